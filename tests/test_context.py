"""BuildContext.batch_size: the requested size, else one that fits the free memory."""
from __future__ import annotations

import pytest
import torch

import sitegen.context as context_mod
from sitegen.build import prepare
from sitegen.config import from_dict


def _ctx(tmp_path, make_images, tiny_checkpoint, paths):
    make_images(tmp_path / "imgs", 4, size=16, classes=1)
    return prepare(tiny_checkpoint, tmp_path / "imgs", from_dict({"model": {"arch": paths["tiny_arch"]}}), None)


def test_batch_size_fits_the_free_memory(tmp_path, make_images, tiny_checkpoint, paths, monkeypatch):
    ctx = _ctx(tmp_path, make_images, tiny_checkpoint, paths)
    per_image = ctx.bytes_per_image()
    # Independently: 3 float32 copies of every discovered layer's output and of the input.
    expected = 12 * (sum(c * h * w for c, h, w in (l.shape for l in ctx.all_layers)) + 16 * 16)
    assert per_image == expected
    assert ctx.batch_size(7) == 7  # an explicit size always wins

    monkeypatch.setattr(context_mod, "available_memory", lambda device: 10 ** 12)
    assert ctx.batch_size() == (256 if ctx.device.type == "cuda" else 64)  # capped
    share = context_mod.MEMORY_SHARE[ctx.device.type]
    monkeypatch.setattr(context_mod, "available_memory", lambda device: int(10 * per_image / share))
    assert ctx.batch_size() == 10
    monkeypatch.setattr(context_mod, "available_memory", lambda device: 0)
    assert ctx.batch_size() == 1  # never zero


def test_available_memory_is_plausible():
    free = context_mod.available_memory(torch.device("cpu"))
    assert 1 << 20 < free < 1 << 50


class _ViewNet(torch.nn.Module):
    """A hand-written model that flattens with .view(), as many tutorials' VGG-style models do."""

    def __init__(self, flatten_with_view: bool):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4 * 8 * 8, 2)
        self.flatten_with_view = flatten_with_view

    def forward(self, x):
        x = torch.relu(self.conv(x))
        x = x.view(x.size(0), -1) if self.flatten_with_view else torch.flatten(x, 1)
        return self.fc(x)


def test_channels_last_only_for_models_that_accept_it(tmp_path, make_images, tiny_checkpoint, paths):
    cpu = torch.device("cpu")
    assert context_mod.channels_last_works(_ViewNet(False), (8, 8), cpu)
    view_net = _ViewNet(True)
    with pytest.raises(RuntimeError):  # the failure the check protects against
        view_net(torch.zeros(2, 3, 8, 8).contiguous(memory_format=torch.channels_last))
    assert not context_mod.channels_last_works(view_net, (8, 8), cpu)
    assert view_net.training and all(p.requires_grad for p in view_net.parameters())  # left as found
    ctx = _ctx(tmp_path, make_images, tiny_checkpoint, paths)
    if ctx.device.type == "cpu":  # NCHW on the CPU, whatever the model
        assert not ctx.channels_last
        assert all(b.inputs.is_contiguous() for b in ctx.batches())


def test_channels_last_is_decided_when_the_context_is_made(tmp_path, make_images, tiny_checkpoint, paths,
                                                           monkeypatch):
    """Probing later, inside a pass, would run the probe through that pass's hooks and early stop
    (the dataset pass died on every GPU that way).  The decision is taken once, at construction."""
    import dataclasses

    calls = []
    monkeypatch.setattr(context_mod, "channels_last_works", lambda *a: calls.append(a) or True)
    ctx = _ctx(tmp_path, make_images, tiny_checkpoint, paths)
    gpu_like = dataclasses.replace(ctx, device=torch.device("cuda"), _channels_last=None)
    assert calls and gpu_like.channels_last  # probed when made, as on a GPU
    n = len(calls)
    assert gpu_like.channels_last and len(calls) == n  # never again
    assert not dataclasses.replace(ctx, device=torch.device("cpu"), _channels_last=None).channels_last
    assert len(calls) == n  # no probe on the CPU


def test_cache_identity_includes_every_layers_field(tmp_path, make_images, tiny_checkpoint, paths):
    """Crop windows come from the fields: results cut at other windows must not be reused."""
    import dataclasses

    from sitegen.fields import ReceptiveField

    ctx = _ctx(tmp_path, make_images, tiny_checkpoint, paths)
    before = ctx.identity()
    first = ctx.layers[0]
    ctx.layers[0] = dataclasses.replace(first, rf=ReceptiveField(first.rf.size + 2, first.rf.stride, first.rf.offset - 1))
    assert ctx.identity() != before and ctx.identity()["layers"] == before["layers"]


def test_backward_passes_layout(tmp_path, make_images, tiny_checkpoint, paths, monkeypatch):
    """The passes that run a backward take NHWC inputs on the CPU where the model accepts them
    (probed once per image size, then kept); the dataset pass's batches stay NCHW."""
    import dataclasses

    ctx = _ctx(tmp_path, make_images, tiny_checkpoint, paths)
    if ctx.device.type != "cpu":
        pytest.skip("the CPU's choice")
    x = next(ctx.batches()).inputs
    assert x.is_contiguous()
    assert ctx.backward_channels_last()  # the tiny model accepts NHWC
    assert ctx.backward_inputs(x).is_contiguous(memory_format=torch.channels_last)
    calls = []
    monkeypatch.setattr(context_mod, "channels_last_works", lambda *a: calls.append(a) or False)
    fresh = dataclasses.replace(ctx, _backward_layout={})
    assert not fresh.backward_channels_last() and fresh.backward_inputs(x).is_contiguous()
    other = tuple(2 * s for s in ctx.input_size)
    assert not fresh.backward_channels_last(other)
    fresh.backward_inputs(x)
    assert [a[1] for a in calls] == [tuple(ctx.input_size), other]  # one probe per size
