"""Bad input gets a clear Python exception naming the problem, and the layer's state is untouched."""
import pytest
import torch

import cmbn_ext
from conftest import assert_same_state, state_of


@pytest.fixture(params=["cumulative", "sliding", "ema"])
def layer_mid_window(request):
    layer = cmbn_ext.CrossMiniBatchNorm2d(4, mode=request.param, window=3)
    layer(torch.randn(2, 4, 3, 3))
    return layer


@pytest.mark.parametrize("x,error,message", [
    (torch.randn(2, 4, 3), ValueError, "expected 4D input"),
    (torch.randn(2, 4, 3, 3, 3), ValueError, "expected 4D input"),
    (torch.randn(2, 5, 3, 3), ValueError, "expected 4 channels"),
    (torch.ones(2, 4, 3, 3, dtype=torch.int64), TypeError, "floating-point"),
    (torch.ones(2, 4, 3, 3, dtype=torch.bool), TypeError, "floating-point"),
    (torch.randn(2, 4, 3, 3, dtype=torch.complex64), TypeError, "floating-point"),
    (torch.empty(2, 4, 3, 3, device="meta"), RuntimeError, "input is on meta"),
    ([[1.0]], TypeError, "expected a tensor"),
    (torch.randn(1, 4, 1, 1), ValueError, None),  # one value per channel without history: see below
])
def test_bad_input(layer_mid_window, x, error, message):
    before = state_of(layer_mid_window)
    if message is None:  # legal with history (the fixture has some), so it must not raise
        layer_mid_window(x)
        return
    with pytest.raises(error, match=message):
        layer_mid_window(x)
    assert_same_state(before, state_of(layer_mid_window))


def test_dims_of_1d_and_3d():
    with pytest.raises(ValueError, match="expected 2D or 3D input"):
        cmbn_ext.CrossMiniBatchNorm1d(4)(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match="expected 5D input"):
        cmbn_ext.CrossMiniBatchNorm3d(4)(torch.randn(2, 4, 3, 3))


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(window=0), ValueError, "window must be >= 1"),
    (dict(window=-2), ValueError, "window must be >= 1"),
    (dict(window=2.0), TypeError, "window must be an int"),
    (dict(window=True), TypeError, "window must be an int"),
    (dict(mode="sliding", window=None), ValueError, "window=None"),
    (dict(mode="batch"), ValueError, "mode must be one of"),
    (dict(grad="autograd"), ValueError, "grad must be one of"),
    (dict(mode="ema", momentum=None), ValueError, "momentum"),
    (dict(mode="ema", momentum=1.5), ValueError, "momentum"),
    (dict(process_group=object()), TypeError, "process_group must be"),
])
def test_bad_options(kwargs, error, message):
    with pytest.raises(error, match=message):
        cmbn_ext.CrossMiniBatchNorm2d(4, **kwargs)


def test_mismatched_checkpoint_is_refused_and_state_kept(layer_mid_window):
    other = cmbn_ext.CrossMiniBatchNorm2d(5)
    before = state_of(layer_mid_window)
    with pytest.raises(RuntimeError, match="size mismatch"):
        layer_mid_window.load_state_dict(other.state_dict())
    assert_same_state(before, state_of(layer_mid_window))


def test_options_after_construction():
    layer = cmbn_ext.CrossMiniBatchNorm2d(4, mode="sliding", window=3)
    with pytest.raises(AttributeError, match="mode is fixed"):
        layer.mode = "ema"
    with pytest.raises(AttributeError, match="fixed at construction"):
        layer.window = 5
    with pytest.raises(ValueError, match="grad must be one of"):
        layer.grad = "autograd"
    layer.grad = "exact"
    cumulative = cmbn_ext.CrossMiniBatchNorm2d(4, window=3)
    cumulative.window = None  # a cumulative window may change: it only decides when to commit
    with pytest.raises(ValueError, match="window must be >= 1"):
        cumulative.window = 0
    assert (layer.grad, cumulative.window) == ("exact", None)


def test_ema_momentum_none_is_named_and_state_kept():
    layer = cmbn_ext.CrossMiniBatchNorm2d(4, mode="ema", momentum=0.1)
    layer(torch.randn(2, 4, 3, 3))
    layer.momentum = None
    before = state_of(layer)
    with pytest.raises(ValueError, match="momentum"):
        layer(torch.randn(2, 4, 3, 3))
    assert_same_state(before, state_of(layer))
