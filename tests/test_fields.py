"""The gradient probe (sitegen.fields.probe_field): fields it measures where the arithmetic's answer
is known by hand, on models built to break a probe whose numbers leave their range."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from sitegen.fields import ReceptiveField, probe_field, probe_model


class DeepChain(nn.Module):
    """``depth`` 3×3 convolutions of one channel.  The gradient reaching the far edge of the last
    one's field takes the edge row of every kernel, about a third of the row's weight each, so it
    is about 3^-depth: 3^-100 ≈ 2e-48 is below the smallest float32 (1.4e-45)."""

    def __init__(self, depth: int = 100):
        super().__init__()
        self.convs = nn.Sequential(*[nn.Conv2d(1, 1, 3, padding=1) for _ in range(depth)])

    def forward(self, x):
        return self.convs(x)


def test_a_deep_field_is_not_cut_short_by_underflow():
    model = DeepChain(100)
    probe = probe_model(model)
    # 100 convolutions of 3×3, stride 1, padding 1: 1 + 2·100 px, offset -100.
    assert probe_field(probe, "convs.99", 1, (32, 32)) == ReceptiveField(201, 1, -100)
    # The same probe in float32 loses the field's edges: what the float64 default is for.
    short = probe_field(probe_model(model, dtype=torch.float32), "convs.99", 1, (32, 32))
    assert short is not None and short.size < 201


class GatedResidual(nn.Module):
    """Residual blocks, each followed by a squeeze-and-excitation style gate (the map's mean).  The
    residual sum doubles the magnitudes and the gate, about the map's mean, squares them: a probe
    keeping the gates' values overflows float64 by the tenth block."""

    def __init__(self, blocks: int = 12):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(2, 2, 3, padding=1) for _ in range(blocks))

    def forward(self, x):
        x = x[:, :2]
        for conv in self.convs:
            x = x + conv(x)
            x = x * torch.sigmoid(x.mean((2, 3), keepdim=True))
        return x


def test_gates_do_not_overflow_the_probe():
    probe = probe_model(GatedResidual(12))
    # The residual sums add nothing beyond the convolutions: 12 of 3×3 give 25 px, offset -12.
    assert probe_field(probe, "convs.11", 3, (32, 32)) == ReceptiveField(25, 1, -12)


class Squares(nn.Module):
    """A product of a map with itself after each residual block (not a gate: nothing to set to 1),
    behind a pixel_unshuffle the arithmetic cannot follow: the probe's magnitudes square block
    after block until float64 overflows."""

    def __init__(self, blocks: int = 12):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1) for _ in range(blocks))

    def forward(self, x):
        x = nn.functional.pixel_unshuffle(x[:, :1], 2)
        for conv in self.convs:
            x = x + conv(x)
            x = x * x
        return x


def test_an_overflowing_probe_is_an_error_not_an_empty_field():
    """A NaN gradient is not > 0: unchecked, it would read as a unit that sees nothing."""
    from sitegen.errors import LayerError
    from sitegen.layers import discover

    with pytest.raises(LayerError) as e:
        discover(Squares(12), (3, 32, 32))
    assert "not measurable" in str(e.value) and "overflowed" in str(e.value) and "pixel_unshuffle" in str(e.value)
