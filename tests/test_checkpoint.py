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


def _mid_window(mode, window, steps=2):
    layer = cmbn_ext.CrossMiniBatchNorm2d(3, mode=mode, window=window)
    _steps(layer, [torch.randn(2, 3, 4, 4) + i for i in range(steps)])
    return layer


def _round_trip(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer)


# (saved by, loaded into): the slot shapes match, so only the recorded mode and window tell them apart.
FOREIGN = [
    (("ema", 4), ("cumulative", 4)),
    (("cumulative", 4), ("ema", 4)),
    (("sliding", 2), ("cumulative", 2)),
    (("cumulative", 4), ("cumulative", 3)),
    (("cumulative", 4), ("cumulative", None)),
    (("cumulative", None), ("cumulative", 4)),
]


def _pair_id(pair):
    return f"{pair[0]}{pair[1]}" if isinstance(pair, tuple) and isinstance(pair[0], str) else None


@pytest.mark.parametrize("saved,loaded", FOREIGN, ids=_pair_id)
@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("through_file", [False, True])
def test_window_state_of_another_mode_or_window_is_refused(saved, loaded, strict, through_file):
    checkpoint = _mid_window(*saved).state_dict()
    if through_file:
        checkpoint = _round_trip(checkpoint)
    layer = _mid_window(*loaded, steps=1)
    before = state_of(layer)
    expected = (f"the checkpoint holds the window state of mode='{saved[0]}', window={saved[1]}; "
                f"this layer has mode='{loaded[0]}', window={loaded[1]}")
    with pytest.raises(RuntimeError, match="window state mismatch") as raised:
        layer.load_state_dict(checkpoint, strict=strict)  # error_msgs raise even when not strict
    assert expected in str(raised.value)
    assert "size mismatch" not in str(raised.value)
    assert_same_state(before, state_of(layer))


def test_sliding_window_change_is_named_not_just_a_size_mismatch():
    layer = _mid_window("sliding", 4, steps=1)
    before = state_of(layer)
    with pytest.raises(RuntimeError, match="window state of mode='sliding', window=3; this layer has "
                                           "mode='sliding', window=4"):
        layer.load_state_dict(_mid_window("sliding", 3).state_dict())
    assert_same_state(before, state_of(layer))


@pytest.mark.parametrize("mode", MODES)
def test_same_mode_and_window_loads_and_continues_bit_for_bit(mode):
    source = _mid_window(mode, 3)
    layer = _mid_window(mode, 3, steps=1)
    layer.load_state_dict(_round_trip(source.state_dict()))
    assert_same_state(state_of(source), state_of(layer))
    batches = [torch.randn(2, 3, 4, 4) for _ in range(4)]
    _assert_outputs_equal(_steps(source, batches), _steps(layer, batches))


def test_ema_ignores_the_window():
    source = _mid_window("ema", 4)
    layer = _mid_window("ema", None, steps=1)
    layer.load_state_dict(source.state_dict())
    assert_same_state(state_of(source), state_of(layer))


@pytest.mark.parametrize("saved,loaded", FOREIGN + [(("sliding", 3), ("sliding", 4))], ids=_pair_id)
def test_an_empty_window_loads_into_any_mode_and_window(saved, loaded):
    source = _mid_window(*saved)
    source.reset_window()  # the running statistics stay, the window holds nothing
    layer = _mid_window(*loaded, steps=1)
    layer.load_state_dict(_round_trip(source.state_dict()), strict=True)
    for name, value in source.state_dict().items():
        if not name.startswith("window"):
            assert torch.equal(layer.state_dict()[name], value), name
    assert layer.window_step.item() == 0 and layer.window_count.sum().item() == 0
    assert layer.window_count.shape == (loaded[1] - 1 if loaded[0] == "sliding" else 1, 3)


def test_removing_the_window_state_loads_the_rest_into_another_mode():
    checkpoint = _mid_window("ema", 4).state_dict()
    for name in ("window_count", "window_mean", "window_var", "window_step"):
        del checkpoint[name]  # the metadata stays: it is the window state that is checked
    layer = _mid_window("cumulative", 4, steps=1)
    layer.load_state_dict(checkpoint, strict=True)
    assert torch.equal(layer.running_mean, checkpoint["running_mean"])
    assert layer.window_step.item() == 0 and layer.window_count.sum().item() == 0


def test_checkpoints_without_the_metadata_load_as_before():
    source = _mid_window("ema", 4)
    checkpoint = dict(source.state_dict())  # a plain dict: no _metadata, as hand-built or older ones
    layer = _mid_window("cumulative", 4, steps=1)
    layer.load_state_dict(checkpoint, strict=True)
    assert_same_state(state_of(source), state_of(layer))


def test_nested_layers_are_checked_under_their_own_prefix():
    def model(mode):
        return torch.nn.Sequential(
            torch.nn.Conv2d(3, 3, 1),
            torch.nn.Sequential(cmbn_ext.CrossMiniBatchNorm2d(3, mode=mode, window=4)),
            cmbn_ext.CrossMiniBatchNorm2d(3, mode="cumulative", window=4))

    def train(net, steps):
        for i in range(steps):
            net(torch.randn(2, 3, 4, 4) + i).sum().backward()
        return net

    source = train(model("ema"), 2)
    checkpoint = source.state_dict()
    assert checkpoint._metadata["1.0"]["cmbn_mode"] == "ema"
    assert checkpoint._metadata["2"]["cmbn_mode"] == "cumulative"
    assert "cmbn_mode" not in checkpoint._metadata["0"] and "cmbn_mode" not in checkpoint._metadata[""]

    same = train(model("ema"), 1)
    same.load_state_dict(_round_trip(checkpoint))
    assert_same_state(state_of(source), state_of(same))

    other = train(model("cumulative"), 1)
    before = state_of(other[1][0])
    with pytest.raises(RuntimeError) as raised:
        other.load_state_dict(_round_trip(checkpoint))
    message = str(raised.value)
    assert "window state mismatch for 1.0.window_*" in message and "mode='ema', window=4" in message
    assert message.count("window state mismatch") == 1  # the layer under prefix "2" agrees
    assert_same_state(before, state_of(other[1][0]))
