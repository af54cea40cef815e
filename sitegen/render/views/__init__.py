"""Views: each analysis's pages and pictures, one file each, added to the atlas by registration.

A view reads pass results (never computes an analysis) and may
 - add whole pages (``pages``) and draw their pictures (``draw``),
 - add rows to every channel's sprite sheet (``sprite_rows``: e.g. guided backprop beside each patch),
 - add a partial template and its data to every channel page (``channel_partial``/``channel_context``),
 - put a link on the index page and in the header (``nav``).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from ...context import BuildContext
    from ...passes.base import Result
    from ..site import Page, RenderOptions


class View:
    name: str = ""
    channel_partial: str | None = None
    """Template (e.g. ``_channel_attribution.html``) included on every channel page, given
    ``page.extras[name]``; None for views without channel-page content."""

    def available(self, results: dict[str, "Result"]) -> bool:
        """False when the passes this view reads did not run (the view is then left out)."""
        return True

    def nav(self) -> list[tuple[str, str]]:
        """(url relative to the site root, text) links for the index page and header."""
        return []

    def sprite_rows(self, ctx: "BuildContext", atlas: dict, results: dict, li: int, c: int,
                    patch_boxes: list[tuple[int, int, int, int]]) -> list[list[np.ndarray]]:
        return []

    def channel_context(self, ctx: "BuildContext", atlas: dict, results: dict, li: int, c: int) -> dict[str, Any]:
        return {}

    def pages(self, ctx: "BuildContext", atlas: dict, results: dict, opts: "RenderOptions") -> list["Page"]:
        return []

    def draw(self, ctx: "BuildContext", atlas: dict, results: dict, out: Path, opts: "RenderOptions") -> None:
        pass


def registered() -> list[View]:
    """Every view, in the order their links appear.  Add a new view here."""
    from .activations import ActivationsView
    from .attribution import AttributionView
    from .correspondence import CorrespondenceView
    from .featurevis import FeatureVisView
    from .image_pages import ImagePagesView
    from .kernels import KernelsView
    from .occlusion import OcclusionView
    from .tsne import TsneView

    # AttributionView first: its method rows must be sprite rows 1, 2, 3 (row 0 = patches).
    return [AttributionView(), FeatureVisView(), CorrespondenceView(),
            OcclusionView(), TsneView(), KernelsView(), ActivationsView(), ImagePagesView()]
