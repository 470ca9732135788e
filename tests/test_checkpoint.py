"""Window state in state_dict, BatchNorm checkpoints, copies, and the model-wide converters."""
import copy
import io
import pickle

import pytest
import torch

import cmbn_ext
from conftest import assert_same_state, state_of

MODES = ["cumulative", "sliding", "ema"]


def _steps(layer, batches):
    outputs = []
    for x in batches:
        x = x.clone().requires_grad_()
        y = layer(x)
        y.backward(torch.ones_like(y) * 0.5 + x.detach())
        outputs.append((y.detach(), x.grad))
    return outputs


def _assert_outputs_equal(a, b):
    for (ya, ga), (yb, gb) in zip(a, b):
        assert torch.equal(ya, yb) and torch.equal(ga, gb)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("window", [4, None])
def test_save_mid_window_and_continue_bit_for_bit(mode, window):
    if mode == "sliding" and window is None:
        window = 3
    layer = cmbn_ext.CrossMiniBatchNorm2d(3, mode=mode, window=window)
    batches = [torch.randn(2, 3, 4, 4) * (i + 1) for i in range(9)]
    _steps(layer, batches[:2])
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    fresh = cmbn_ext.CrossMiniBatchNorm2d(3, mode=mode, window=window)
    fresh.load_state_dict(torch.load(buffer), strict=True)
    assert_same_state(state_of(layer), state_of(fresh))
    _assert_outputs_equal(_steps(layer, batches[2:]), _steps(fresh, batches[2:]))
    assert_same_state(state_of(layer), state_of(fresh))


@pytest.mark.parametrize("mode", MODES)
def test_deepcopy_and_pickle_continue_identically(mode):
    layer = cmbn_ext.CrossMiniBatchNorm2d(3, mode=mode, window=3)
    batches = [torch.randn(2, 3, 4, 4) for _ in range(5)]
    _steps(layer, batches[:2])
    copies = [copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))]
    expected = _steps(layer, batches[2:])
    for other in copies:
        assert other.mode == mode and other.window == 3 and other.grad == "renorm"
        _assert_outputs_equal(_steps(other, batches[2:]), expected)
        assert_same_state(state_of(layer), state_of(other))


@pytest.mark.parametrize("mode", MODES)
def test_plain_batchnorm_checkpoint_loads_strictly(mode):
    bn = torch.nn.BatchNorm2d(3)
    for _ in range(3):
        bn(torch.randn(4, 3, 2, 2) + 1)
    layer = cmbn_ext.CrossMiniBatchNorm2d(3, mode=mode, window=3)
    layer(torch.randn(2, 3, 2, 2))  # mid-window: the BatchNorm checkpoint brings an empty window
    layer.load_state_dict(bn.state_dict(), strict=True)
    for name, value in bn.state_dict().items():
        assert torch.equal(layer.state_dict()[name], value)
    assert layer.window_step.item() == 0 and layer.window_count.sum().item() == 0
    layer.eval(), bn.eval()
    x = torch.randn(2, 3, 2, 2)
    assert torch.equal(layer(x), bn(x))


def test_repr_and_batchnorm_identity():
    layer = cmbn_ext.CrossMiniBatchNorm2d(8, mode="sliding", window=5, grad="exact")
    assert isinstance(layer, torch.nn.modules.batchnorm._BatchNorm)
    text = repr(layer)
    assert text.startswith("CrossMiniBatchNorm2d(8, eps=1e-05, momentum=0.1, affine=True")
    assert "mode='sliding', window=5, grad='exact'" in text
    bn_keys = set(torch.nn.BatchNorm2d(8).state_dict())
    assert bn_keys <= set(layer.state_dict())


def test_convert_and_revert_keep_everything():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4 * 25, 6),
                            torch.nn.BatchNorm1d(6, eps=1e-3, affine=False, momentum=None)),
    )
    block3d = torch.nn.Sequential(torch.nn.BatchNorm3d(2, track_running_stats=False))
    for _ in range(3):
        model(torch.randn(4, 3, 5, 5))
    model.eval()
    x = torch.randn(4, 3, 5, 5)
    expected = model(x)
    weight = model[1].weight
    stats = {name: value.clone() for name, value in model.state_dict().items()}

    converted = cmbn_ext.convert_batchnorm(model, window=2, grad="exact")
    assert converted is model
    assert type(model[1]) is cmbn_ext.CrossMiniBatchNorm2d
    assert type(model[3][2]) is cmbn_ext.CrossMiniBatchNorm1d
    assert model[1].weight is weight  # the very Parameter: optimizers keep working
    assert (model[3][2].eps, model[3][2].momentum, model[3][2].affine) == (1e-3, None, False)
    assert model[1].window == 2 and model[1].grad == "exact" and not model[1].training
    for name, value in stats.items():
        assert torch.equal(model.state_dict()[name], value)
    assert torch.equal(model(x), expected)

    ema = cmbn_ext.convert_batchnorm(torch.nn.BatchNorm2d(4), mode="ema", momentum=0.25)
    assert ema.mode == "ema" and ema.momentum == 0.25
    assert type(cmbn_ext.convert_batchnorm(block3d)[0]) is cmbn_ext.CrossMiniBatchNorm3d
    assert block3d[0].track_running_stats is False
    single = cmbn_ext.convert_batchnorm(torch.nn.BatchNorm2d(4))
    assert type(single) is cmbn_ext.CrossMiniBatchNorm2d

    reverted = cmbn_ext.revert_to_batchnorm(model)
    assert type(reverted[1]) is torch.nn.BatchNorm2d and type(reverted[3][2]) is torch.nn.BatchNorm1d
    assert reverted[1].weight is weight
    assert set(reverted.state_dict()) == set(stats)
    assert torch.equal(reverted(x), expected)


def test_converted_window_one_trains_like_batchnorm():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    twin = cmbn_ext.convert_batchnorm(copy.deepcopy(model), window=1)
    for _ in range(3):
        x = torch.randn(2, 3, 6, 6)
        a, b = model(x), twin(x)
        torch.testing.assert_close(a, b)
        a.sum().backward(), b.sum().backward()
    torch.testing.assert_close(twin[0].weight.grad, model[0].weight.grad)
    torch.testing.assert_close(twin[1].running_var, model[1].running_var)


def test_model_wide_end_and_reset_window():
    model = cmbn_ext.convert_batchnorm(
        torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.Sequential(torch.nn.BatchNorm2d(3))),
        window=None)
    model(torch.randn(2, 3, 2, 2))
    cmbn_ext.end_window(model)
    assert all(m.num_batches_tracked.item() == 1 and m.window_step.item() == 0
               for m in (model[0], model[1][0]))
    model(torch.randn(2, 3, 2, 2))
    cmbn_ext.reset_window(model)
    assert all(m.num_batches_tracked.item() == 1 and m.window_count.sum().item() == 0
               for m in (model[0], model[1][0]))


def test_partial_state_dict_keeps_the_window():
    layer = cmbn_ext.CrossMiniBatchNorm2d(3, window=4)
    layer(torch.randn(2, 3, 2, 2))
    before = state_of(layer)
    layer.load_state_dict({"weight": layer.weight.detach().clone()}, strict=False)
    assert_same_state(before, state_of(layer))


def test_convert_keeps_sharing_and_takes_device_and_dtype():
    shared = torch.nn.BatchNorm2d(3)
    model = torch.nn.Sequential(shared, torch.nn.ReLU(), shared)
    cmbn_ext.convert_batchnorm(model)
    assert model[0] is model[2] and type(model[0]) is cmbn_ext.CrossMiniBatchNorm2d
    stateless = torch.nn.BatchNorm2d(3, affine=False, track_running_stats=False)
    converted = cmbn_ext.convert_batchnorm(stateless, dtype=torch.float64, device="meta")
    assert converted.window_mean.dtype == torch.float64 and converted.window_mean.is_meta
    reverted = cmbn_ext.revert_to_batchnorm(model)
    assert reverted[0] is reverted[2] and type(reverted[0]) is torch.nn.BatchNorm2d
