"""Fitting an atlas into a byte budget: which parts to leave out, in a fixed order.

Pure functions over a plan: the estimated files (:class:`~sitegen.planning.SiteItem`) and an
ordered list of :class:`Reduction` steps, each leaving something out (some layers, one
attribution method's sprite rows) or shrinking it (feature-visualisation images drawn smaller).
:func:`fit` applies the steps in order until the total fits and returns what it applied; nothing
here measures, reads a model or prints.  :mod:`sitegen.plan` builds the items and the steps from
the real estimates and turns the applied steps into the build's settings.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from .planning import SiteItem, human_bytes, total


@dataclass(frozen=True)
class Reduction:
    """One step of the reduction order."""

    group: str
    """What kind of step (the summary groups by it): ``attribution rows``, ``convolutions inside
    residual blocks``, ``feature-visualisation images``, ..."""
    label: str
    """What this step leaves out or shrinks, for the list (a layer's name, ``the gradient row``)."""
    restore: str
    """The flag or config key that brings it back."""
    layers: tuple[str, ...] = ()
    """Layers it leaves out: every item of theirs goes."""
    tags: tuple[str, ...] = ()
    """Items with these tags go."""
    replace: tuple[SiteItem, ...] = ()
    """Items that take the place of those with the same key (smaller versions); an item whose key
    is no longer in the plan (its layer already left out) is not added back."""
    setting: tuple[str, Any] | None = None
    """The config change this step stands for (``("featurevis.image_size", 64)``); a later step
    with the same key overrides it."""


@dataclass
class Fitted:
    """What :func:`fit` decided."""

    items: list[SiteItem]
    applied: list[Reduction]
    bytes: float
    files: int
    limit: int
    """The budget in bytes; 0 means none."""
    before: float = 0.0
    """Bytes of the plan before any step."""
    fits: bool = True

    @property
    def left_out_layers(self) -> list[str]:
        return [name for r in self.applied for name in r.layers]

    def settings(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for r in self.applied:
            if r.setting is not None:
                out[r.setting[0]] = r.setting[1]
        return out


def apply(items: Sequence[SiteItem], step: Reduction) -> list[SiteItem]:
    """``items`` after one step."""
    layers, tags = set(step.layers), set(step.tags)
    kept = [i for i in items if not (i.layer and i.layer in layers) and not (i.tag and i.tag in tags)]
    if not step.replace:
        return kept
    new = {r.key: r for r in step.replace}
    return [new.get(i.key, i) for i in kept]


def fit(items: Sequence[SiteItem], steps: Sequence[Reduction], limit: int) -> Fitted:
    """Apply ``steps`` in order, each only while the plan is still over ``limit`` bytes, and stop as
    soon as it fits.  ``limit`` 0 applies nothing.  A step that saves nothing (its layer is not in
    the plan) is skipped, so the list of what was left out names only real savings."""
    current = list(items)
    files, size = total(current)
    before = size
    applied: list[Reduction] = []
    if limit > 0:
        for step in steps:
            if size <= limit:
                break
            after = apply(current, step)
            f2, s2 = total(after)
            if s2 >= size and f2 >= files:
                continue  # nothing of it is in the plan
            current, files, size = after, f2, s2
            applied.append(step)
    return Fitted(items=current, applied=applied, bytes=size, files=files, limit=limit, before=before,
                  fits=limit <= 0 or size <= limit)


def saving(items: Sequence[SiteItem], step: Reduction) -> float:
    """Bytes one step would save applied alone to ``items``."""
    return total(items)[1] - total(apply(items, step))[1]


def summary(items: Sequence[SiteItem], applied: Iterable[Reduction]) -> list[dict[str, Any]]:
    """The applied steps grouped for the terminal and the index page: per group, what went, how to
    bring it back and how many bytes it saved (each step measured on the plan as it was then)."""
    groups: dict[str, dict[str, Any]] = {}
    current = list(items)
    for step in applied:
        saved = saving(current, step)
        current = apply(current, step)
        g = groups.setdefault(step.group, {"group": step.group, "what": [], "restore": step.restore, "bytes": 0.0})
        if step.replace:  # a smaller version replaces the last one: only the final choice is news
            g["what"] = [step.label]
        else:
            g["what"].append(step.label)
        g["bytes"] += saved
        g["restore"] = step.restore  # the last step's wording covers all of the group's
    return [{**g, "saved": human_bytes(g["bytes"])} for g in groups.values()]


def describe(group: dict[str, Any], shown: int = 6) -> str:
    """One line: ``convolutions inside residual blocks (22): layer1.0.conv1, … — saves 1.1 GB``."""
    what = group["what"]
    names = ", ".join(what[:shown]) + (f", … ({len(what) - shown} more)" if len(what) > shown else "")
    n = f" ({len(what)})" if len(what) > 1 else ""
    return f"{group['group']}{n}: {names} — saves {group['saved']}"

