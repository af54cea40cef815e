"""Views: each analysis's pages and pictures, one file each, added to the atlas by registration.

A view reads pass results (never computes an analysis) and may
 - add whole pages (``pages``) and draw their pictures (``draw``),
 - add rows to every channel's sprite sheet (``sprite_rows``: e.g. guided backprop beside each patch),
 - add a partial template and its data to every channel page (``channel_partial``/``channel_context``),
 - add a partial template and its data to the index page (``index_partial``/``index_context``),
 - add a partial template and its data to every layer page (``layer_partial``/``layer_context``),
 - put a link on the index page and in the header (``nav``).
"""
from __future__ import annotations

from .base import View

__all__ = ["View", "registered"]


def registered() -> list[View]:
    """Every view, in the order their links appear.  Add a new view here."""
    from .activations import ActivationsView
    from .attribution import AttributionView
    from .compare import CompareView
    from .correspondence import CorrespondenceView
    from .featurevis import FeatureVisView
    from .image_pages import ImagePagesView
    from .kernels import KernelsView
    from .occlusion import OcclusionView
    from .sanity import SanityView
    from .tsne import TsneView

    # AttributionView first among the views that add sprite rows: its method rows must be rows 1, 2, 3
    # (row 0 = patches).  CompareView adds none; first, its partial follows the top-k row directly.
    return [CompareView(), AttributionView(), SanityView(), FeatureVisView(), CorrespondenceView(),
            OcclusionView(), TsneView(), KernelsView(), ActivationsView(), ImagePagesView()]
