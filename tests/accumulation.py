"""Helpers for the training-loop tests: a tiny CmBN model, a recorder of what its CmBN layer saw, and the
independent expectation of the running statistics, torch's BatchNorm over each window concatenated."""
import torch

import cmbn_ext

CHANNELS = 4


def tiny_model(window=None):
    """conv -> CmBN -> ReLU -> pool -> linear, for (N, 3, 6, 6) input and 2 classes."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, CHANNELS, 3), cmbn_ext.CrossMiniBatchNorm2d(CHANNELS, window=window),
        torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(CHANNELS, 2))


def micro_batch_loader(num_batches):
    """A DataLoader of ``num_batches`` micro-batches of 2 random (3, 6, 6) images, for ``tiny_model``."""
    images = torch.utils.data.TensorDataset(torch.randn(2 * num_batches, 3, 6, 6))
    return torch.utils.data.DataLoader(images, batch_size=2)


def cmbn_layer(model):
    (layer,) = [m for m in model.modules() if isinstance(m, cmbn_ext.CrossMiniBatchNorm2d)]
    return layer


class InputRecorder:
    """Keeps a copy of every training micro-batch that reaches ``layer``."""

    def __init__(self, layer):
        self.inputs = []
        self._handle = layer.register_forward_pre_hook(self._record)

    def _record(self, layer, args):
        if layer.training:
            self.inputs.append(args[0].detach().clone())

    def remove(self):
        self._handle.remove()


def batchnorm_over_windows(inputs, window_sizes, momentum=0.1):
    """torch's BatchNorm2d run once per window on the window's micro-batches concatenated: the running
    statistics a CmBN layer must hold when exactly these windows were committed."""
    assert sum(window_sizes) == len(inputs), (window_sizes, len(inputs))
    bn = torch.nn.BatchNorm2d(inputs[0].shape[1], momentum=momentum).double()
    start = 0
    for size in window_sizes:
        bn(torch.cat(inputs[start:start + size]).double())
        start += size
    return bn


def assert_committed(layer, inputs, window_sizes):
    """``layer`` committed exactly ``window_sizes`` (micro-batches per window, in order) of ``inputs``."""
    expected = batchnorm_over_windows(inputs, window_sizes, layer.momentum)
    assert int(layer.num_batches_tracked) == len(window_sizes)
    torch.testing.assert_close(layer.running_mean.double(), expected.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.running_var.double(), expected.running_var, rtol=1e-5, atol=1e-6)


def window_sizes(num_batches, accumulate):
    """Micro-batches per optimizer step when a loop of ``num_batches`` steps every ``accumulate`` batches
    and once more on the last batch (the partial group at the end of an epoch)."""
    sizes = [accumulate] * (num_batches // accumulate)
    return sizes + [num_batches % accumulate] if num_batches % accumulate else sizes
