"""Deferred mode (torchgpipe's and fairscale's DeferredBatchNorm) against torch's BatchNorm, and the
Darknet option ``running_stats="micro_batch"`` against its closed form."""
import copy

import pytest
import torch
import torch.utils.checkpoint

import cmbn_ext
from conftest import assert_same_state, state_of
from test_ops import _train_and_eval

C = 4


def _layer(**kwargs):
    layer = cmbn_ext.CrossMiniBatchNorm2d(C, **kwargs).double()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(C))
        layer.bias.copy_(torch.randn(C))
    return layer


def _batches(count, n=2):
    return [torch.randn(n, C, 3, 3, dtype=torch.float64) * (1 + i % 3) + i for i in range(count)]


def _batchnorm_over(batches, momentum, windows):
    """torch's BatchNorm running statistics after one training forward per window, each over the
    window's micro-batches concatenated."""
    bn = torch.nn.BatchNorm2d(C, momentum=momentum).double()
    for window in windows:
        bn(torch.cat(batches[window]))
    return bn


@pytest.mark.parametrize("grad", ["renorm", "exact"])
def test_deferred_normalizes_each_micro_batch_as_batchnorm(grad):
    """Outputs and gradients are a plain BatchNorm's on each micro-batch, whatever the window holds;
    ``grad`` makes no difference without history."""
    layer = _layer(mode="deferred", window=3, grad=grad)
    bn = torch.nn.BatchNorm2d(C).double()
    with torch.no_grad():
        bn.weight.copy_(layer.weight)
        bn.bias.copy_(layer.bias)
    for x in _batches(5):
        x_layer, x_bn = x.clone().requires_grad_(), x.clone().requires_grad_()
        y = layer(x_layer)
        torch.testing.assert_close(y, bn(x_bn), rtol=1e-12, atol=1e-12)
        dy = torch.randn_like(y)
        grads = torch.autograd.grad(y, (x_layer, layer.weight, layer.bias), dy)
        expected = torch.autograd.grad(bn(x_bn), (x_bn, bn.weight, bn.bias), dy)
        for got, want in zip(grads, expected):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_deferred_commits_batchnorm_statistics_of_the_concatenated_window(momentum):
    layer = _layer(mode="deferred", window=3, momentum=momentum)
    batches = _batches(7)
    for t, x in enumerate(batches):
        layer(x)
        windows = [slice(0, 3), slice(3, 6)][:(t + 1) // 3]
        bn = _batchnorm_over(batches, momentum, windows)
        torch.testing.assert_close(layer.running_mean, bn.running_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.running_var, bn.running_var, rtol=1e-12, atol=1e-12)
        assert layer.num_batches_tracked.item() == len(windows)
    assert layer.window_step.item() == 1 and layer.window_count[0].tolist() == [18] * C


def test_deferred_window_none_commits_at_end_window():
    layer = _layer(mode="deferred", window=None)
    batches = _batches(5)
    for x in batches:
        layer(x)
    assert layer.num_batches_tracked.item() == 0
    assert torch.equal(layer.running_mean, torch.zeros(C, dtype=torch.float64))
    layer.end_window()
    bn = _batchnorm_over(batches, 0.1, [slice(0, 5)])
    torch.testing.assert_close(layer.running_mean, bn.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.running_var, bn.running_var, rtol=1e-12, atol=1e-12)
    assert layer.num_batches_tracked.item() == 1 and layer.window_step.item() == 0


def test_deferred_checkpoint_mid_window_continues_bit_for_bit():
    batches = _batches(4)
    layer = _layer(mode="deferred", window=3)
    for x in batches[:2]:
        layer(x)
    restored = _layer(mode="deferred", window=3)
    restored.load_state_dict(layer.state_dict())
    for x in batches[2:]:
        assert torch.equal(restored(x), layer(x))
    assert_same_state(state_of(restored), state_of(layer))
    cumulative = _layer(mode="cumulative", window=3)
    with pytest.raises(RuntimeError, match="window state mismatch"):
        cumulative.load_state_dict(_with_open_window(layer).state_dict())


def _with_open_window(layer):
    layer(_batches(1)[0])
    assert layer.window_step.item() > 0
    return layer


def test_deferred_one_value_per_channel_is_refused_even_with_a_window():
    """Each micro-batch is normalized alone: one value per channel has no statistics, as in BatchNorm."""
    layer = _layer(mode="deferred", window=4)
    layer(_batches(1)[0])
    before = state_of(layer)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        layer(torch.randn(1, C, 1, 1, dtype=torch.float64))
    assert_same_state(before, state_of(layer))


def test_deferred_non_finite_channels_stay_out_of_the_running_statistics():
    """A channel whose statistics are not finite in one micro-batch commits the others' alone."""
    layer = _layer(mode="deferred", window=3, momentum=None)
    batches = _batches(3)
    bad = batches[1].clone()
    bad[0, 0, 0, 0] = float("nan")
    for x in (batches[0], bad, batches[2]):
        layer(x)
    finite = _batchnorm_over(batches, None, [slice(0, 3)])
    without = torch.nn.BatchNorm2d(C, momentum=None).double()
    without(torch.cat([batches[0], batches[2]]))
    for got, all_three, first_and_last in ((layer.running_mean, finite.running_mean, without.running_mean),
                                           (layer.running_var, finite.running_var, without.running_var)):
        torch.testing.assert_close(got[0], first_and_last[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got[1:], all_three[1:], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_deferred_under_activation_checkpointing(use_reentrant):
    """The recomputed forward normalizes alone too, and the micro-batch enters the window once."""
    plain, checkpointed = _layer(mode="deferred", window=3), _layer(mode="deferred", window=3)
    checkpointed.load_state_dict(plain.state_dict())
    for x in _batches(4):
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        plain(a).square().sum().backward()
        y = torch.utils.checkpoint.checkpoint(checkpointed, b, use_reentrant=use_reentrant)
        y.square().sum().backward()
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-12, atol=1e-12)
    assert_same_state(state_of(checkpointed), state_of(plain))


def _model():
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, C, 3, padding=1), torch.nn.BatchNorm2d(C), torch.nn.ReLU(),
        torch.nn.Conv2d(C, C, 1), torch.nn.BatchNorm2d(C, momentum=None)).double()


def test_convert_deferred_batch_norm_matches_batchnorm_per_micro_batch():
    """torchgpipe's signature; outputs as the BatchNorm model's on each micro-batch, and each layer's
    running statistics after a window as BatchNorm's over that layer's inputs of the window."""
    chunks = 3
    original = _model()
    converted = cmbn_ext.convert_deferred_batch_norm(copy.deepcopy(original), chunks)
    norms = [converted[1], converted[4]]
    assert all(isinstance(layer, cmbn_ext.CrossMiniBatchNorm2d) and layer.mode == "deferred"
               and layer.window == chunks for layer in norms)
    inputs = {1: [], 4: []}
    for index in inputs:
        original[index].register_forward_pre_hook(lambda module, args, i=index: inputs[i].append(args[0]))
    for _ in range(chunks):
        x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
        torch.testing.assert_close(converted(x), original(x), rtol=1e-12, atol=1e-12)
    for index, layer in zip(inputs, norms):
        bn = torch.nn.BatchNorm2d(C, momentum=original[index].momentum).double()
        bn(torch.cat(inputs[index]))
        torch.testing.assert_close(layer.running_mean, bn.running_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.running_var, bn.running_var, rtol=1e-12, atol=1e-12)
        assert layer.num_batches_tracked.item() == 1
    with pytest.raises(ValueError, match="window must be >= 1"):
        cmbn_ext.convert_deferred_batch_norm(_model(), chunks=0)


# ------------------------------------------------------------------------------------ Darknet option
def _closed_form_running(batches, window, momentum=0.1):
    """Darknet's running statistics: after every micro-batch, a momentum step toward the statistics
    of the window so far (all its micro-batches concatenated; unbiased variance)."""
    mean, var = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
    for t in range(len(batches)):
        start = t - t % window
        so_far = torch.cat(batches[start:t + 1]).transpose(0, 1).reshape(C, -1)
        mean = mean + momentum * (so_far.mean(1) - mean)
        var = var + momentum * (so_far.var(1, unbiased=True) - var)
        yield mean, var


@pytest.mark.parametrize("mode", ["cumulative", "deferred"])
def test_running_statistics_after_every_micro_batch(mode):
    layer = _layer(mode=mode, window=3, running_stats="micro_batch")
    batches = _batches(7)
    for t, (x, (mean, var)) in enumerate(zip(batches, _closed_form_running(batches, 3))):
        layer(x)
        torch.testing.assert_close(layer.running_mean, mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.running_var, var, rtol=1e-12, atol=1e-12)
        assert layer.num_batches_tracked.item() == t + 1
    before = state_of(layer)
    layer.end_window()  # its micro-batch is in the running statistics already: only emptied
    after = state_of(layer)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(after[name], before[name])
    assert layer.window_step.item() == 0 and not layer.window_count.any()


def test_running_stats_option_is_checked_and_fixed():
    for mode in ("sliding", "ema"):
        with pytest.raises(ValueError, match="running_stats='micro_batch' is for the modes"):
            cmbn_ext.CrossMiniBatchNorm2d(C, mode=mode, window=3, running_stats="micro_batch")
    with pytest.raises(ValueError, match="running_stats must be one of"):
        cmbn_ext.CrossMiniBatchNorm2d(C, running_stats="step")
    layer = cmbn_ext.CrossMiniBatchNorm2d(C, running_stats="micro_batch")
    with pytest.raises(AttributeError, match="fixed at construction"):
        layer.running_stats = "window"
    assert "running_stats='micro_batch'" in repr(layer)
    assert ", running_stats=" not in repr(cmbn_ext.CrossMiniBatchNorm2d(C))


def test_checkpoint_of_the_other_running_stats_is_refused_mid_window():
    """The open window of a ``micro_batch`` layer is in its running statistics already: a ``window``
    layer would commit it a second time."""
    darknet = _with_open_window(_layer(running_stats="micro_batch", window=3))
    with pytest.raises(RuntimeError, match="running_stats='micro_batch'"):
        _layer(window=3).load_state_dict(darknet.state_dict())
    darknet.end_window()
    _layer(window=3).load_state_dict(darknet.state_dict())  # an empty window means the same


@pytest.fixture
def fresh_dynamo():
    """Compiled code of other tests' layers neither counts toward dynamo's recompile limit here nor
    theirs after."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.filterwarnings("ignore::cmbn_ext.OpenWindowWarning")  # eval() mid-window, on purpose
@pytest.mark.parametrize("mode,running_stats", [("deferred", "window"), ("deferred", "micro_batch"),
                                                ("cumulative", "micro_batch")])
def test_compile_fullgraph_matches_eager(mode, running_stats, fresh_dynamo):
    torch.manual_seed(0)
    eager = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        cmbn_ext.CrossMiniBatchNorm2d(8, mode=mode, window=3, running_stats=running_stats),
        torch.nn.ReLU())
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    batches = [torch.randn(2, 3, 6, 6) * (i + 1) for i in range(5)]
    for got, expected in zip(_train_and_eval(compiled, batches), _train_and_eval(eager, batches)):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    for (name, got), expected in zip(compiled_model.state_dict().items(), eager.state_dict().values()):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=name)
