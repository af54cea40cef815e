"""Analysis passes: one file each, behind the small interface in :mod:`sitegen.passes.base`.

``default_passes`` lists what a build runs, in order; later passes may read earlier results
through ``ctx.results``.
"""
from __future__ import annotations

from ..config import Config
from .base import AnalysisPass


def default_passes(cfg: Config) -> list[AnalysisPass]:
    from .activations import ActivationsPass
    from .correspondence import CorrespondenceConfig, CorrespondencePass
    from .featurevis import FeatureVisPass
    from .kernels import KernelsPass
    from .occlusion import OcclusionPass
    from .topk import TopKPass
    from .tsne import TsnePass

    passes: list[AnalysisPass] = [TopKPass(cfg.topk)]
    if cfg.compare.checkpoint:
        # A comparison build: the dataset pass reads the images once for both models.
        from .compare import CompareTopKPass

        passes = [CompareTopKPass(cfg.topk, cfg.compare, cfg.tsne)]
    # Attributions of every top-k unit: reads the topk result, so it comes right after it.
    if cfg.attribution.enabled:
        from .attribution import AttributionPass

        passes.append(AttributionPass(cfg.attribution))
        # The checks of those pictures (weights randomised, other images, edges) read both results.
        if cfg.sanity.enabled:
            from .sanity import SanityPass

            passes.append(SanityPass(cfg.sanity))
    # Whole-model views: each its own pass, each switched off by `enabled = false`.
    if cfg.occlusion.enabled:
        passes.append(OcclusionPass(cfg.occlusion, cfg.samples))
    if cfg.tsne.enabled:
        passes.append(TsnePass(cfg.tsne))
    if cfg.kernels.enabled:
        passes.append(KernelsPass(cfg.kernels))
    if cfg.activations.enabled:
        passes.append(ActivationsPass(cfg.activations, cfg.samples))
    # Feature visualisation (expensive: gradient ascent per channel) and the layer correspondence
    # read off the top-k sets (cheap, always on).
    if cfg.featurevis.enabled:
        passes.append(FeatureVisPass(cfg.featurevis))
    passes.append(CorrespondencePass(CorrespondenceConfig(topk=cfg.topk)))
    if cfg.compare.checkpoint:
        # What changed from the old checkpoint: after t-SNE, whose map the old codes' map is laid over.
        from .compare import ComparePass, OldFeatureVisPass

        if cfg.featurevis.enabled:
            passes.append(OldFeatureVisPass(cfg.featurevis))
        passes.append(ComparePass(cfg.compare, cfg.topk, cfg.tsne))
    return passes
