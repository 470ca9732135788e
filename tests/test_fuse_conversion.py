"""``convert_batchnorm(..., fuse_activation=True, memory=...)`` on nn.Sequential neighbours, timm's
cspdarknet53, an ultralytics YOLOv8n and mmcv's ConvModule: what is fused (``fused_activations``), the
state dict keys, the same function as the BatchNorm model (window=1), and ``revert_to_batchnorm``
putting the activation modules back. And one ``torch.compile(fullgraph=True)`` of a fused layer.
"""
import copy

import pytest
import torch
import torch.nn as nn

import cmbn_ext
from cmbn_ext import FusedActivation


def tensors(output):
    """The tensors of a model's output (nested lists, tuples and dicts), in order."""
    if isinstance(output, torch.Tensor):
        return [output]
    items = output.values() if isinstance(output, dict) else output
    return [t for item in items for t in tensors(item)]


def train_step(model, x, seed=0):
    """Outputs and the parameters' gradients of one training forward and backward (a random linear
    function of every output)."""
    model.train()
    model.zero_grad(set_to_none=True)
    outputs = tensors(model(x))
    generator = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, dtype=o.dtype, generator=generator)).sum() for o in outputs)
    loss.backward()
    return [o.detach() for o in outputs] + [p.grad.clone() for p in model.parameters() if p.grad is not None]


def assert_same_function(model, reference, x, rtol=1e-9, atol=1e-10):
    got, expected = train_step(model, x), train_step(reference, x)
    assert len(got) == len(expected)
    for index, (a, b) in enumerate(zip(got, expected)):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"item {index}: {m}")


def small_net():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.LeakyReLU(0.1, inplace=True),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.GELU(),
        nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8), nn.SiLU(),
        nn.Conv2d(8, 4, 1, bias=False), nn.BatchNorm2d(4),
    ).double()


@pytest.mark.parametrize("memory", ["standard", "lean"])
def test_sequential_neighbours(memory):
    original = small_net()
    unfused = cmbn_ext.convert_batchnorm(copy.deepcopy(original), window=1)
    fused = cmbn_ext.convert_batchnorm(copy.deepcopy(original), window=1, fuse_activation=True, memory=memory)
    assert cmbn_ext.fused_activations(fused) == {"1": "leaky_relu", "7": "silu"}
    assert cmbn_ext.fused_activations(unfused) == {}
    assert [type(fused[i]) for i in (2, 5, 8)] == [FusedActivation, nn.GELU, FusedActivation]
    assert list(fused.state_dict()) == list(unfused.state_dict())
    # the last layer's output leaves the model: what uses it is not seen, so it keeps its input
    assert [fused[i].memory for i in (1, 4, 7, 10)] == [memory, memory, memory, "standard"]
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    assert_same_function(fused, original, x)
    original_act = original[2]
    reverted = cmbn_ext.revert_to_batchnorm(fused)
    assert [type(m) for m in reverted] == [type(m) for m in original]
    assert reverted[2].negative_slope == 0.1 and reverted[2].inplace
    assert not any(isinstance(m, FusedActivation) for m in reverted.modules())
    reverted.eval(), original.eval()
    torch.testing.assert_close(reverted(x), original(x))
    del original_act


def test_what_stays_unfused():
    """A BatchNorm used twice, a Sequential subclass with a forward of its own and an activation
    subclass stay unfused; lean, such a layer keeps its output only when it goes straight into a
    module that does not change it in place."""
    shared = nn.BatchNorm2d(4)

    class Custom(nn.Sequential):
        def forward(self, x):
            return self[1](x) + self[0](x)

    class MyReLU(nn.ReLU):
        pass

    model = nn.Sequential(nn.Sequential(shared, nn.ReLU()), nn.Sequential(shared, nn.Identity()),
                          Custom(nn.BatchNorm2d(4), nn.ReLU()), nn.Sequential(nn.BatchNorm2d(4), MyReLU()),
                          nn.Sequential(nn.BatchNorm2d(4), nn.ReLU6(inplace=True)),
                          nn.Sequential(nn.BatchNorm2d(4), nn.ReLU(inplace=True)),
                          nn.Sequential(nn.BatchNorm2d(4), nn.Identity()))
    cmbn_ext.convert_batchnorm(model, fuse_activation=True, memory="lean")
    assert cmbn_ext.fused_activations(model) == {"5.0": "relu"}
    assert model[0][0] is model[1][0] and type(model[6][1]) is nn.Identity
    assert [model[i][0].memory for i in range(7)] == ["standard", "standard", "standard", "lean", "standard",
                                                      "lean", "standard"]
    x = torch.randn(2, 4, 3, 3)
    for block in model:
        block(x).sum().backward()  # the in-place ReLU6 after a lean layer would fail the backward


@pytest.mark.parametrize("name,options", [("resnet18", {}), ("mobilenet_v3_small", {"dropout": 0.0})])
def test_lean_conversion_of_residual_models_with_in_place_additions(name, options):
    """torchvision's residual blocks add the shortcut in place to a norm's output (``out += identity``):
    those layers keep their input, so the backward works."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    original = getattr(torchvision.models, name)(num_classes=10, **options).double()
    converted = cmbn_ext.convert_batchnorm(copy.deepcopy(original), window=1, fuse_activation=True,
                                           memory="lean")
    # 64x64: the last stage still sees 2 x 2 x 2 values per channel (at 1 x 1 two values per channel
    # leave a backward of pure rounding noise, which no two implementations share)
    assert_same_function(converted, original, torch.randn(2, 3, 64, 64, dtype=torch.float64), rtol=1e-7,
                         atol=1e-9)


def test_lean_without_fusing_keeps_the_input_before_an_in_place_activation():
    model = cmbn_ext.convert_batchnorm(nn.Sequential(nn.BatchNorm2d(4), nn.ReLU(inplace=True)),
                                       memory="lean")
    assert model[0].memory == "standard" and type(model[1]) is nn.ReLU
    model(torch.randn(2, 4, 3, 3)).sum().backward()


def test_bad_arguments():
    with pytest.raises(ValueError, match="memory must be one of"):
        cmbn_ext.convert_batchnorm(nn.Sequential(), memory="lite")
    with pytest.raises(TypeError, match="fuse_activation"):
        cmbn_ext.convert_batchnorm(nn.Sequential(), activation="relu")


def test_timm_cspdarknet53():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    original = timm.create_model("cspdarknet53", num_classes=10).double()
    keys = list(cmbn_ext.convert_batchnorm(copy.deepcopy(original), window=1).state_dict())
    fused = cmbn_ext.convert_batchnorm(copy.deepcopy(original), window=1, fuse_activation=True, memory="lean")
    found = cmbn_ext.fused_activations(fused)
    assert len(found) == 67 and set(found.values()) == {"leaky_relu"}
    assert list(fused.state_dict()) == keys
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    assert_same_function(fused, original, x, rtol=1e-7, atol=1e-9)
    not_fused = cmbn_ext.convert_batchnorm(copy.deepcopy(original), window=1)
    assert cmbn_ext.fused_activations(not_fused) == {}
    reverted = cmbn_ext.revert_to_batchnorm(fused)
    assert [type(m) for m in reverted.modules()] == [type(m) for m in original.modules()]
    reverted.eval(), original.eval()
    torch.testing.assert_close(reverted(x), original(x))


def test_ultralytics_yolov8n():
    tasks = pytest.importorskip("ultralytics.nn.tasks")
    from ultralytics.nn.modules.conv import Conv
    torch.manual_seed(0)
    original = tasks.DetectionModel("yolov8n.yaml", verbose=False).double()
    convs = [name for name, m in original.named_modules() if type(m) is Conv and type(m.act) is nn.SiLU]
    keys = list(cmbn_ext.convert_batchnorm(copy.deepcopy(original), window=1).state_dict())
    fused = cmbn_ext.convert_batchnorm(copy.deepcopy(original), window=1, fuse_activation=True, memory="lean")
    assert cmbn_ext.fused_activations(fused) == {f"{name}.bn": "silu" for name in convs} and len(convs) > 50
    assert list(fused.state_dict()) == keys
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    assert_same_function(fused, original, x, rtol=1e-7, atol=1e-9)
    reverted = cmbn_ext.revert_to_batchnorm(fused)
    assert all(type(m.act) is nn.SiLU and type(m.bn) is nn.BatchNorm2d
               for m in reverted.modules() if type(m) is Conv)
    reverted.eval(), original.eval()
    expected = original(x)[0]
    torch.testing.assert_close(reverted(x)[0], expected)
    torch.testing.assert_close(reverted.fuse(verbose=False)(x)[0], expected)  # ultralytics' own fusion


def test_mmcv_conv_module():
    cnn = pytest.importorskip("mmcv.cnn")
    torch.manual_seed(0)

    def build(**kwargs):
        return cnn.ConvModule(3, 8, 3, norm_cfg=dict(type="BN"), **kwargs).double()

    original = build(act_cfg=dict(type="LeakyReLU", negative_slope=0.1))
    fused = cmbn_ext.convert_batchnorm(copy.deepcopy(original), window=1, fuse_activation=True, memory="lean")
    assert cmbn_ext.fused_activations(fused) == {"bn": "leaky_relu"}
    assert type(fused.activate) is FusedActivation
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    assert_same_function(fused, original, x)
    reverted = cmbn_ext.revert_to_batchnorm(fused)
    assert type(reverted.activate) is nn.LeakyReLU and type(reverted.bn) is nn.BatchNorm2d
    # norm after the activation, or an eval path that skips the norm: left unfused
    for unfused in (build(order=("conv", "act", "norm")), build(efficient_conv_bn_eval=True),
                    build(act_cfg=dict(type="GELU"))):
        cmbn_ext.convert_batchnorm(unfused, fuse_activation=True)
        assert cmbn_ext.fused_activations(unfused) == {}


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()  # compiles afresh, under the recompile limit whatever compiled before
    model = cmbn_ext.convert_batchnorm(small_net().float(), window=2, fuse_activation=True, memory="lean")
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model, fullgraph=True)
    for index in range(3):
        x = torch.randn(2, 3, 6, 6) * (index + 1)
        got, expected = train_step(compiled, x, index), train_step(model, x, index)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for (name, a), b in zip(compiled_model.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_the_memory_page_snippet_runs(tmp_path):
    """docs/memory.md's ```python block runs as written, in a fresh interpreter."""
    import os
    import re
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "docs", "memory.md")) as f:
        [code] = re.findall(r"^```python\n(.*?)^```", f.read(), re.S | re.M)
    (tmp_path / "snippet.py").write_text(code)
    environment = dict(os.environ, PYTHONPATH=root)
    result = subprocess.run([sys.executable, "snippet.py"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120, env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "{'1': 'leaky_relu', '4': 'silu'}" in result.stdout


def test_a_fused_model_pickles_and_reverts_after_loading(tmp_path):
    model = cmbn_ext.convert_batchnorm(small_net(), window=1, fuse_activation=True, memory="lean")
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert cmbn_ext.fused_activations(loaded) == cmbn_ext.fused_activations(model)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    assert_same_function(loaded, model, x, rtol=0, atol=0)
    reverted = cmbn_ext.revert_to_batchnorm(loaded)
    assert type(reverted[2]) is nn.LeakyReLU and type(reverted[8]) is nn.SiLU


@pytest.mark.parametrize("norm_act", [False, True])
def test_a_layer_pickled_before_activations_loads(norm_act):
    """A layer pickled whole before these options existed: no activation of its own, memory standard
    (timm's counterpart: its act, as before)."""
    from cmbn_ext.norm_act import CrossMiniBatchNormAct2d
    cls = CrossMiniBatchNormAct2d if norm_act else cmbn_ext.CrossMiniBatchNorm2d
    layer = cls(4, window=1)
    state = layer.__dict__.copy()
    for name in ("_activation", "_activation_module", "_lean", "_memory", "_lean_check", "_activation_slot",
                 "_fuse_activation", "_act_fused", "_fused_for"):
        state.pop(name, None)
    old = cls.__new__(cls)
    old.__setstate__(state)
    assert old.memory == "standard" and old.activation == ("relu" if norm_act else None)
    x = torch.randn(2, 4, 3, 3)
    old(x).sum().backward()
    old.eval(), layer.eval()
    torch.testing.assert_close(old(x), layer(x))


def test_sync_batchnorm_fuses_too():
    original = nn.Sequential(nn.SyncBatchNorm(4), nn.ELU(0.5)).double()
    fused = cmbn_ext.convert_batchnorm(copy.deepcopy(original), window=1, fuse_activation=True)
    assert type(fused[0]) is cmbn_ext.SyncCrossMiniBatchNorm
    assert cmbn_ext.fused_activations(fused) == {"0": "elu"}
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    bn = nn.BatchNorm1d(4).double()
    bn.load_state_dict(original[0].state_dict())
    assert_same_function(fused, nn.Sequential(bn, nn.ELU(0.5)), x)
    reverted = cmbn_ext.revert_to_batchnorm(fused)
    assert type(reverted[0]) is nn.SyncBatchNorm and type(reverted[1]) is nn.ELU
