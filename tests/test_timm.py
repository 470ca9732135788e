"""timm: its BatchNormAct2d (BatchNorm with its activation and dropout, what most of timm's CNNs are built
from) converts to CrossMiniBatchNormAct2d and back, and timm's norm_layer= takes the CmBN layer. Checked
on the real timm and on CSPDarknet53, YOLOv4's backbone, whose 67 norm layers are all BatchNormAct2d."""
import copy
import functools
import subprocess
import sys
import warnings

import pytest
import torch

import cmbn_ext

timm = pytest.importorskip("timm")
from timm.layers import BatchNormAct2d, ConvNormAct  # noqa: E402  (after the skip: timm is optional)

CSP_NORM_LAYERS = 67


def _norm_layers(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def _cspdarknet(**kwargs):
    torch.manual_seed(0)
    return timm.create_model("cspdarknet53", pretrained=False, **kwargs)


def _assert_same_outputs(model, twin):
    """Outputs in training (two steps, running statistics updated) and then in eval. The input keeps 16
    values per channel at the last stage: fewer would magnify rounding differences beyond any bound.
    (53 layers deep, rounding differs by a few 1e-6.)"""
    close = functools.partial(torch.testing.assert_close, atol=1e-4, rtol=1e-4)
    x = torch.randn(4, 3, 64, 64)
    for _ in range(2):
        close(twin(x), model(x))
    for a, b in zip(_norm_layers(model), _norm_layers(twin)):
        close(b.running_mean, a.running_mean)
        close(b.running_var, a.running_var)
    model.eval(), twin.eval()
    close(twin(x), model(x))


def test_import_cmbn_ext_does_not_import_timm():
    code = "import sys, cmbn_ext; assert 'timm' not in sys.modules, 'timm was imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_cspdarknet53_converts_every_norm_layer_keeping_activation_and_weights():
    model = _cspdarknet()
    layers = _norm_layers(model)
    assert len(layers) == CSP_NORM_LAYERS and all(type(m) is BatchNormAct2d for m in layers)
    kept = [(m.act, m.drop, m.weight, m.running_mean) for m in layers]
    twin = cmbn_ext.convert_batchnorm(copy.deepcopy(model), window=1)
    converted = _norm_layers(twin)
    assert len(converted) == CSP_NORM_LAYERS
    assert all(type(m) is cmbn_ext.CrossMiniBatchNormAct2d for m in converted)
    assert all(type(m.act) is type(act) and type(m.drop) is type(drop)
               for m, (act, drop, _, _) in zip(converted, kept))
    same = cmbn_ext.convert_batchnorm(model, window=1)  # in place: the very modules and tensors
    assert all(m.act is act and m.drop is drop and m.weight is weight and m.running_mean is mean
               for m, (act, drop, weight, mean) in zip(_norm_layers(same), kept))
    _assert_same_outputs(_cspdarknet(), twin)


def test_revert_gives_back_batchnormact2d():
    model = cmbn_ext.convert_batchnorm(_cspdarknet(), window=3).eval()
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    acts = [m.act for m in _norm_layers(model)]
    reverted = cmbn_ext.revert_to_batchnorm(model)
    layers = _norm_layers(reverted)
    assert all(type(m) is BatchNormAct2d for m in layers) and [m.act for m in layers] == acts
    torch.testing.assert_close(reverted(x), expected)


def test_timm_norm_layer_argument_builds_the_model_with_cmbn():
    """norm_layer= through timm's own factory: the same model as with BatchNormAct2d, with CmBN
    layers, the model's activations, and the options of the partial."""
    model = _cspdarknet()
    built = _cspdarknet(norm_layer=functools.partial(cmbn_ext.CrossMiniBatchNormAct2d, window=1))
    layers = _norm_layers(built)
    assert len(layers) == CSP_NORM_LAYERS
    assert all(type(m) is cmbn_ext.CrossMiniBatchNormAct2d and m.window == 1 for m in layers)
    assert [type(m.act) for m in layers] == [type(m.act) for m in _norm_layers(model)]
    built.load_state_dict(model.state_dict(), strict=True)  # a BatchNorm checkpoint of the model
    _assert_same_outputs(model, built)


@pytest.mark.parametrize("act_layer", ["silu", torch.nn.Hardswish, None])
def test_conv_norm_act_takes_the_bare_class(act_layer):
    block = ConvNormAct(3, 8, 3, norm_layer=cmbn_ext.CrossMiniBatchNormAct2d, act_layer=act_layer)
    reference = ConvNormAct(3, 8, 3, norm_layer=BatchNormAct2d, act_layer=act_layer)
    assert type(block.bn) is cmbn_ext.CrossMiniBatchNormAct2d
    assert type(block.bn.act) is type(reference.bn.act)


@pytest.mark.parametrize("options", [
    {},
    dict(apply_act=False),
    dict(act_layer="leaky_relu", act_kwargs=dict(negative_slope=0.2), inplace=False),
    dict(act_layer=torch.nn.GELU, drop_layer=torch.nn.Identity),
    dict(act_layer=torch.nn.SiLU, eps=1e-3, momentum=None, affine=False),
    dict(act_layer=torch.nn.SiLU, track_running_stats=False, dtype=torch.float64),
])
def test_layer_is_batchnormact2d_at_window_one(options):
    """timm's constructor arguments, with timm's meaning: the same activation, and the same outputs."""
    torch.manual_seed(0)
    bn = BatchNormAct2d(4, **options)
    layer = cmbn_ext.CrossMiniBatchNormAct2d(4, **options, window=1)
    assert repr(layer.act) == repr(bn.act) and repr(layer.drop) == repr(bn.drop)
    if bn.weight is not None:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-1, 1)
            layer.weight.copy_(bn.weight), layer.bias.copy_(bn.bias)
    x = torch.randn(3, 4, 5, 5, dtype=options.get("dtype", torch.float32))
    for _ in range(3):
        torch.testing.assert_close(layer(x.clone()), bn(x.clone()))
    bn.eval(), layer.eval()
    torch.testing.assert_close(layer(x.clone()), bn(x.clone()))


def test_sync_batchnorm_act_keeps_activation_and_group(tmp_path):
    """timm's SyncBatchNormAct (its convert_sync_batchnorm) converts with its activation; its group,
    none for the default group, becomes the layer's."""
    model = timm.layers.convert_sync_batchnorm(torch.nn.Sequential(
        BatchNormAct2d(4, act_layer=torch.nn.SiLU), BatchNormAct2d(4, act_layer=torch.nn.ReLU)))
    with pytest.warns(UserWarning, match="not initialized"):  # no default group yet
        converted = cmbn_ext.convert_batchnorm(copy.deepcopy(model))
    assert [type(m.act) for m in converted] == [torch.nn.SiLU, torch.nn.ReLU]
    assert all(m.process_group is None for m in converted)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a group chosen for the layers: nothing to warn about
        cmbn_ext.convert_batchnorm(copy.deepcopy(model), process_group=None)

    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                                         world_size=1)
    try:
        group = torch.distributed.new_group([0])
        model[1].process_group = group
        converted = cmbn_ext.convert_batchnorm(model)
        assert converted[0].process_group is torch.distributed.group.WORLD
        assert converted[1].process_group is group
        assert type(converted[1]) is cmbn_ext.CrossMiniBatchNormAct2d
        assert type(converted[1].act) is torch.nn.ReLU
    finally:
        torch.distributed.destroy_process_group()
