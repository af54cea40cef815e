"""Residual stages among the selected layers: the blocks of a stage grouped at the stage's width, with
their inner branch layers and Caffe names (res5a → res5b → res5c).  Below the views: the attribution
view draws the stage pages, the sanity view sizes its lines on them."""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..layers import LayerInfo
from .pages import slug

if TYPE_CHECKING:  # pragma: no cover
    from ..context import BuildContext


@dataclass
class Stage:
    """The blocks of one residual stage that share a width, in order."""

    stage: str
    caffe: str
    width: int
    blocks: list[LayerInfo]
    branches: dict[str, str]
    """Block name -> its branch layer's name, when that layer is selected and of the same width."""
    branch_caffe: dict[str, str]
    left_out: list[LayerInfo] = field(default_factory=list)
    """Blocks of the stage with another width (their channel c is a different feature map)."""

    @property
    def slug(self) -> str:

        return slug(self.stage)


def _caffe_stage(caffe: str) -> str:
    m = re.match(r"res\d+", caffe)
    return m.group(0) if m else ""


def find_stages(ctx: "BuildContext", selected: list[str]) -> list[Stage]:
    """Residual stages among the selected layers: blocks grouped by stage, of the stage's width.

    A stage's width is the most common channel count of its selected blocks (ties: the last
    block's, the stage's output width); only blocks of that width are compared.
    """
    chosen = set(selected)
    infos = [ctx.layer(n) for n in selected]
    stages: dict[str, list[LayerInfo]] = {}
    for info in infos:
        if info.kind == "block" and info.stage:
            stages.setdefault(info.stage, []).append(info)
    out = []
    for stage, blocks in stages.items():
        counts = Counter(b.channels for b in blocks)
        best = max(counts.values())
        width = next(b.channels for b in reversed(blocks) if counts[b.channels] == best)
        same = [b for b in blocks if b.channels == width]
        branches, branch_caffe = {}, {}
        for b in same:
            if b.branch and b.branch in chosen and ctx.layer(b.branch).channels == width:
                branches[b.name] = b.branch
                branch_caffe[b.name] = _branch_caffe(ctx, b)
        out.append(Stage(stage, _caffe_stage(same[0].caffe), width, same, branches, branch_caffe,
                         [b for b in blocks if b.channels != width]))
    return out


def _branch_caffe(ctx: "BuildContext", block: LayerInfo) -> str:
    """Caffe name of the block's last branch convolution: ``res4c_branch2b`` for a basic block's
    second convolution, ``..._branch2c`` for a bottleneck's third."""
    convs = [l for l in ctx.all_layers if l.kind == "conv" and l.name.startswith(block.name + ".")
             and "downsample" not in l.name and "shortcut" not in l.name]
    if not block.caffe or not convs or len(convs) > 26:
        return ""
    return f"{block.caffe}_branch2{'abcdefghijklmnopqrstuvwxyz'[len(convs) - 1]}"
