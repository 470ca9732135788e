"""Checkpoints both ways: BatchNorm -> CmBN loads strictly; CmBN -> BatchNorm through
``batchnorm_state_dict`` (the open window committed, the model unchanged), or through ``end_window`` and
``revert_to_batchnorm``; and what ``load_state_dict(strict=False)`` of a CmBN checkpoint into a BatchNorm
model loses."""
import copy

import pytest
import torch

import cmbn_ext
from conftest import assert_same_state, state_of

# (mode, window, running_stats): every mode, window=None, and Darknet's running statistics
CONFIGS = [("cumulative", 4, "window"), ("cumulative", None, "window"), ("deferred", 4, "window"),
           ("sliding", 4, "window"), ("ema", 4, "window"), ("cumulative", 4, "micro_batch"),
           ("deferred", None, "micro_batch")]


def batchnorm_model():
    """Two BatchNorm2d layers, one of them used twice (so it is in the state dict under two names),
    and a BatchNorm1d without affine parameters."""
    shared = torch.nn.BatchNorm2d(4)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), shared, torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 1), shared,
        torch.nn.BatchNorm2d(4, momentum=None), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.BatchNorm1d(4, affine=False))


def trained_cmbn_model(mode, window, running_stats, micro_batches=2):
    """A converted model after one full step of 4 micro-batches, then ``micro_batches`` more: with
    ``window`` 4 (or ended by hand when None) the last ones are an open window."""
    model = cmbn_ext.convert_batchnorm(batchnorm_model(), mode=mode, window=window,
                                       running_stats=running_stats,
                                       **({"momentum": 0.4} if mode == "ema" else {}))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for count in (4, micro_batches):
        for _ in range(count):
            model(torch.randn(2, 3, 5, 5) * 3 + 1).square().mean().backward()
        if count == 4:
            optimizer.step()
            optimizer.zero_grad()
            cmbn_ext.end_window(model)
    return model


def assert_same_state_dict(actual, expected):
    assert list(actual) == list(expected)
    for key in expected:
        assert actual[key].dtype == expected[key].dtype and torch.equal(actual[key], expected[key]), key
    assert actual._metadata == expected._metadata


@pytest.mark.parametrize("mode,window,running_stats", CONFIGS)
def test_batchnorm_state_dict_is_end_window_then_revert(mode, window, running_stats):
    model = trained_cmbn_model(mode, window, running_stats)
    before = state_of(model)
    open_steps = [layer.window_step.item() for layer in model.modules()
                  if isinstance(layer, cmbn_ext.CrossMiniBatchNorm2d)]

    state = cmbn_ext.batchnorm_state_dict(model)

    # the model is as it was: same classes, same state, the window still open
    assert_same_state(state_of(model), before)
    assert open_steps == [layer.window_step.item() for layer in model.modules()
                          if isinstance(layer, cmbn_ext.CrossMiniBatchNorm2d)]
    assert all(isinstance(model[i], cmbn_ext.CrossMiniBatchNorm2d) for i in (1, 4, 5))
    assert not any("window_" in key for key in state)

    # bit for bit what ending the window and reverting gives, metadata included
    reverted = copy.deepcopy(model)
    cmbn_ext.end_window(reverted)
    reverted = cmbn_ext.revert_to_batchnorm(reverted)
    assert_same_state_dict(state, reverted.state_dict())

    # and it loads strictly into the BatchNorm model
    target = batchnorm_model()
    target.load_state_dict(state, strict=True)


def test_the_committed_window_is_batchnorm_over_its_micro_batches():
    """The open window's micro-batches reach the running statistics as BatchNorm's one update over them
    concatenated would: the independent expectation of the commit."""
    layer = cmbn_ext.CrossMiniBatchNorm2d(3, window=4)
    bn = torch.nn.BatchNorm2d(3)
    micro_batches = [torch.randn(2, 3, 4, 4) * 2 + 1 for _ in range(3)]
    for x in micro_batches:
        layer(x)
    bn(torch.cat(micro_batches))
    state = cmbn_ext.batchnorm_state_dict(layer)
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(state[name], getattr(bn, name), rtol=1e-5, atol=1e-6)
    assert state["num_batches_tracked"].item() == 1
    assert layer.num_batches_tracked.item() == 0 and layer.window_step.item() == 3  # still open


@pytest.mark.parametrize("mode", ["cumulative", "deferred", "sliding", "ema"])
def test_batchnorm_checkpoint_loads_strictly_into_the_converted_model(mode):
    bn_model = batchnorm_model()
    for _ in range(3):
        bn_model(torch.randn(4, 3, 5, 5) + 2)
    model = cmbn_ext.convert_batchnorm(batchnorm_model(), mode=mode, window=4,
                                       **({"momentum": 0.4} if mode == "ema" else {}))
    model(torch.randn(2, 3, 5, 5))  # mid-window: the BatchNorm checkpoint brings an empty window
    model.load_state_dict(bn_model.state_dict(), strict=True)
    for key, value in bn_model.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert all(layer.window_step.item() == 0 for layer in model.modules()
               if isinstance(layer, cmbn_ext.CrossMiniBatchNorm2d))
    # and back: with nothing open, the BatchNorm checkpoint comes back unchanged
    assert_same_state_dict(cmbn_ext.batchnorm_state_dict(model), bn_model.state_dict())


@pytest.mark.parametrize("mode,window,running_stats", CONFIGS)
def test_strict_false_loses_exactly_the_open_window(mode, window, running_stats):
    """A CmBN checkpoint loaded into a BatchNorm model with strict=False: the window_* entries are
    unexpected and dropped, so the running statistics lack the open window's micro-batches (cumulative
    and deferred modes, window per window); everything else arrives."""
    model = trained_cmbn_model(mode, window, running_stats)
    target = batchnorm_model()
    result = target.load_state_dict(model.state_dict(), strict=False)
    assert result.missing_keys == []
    assert sorted(result.unexpected_keys) == sorted(key for key in model.state_dict() if "window_" in key)

    loaded = target.state_dict()
    committed = cmbn_ext.batchnorm_state_dict(model)
    uncommitted = {key: value for key, value in model.state_dict().items() if "window_" not in key}
    assert_same_state(loaded, uncommitted)  # what the model held, less its window
    window_lost = mode in ("cumulative", "deferred") and running_stats == "window"
    differs = [key for key in loaded if not torch.equal(loaded[key], committed[key])]
    if window_lost:  # the open window's micro-batches are not in the running statistics
        assert differs and all(key.rsplit(".", 1)[1] in ("running_mean", "running_var",
                                                         "num_batches_tracked") for key in differs)
    else:  # their running statistics hold every micro-batch already
        assert differs == []


def test_a_model_without_cmbn_layers_gives_its_own_state_dict():
    model = batchnorm_model()
    model(torch.randn(4, 3, 5, 5))
    assert_same_state_dict(cmbn_ext.batchnorm_state_dict(model), model.state_dict())


def test_timm_norm_act_layers_revert_to_their_checkpoint():
    pytest.importorskip("timm")
    from timm.layers import BatchNormAct2d

    original = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), BatchNormAct2d(4, act_layer=torch.nn.ReLU))
    model = cmbn_ext.convert_batchnorm(copy.deepcopy(original), window=4)
    for _ in range(2):
        model(torch.randn(2, 3, 4, 4))
    state = cmbn_ext.batchnorm_state_dict(model)
    original.load_state_dict(state, strict=True)
    reverted = copy.deepcopy(model)
    cmbn_ext.end_window(reverted)
    assert type(cmbn_ext.revert_to_batchnorm(reverted)[1]) is BatchNormAct2d
    assert_same_state_dict(state, reverted.state_dict())
