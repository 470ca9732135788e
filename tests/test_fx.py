"""torch.fx symbolic tracing of converted models: torch.fx.symbolic_trace and torchvision's
create_feature_extractor (how detection and segmentation code takes a backbone's feature maps) record
each CmBN layer as one call of the layer, as they do torch's BatchNorm, so the traced module computes
what the eager model does and still advances the layers' windows."""
import copy

import pytest
import torch

import cmbn_ext

torchvision = pytest.importorskip("torchvision")
from torchvision.models.feature_extraction import create_feature_extractor  # noqa: E402

NODES = {"bn1": "stem", "layer1.0.bn2": "block", "layer2": "c3"}


def _resnet():
    model = torchvision.models.resnet18(num_classes=4)
    with torch.no_grad():  # statistics and affine parameters other than the defaults
        for layer in model.modules():
            if isinstance(layer, torch.nn.BatchNorm2d):
                layer.weight.uniform_(0.5, 1.5)
                layer.bias.uniform_(-0.5, 0.5)
                layer.running_mean.uniform_(-0.2, 0.2)
                layer.running_var.uniform_(0.5, 1.5)
    return model


def _cmbn_layers(model):
    return [m for m in model.modules() if isinstance(m, cmbn_ext.CrossMiniBatchNorm2d)]


def _used_layers(extractor, model, cls=cmbn_ext.CrossMiniBatchNorm2d):
    """The layers of ``model`` that ``extractor`` runs (the graph ends at the last requested node), in
    the model's order; the extractor holds the very layer objects."""
    used = {id(m) for m in extractor.modules()}
    layers = [m for m in model.modules() if isinstance(m, cls) and id(m) in used]
    assert len(layers) >= 5  # the stem and the first two stages
    return layers


def _assert_same_outputs(got, expected):
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], msg=name)


def test_feature_extractor_at_window_one_is_batchnorms():
    batchnorm = _resnet()
    model = cmbn_ext.convert_batchnorm(copy.deepcopy(batchnorm), window=1)
    extractor = create_feature_extractor(model, NODES)
    expected = create_feature_extractor(batchnorm, NODES)
    for _ in range(2):
        x = torch.randn(2, 3, 32, 32)
        _assert_same_outputs(extractor(x), expected(x))
    for ours, theirs in zip(_used_layers(extractor, model),
                            _used_layers(expected, batchnorm, torch.nn.BatchNorm2d), strict=True):
        torch.testing.assert_close(ours.running_mean, theirs.running_mean)
        torch.testing.assert_close(ours.running_var, theirs.running_var)
        assert int(ours.num_batches_tracked) == 2
    extractor.eval(), expected.eval()
    x = torch.randn(2, 3, 32, 32)
    _assert_same_outputs(extractor(x), expected(x))


@pytest.mark.parametrize("mode", ["cumulative", "sliding", "ema", "deferred"])
def test_feature_extractor_advances_the_windows_as_eager(mode):
    model = cmbn_ext.convert_batchnorm(_resnet(), mode=mode, window=3, momentum=0.4)
    twin = copy.deepcopy(model)
    extractor = create_feature_extractor(model, NODES)
    eager = create_feature_extractor(twin, NODES, tracer_kwargs={
        "leaf_modules": [cmbn_ext.CrossMiniBatchNorm2d]})  # the layer's own forward, as a leaf
    for step in range(2):
        x = torch.randn(2, 3, 32, 32)
        _assert_same_outputs(extractor(x), eager(x))
        for layer in _used_layers(extractor, model):  # the traced module runs the model's own layers
            assert int(layer.window_step) == step + 1
    for ours, theirs in zip(_cmbn_layers(model), _cmbn_layers(twin), strict=True):
        for name, value in theirs.state_dict().items():
            assert torch.equal(ours.state_dict()[name], value), name
    cmbn_ext.end_window(model), cmbn_ext.end_window(twin)
    extractor.eval(), eager.eval()
    x = torch.randn(2, 3, 32, 32)
    _assert_same_outputs(extractor(x), eager(x))


@pytest.mark.parametrize("training", [True, False])
def test_symbolic_trace_runs_the_layers(training):
    model = cmbn_ext.convert_batchnorm(_resnet(), window=3).train(training)
    twin = copy.deepcopy(model)
    traced = torch.fx.symbolic_trace(model)
    called = {node.target for node in traced.graph.nodes if node.op == "call_module"}
    assert {name for name, m in model.named_modules()
            if isinstance(m, cmbn_ext.CrossMiniBatchNorm2d)} <= called
    for _ in range(2):
        x = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(traced(x), twin(x))
    expected_step = 2 if training else 0
    assert all(int(layer.window_step) == expected_step for layer in _cmbn_layers(model))


def test_symbolic_trace_of_the_norm_act_layer_applies_its_activation_once():
    layer = cmbn_ext.CrossMiniBatchNormAct2d(4, act_layer=torch.nn.Tanh, window=2)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), layer)
    twin = copy.deepcopy(model)
    traced = torch.fx.symbolic_trace(model)
    assert [node.target for node in traced.graph.nodes if node.op == "call_module"] == ["0", "1"]
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(traced(x), twin(x))
    assert int(layer.window_step) == 1
