"""Memory formats and dtypes: outputs keep the input's layout; low precision agrees with fp64."""
import pytest
import torch

import cmbn_ext

TOLERANCES = {  # output tolerances, set by the input's own rounding (fp16: 2^-11, bf16: 2^-8)
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=6e-2, rtol=6e-2),
}


def _pair(cls, C, dtype=None, **kwargs):
    low = cls(C, **kwargs)
    with torch.no_grad():
        low.weight.copy_(torch.randn(C))
        low.bias.copy_(torch.randn(C))
    if dtype is not None:
        low = low.to(dtype)
    high = cls(C, **kwargs).double()
    high.load_state_dict(low.state_dict())
    return low, high


@pytest.mark.parametrize("mode", ["cumulative", "sliding", "ema"])
@pytest.mark.parametrize("fmt,cls,shape", [
    (torch.channels_last, cmbn_ext.CrossMiniBatchNorm2d, (3, 5, 4, 6)),
    (torch.channels_last, cmbn_ext.CrossMiniBatchNorm2d, (3, 5, 1, 1)),
    (torch.channels_last_3d, cmbn_ext.CrossMiniBatchNorm3d, (2, 5, 3, 2, 4)),
])
def test_channels_last_is_kept(mode, fmt, cls, shape):
    layer, reference = _pair(cls, 5, mode=mode, window=2)
    for _ in range(3):
        x = torch.randn(shape).contiguous(memory_format=fmt).requires_grad_()
        y = layer(x)
        assert y.is_contiguous(memory_format=fmt) and y.stride() == x.stride()
        dy = torch.randn(shape).contiguous(memory_format=fmt)
        (dx,) = torch.autograd.grad(y, x, dy)
        assert dx.stride() == x.stride()
        xr = x.detach().double().contiguous().requires_grad_()
        yr = reference(xr)
        (dxr,) = torch.autograd.grad(yr, xr, dy.double())
        torch.testing.assert_close(y.double(), yr, **TOLERANCES[torch.float32])
        torch.testing.assert_close(dx.double(), dxr, **TOLERANCES[torch.float32])


def test_non_contiguous_input():
    layer, reference = _pair(cmbn_ext.CrossMiniBatchNorm2d, 5, window=2)
    for _ in range(2):
        base = torch.randn(6, 4, 5, 10)
        x = base.transpose(1, 2)[..., ::2]  # (6, 5, 4, 5), neither contiguous nor channels_last
        assert not x.is_contiguous()
        x.requires_grad_()
        y = layer(x)
        dy = torch.randn_like(y)
        (dx,) = torch.autograd.grad(y, x, dy)
        xr = x.detach().double().requires_grad_()
        yr = reference(xr)
        (dxr,) = torch.autograd.grad(yr, xr, dy.double())
        torch.testing.assert_close(y.double(), yr, **TOLERANCES[torch.float32])
        torch.testing.assert_close(dx.double(), dxr, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("grad", ["renorm", "exact"])
@pytest.mark.parametrize("mode", ["cumulative", "sliding", "ema"])
@pytest.mark.parametrize("dtype,amp", [(torch.float32, False), (torch.float16, False),
                                       (torch.bfloat16, False), (torch.float16, True),
                                       (torch.bfloat16, True)])
def test_low_precision_against_fp64(dtype, mode, grad, amp):
    """fp16/bf16/fp32 input against the same values in fp64: outputs, dx, dweight, dbias, state.
    ``amp`` keeps fp32 parameters and buffers with half input, as under autocast."""
    layer, reference = _pair(cmbn_ext.CrossMiniBatchNorm2d, 6, None if amp else dtype, mode=mode,
                             window=3, grad=grad)
    tol = TOLERANCES[dtype]
    for _ in range(4):
        x = (torch.randn(2, 6, 5, 5) * 2 + 1).to(dtype).requires_grad_()
        dy = torch.randn(2, 6, 5, 5).to(dtype)
        y = layer(x)
        assert y.dtype == dtype
        got = torch.autograd.grad(y, (x, layer.weight, layer.bias), dy)
        xr = x.detach().double().requires_grad_()
        yr = reference(xr)
        expected = torch.autograd.grad(yr, (xr, reference.weight, reference.bias), dy.double())
        torch.testing.assert_close(y.double(), yr, **tol)
        torch.testing.assert_close(got[0].double(), expected[0], **tol)
        for g, e in zip(got[1:], expected[1:]):  # sums over 50 values
            torch.testing.assert_close(g.double(), e, atol=tol["atol"] * 10, rtol=tol["rtol"] * 10)
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(layer.state_dict()[name].double(), value.double(), **tol)


def test_large_mean_fp32_output():
    """Welford statistics keep fp32 input with mean 1e4 and std 1 accurate through the layer."""
    layer, reference = _pair(cmbn_ext.CrossMiniBatchNorm2d, 3, window=3)
    for _ in range(3):
        x = (torch.randn(4, 3, 8, 8, dtype=torch.float64) + 1e4).float()
        y = layer(x)
        yr = reference(x.double())
        # the input itself is only resolved to ulp(1e4) ~ 1e-3 in fp32
        torch.testing.assert_close(y.double(), yr, atol=5e-3, rtol=1e-3)
    torch.testing.assert_close(layer.window_var.double(), reference.window_var, rtol=1e-4, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_layer_keeps_its_window_in_fp32(dtype):
    """A .half() / bfloat16 layer: the history stays fp32, so a variance beyond fp16's range (std 300)
    neither overflows nor rounds the pooled statistics; the commit lands in the half running stats."""
    layer = cmbn_ext.CrossMiniBatchNorm2d(2, window=3).to(dtype)
    assert layer.window_mean.dtype == layer.window_var.dtype == torch.float32
    assert layer.running_var.dtype == dtype
    reference = cmbn_ext.CrossMiniBatchNorm2d(2, window=3).double()
    for _ in range(3):
        x = (torch.randn(4, 2, 5, 5) * 300 + 100).to(dtype)
        y = layer(x)
        torch.testing.assert_close(y.double(), reference(x.double()), **TOLERANCES[dtype])
    assert torch.isfinite(layer.running_var).all()
    torch.testing.assert_close(layer.running_var.double(), reference.running_var, rtol=1e-2, atol=0)
    layer.double()  # and back: fp64 layers keep fp64 history
    assert layer.window_var.dtype == torch.float64
