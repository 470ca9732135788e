"""Sliding and EMA modes against their closed forms; window control; running statistics; edge cases
(deferred mode's own checks are in test_deferred_mode.py)."""
import math

import pytest
import torch

import cmbn_ext
from conftest import assert_same_state, bn_forward, bn_stats, state_of


def _layer(**kwargs):
    layer = cmbn_ext.CrossMiniBatchNorm2d(4, **kwargs).double()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(4))
        layer.bias.copy_(torch.randn(4))
    return layer


def _batches(count, n=2):
    return [torch.randn(n, 4, 3, 3, dtype=torch.float64) * (1 + i % 3) + i for i in range(count)]


def test_sliding_pools_the_previous_window_minus_one_micro_batches():
    k = 3
    layer = _layer(mode="sliding", window=k)
    bn = torch.nn.BatchNorm2d(4).double()
    batches = _batches(7)
    for t, x in enumerate(batches):
        seen = torch.cat(batches[max(0, t - k + 1): t + 1])
        y = layer(x)
        torch.testing.assert_close(y, bn_forward(seen, layer.weight, layer.bias)[-len(x):])
        bn(seen)  # BatchNorm's running update from the pooled statistics, on every micro-batch
        torch.testing.assert_close(layer.running_mean, bn.running_mean)
        torch.testing.assert_close(layer.running_var, bn.running_var)
    assert layer.num_batches_tracked.item() == len(batches)


def test_sliding_window_one_is_batchnorm():
    layer = _layer(mode="sliding", window=1)
    for x in _batches(3):
        torch.testing.assert_close(layer(x), bn_forward(x, layer.weight, layer.bias))


def _ema_expected(batches, momentum):
    mean = var = None
    for x in batches:
        mb, vb = bn_stats(x)
        if mean is None:
            mean, var = mb, vb
            continue
        new_mean = (1 - momentum) * mean + momentum * mb
        var = (1 - momentum) * (var + (mean - new_mean) ** 2) + momentum * (vb + (mb - new_mean) ** 2)
        mean = new_mean
    return mean, var


def test_ema_closed_form_and_eval_uses_the_same_statistics():
    momentum = 0.2
    layer = _layer(mode="ema", momentum=momentum)
    batches = _batches(5)
    for t, x in enumerate(batches):
        y = layer(x)
        mean, var = _ema_expected(batches[: t + 1], momentum)
        expected = torch.nn.functional.batch_norm(x, mean, var, layer.weight, layer.bias, False, 0.0, layer.eps)
        torch.testing.assert_close(y, expected)
        torch.testing.assert_close(layer.running_mean, mean)
        torch.testing.assert_close(layer.running_var, var)  # biased: the same numbers as training
        assert layer.num_batches_tracked.item() == t + 1  # one per training micro-batch
        layer(torch.randn(0, 4, 3, 3, dtype=torch.float64))  # an empty one: none
        assert layer.num_batches_tracked.item() == t + 1
    layer.eval()
    x = batches[-1]
    torch.testing.assert_close(layer(x), y)  # eval normalizes with what the last step used
    assert layer.num_batches_tracked.item() == len(batches)  # eval counts nothing
    layer.train()
    layer.reset_window()
    torch.testing.assert_close(layer.running_mean, mean)  # kept
    assert layer.num_batches_tracked.item() == len(batches)
    x = _batches(1)[0]
    torch.testing.assert_close(layer(x), bn_forward(x, layer.weight, layer.bias))  # starts afresh
    assert layer.num_batches_tracked.item() == len(batches) + 1


def test_window_none_accumulates_until_end_window():
    layer = _layer(window=None)
    bn = torch.nn.BatchNorm2d(4).double()
    batches = _batches(5)
    for t, x in enumerate(batches):
        expected = bn_forward(torch.cat(batches[: t + 1]), layer.weight, layer.bias)[-len(x):]
        torch.testing.assert_close(layer(x), expected)
    assert layer.num_batches_tracked.item() == 0
    assert torch.equal(layer.running_mean, torch.zeros(4, dtype=torch.float64))
    layer.end_window()
    bn(torch.cat(batches))
    torch.testing.assert_close(layer.running_mean, bn.running_mean)
    torch.testing.assert_close(layer.running_var, bn.running_var)
    assert layer.num_batches_tracked.item() == 1
    before = state_of(layer)
    layer.end_window()  # an empty window commits nothing
    assert_same_state(before, state_of(layer))
    x = _batches(1)[0]
    torch.testing.assert_close(layer(x), bn_forward(x, layer.weight, layer.bias))  # a new window


def test_end_window_mid_window_with_fixed_window():
    layer = _layer(window=4)
    bn = torch.nn.BatchNorm2d(4).double()
    batches = _batches(2)
    for x in batches:
        layer(x)
    cmbn_ext.end_window(layer)
    bn(torch.cat(batches))
    torch.testing.assert_close(layer.running_var, bn.running_var)
    assert layer.window_step.item() == 0


def test_reset_window_drops_without_committing():
    layer = _layer(window=3)
    for x in _batches(2):
        layer(x)
    layer.reset_window()
    assert layer.num_batches_tracked.item() == 0
    assert torch.equal(layer.running_var, torch.ones(4, dtype=torch.float64))
    x = _batches(1)[0]
    torch.testing.assert_close(layer(x), bn_forward(x, layer.weight, layer.bias))


@pytest.mark.parametrize("mode", ["cumulative", "sliding", "ema", "deferred"])
def test_track_running_stats_false(mode):
    layer = _layer(mode=mode, window=2, track_running_stats=False)
    assert layer.running_mean is None
    a, b = _batches(2)
    layer(a)
    y = layer(b)
    if mode == "ema":  # training still pools the history
        mean, var = _ema_expected([a, b], layer.momentum)
        expected = torch.nn.functional.batch_norm(b, mean, var, layer.weight, layer.bias, False, 0.0,
                                                  layer.eps)
    elif mode == "deferred":  # each micro-batch alone
        expected = bn_forward(b, layer.weight, layer.bias)
    else:
        expected = bn_forward(torch.cat([a, b]), layer.weight, layer.bias)[len(a):]
    torch.testing.assert_close(y, expected)
    layer.eval()
    before = state_of(layer)
    torch.testing.assert_close(layer(b), bn_forward(b, layer.weight, layer.bias))  # batch alone
    assert_same_state(before, state_of(layer))


def test_eval_does_not_touch_state():
    layer = _layer(window=3)
    layer(_batches(1)[0])
    layer.eval()
    before = state_of(layer)
    layer(_batches(1)[0])
    assert_same_state(before, state_of(layer))


def test_non_finite_micro_batch_never_enters_state_cumulative():
    layer = _layer(window=3)
    good1, bad, good2 = _batches(3)
    bad = bad.clone()
    bad[0, 0, 0, 0] = float("nan")
    bad[1, 2, 1, 1] = float("inf")
    layer(good1)
    y = layer(bad)
    assert torch.isnan(y[:, 0]).all() and not torch.isfinite(y[:, 2]).all()
    clean = [1, 3]  # the channels with finite statistics pool normally
    torch.testing.assert_close(y[:, clean], bn_forward(torch.cat([good1, bad]), layer.weight,
                                                       layer.bias)[2:, clean])
    y = layer(good2)  # commits: channels 0 and 2 hold good1 and good2 only
    assert torch.isfinite(y).all()
    for c in (0, 2):
        expected = bn_forward(torch.cat([good1, good2])[:, c:c + 1], layer.weight[c:c + 1],
                              layer.bias[c:c + 1])[2:]
        torch.testing.assert_close(y[:, c:c + 1], expected)
    for name, buffer in layer.state_dict().items():
        assert torch.isfinite(buffer.double()).all(), name


@pytest.mark.parametrize("mode", ["cumulative", "sliding", "ema", "deferred"])
def test_non_finite_micro_batch_does_not_poison_later_training(mode):
    layer = _layer(mode=mode, window=3)
    for t, x in enumerate(_batches(8)):
        if t == 2:
            x = x.clone()
            x[0, :, 0, 0] = float("nan")
            layer(x)
            continue
        assert torch.isfinite(layer(x)).all()
    for name, buffer in layer.state_dict().items():
        assert torch.isfinite(buffer.double()).all(), name


@pytest.mark.parametrize("mode", ["cumulative", "sliding", "ema", "deferred"])
def test_empty_micro_batch(mode):
    layer = _layer(mode=mode, window=3)
    layer(_batches(1)[0])
    before = state_of(layer)
    x = torch.randn(0, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    # Zeros, not None: the output stays connected to the parameters, so that under DDP this rank
    # still takes part in their gradient all-reduce.
    for parameter in (layer.weight, layer.bias):
        assert parameter.grad is not None and torch.equal(parameter.grad, torch.zeros_like(parameter))
    assert_same_state(before, state_of(layer))
    assert layer.num_batches_tracked.item() == before["num_batches_tracked"].item()


def test_one_value_per_channel():
    layer = _layer(window=2)
    before = state_of(layer)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        layer(torch.randn(1, 4, 1, 1, dtype=torch.float64))
    assert_same_state(before, state_of(layer))
    first = torch.randn(3, 4, 1, 1, dtype=torch.float64)
    second = torch.randn(1, 4, 1, 1, dtype=torch.float64)
    layer(first)
    y = layer(second)  # legal with history
    torch.testing.assert_close(y, bn_forward(torch.cat([first, second]), layer.weight, layer.bias)[-1:])


def test_one_value_per_channel_in_eval_without_running_stats():
    layer = _layer(track_running_stats=False).eval()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        layer(torch.randn(1, 4, 1, 1, dtype=torch.float64))


def test_counts_are_exact_int64():
    layer = _layer(window=None)
    big = 2 ** 40  # beyond fp32 and fp64-safe-ish sums: history counts stay exact integers
    with torch.no_grad():
        layer.window_count.fill_(big)
        layer.window_step.fill_(1)
    x = _batches(1)[0]
    layer(x)
    assert layer.window_count[0, 0].item() == big + x.numel() // 4
    assert layer.window_count.dtype == torch.int64
    assert not math.isnan(layer.window_mean.sum().item())


def test_track_running_stats_switched_off_after_construction():
    """As BatchNorm: training no longer updates the running statistics, and eval still uses them."""
    layer = _layer(window=1)
    bn = torch.nn.BatchNorm2d(4).double()
    bn.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("window")})
    first = _batches(1)[0]
    for module in (layer, bn):
        module(first)
        module.track_running_stats = False
    before = layer.running_var.clone()
    x = _batches(1)[0]
    torch.testing.assert_close(layer(x), bn(x))
    assert torch.equal(layer.running_var, before)
    layer.eval(), bn.eval()
    torch.testing.assert_close(layer(x), bn(x))
