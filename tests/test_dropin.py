"""Drop-in for torch's BatchNorm where a model or a training stack meets it: constructor arguments and
their checks, dtype rules, materialization from the meta device, BatchNorm checkpoints, SyncBatchNorm
and other BatchNorm subclasses in convert_batchnorm, and the warnings about windows left open."""
import copy
import inspect
import io
import warnings

import pytest
import torch

import cmbn_ext
from cmbn_ext import modules
from conftest import assert_same_state, state_of

LAYERS = {  # CmBN layer -> (torch's layer, an input)
    cmbn_ext.CrossMiniBatchNorm1d: (torch.nn.BatchNorm1d, (6, 4, 3)),
    cmbn_ext.CrossMiniBatchNorm2d: (torch.nn.BatchNorm2d, (3, 4, 3, 2)),
    cmbn_ext.CrossMiniBatchNorm3d: (torch.nn.BatchNorm3d, (2, 4, 3, 2, 2)),
    cmbn_ext.SyncCrossMiniBatchNorm: (torch.nn.SyncBatchNorm, (3, 4, 5)),
}
# A value other than the default for each argument of torch's BatchNorm constructors. An argument that
# a new torch adds fails the signature test below until it is accepted and listed here.
OTHER_VALUES = {"eps": 1e-3, "momentum": None, "affine": False, "track_running_stats": False,
                "device": "meta", "dtype": torch.float64, "bias": False, "process_group": None}


def _same_layer(ours, theirs):
    """The options, parameters and buffers of torch's layer, with their shapes, dtypes and devices."""
    assert repr(ours).startswith(repr(theirs)[:-1].replace(type(theirs).__name__, type(ours).__name__))
    expected = {name: (t.shape, t.dtype, t.device) for name, t in theirs.state_dict().items()}
    got = {name: (t.shape, t.dtype, t.device) for name, t in ours.state_dict().items()
           if not name.startswith("window_")}
    assert got == expected


# ------------------------------------------------------------------------------------ constructor
def _positional(parameters):
    return [name for name, p in parameters.items() if p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD]


@pytest.mark.parametrize("cls", LAYERS)
def test_every_batchnorm_argument_is_accepted_with_its_meaning(cls):
    torch_cls = LAYERS[cls][0]
    signature = inspect.signature(torch_cls.__init__).parameters
    ours = inspect.signature(cls.__init__).parameters
    positional = _positional(signature)
    assert _positional(ours)[:len(positional)] == positional
    for name, parameter in list(signature.items())[2:]:  # self, num_features
        assert name in OTHER_VALUES, f"torch's {torch_cls.__name__} has a new argument {name!r}"
        assert ours.get(name, parameter).default == parameter.default, name
        kwargs = {name: OTHER_VALUES[name]}
        _same_layer(cls(4, **kwargs), torch_cls(4, **kwargs))
        if parameter.kind == parameter.POSITIONAL_OR_KEYWORD:
            args = [4] + [OTHER_VALUES[n] if n == name else signature[n].default for n in positional[2:]]
            _same_layer(cls(*args), torch_cls(*args))


@pytest.mark.parametrize("cls", [c for c in LAYERS if c is not cmbn_ext.SyncCrossMiniBatchNorm])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_weight_without_bias_is_batchnorm(cls, momentum):
    """bias=False at window=1: torch's BatchNorm(bias=False) in outputs, gradients, running
    statistics, eval and an empty micro-batch."""
    torch_cls, shape = LAYERS[cls]
    bn = torch_cls(4, momentum=momentum, bias=False).double()
    layer = cls(4, momentum=momentum, bias=False, window=1).double()
    assert layer.bias is None and "bias" not in layer.state_dict()
    with torch.no_grad():
        bn.weight.copy_(torch.rand(4) + 0.5)
        layer.weight.copy_(bn.weight)
    for step in range(3):
        x = (torch.randn(shape, dtype=torch.float64) * 2 + step).requires_grad_()
        dy = torch.randn(shape, dtype=torch.float64)
        expected = torch.autograd.grad(bn(x), (x, bn.weight), dy)
        got = torch.autograd.grad(layer(x), (x, layer.weight), dy)
        for e, g in zip(expected, got):
            torch.testing.assert_close(g, e)
        torch.testing.assert_close(layer.running_mean, bn.running_mean)
        torch.testing.assert_close(layer.running_var, bn.running_var)
    empty = torch.randn((0,) + shape[1:], dtype=torch.float64)
    assert layer(empty).shape == empty.shape
    bn.eval(), layer.eval()
    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(layer(x), bn(x))


@pytest.mark.parametrize("eps", [0, 0.0, -1e-5, -1, float("nan"), float("inf")])
def test_eps_must_be_positive(eps):
    with pytest.raises(ValueError, match="eps"):
        cmbn_ext.CrossMiniBatchNorm2d(4, eps=eps)


@pytest.mark.parametrize("training", [True, False])
def test_eps_set_later_is_checked_and_state_kept(training):
    layer = cmbn_ext.CrossMiniBatchNorm2d(4, mode="sliding", window=3)
    layer(torch.randn(2, 4, 3, 3))
    layer.train(training)
    before = state_of(layer)
    with pytest.raises(ValueError, match="eps"):
        layer.eps = 0.0
    assert layer.eps == 1e-5
    assert_same_state(before, state_of(layer))
    y = layer(torch.full((2, 4, 3, 3), 5.0))
    assert torch.isfinite(y).all()


# ----------------------------------------------------------------------------------------- dtypes
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@pytest.mark.parametrize("layer_dtype", DTYPES)
@pytest.mark.parametrize("input_dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False])
def test_dtype_pairs_that_batchnorm_refuses_are_refused(layer_dtype, input_dtype, training):
    """torch's BatchNorm2d decides which pairs of layer and input dtype are legal; the output of a legal
    pair has BatchNorm's dtype."""
    x = torch.randn(2, 3, 4, 4).to(input_dtype)
    bn = torch.nn.BatchNorm2d(3).to(layer_dtype).train(training)
    layer = cmbn_ext.CrossMiniBatchNorm2d(3).to(layer_dtype).train(training)
    try:
        expected = bn(x).dtype
    except RuntimeError:
        before = state_of(layer)
        with pytest.raises(RuntimeError, match="dtype"):
            layer(x)
        assert_same_state(before, state_of(layer))
    else:
        assert layer(x).dtype == expected


# ------------------------------------------------------------------------------- meta and to_empty
@pytest.mark.parametrize("mode", ["cumulative", "sliding", "ema"])
@pytest.mark.parametrize("reset", ["reset_parameters", "reset_running_stats"])
def test_materialized_from_meta_starts_clean(mode, reset):
    """Built on the meta device, then to_empty() (whose memory holds anything: poisoned here) and a
    reset, as FSDP and large-model loaders do: the layer then trains as a freshly built one."""
    fresh = cmbn_ext.CrossMiniBatchNorm2d(4, mode=mode, window=3)
    layer = cmbn_ext.CrossMiniBatchNorm2d(4, mode=mode, window=3, device="meta").to_empty(device="cpu")
    with torch.no_grad():
        for tensor in layer.buffers():
            tensor.fill_(float("nan") if tensor.is_floating_point() else 7)
        for p, value in zip(layer.parameters(), fresh.parameters()):
            if reset == "reset_parameters":
                p.fill_(float("nan"))
            else:  # reset_running_stats leaves the parameters as they are
                p.copy_(value)
    getattr(layer, reset)()
    assert_same_state(state_of(fresh), state_of(layer))
    for _ in range(4):
        x = torch.randn(2, 4, 3, 3)
        assert torch.equal(layer(x), fresh(x))
    assert_same_state(state_of(fresh), state_of(layer))


def _small(**options):
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.Conv2d(4, 4, 1), torch.nn.BatchNorm2d(4, **options))


def _assert_real_and_loaded(model, checkpoint):
    """Every parameter and buffer is a real tensor on the checkpoint's device, holding its value."""
    state = dict(model.named_parameters(), **dict(model.named_buffers()))
    assert state.keys() == checkpoint.keys()
    for name, tensor in state.items():
        assert not tensor.is_meta and tensor.device == checkpoint[name].device, name
        assert torch.equal(tensor, checkpoint[name]), name


@pytest.mark.parametrize("mode", ["cumulative", "sliding", "ema", "deferred"])
@pytest.mark.parametrize("affine", [True, False])
def test_batchnorm_checkpoint_assigned_into_a_model_built_on_meta(mode, affine):
    """How large-model loaders materialize weights: build on the meta device, then
    load_state_dict(assign=True) takes the checkpoint's tensors; the window state, which a BatchNorm
    checkpoint lacks, is made empty next to them."""
    batchnorm = _small(affine=affine)
    batchnorm(torch.randn(4, 3, 2, 2))
    with torch.device("meta"):
        model = cmbn_ext.convert_batchnorm(_small(affine=affine), mode=mode, window=3)
    model.load_state_dict(batchnorm.state_dict(), strict=True, assign=True)
    built = cmbn_ext.convert_batchnorm(copy.deepcopy(batchnorm), mode=mode, window=3)  # the same, eagerly
    _assert_real_and_loaded(model, built.state_dict())
    for layer in (model[1], model[4]):
        assert layer.window_step.item() == 0 and layer.window_count.sum().item() == 0
    for _ in range(4):
        x = torch.randn(2, 3, 2, 2)
        assert torch.equal(model(x), built(x))
    assert_same_state(state_of(built), state_of(model))


@pytest.mark.parametrize("mode", ["cumulative", "sliding", "ema", "deferred"])
def test_cmbn_checkpoint_assigned_into_a_model_built_on_meta(mode):
    """The same with a CmBN checkpoint saved mid-window: the window state comes from it, and the model
    continues bit for bit."""
    model = cmbn_ext.convert_batchnorm(_small(), mode=mode, window=3)
    for _ in range(2):
        model(torch.randn(2, 3, 2, 2))
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    with torch.device("meta"):
        loaded = cmbn_ext.convert_batchnorm(_small(), mode=mode, window=3)
    loaded.load_state_dict(checkpoint, strict=True, assign=True)
    _assert_real_and_loaded(loaded, checkpoint)
    for _ in range(4):
        x = torch.randn(2, 3, 2, 2)
        assert torch.equal(loaded(x), model(x))
    assert_same_state(state_of(model), state_of(loaded))


# ------------------------------------------------------------------------------ BatchNorm checkpoints
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track_running_stats", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("mode", ["cumulative", "sliding", "ema"])
def test_batchnorm_checkpoints_load_strictly_in_every_configuration(affine, track_running_stats, bias,
                                                                    mode):
    options = dict(affine=affine, track_running_stats=track_running_stats, bias=bias)
    bn = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), torch.nn.BatchNorm2d(3, **options))
    with torch.no_grad():
        for p in bn.parameters():
            p.add_(torch.rand_like(p))
    bn(torch.randn(4, 3, 2, 2))
    buffer = io.BytesIO()
    torch.save(bn.state_dict(), buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer)

    model = cmbn_ext.convert_batchnorm(
        torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), torch.nn.BatchNorm2d(3, **options)),
        mode=mode, window=3)
    model(torch.randn(2, 3, 2, 2))  # mid-window: the checkpoint brings an empty window
    model.load_state_dict(checkpoint, strict=True)
    for name, value in bn.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    assert model[1].window_step.item() == 0 and model[1].window_count.sum().item() == 0
    bn.eval(), model.eval()
    x = torch.randn(2, 3, 2, 2)
    torch.testing.assert_close(model(x), bn(x))


# ------------------------------------------------------------------- SyncBatchNorm and other subclasses
@pytest.mark.parametrize("shape", [(6, 4), (3, 4, 5), (2, 4, 3, 3), (2, 4, 2, 2, 2)])
def test_sync_batchnorm_converts_and_reverts(shape):
    """Without a process group SyncBatchNorm runs as BatchNorm on the CPU: at window=1 its counterpart
    matches it on every input rank SyncBatchNorm takes, in training and eval, and reverts to it."""
    model = torch.nn.Sequential(torch.nn.SyncBatchNorm(4, eps=1e-3, momentum=None, bias=False))
    model[0].weight.data.uniform_(0.5, 1.5)
    converted = cmbn_ext.convert_batchnorm(torch.nn.Sequential(
        torch.nn.SyncBatchNorm(4, eps=1e-3, momentum=None, bias=False)), window=1)
    converted[0].weight.data.copy_(model[0].weight)
    layer = converted[0]
    assert type(layer) is cmbn_ext.SyncCrossMiniBatchNorm and layer.process_group is None
    assert (layer.eps, layer.momentum, layer.bias) == (1e-3, None, None)
    for _ in range(3):
        x = torch.randn(shape)
        torch.testing.assert_close(converted(x), model(x))
    torch.testing.assert_close(layer.running_var, model[0].running_var)
    model.eval(), converted.eval()
    x = torch.randn(shape)
    torch.testing.assert_close(converted(x), model(x))
    reverted = cmbn_ext.revert_to_batchnorm(converted)[0]
    assert type(reverted) is torch.nn.SyncBatchNorm and reverted.weight is layer.weight


def test_sync_batchnorm_keeps_its_process_group(tmp_path):
    """SyncBatchNorm's group stays the layer's, and the layer pools across it (one process here)."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                                         world_size=1)
    try:
        group = torch.distributed.new_group([0])
        model = torch.nn.Sequential(torch.nn.SyncBatchNorm(4, process_group=group),
                                    torch.nn.SyncBatchNorm(4))
        cmbn_ext.convert_batchnorm(model, window=2)
        assert model[0].process_group is group and model[1].process_group is None
        alone = cmbn_ext.CrossMiniBatchNorm2d(4, window=2)
        for _ in range(3):
            x = torch.randn(2, 4, 3, 3)
            torch.testing.assert_close(model[0](x), alone(x))
        assert_same_state(state_of(alone), state_of(model[0]))
        assert cmbn_ext.revert_to_batchnorm(model)[0].process_group is group
    finally:
        torch.distributed.destroy_process_group()


def test_other_batchnorm_subclasses_are_named_in_one_warning():
    class FrozenStatsBatchNorm2d(torch.nn.BatchNorm2d):
        pass

    model = torch.nn.Sequential(torch.nn.BatchNorm2d(4), FrozenStatsBatchNorm2d(4),
                                torch.nn.Sequential(FrozenStatsBatchNorm2d(4)), torch.nn.LazyBatchNorm2d())
    with pytest.warns(UserWarning) as record:
        cmbn_ext.convert_batchnorm(model)
    assert len(record) == 1 and record[0].filename == __file__  # the caller's line
    message = str(record[0].message)
    assert "FrozenStatsBatchNorm2d (2)" in message and "LazyBatchNorm2d (1)" in message
    assert "convert_batchnorm left 3 layer(s)" in message
    assert type(model[0]) is cmbn_ext.CrossMiniBatchNorm2d and type(model[1]) is FrozenStatsBatchNorm2d


def test_a_model_of_known_layers_converts_and_reverts_without_warnings():
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(3), torch.nn.SyncBatchNorm(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cmbn_ext.convert_batchnorm(model)
        cmbn_ext.convert_batchnorm(model)  # already converted: nothing to say
        cmbn_ext.revert_to_batchnorm(model)


def test_norm_act_layer_builds_its_activation_without_timm(monkeypatch):
    """CrossMiniBatchNormAct2d (timm's BatchNormAct2d counterpart) needs timm only for activation names."""
    from cmbn_ext import norm_act

    monkeypatch.setattr(norm_act, "create_act_layer", None)
    layer = cmbn_ext.CrossMiniBatchNormAct2d(4, act_layer=torch.nn.LeakyReLU,
                                             act_kwargs=dict(negative_slope=0.3), window=1)
    assert type(layer.act) is torch.nn.LeakyReLU and layer.act.inplace and layer.act.negative_slope == 0.3
    assert type(cmbn_ext.CrossMiniBatchNormAct2d(4, act_layer=torch.nn.GELU).act) is torch.nn.GELU
    assert type(cmbn_ext.CrossMiniBatchNormAct2d(4, apply_act=False).act) is torch.nn.Identity
    with pytest.raises(ValueError, match="timm"):
        cmbn_ext.CrossMiniBatchNormAct2d(4, act_layer="silu")
    x = torch.randn(3, 4, 2, 2)
    expected = torch.nn.functional.leaky_relu(torch.nn.functional.batch_norm(x, None, None, training=True), 0.3)
    torch.testing.assert_close(layer(x), expected)


# ------------------------------------------------------------------------------- open-window warnings
def _model(**options):
    return cmbn_ext.convert_batchnorm(torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.BatchNorm2d(4)),
        **options)


def _open_window_warnings(record):
    return [w for w in record if issubclass(w.category, cmbn_ext.OpenWindowWarning)]


def test_eval_with_an_open_window_is_said_once():
    model = _model(window=3)
    model(torch.randn(2, 3, 4, 4))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model.eval()
        model.train()
        model.eval()
    said = _open_window_warnings(record)
    assert len(said) == 1 and "open window of 1 micro-batch" in str(said[0].message)
    assert said[0].filename == __file__  # model.eval()'s line, below Module.train of each parent


def test_a_window_none_that_grows_without_end_is_said_once(monkeypatch):
    monkeypatch.setattr(modules, "LONG_WINDOW", 5)
    model = _model(window=None)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(4):
            model(torch.randn(2, 3, 4, 4))
        assert not _open_window_warnings(record)
        for _ in range(6):
            model(torch.randn(2, 3, 4, 4))
    said = _open_window_warnings(record)
    assert len(said) == 1 and "without end_window()" in str(said[0].message)
    assert said[0].filename == __file__


@pytest.mark.parametrize("options", [dict(window=2), dict(window=None), dict(mode="sliding", window=2),
                                     dict(mode="ema", momentum=0.4)])
def test_correct_loops_are_not_warned(monkeypatch, options):
    """Windows ended by count or by end_window(), and the modes whose history is meant to outlive a
    step: no warning, however long the run, at eval() or not."""
    monkeypatch.setattr(modules, "LONG_WINDOW", 5)
    model = _model(**options)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(6):
            for _ in range(2):
                model(torch.randn(2, 3, 4, 4)).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            cmbn_ext.end_window(model)
            model.eval()
            model(torch.randn(2, 3, 4, 4))
            model.train()
    assert not _open_window_warnings(record)


# --------------------------------------------------------------- a window that spans an optimizer step
def _train(model, steps, per_step, end_windows=False, parameters=None):
    """``steps`` optimizer steps of ``per_step`` micro-batches each; the windows are ended after each
    step only with ``end_windows``."""
    optimizer = torch.optim.SGD(model.parameters() if parameters is None else parameters, lr=0.1,
                                momentum=0.9)
    for _ in range(steps):
        for _ in range(per_step):
            model(torch.randn(2, 3, 4, 4)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        if end_windows:
            cmbn_ext.end_window(model)


@pytest.mark.parametrize("options", [dict(window=4), dict(window=None), dict(mode="deferred", window=4),
                                     dict(window=4, running_stats="micro_batch")])
def test_a_window_across_an_optimizer_step_is_said_once(options):
    """The mistake: 3 micro-batches per step with window=4 (or window=None) and nothing that ends the
    windows at the step. The weights change inside a window, and the layer says so, once, at the
    forward that finds them changed, naming the fixes."""
    model = _model(**options)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _train(model, 1, 3)
        assert not _open_window_warnings(record)  # the first step's micro-batches: one set of weights
        _train(model, 4, 3)
    said = _open_window_warnings(record)
    assert len(said) == 1, [str(w.message) for w in said]
    message = str(said[0].message)
    assert "end_windows_on_step" in message and "window= equal to the micro-batches per optimizer step" \
        in message
    assert said[0].filename == __file__  # the model(...) line, below Sequential and Module.__call__


@pytest.mark.parametrize("trained", ["weight", "bias"])
def test_a_change_of_the_weight_or_the_bias_alone_is_found(trained):
    """Only one of the layers' parameters is trained: the other never changes and cannot tell."""
    model = _model(window=4)
    parameters = [getattr(layer, trained) for layer in (model[1], model[3])]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _train(model, 1, 3, parameters=parameters)  # a step inside the window, after 3 micro-batches
        assert not _open_window_warnings(record)
        model(torch.randn(2, 3, 4, 4))  # the window's 4th finds the change
    said = _open_window_warnings(record)
    assert len(said) == 1 and "end_windows_on_step" in str(said[0].message)


@pytest.mark.parametrize("options", [dict(mode="sliding", window=4), dict(mode="ema", momentum=0.4),
                                     dict(window=4, affine=False)])
def test_no_step_warning_where_history_may_span_steps_or_nothing_can_change(options):
    """Sliding and EMA history spans optimizer steps by design; a layer without affine parameters has
    nothing to tell a step by."""
    options = dict(options)
    affine = options.pop("affine", True)
    model = cmbn_ext.convert_batchnorm(torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4, affine=affine), torch.nn.ReLU(),
        torch.nn.BatchNorm2d(4, affine=affine)), **options)
    with warnings.catch_warnings():
        warnings.simplefilter("error", cmbn_ext.OpenWindowWarning)
        _train(model, 4, 3)


def test_no_step_warning_for_frozen_affine_parameters():
    model = _model(window=4)
    for layer in (model[1], model[3]):
        layer.requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", cmbn_ext.OpenWindowWarning)
        _train(model, 4, 3)  # the conv trains: the statistics change, but not the layers' own weights


@pytest.mark.parametrize("per_step", [3, 4, 5])
def test_no_step_warning_when_the_windows_end_with_the_step(per_step):
    """The README's loop: window=4 and end_windows_on_step, with steps of 3, 4 and 5 micro-batches (the
    count commits a window inside a step of 5, and the step ends the rest); also a window ended by hand
    and one that is a copy or a checkpoint of a model in mid-window."""
    model = _model(window=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = cmbn_ext.end_windows_on_step(optimizer, model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", cmbn_ext.OpenWindowWarning)
        for _ in range(3):
            for _ in range(per_step):
                model(torch.randn(2, 3, 4, 4)).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        handle.remove()
        model(torch.randn(2, 3, 4, 4))  # mid-window
        copied = copy.deepcopy(model)  # new parameters, with new version counters
        loaded = _model(window=4)
        loaded.load_state_dict(model.state_dict())
        for other in (copied, loaded):
            _train(other, 2, 1, end_windows=True)


@pytest.mark.parametrize("checkpoint", ["batchnorm", "cmbn"])
def test_no_step_warning_after_a_checkpoint_loaded_mid_window(checkpoint):
    """Loading writes the parameters in place and replaces the window: the layer follows the loaded
    window from there, instead of taking the load for a step inside its own window."""
    source = _model(window=4)
    source(torch.randn(2, 3, 4, 4))  # a window of 1 in the CmBN checkpoint
    if checkpoint == "batchnorm":
        source = cmbn_ext.revert_to_batchnorm(source)
    model = _model(window=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", cmbn_ext.OpenWindowWarning)
        for _ in range(2):
            model(torch.randn(2, 3, 4, 4))
        model.load_state_dict(source.state_dict())
        _train(model, 3, 3, end_windows=True)
