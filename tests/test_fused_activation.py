"""The layers' ``activation=`` and ``memory=``: with ``window=1`` a layer equals torch's BatchNorm then
torch's activation module (outputs, input and parameter gradients, running statistics, eval); with
history, every mode equals the same layer without an activation followed by the activation module;
``memory="lean"`` keeps the output, except where a weight is too small to divide by (then the input,
checked with ``saved_tensors_hooks``); the checkpoint, empty micro-batch, eval and process-group paths
apply the activation too; bad options give clear errors.
"""
import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import cmbn_ext
from cmbn_ext import activations
from cmbn_ext.reference import LEAN_MIN_WEIGHT

# (name, param): every activation, with LeakyReLU's and ELU's parameter at several values
ACTIVATIONS = [("identity", None), ("relu", None), ("leaky_relu", 0.01), ("leaky_relu", 0.1),
               ("leaky_relu", 1.0), ("elu", 1.0), ("elu", 0.5), ("silu", None), ("mish", None),
               ("hardswish", None)]
MEMORY = ["standard", "lean"]
IDS = [f"{name}-{param}" if param is not None else name for name, param in ACTIVATIONS]


def torch_activation(name, param):
    """torch's own module, built independently of cmbn_ext.activations."""
    return {"identity": lambda: nn.Identity(), "relu": lambda: nn.ReLU(),
            "leaky_relu": lambda: nn.LeakyReLU(param), "elu": lambda: nn.ELU(param),
            "silu": lambda: nn.SiLU(), "mish": lambda: nn.Mish(), "hardswish": lambda: nn.Hardswish()}[name]()


def random_affine(layer, seed=1):
    """Weights of both signs, away from zero, and a bias."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        magnitude = torch.rand(layer.num_features, generator=generator) + 0.5
        sign = torch.where(torch.arange(layer.num_features) % 3 == 2, -1.0, 1.0)
        layer.weight.copy_(magnitude * sign)
        layer.bias.copy_(torch.randn(layer.num_features, generator=generator) * 0.5)
    return layer


def batchnorm_like(layer):
    """torch's BatchNorm2d with the layer's parameters and running statistics (copies)."""
    bn = nn.BatchNorm2d(layer.num_features, eps=layer.eps, momentum=layer.momentum).to(layer.weight.dtype)
    bn.load_state_dict({k: v.clone() for k, v in layer.state_dict().items() if not k.startswith("window")})
    return bn


def step(module, x, grad_y, params):
    """One training forward and backward: the output and the gradients of x and ``params``."""
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    grads = torch.autograd.grad(y, [x, *params], grad_y)
    return [y.detach(), *grads]


def assert_all_close(got, expected, **tolerance):
    for index, (a, b) in enumerate(zip(got, expected)):
        torch.testing.assert_close(a, b, msg=lambda m: f"item {index}: {m}", **tolerance)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("memory", MEMORY)
@pytest.mark.parametrize("name,param", ACTIVATIONS, ids=IDS)
def test_window_1_equals_batchnorm_then_activation_fp64(name, param, memory, memory_format):
    layer = random_affine(cmbn_ext.CrossMiniBatchNorm2d(6, window=1, activation=name, activation_param=param,
                                                        memory=memory).double())
    bn, act = batchnorm_like(layer), torch_activation(name, param)
    reference = nn.Sequential(bn, act)
    x = (torch.randn(3, 6, 5, 4, dtype=torch.float64) * 2 + 0.3).contiguous(memory_format=memory_format)
    grad_y = torch.randn_like(x)
    got = step(layer, x, grad_y, [layer.weight, layer.bias])
    expected = step(reference, x, grad_y, [bn.weight, bn.bias])
    assert_all_close(got, expected, rtol=1e-10, atol=1e-12)
    assert got[0].is_contiguous(memory_format=memory_format)
    torch.testing.assert_close(layer.running_mean, bn.running_mean, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(layer.running_var, bn.running_var, rtol=1e-12, atol=1e-14)
    layer.eval(), reference.eval()
    torch.testing.assert_close(layer(x), reference(x), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("memory", MEMORY)
@pytest.mark.parametrize("name,param", [("leaky_relu", 0.1), ("elu", 0.5), ("silu", None),
                                        ("hardswish", None)], ids=str)
def test_window_1_fp32_and_bf16_against_fp64(name, param, memory):
    """fp32, and bf16 input with fp32 parameters (autocast's layout), loosely against BatchNorm then
    the activation in fp64 on the same input values."""
    for dtype, tolerance in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
        layer = random_affine(cmbn_ext.CrossMiniBatchNorm2d(6, window=1, activation=name,
                                                            activation_param=param, memory=memory))
        bn = batchnorm_like(layer).double()
        x = (torch.randn(4, 6, 5, 5) * 2 + 0.3).to(dtype).contiguous(memory_format=torch.channels_last)
        grad_y = torch.randn_like(x)
        got = step(layer, x, grad_y, [layer.weight, layer.bias])
        expected = step(nn.Sequential(bn, torch_activation(name, param)), x.double(), grad_y.double(),
                        [bn.weight, bn.bias])
        assert got[0].dtype == got[1].dtype == dtype
        scale = [e.abs().max() for e in expected]
        for index, (a, b, s) in enumerate(zip(got, expected, scale)):
            error = (a.double() - b).abs().max() / s
            assert error < tolerance, (dtype, index, float(error))


@pytest.mark.parametrize("memory", MEMORY)
@pytest.mark.parametrize("grad", ["renorm", "exact"])
@pytest.mark.parametrize("mode,window", [("cumulative", 3), ("sliding", 3), ("ema", 3), ("deferred", 3),
                                         ("cumulative", None)])
@pytest.mark.parametrize("name,param", [("leaky_relu", 0.1), ("elu", 0.5), ("silu", None)], ids=str)
def test_every_mode_equals_the_layer_then_the_activation(name, param, mode, window, grad, memory):
    """With history: the fused layer equals the layer without an activation followed by torch's
    module, micro-batch by micro-batch, and ends in the same state, bit for bit."""
    options = dict(mode=mode, window=window, grad=grad, momentum=0.3)
    plain = random_affine(cmbn_ext.CrossMiniBatchNorm2d(5, **options).double())
    fused = cmbn_ext.CrossMiniBatchNorm2d(5, activation=name, activation_param=param, memory=memory,
                                          **options).double()
    fused.load_state_dict(plain.state_dict())
    reference = nn.Sequential(plain, torch_activation(name, param))
    generator = torch.Generator().manual_seed(3)
    for index in range(4):
        x = torch.randn(2, 5, 3, 3, dtype=torch.float64, generator=generator) * (index + 1) + index
        grad_y = torch.randn(x.shape, dtype=torch.float64, generator=generator)
        got = step(fused, x, grad_y, [fused.weight, fused.bias])
        expected = step(reference, x, grad_y, [plain.weight, plain.bias])
        assert_all_close(got, expected, rtol=1e-9, atol=1e-11)
    for (key, a), b in zip(fused.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), key
    cmbn_ext.end_window(fused), cmbn_ext.end_window(plain)
    fused.eval(), reference.eval()
    torch.testing.assert_close(fused(x), reference(x), rtol=1e-12, atol=1e-13)


def saved_storages(function):
    """Runs ``function`` and returns the data pointers of the storages autograd saved meanwhile."""
    pointers = set()

    def pack(tensor):
        pointers.add(tensor.untyped_storage().data_ptr())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = function()
    return result, pointers


def test_lean_keeps_the_output_standard_the_input():
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    for memory, activation, keeps_output in (("lean", "leaky_relu", True), ("lean", "elu", True),
                                             ("lean", None, True), ("standard", "leaky_relu", False),
                                             ("lean", "silu", False), ("lean", "relu", False)):
        layer = random_affine(cmbn_ext.CrossMiniBatchNorm2d(4, activation=activation, memory=memory))
        y, saved = saved_storages(lambda: layer(x))
        kept = y.untyped_storage().data_ptr() if keeps_output else x.untyped_storage().data_ptr()
        other = x.untyped_storage().data_ptr() if keeps_output else y.untyped_storage().data_ptr()
        assert kept in saved and other not in saved, (memory, activation)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lean_elu_in_half_precision_keeps_the_input(dtype):
    """A half ELU output rounds to -alpha far below zero, where no input can be recovered from it (the
    gradients would be NaN): half-precision input keeps its input; LeakyReLU keeps its output."""
    x = (torch.randn(2, 4, 3, 3) * 4 - 6).to(dtype).requires_grad_()
    for activation, keeps_output in (("elu", False), ("leaky_relu", True)):
        layer = random_affine(cmbn_ext.CrossMiniBatchNorm2d(4, activation=activation, memory="lean"))
        y, saved = saved_storages(lambda: layer(x))
        assert (y.untyped_storage().data_ptr() in saved) == keeps_output, activation
        assert (x.untyped_storage().data_ptr() in saved) != keeps_output, activation
        grads = torch.autograd.grad(y, [x, layer.weight, layer.bias], torch.randn_like(y))
        assert all(bool(g.isfinite().all()) for g in grads), activation


@pytest.mark.parametrize("slope", [0.001, 0.01, 0.1])
def test_lean_reconstruction_with_small_slopes(slope):
    """fp32: the backward from the output (dividing negative outputs by the slope) stays close to
    BatchNorm then LeakyReLU computed in fp64."""
    layer = random_affine(cmbn_ext.CrossMiniBatchNorm2d(6, window=1, activation="leaky_relu",
                                                        activation_param=slope, memory="lean"))
    bn = batchnorm_like(layer).double()
    x = torch.randn(4, 6, 5, 5) * 3 - 1
    grad_y = torch.randn_like(x)
    got = step(layer, x, grad_y, [layer.weight, layer.bias])
    expected = step(nn.Sequential(bn, nn.LeakyReLU(slope)), x.double(), grad_y.double(), [bn.weight, bn.bias])
    for a, b in zip(got, expected):
        assert (a.double() - b).abs().max() <= 1e-4 * b.abs().max()


def test_a_weight_near_zero_keeps_the_input_and_the_gradients_exact():
    layer = random_affine(cmbn_ext.CrossMiniBatchNorm2d(4, window=1, activation="leaky_relu",
                                                        activation_param=0.05, memory="lean").double())
    x = torch.randn(3, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    grad_y = torch.randn_like(x)

    def check(keeps_output):
        bn = batchnorm_like(layer)
        y, saved = saved_storages(lambda: layer(x))
        assert (y.untyped_storage().data_ptr() in saved) == keeps_output
        assert (x.untyped_storage().data_ptr() in saved) != keeps_output
        got = torch.autograd.grad(y, [x, layer.weight, layer.bias], grad_y)
        reference = nn.LeakyReLU(0.05)(bn(x))
        expected = torch.autograd.grad(reference, [x, bn.weight, bn.bias], grad_y)
        assert_all_close([y, *got], [reference, *expected], rtol=1e-9, atol=1e-11)

    check(keeps_output=True)
    with torch.no_grad():
        layer.weight[1] = LEAN_MIN_WEIGHT * 0.1  # an in-place change: the version counter moves
    check(keeps_output=False)
    with torch.no_grad():
        layer.weight[1] = -2 * LEAN_MIN_WEIGHT  # just above the limit, negative
    check(keeps_output=True)
    layer.weight = nn.Parameter(torch.zeros(4, dtype=torch.float64))  # a new tensor, zero-initialised
    check(keeps_output=False)


def test_zero_initialised_weights_train():
    """timm's zero_init_last: a lean layer whose weight starts at zero gets BatchNorm's gradients."""
    layer = cmbn_ext.CrossMiniBatchNorm2d(4, window=1, activation="elu", memory="lean").double()
    nn.init.zeros_(layer.weight)
    bn = batchnorm_like(layer)
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    grad_y = torch.randn_like(x)
    got = step(layer, x, grad_y, [layer.weight, layer.bias])
    expected = step(nn.Sequential(bn, nn.ELU()), x, grad_y, [bn.weight, bn.bias])
    assert_all_close(got, expected, rtol=1e-10, atol=1e-12)
    assert got[2].abs().sum() > 0


@pytest.mark.parametrize("memory", MEMORY)
def test_checkpoint_recomputation_applies_the_activation(memory):
    plain = random_affine(cmbn_ext.CrossMiniBatchNorm2d(4, window=2, activation="elu", activation_param=0.5,
                                                        memory=memory).double())
    checkpointed = copy.deepcopy(plain)
    for index in range(3):
        x = torch.randn(2, 4, 3, 3, dtype=torch.float64) + index
        grad_y = torch.randn_like(x)
        expected = step(plain, x, grad_y, [plain.weight, plain.bias])
        got = step(lambda t: torch.utils.checkpoint.checkpoint(checkpointed, t, use_reentrant=False), x,
                   grad_y, [checkpointed.weight, checkpointed.bias])
        # The same op on the same input, recomputed: the same bits.
        assert_all_close(got, expected, rtol=0, atol=0)


def test_empty_micro_batch_and_eval_without_running_stats():
    layer = random_affine(cmbn_ext.CrossMiniBatchNorm2d(4, activation="silu", track_running_stats=False))
    y = layer(torch.randn(0, 4, 3, 3))
    assert y.shape == (0, 4, 3, 3)
    y.sum().backward()
    assert layer.weight.grad is not None
    bn = nn.BatchNorm2d(4, track_running_stats=False)
    bn.load_state_dict(layer.state_dict(), strict=False)
    layer.eval(), bn.eval()
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(layer(x), nn.SiLU()(bn(x)))


def test_half_eval_applies_the_activation_before_rounding():
    """Eval with fp32 running statistics and bf16 input: the output is the fp64 result rounded once
    (within half a bf16 unit), where BatchNorm then the activation rounds twice."""
    layer = random_affine(cmbn_ext.CrossMiniBatchNorm2d(8, activation="silu"))
    with torch.no_grad():
        layer.running_mean.uniform_(-1, 1), layer.running_var.uniform_(0.5, 2)
    layer.eval()
    x = (torch.randn(4, 8, 6, 6) * 2).bfloat16()
    bn = batchnorm_like(layer).double().eval()
    exact = nn.SiLU()(bn(x.double()))
    error = (layer(x).double() - exact).abs()
    assert layer(x).dtype == torch.bfloat16
    assert (error <= exact.abs() * 2.0 ** -8 + 1e-6).all()


def test_process_group_applies_the_activation_after_the_op(tmp_path):
    """A one-process gloo group: the distributed path, with the activation applied after its op."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        layer = random_affine(cmbn_ext.CrossMiniBatchNorm2d(4, window=1, activation="leaky_relu",
                                                            activation_param=0.2, memory="lean",
                                                            process_group="world").double())
        bn = batchnorm_like(layer)
        x = torch.randn(3, 4, 3, 3, dtype=torch.float64)
        grad_y = torch.randn_like(x)
        got = step(layer, x, grad_y, [layer.weight, layer.bias])
        expected = step(nn.Sequential(bn, nn.LeakyReLU(0.2)), x, grad_y, [bn.weight, bn.bias])
        assert_all_close(got, expected, rtol=1e-10, atol=1e-12)
    finally:
        dist.destroy_process_group()


def test_activation_from_a_module_and_its_revert():
    act = nn.LeakyReLU(0.2, inplace=True)
    layer = cmbn_ext.CrossMiniBatchNorm2d(4, activation=act, memory="lean")
    assert (layer.activation, layer.activation_param, layer.memory) == ("leaky_relu", 0.2, "lean")
    assert "activation='leaky_relu', activation_param=0.2, memory='lean'" in repr(layer)
    assert list(layer.state_dict()) == list(cmbn_ext.CrossMiniBatchNorm2d(4).state_dict())
    reverted = cmbn_ext.revert_to_batchnorm(layer)
    assert isinstance(reverted, nn.Sequential) and type(reverted[0]) is nn.BatchNorm2d and reverted[1] is act
    by_name = cmbn_ext.revert_to_batchnorm(cmbn_ext.CrossMiniBatchNorm2d(4, activation="elu",
                                                                       activation_param=0.5))
    assert type(by_name[1]) is nn.ELU and by_name[1].alpha == 0.5
    lean_only = cmbn_ext.CrossMiniBatchNorm2d(4, memory="lean")
    assert type(cmbn_ext.revert_to_batchnorm(lean_only)) is nn.BatchNorm2d
    assert "activation" not in repr(cmbn_ext.CrossMiniBatchNorm2d(4))


class MyReLU(nn.ReLU):
    pass


@pytest.mark.parametrize("options,error,match", [
    (dict(activation="gelu"), ValueError, "activation must be one of"),
    (dict(activation=nn.GELU()), ValueError, "GELU"),
    (dict(activation=MyReLU()), ValueError, "MyReLU"),
    (dict(activation=3), TypeError, "activation must be None"),
    (dict(activation="relu", activation_param=0.1), ValueError, "takes none"),
    (dict(activation=nn.ELU(), activation_param=0.1), ValueError, "read from the activation module"),
    (dict(activation="elu", activation_param=float("nan")), ValueError, "finite"),
    (dict(memory="small"), ValueError, "memory must be one of"),
])
def test_bad_options(options, error, match):
    with pytest.raises(error, match=match):
        cmbn_ext.CrossMiniBatchNorm2d(4, **options)


def test_memory_is_validated_when_set_and_kept_on_error():
    layer = cmbn_ext.CrossMiniBatchNorm2d(4, activation="elu", memory="lean")
    with pytest.raises(ValueError, match="memory must be one of"):
        layer.memory = "tiny"
    assert layer.memory == "lean" and layer._lean
    layer.memory = "standard"
    assert not layer._lean
    with pytest.raises(AttributeError):
        layer.activation = "relu"


@pytest.mark.parametrize("memory", MEMORY)
def test_norm_act_computes_its_act_in_the_op(memory):
    """CrossMiniBatchNormAct2d: act inside the op when supported and drop is an identity; a new act
    is followed at the next forward; act(drop(.)) otherwise."""
    from cmbn_ext.norm_act import CrossMiniBatchNormAct2d
    layer = random_affine(CrossMiniBatchNormAct2d(4, act_layer=nn.LeakyReLU,
                                                  act_kwargs={"negative_slope": 0.1}, window=1,
                                                  memory=memory).double())
    assert layer.fused_activation() == (activations.LEAKY_RELU, 0.1)
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    grad_y = torch.randn_like(x)
    bn = batchnorm_like(layer)
    assert_all_close(step(layer, x, grad_y, [layer.weight]),
                     step(nn.Sequential(bn, nn.LeakyReLU(0.1)), x, grad_y, [bn.weight]),
                     rtol=1e-10, atol=1e-12)
    layer.act = nn.GELU()  # not one the op computes: applied after
    bn = batchnorm_like(layer)
    assert_all_close(step(layer, x, grad_y, [layer.weight]),
                     step(nn.Sequential(bn, nn.GELU()), x, grad_y, [bn.weight]), rtol=1e-10, atol=1e-12)
    assert layer.fused_activation() is None
    layer.act = nn.ReLU(inplace=True)
    layer.drop = nn.Dropout(0.0)  # a drop that is not an identity: unfused, and never lean (in place)
    y, saved = saved_storages(lambda: layer(x.requires_grad_()))
    assert layer.fused_activation() is None and not layer._lean
    assert x.untyped_storage().data_ptr() in saved
    y.sum().backward()
