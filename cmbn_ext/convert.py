"""Model-wide helpers: swap BatchNorm layers for CmBN and back, and end or reset every window."""
import torch

from .modules import (CrossMiniBatchNorm1d, CrossMiniBatchNorm2d, CrossMiniBatchNorm3d,
                      _CrossMiniBatchNorm)

_TO_CMBN = {
    torch.nn.BatchNorm1d: CrossMiniBatchNorm1d,
    torch.nn.BatchNorm2d: CrossMiniBatchNorm2d,
    torch.nn.BatchNorm3d: CrossMiniBatchNorm3d,
}
_TO_BATCHNORM = {cmbn: bn for bn, cmbn in _TO_CMBN.items()}


def _swap(module, cls, **kwargs):
    """A ``cls`` layer with the options of ``module`` (``eps``, ``momentum``, and the device and dtype
    of its tensors, unless ``kwargs`` set them), sharing its parameters and statistics."""
    reference = module.running_mean if module.running_mean is not None else module.weight
    factory = {} if reference is None else {"device": reference.device, "dtype": reference.dtype}
    options = {"eps": module.eps, "momentum": module.momentum, **factory, **kwargs}
    swapped = cls(module.num_features, affine=module.affine,
                  track_running_stats=module.track_running_stats, **options)
    # The same Parameter objects, so an optimizer built before the swap keeps working.
    swapped.weight, swapped.bias = module.weight, module.bias
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        setattr(swapped, name, getattr(module, name))
    swapped.train(module.training)
    return swapped


def convert_batchnorm(module, **kwargs):
    """Replace every ``torch.nn.BatchNorm1d/2d/3d`` inside ``module`` by ``CrossMiniBatchNorm1d/2d/3d``.

    Parameters and running statistics are kept (the very tensors), and so are ``eps``, ``momentum``,
    ``affine``, ``track_running_stats``, the training flag, and a layer's sharing between several
    places. ``kwargs`` are the CmBN options (``mode``, ``window``, ``grad``, ``process_group``); they may
    also set ``momentum`` or ``eps`` anew (EMA mode takes its weight from ``momentum``), and ``device``
    and ``dtype`` for layers without tensors of their own (``affine=False`` and no running statistics).
    Only those exact classes are converted: subclasses of BatchNorm may carry behaviour of their own.
    Returns the converted module (a new one when ``module`` itself is a BatchNorm layer); the children
    of ``module`` are replaced in place.

    Example::

        model = cmbn_ext.convert_batchnorm(torchvision.models.resnet18(), window=4)
    """
    return _convert(module, _TO_CMBN, kwargs, {})


def revert_to_batchnorm(module):
    """Replace every CmBN layer inside ``module`` by the ``torch.nn.BatchNorm*d`` it came from.

    Parameters and running statistics are kept; the window state is dropped (call ``end_window`` first
    to commit it). For export, fusion, ONNX and inference tooling that knows only BatchNorm.
    """
    return _convert(module, _TO_BATCHNORM, {}, {})


def _convert(module, classes, kwargs, converted):
    """Swap ``module`` and its descendants whose exact type is in ``classes``. A layer used in several
    places is swapped once (``converted`` maps old layers to new ones), so it stays shared."""
    if id(module) in converted:
        return converted[id(module)]
    if type(module) in classes:
        converted[id(module)] = _swap(module, classes[type(module)], **kwargs)
        return converted[id(module)]
    # Every slot, not named_children(), which lists a shared child once only.
    for name, child in list(module._modules.items()):
        if child is not None:
            module.add_module(name, _convert(child, classes, kwargs, converted))
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
