"""Model-wide helpers: swap BatchNorm layers for CmBN and back, and end or reset every window."""
import collections
import sys

import torch
import torch.distributed as dist
from torch.nn.modules.batchnorm import _BatchNorm

from . import activations
from .modules import (CrossMiniBatchNorm1d, CrossMiniBatchNorm2d, CrossMiniBatchNorm3d, FusedActivation,
                      SyncCrossMiniBatchNorm, _check_memory, _CrossMiniBatchNorm)
from .user_warnings import warn

_TO_CMBN = {
    torch.nn.BatchNorm1d: CrossMiniBatchNorm1d,
    torch.nn.BatchNorm2d: CrossMiniBatchNorm2d,
    torch.nn.BatchNorm3d: CrossMiniBatchNorm3d,
    torch.nn.SyncBatchNorm: SyncCrossMiniBatchNorm,
}
_TO_BATCHNORM = {cmbn: bn for bn, cmbn in _TO_CMBN.items()}


def _timm_to_cmbn():
    """timm's norm+act layers and their counterpart, once timm is loaded: a model that holds timm's
    layers has loaded it, and a conversion must not import timm for the others."""
    timm_layers = sys.modules.get("timm.layers.norm_act")
    if timm_layers is None:
        return {}
    from .norm_act import CrossMiniBatchNormAct2d
    return {timm_layers.BatchNormAct2d: CrossMiniBatchNormAct2d,
            timm_layers.SyncBatchNormAct: CrossMiniBatchNormAct2d}


def _norm_act_slots(parent):
    """The ``(norm, activation)`` child names of ``parent`` whose forward applies the activation
    straight to the norm's output: neighbours in an ``nn.Sequential`` (one that keeps Sequential's
    forward), ultralytics' ``Conv`` (``act(bn(conv(x)))``) and mmcv's ``ConvModule`` in the order
    conv, norm, act. Those packages are looked at only when already loaded."""
    forward = type(parent).forward
    if forward is torch.nn.Sequential.forward:
        names = [name for name, child in parent._modules.items() if child is not None]
        return list(zip(names, names[1:]))
    ultralytics = sys.modules.get("ultralytics.nn.modules.conv")
    if ultralytics is not None and forward is ultralytics.Conv.forward:
        return [("bn", "act")]
    mmcv = sys.modules.get("mmcv.cnn.bricks.conv_module")
    if (mmcv is not None and forward is mmcv.ConvModule.forward and parent.order == ("conv", "norm", "act")
            and parent.with_norm and parent.with_activation
            and getattr(parent, "efficient_conv_bn_eval_forward", None) is None):  # that skips norm
        return [(parent.norm_name, "activate")]
    return []


def _activation_pairs(root, classes):
    """``(parent, norm name, module name)`` of the BatchNorm layers (of ``classes``) whose output goes
    straight into a module (``_norm_act_slots``). A layer in more than one slot is left out: its other
    uses may not be followed by that module."""
    slots = collections.Counter(id(child) for parent in root.modules()
                                for child in parent._modules.values() if child is not None)
    slots[id(root)] += 1
    return [(parent, norm_name, act_name) for parent in root.modules()
            for norm_name, act_name in _norm_act_slots(parent)
            if type(parent._modules[norm_name]) in classes and slots[id(parent._modules[norm_name])] == 1]


def _keeps_output_safely(layer, followed):
    """Whether a lean layer may keep its output: it computes an activation (whose output the original
    model's activation handed on as it does now), or its output goes straight into a module that
    does not change it in place (``followed``, or a timm layer's own ``act``). Other outputs may be
    changed in place by code the conversion cannot see (a residual ``out += identity``), which would
    make the backward fail."""
    if layer.fused_activation() is not None or id(layer) in followed:
        return True
    act = layer._modules.get("act")
    return act is not None and type(act) is not torch.nn.Identity and not activations.in_place(act)


def _swap(module, cls, fuse_activation=None, **kwargs):
    """A ``cls`` layer with the options of ``module`` (``eps``, ``momentum``, the device and dtype of
    its tensors, a process group, unless ``kwargs`` set them), sharing its parameters, statistics, and
    a timm layer's activation and dropout (``fuse_activation``: whether its op computes that
    activation)."""
    reference = module.running_mean if module.running_mean is not None else module.weight
    factory = {} if reference is None else {"device": reference.device, "dtype": reference.dtype}
    options = {"eps": module.eps, "momentum": module.momentum, **factory,
               **_kept_options(module, cls, kwargs), **kwargs}
    if fuse_activation is not None and "act" in module._modules:
        options["fuse_activation"] = fuse_activation
    swapped = cls(module.num_features, affine=module.affine,
                  track_running_stats=module.track_running_stats, **options)
    # The same Parameter objects, so an optimizer built before the swap keeps working.
    swapped.weight, swapped.bias = module.weight, module.bias
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        setattr(swapped, name, getattr(module, name))
    for name in ("drop", "act"):
        if name in module._modules:
            swapped.add_module(name, module._modules[name])
    if isinstance(swapped, _CrossMiniBatchNorm):
        swapped._refresh_activation()  # a timm layer's activation is in place now
    swapped.train(module.training)
    return swapped


def _kept_options(module, cls, chosen):
    """What ``cls`` must be told beyond BatchNorm's options: the process group of a SyncBatchNorm
    (unless ``chosen`` sets one), and that a timm layer's activation is moved over rather than built."""
    options = {"apply_act": False} if "act" in module._modules else {}
    if "process_group" in chosen:
        return options
    if isinstance(module, torch.nn.SyncBatchNorm):
        group = module.process_group
        if group is None and cls is not SyncCrossMiniBatchNorm:  # there None means "alone"
            group = _default_group(module)
        options["process_group"] = group
    elif cls is torch.nn.SyncBatchNorm:
        options["process_group"] = module.process_group
    return options


def _default_group(module):
    """The group a SyncBatchNorm without one pools over: the default group, once there is one."""
    if dist.is_available() and dist.is_initialized():
        return dist.group.WORLD
    warn(f"convert_batchnorm: {type(module).__name__} without a process_group pools over the "
         f"default group, but torch.distributed is not initialized yet: its CmBN layer pools "
         f"within each process. Convert after init_process_group(), or pass process_group=")
    return None


def convert_batchnorm(module, *, fuse_activation=False, memory="standard", **kwargs):
    """Replace every BatchNorm layer inside ``module`` by its CmBN counterpart.

    ``torch.nn.BatchNorm1d/2d/3d`` become ``CrossMiniBatchNorm1d/2d/3d``, ``torch.nn.SyncBatchNorm``
    becomes ``SyncCrossMiniBatchNorm`` with its process group, and timm's ``BatchNormAct2d`` and
    ``SyncBatchNormAct`` become ``CrossMiniBatchNormAct2d`` with their activation and dropout.
    Parameters and running statistics are kept (the very tensors), and so are ``eps``, ``momentum``,
    ``affine``, a missing bias, ``track_running_stats``, the training flag, and a layer's sharing
    between several places. ``kwargs`` are the CmBN options (``mode``, ``window``, ``grad``,
    ``process_group``); they may also set ``momentum`` or ``eps`` anew (EMA mode takes its weight from
    ``momentum``), and ``device`` and ``dtype`` for layers without tensors of their own
    (``affine=False`` and no running statistics). ``window`` is the layers' default, 4, unless given:
    set it to the micro-batches per optimizer step (a window that spans a step is warned about).

    ``memory`` (``"standard"`` or ``"lean"``) goes to the converted layers (see the layers' docstring:
    ``"lean"`` keeps a layer's output for the backward instead of its input where the activation it
    computes is invertible, none counting as one). Where a layer computes no activation, ``"lean"``
    is kept only when its output goes straight into the next module of an ``nn.Sequential`` (or a
    timm layer's own activation) that does not change it in place; the others keep their input, as
    code the conversion cannot see may change their output in place (a residual
    ``out += identity``, as in torchvision's ResNet), which would make the backward fail.

    ``fuse_activation=True`` folds a BatchNorm and the activation right after it (ReLU, LeakyReLU,
    ELU, SiLU, Mish, Hardswish: ``activations.MODULES``, those exact classes) into one layer that
    computes both in its op: neighbours in an ``nn.Sequential`` (the activation's slot becomes a
    ``FusedActivation``, an identity, so the state dict keys stay), timm's ``BatchNormAct2d`` (when
    its ``drop`` is an identity), ultralytics' ``Conv`` and mmcv's ``ConvModule`` (norm then
    activation; its ``forward(x, activate=False)`` then still applies the activation). A BatchNorm
    used in several places, and other activations, stay unfused. ``fused_activations(model)`` lists
    what was fused; ``revert_to_batchnorm`` puts the activation modules back. An ultralytics model
    must be reverted before its ``fuse()`` (which would drop the folded activation with the norm).

    Only those exact classes are converted: other subclasses of BatchNorm may carry behaviour of their
    own, and one warning lists the ones left as they are. Returns the converted module (a new one when
    ``module`` itself is a BatchNorm layer); the children of ``module`` are replaced in place.

    Example::

        model = cmbn_ext.convert_batchnorm(timm.create_model("cspdarknet53"), window=4)
    """
    _check_memory(memory)
    for name in ("activation", "activation_param"):
        if name in kwargs:
            raise TypeError(f"convert_batchnorm takes no {name}=: fuse_activation=True folds the model's "
                            f"own activation modules into the layers")
    pairs = _activation_pairs(module, _TO_CMBN) if fuse_activation or memory == "lean" else []
    timm_classes = _timm_to_cmbn()
    options = {**kwargs, "memory": memory}
    swapped = {}
    converted = _convert(module, {**_TO_CMBN, **timm_classes},
                         lambda layer, cls: _swap(layer, cls, **options, **(
                             {"fuse_activation": fuse_activation} if cls in timm_classes.values() else {})),
                         swapped)
    followed = set()  # layers whose output goes straight into a module that does not change it in place
    for parent, norm_name, act_name in pairs:
        layer, act = parent._modules[norm_name], parent._modules[act_name]
        fused = activations.from_module(act) if fuse_activation else None
        if fused is not None and fused[0] != activations.IDENTITY:
            layer._set_activation(*fused, act)
            layer._activation_slot = True
            parent.add_module(act_name, FusedActivation(act))
        elif not activations.in_place(act) and not isinstance(act, torch.nn.Identity):
            # an activation that hands the output on unchanged
            followed.add(id(layer))
    if memory == "lean":
        for layer in swapped.values():
            if isinstance(layer, _CrossMiniBatchNorm) and not _keeps_output_safely(layer, followed):
                layer.memory = "standard"
    left = [layer for layer in converted.modules()
            if isinstance(layer, _BatchNorm) and not isinstance(layer, _CrossMiniBatchNorm)]
    _warn_left("convert_batchnorm", left, "it converts torch.nn.BatchNorm1d/2d/3d, SyncBatchNorm and "
               "timm's BatchNormAct2d and SyncBatchNormAct, not other subclasses, which may behave "
               "differently (a Lazy one becomes BatchNorm at its first forward: run one first)")
    return converted


def convert_deferred_batch_norm(module, chunks=1):
    """torchgpipe's and fairscale's ``DeferredBatchNorm.convert_deferred_batch_norm``: every BatchNorm
    inside ``module`` becomes a CmBN layer in ``mode="deferred"`` with a window of ``chunks``
    micro-batches.

    Each micro-batch is normalized with its own statistics, exactly as BatchNorm does, and the running
    statistics are committed once per ``chunks`` micro-batches from their pooled statistics: after a
    window they equal BatchNorm's over the window's micro-batches concatenated. It is
    ``convert_batchnorm(module, mode="deferred", window=chunks)``, for code that migrates from
    torchgpipe or fairscale.

    Example::

        model = cmbn_ext.convert_deferred_batch_norm(model, chunks=4)  # 4 micro-batches per step
    """
    return convert_batchnorm(module, mode="deferred", window=chunks)


def fused_activations(module):
    """``{qualified name: activation name}`` of the CmBN layers inside ``module`` (itself included, as
    ``""``) whose op computes an activation (``convert_batchnorm(..., fuse_activation=True)``, the
    layers' ``activation=``, or ``CrossMiniBatchNormAct2d``'s own)."""
    found = {}
    for name, layer in module.named_modules():
        if isinstance(layer, _CrossMiniBatchNorm):
            fused = layer.fused_activation()
            if fused is not None:
                found[name] = activations.CODE_NAMES[fused[0]]
    return found


def revert_to_batchnorm(module):
    """Replace every CmBN layer inside ``module`` by the BatchNorm it came from: ``torch.nn.BatchNorm*d``,
    ``torch.nn.SyncBatchNorm`` (with its process group), or timm's ``BatchNormAct2d`` (with its
    activation and dropout).

    An activation the layer computes goes back into the slot ``convert_batchnorm(...,
    fuse_activation=True)`` took it from; a layer built with ``activation=`` becomes
    ``nn.Sequential(BatchNorm, activation module)``. The reverted model computes the same function.
    Parameters and running statistics are kept; the window state is dropped (call ``end_window`` first
    to commit it). For export, fusion, ONNX and inference tooling that knows only BatchNorm.
    """
    to_timm = {cmbn: timm_layer for timm_layer, cmbn in _timm_to_cmbn().items()
               if not issubclass(timm_layer, torch.nn.SyncBatchNorm)}  # BatchNormAct2d
    reverted = _convert(module, {**_TO_BATCHNORM, **to_timm}, _revert, {})
    if type(reverted) is FusedActivation:
        reverted = reverted.original
    for parent in list(reverted.modules()):
        for name, child in list(parent._modules.items()):
            if type(child) is FusedActivation:
                parent._modules[name] = child.original
    _warn_left("revert_to_batchnorm",
               [layer for layer in reverted.modules() if isinstance(layer, _CrossMiniBatchNorm)],
               "their BatchNorm class is not available (timm's, for CrossMiniBatchNormAct2d) or they "
               "are subclasses")
    return reverted


def _warn_left(function, layers, why):
    """One warning naming the classes of the layers left unconverted, if any."""
    if not layers:
        return
    counts = collections.Counter(f"{type(layer).__module__}.{type(layer).__qualname__}" for layer in layers)
    names = ", ".join(f"{name} ({count})" for name, count in counts.items())
    warn(f"{function} left {len(layers)} layer(s) as they are: {names}; {why}")


def _revert(layer, cls):
    """The BatchNorm of a CmBN layer, followed by the activation its op computed where no slot holds it."""
    reverted = _swap(layer, cls)
    fused = layer.fused_activation()
    if fused is None or layer._activation_slot or "act" in layer._modules:
        return reverted
    act = layer._activation_module
    return torch.nn.Sequential(reverted, act if act is not None else activations.to_module(*fused))


def _convert(module, classes, swap, converted):
    """Swap (``swap(layer, cls)``) ``module`` and its descendants whose exact type is in ``classes``. A
    layer used in several places is swapped once (``converted`` maps old layers to new ones), so it
    stays shared."""
    if id(module) in converted:
        return converted[id(module)]
    if type(module) in classes:
        converted[id(module)] = swap(module, classes[type(module)])
        return converted[id(module)]
    # Every slot, not named_children(), which lists a shared child once only.
    for name, child in list(module._modules.items()):
        if child is not None:
            module.add_module(name, _convert(child, classes, swap, converted))
    return module


def _cmbn_layers(module):
    return (layer for layer in module.modules() if isinstance(layer, _CrossMiniBatchNorm))


def end_window(module):
    """``end_window()`` on every CmBN layer inside ``module`` (call it after each optimizer step when
    the window is not a fixed number of micro-batches)."""
    for layer in _cmbn_layers(module):
        layer.end_window()


def reset_window(module):
    """``reset_window()`` on every CmBN layer inside ``module``."""
    for layer in _cmbn_layers(module):
        layer.reset_window()
