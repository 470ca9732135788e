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
    """A ``cls`` layer with the options of ``module`` (``eps`` and ``momentum`` unless ``kwargs`` set
    them), sharing its parameters and statistics."""
    reference = module.running_mean if module.running_mean is not None else module.weight
    factory = {} if reference is None else {"device": reference.device, "dtype": reference.dtype}
    options = {"eps": module.eps, "momentum": module.momentum, **kwargs}
    swapped = cls(module.num_features, affine=module.affine,
                  track_running_stats=module.track_running_stats, **options, **factory)
    # The same Parameter objects, so an optimizer built before the swap keeps working.
    swapped.weight, swapped.bias = module.weight, module.bias
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        setattr(swapped, name, getattr(module, name))
    swapped.train(module.training)
    return swapped


def convert_batchnorm(module, **kwargs):
    """Replace every ``torch.nn.BatchNorm1d/2d/3d`` inside ``module`` by ``CrossMiniBatchNorm1d/2d/3d``.

    Parameters and running statistics are kept (the very tensors), and so are ``eps``, ``momentum``,
    ``affine``, ``track_running_stats`` and the training flag. ``kwargs`` are the CmBN options
    (``mode``, ``window``, ``grad``, ``process_group``), and may set ``momentum`` or ``eps`` anew (EMA
    mode takes its weight from ``momentum``). Only those exact classes are converted:
    subclasses of BatchNorm may carry behaviour of their own. Returns the converted module (a new one
    when ``module`` itself is a BatchNorm layer); the children of ``module`` are replaced in place.

    Example::

        model = cmbn_ext.convert_batchnorm(torchvision.models.resnet18(), window=4)
    """
    if type(module) in _TO_CMBN:
        return _swap(module, _TO_CMBN[type(module)], **kwargs)
    for name, child in module.named_children():
        module.add_module(name, convert_batchnorm(child, **kwargs))
    return module


def revert_to_batchnorm(module):
    """Replace every CmBN layer inside ``module`` by the ``torch.nn.BatchNorm*d`` it came from.

    Parameters and running statistics are kept; the window state is dropped (call ``end_window`` first
    to commit it). For export, fusion, ONNX and inference tooling that knows only BatchNorm.
    """
    if isinstance(module, _CrossMiniBatchNorm):
        return _swap(module, _TO_BATCHNORM[type(module)])
    for name, child in module.named_children():
        module.add_module(name, revert_to_batchnorm(child))
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
