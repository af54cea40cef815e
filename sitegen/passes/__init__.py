"""Analysis passes: one file each, behind the small interface in :mod:`sitegen.passes.base`.

``default_passes`` lists what a build runs, in order; later passes may read earlier results
through ``ctx.results``.
"""
from __future__ import annotations

from ..config import Config
from .base import AnalysisPass


def default_passes(cfg: Config) -> list[AnalysisPass]:
    from .topk import TopKPass

    return [TopKPass(cfg.topk)]
