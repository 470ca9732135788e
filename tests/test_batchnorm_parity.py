"""CmBN against torch's BatchNorm: window=1 is BatchNorm, and a cumulative window is BatchNorm over the
window's micro-batches concatenated."""
import pytest
import torch

import cmbn_ext

SHAPES = {
    cmbn_ext.CrossMiniBatchNorm1d: (torch.nn.BatchNorm1d, [(6, 5), (4, 5, 7)]),
    cmbn_ext.CrossMiniBatchNorm2d: (torch.nn.BatchNorm2d, [(4, 5, 3, 6)]),
    cmbn_ext.CrossMiniBatchNorm3d: (torch.nn.BatchNorm3d, [(2, 5, 3, 2, 4)]),
}
CASES = [(cls, bn, shape) for cls, (bn, shapes) in SHAPES.items() for shape in shapes]


def _pair(cls, bn_cls, momentum=0.1, **kwargs):
    bn = bn_cls(5, momentum=momentum).double()
    layer = cls(5, momentum=momentum, **kwargs).double()
    with torch.no_grad():
        for p in (bn.weight, bn.bias):
            p.copy_(torch.randn(5))
        layer.weight.copy_(bn.weight)
        layer.bias.copy_(bn.bias)
    return bn, layer


@pytest.mark.parametrize("cls,bn_cls,shape", CASES)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_window_one_is_batchnorm(cls, bn_cls, shape, momentum):
    """Outputs, dx, dweight, dbias and running statistics over several steps, then eval."""
    bn, layer = _pair(cls, bn_cls, momentum, window=1)
    for _ in range(4):
        x = torch.randn(shape, dtype=torch.float64) * 3 + 1
        dy = torch.randn(shape, dtype=torch.float64)
        outputs = []
        for module in (bn, layer):
            xs = x.clone().requires_grad_()
            y = module(xs)
            outputs.append((y, *torch.autograd.grad(y, (xs, module.weight, module.bias), dy)))
        for expected, got in zip(*outputs):
            torch.testing.assert_close(got, expected)
        torch.testing.assert_close(layer.running_mean, bn.running_mean)
        torch.testing.assert_close(layer.running_var, bn.running_var)
        assert layer.num_batches_tracked.item() == bn.num_batches_tracked.item()
    bn.eval(), layer.eval()
    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(layer(x), bn(x))


@pytest.mark.parametrize("grad", ["renorm", "exact"])
def test_window_one_gradients_are_batchnorm_for_both_choices(grad):
    bn, layer = _pair(cmbn_ext.CrossMiniBatchNorm2d, torch.nn.BatchNorm2d, window=1, grad=grad)
    x = torch.randn(3, 5, 4, 4, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(3, 5, 4, 4, dtype=torch.float64)
    expected = torch.autograd.grad(bn(x), (x, bn.weight, bn.bias), dy)
    got = torch.autograd.grad(layer(x), (x, layer.weight, layer.bias), dy)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_cumulative_windows_are_batchnorm_over_the_concatenation(momentum):
    """Each micro-batch is normalized with the statistics of its window so far; the last one with
    those of the whole window; each committed window updates the running statistics as one BatchNorm
    step over the concatenated window does."""
    k = 3
    bn, layer = _pair(cmbn_ext.CrossMiniBatchNorm2d, torch.nn.BatchNorm2d, momentum, window=k)
    for _ in range(3):  # windows
        window = [torch.randn(2, 5, 3, 3, dtype=torch.float64) * (i + 1) + i for i in range(k)]
        for i, x in enumerate(window):
            y = layer(x)
            seen = torch.cat(window[: i + 1])
            expected = torch.nn.functional.batch_norm(seen, None, None, layer.weight, layer.bias, True)
            torch.testing.assert_close(y, expected[-len(x):])
        bn(torch.cat(window))
        torch.testing.assert_close(layer.running_mean, bn.running_mean)
        torch.testing.assert_close(layer.running_var, bn.running_var)
        assert layer.num_batches_tracked.item() == bn.num_batches_tracked.item()
        assert layer.window_step.item() == 0 and layer.window_count.sum().item() == 0
