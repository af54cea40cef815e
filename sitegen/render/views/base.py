"""The interface every view implements (see the package docstring)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ..pages import Page, RenderOptions

if TYPE_CHECKING:  # pragma: no cover
    from ...context import BuildContext
    from ...passes.base import Result
    from ...planning import SiteItem, SizeSamples


class View:
    name: str = ""
    channel_partial: str | None = None
    """Template (e.g. ``_channel_attribution.html``) included on every channel page, given
    ``page.extras[name]``; None for views without channel-page content."""
    layer_partial: str | None = None
    """Template included on every layer page above its tiles, given ``page.extras[name]`` (from
    ``layer_context``); None for views without layer-page content."""
    index_partial: str | None = None
    """Template included on the atlas's index page below the layer table, given
    ``page.extras[name]``; None for views without index-page content."""

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

    def layer_context(self, ctx: "BuildContext", atlas: dict, results: dict, li: int) -> dict[str, Any]:
        return {}

    def index_context(self, ctx: "BuildContext", atlas: dict, results: dict) -> dict[str, Any]:
        return {}

    def pages(self, ctx: "BuildContext", atlas: dict, results: dict, opts: "RenderOptions") -> list["Page"]:
        return []

    def draw(self, ctx: "BuildContext", atlas: dict, results: dict, out: Path, opts: "RenderOptions") -> None:
        """Write the view's pictures under ``out``."""
        for job in self.draw_jobs(ctx, atlas, results, out, opts):
            job()

    def draw_jobs(self, ctx: "BuildContext", atlas: dict, results: dict, out: Path,
                  opts: "RenderOptions") -> list[Callable[[], Any]]:
        """The view's drawing as independent jobs, which the renderer runs on several processes at
        once: each writes files no other job (of this view or another) writes, or writes them with
        the same bytes (the colour bar the occlusion and activation views share).  The default is one
        job, :meth:`draw`; a view with many pictures overrides this (and not ``draw``) to split them."""
        if type(self).draw is View.draw:
            return []
        return [lambda: self.draw(ctx, atlas, results, out, opts)]

    def estimate(self, ctx: "BuildContext", sizes: "SizeSamples") -> list["SiteItem"] | None:
        """The files this view will write for ``ctx`` (config, selected layers, images), estimated
        before any pass runs: a list of :class:`~sitegen.planning.SiteItem` (empty when the view
        will not be shown).  Pictures are measured by drawing a few with the view's own code from
        ``sizes`` (real images); see :mod:`sitegen.render.estimate`.  A view that does not override
        this is reported as having no estimate, never counted as zero bytes."""
        return None
