"""The reference math against closed forms, finite differences and the gradients' definitions."""
import pytest
import torch

from cmbn_ext import reference
from cmbn_ext.ops import CrossMiniBatchNormFunction
from conftest import bn_stats

EPS = 1e-5


def _history(C, counts, dtype=torch.float64):
    counts = torch.tensor(counts, dtype=torch.long).view(-1, C)
    mean = torch.randn(counts.shape, dtype=dtype) * 2
    var = torch.rand(counts.shape, dtype=dtype) + 0.5
    return counts, mean, var


def test_batch_stats_match_direct_computation():
    x = torch.randn(3, 5, 4, 7, dtype=torch.float64)
    mean, var = reference.batch_stats(x)
    expected_mean, expected_var = bn_stats(x)
    torch.testing.assert_close(mean, expected_mean)
    torch.testing.assert_close(var, expected_var)


def test_batch_stats_large_mean_fp32_is_accurate():
    """Mean 1e4, std 1 in fp32: E[x^2] - E[x]^2 would lose every digit of the variance."""
    x = (torch.randn(8, 16, 32, 32, dtype=torch.float64) + 1e4).float()
    _, var = reference.batch_stats(x)
    _, exact_var = bn_stats(x)
    assert ((var.double() - exact_var).abs() / exact_var).max() < 1e-4
    naive = (x * x).mean((0, 2, 3)) - x.mean((0, 2, 3)) ** 2
    assert ((naive.double() - exact_var).abs() / exact_var).max() > 1e-2  # the test can tell


def test_merge_history_equals_concatenation():
    """Merged slots have the statistics of all their values concatenated; empty slots weigh nothing."""
    C = 4
    chunks = [torch.randn(n, C, dtype=torch.float64) * s + o for n, s, o in ((3, 1, 0), (7, 2, 5), (1, 1, -3))]
    counts = torch.tensor([[len(c)] * C for c in chunks] + [[0] * C])
    means = torch.stack([c.mean(0) for c in chunks] + [torch.zeros(C, dtype=torch.float64)])
    vars_ = torch.stack([c.var(0, unbiased=False) for c in chunks] + [torch.zeros(C, dtype=torch.float64)])
    order = [3, 0, 1, 2]  # an empty slot first
    total, mean, var = reference.merge_history(counts[order], means[order], vars_[order], torch.float64)
    everything = torch.cat(chunks)
    assert torch.equal(total, torch.full((C,), len(everything)))
    torch.testing.assert_close(mean, everything.mean(0))
    torch.testing.assert_close(var, everything.var(0, unbiased=False))


def test_cumulative_forward_equals_batchnorm_over_concatenation():
    C = 3
    old = torch.randn(6, C, 4, 4, dtype=torch.float64) * 3 + 2
    x = torch.randn(2, C, 4, 4, dtype=torch.float64)
    old_mean, old_var = bn_stats(old)
    counts = torch.full((1, C), old.numel() // C)
    w, b = torch.randn(C, dtype=torch.float64), torch.randn(C, dtype=torch.float64)
    y, mean, var, batch_mean, batch_var, weight_b = reference.forward(
        x, w, b, counts, old_mean[None], old_var[None], EPS, None)
    expected = torch.nn.functional.batch_norm(torch.cat([old, x]), None, None, w, b, True, 0.0, EPS)[6:]
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(weight_b, torch.full((C,), 2 / 8, dtype=torch.float64))
    torch.testing.assert_close((batch_mean, batch_var), bn_stats(x))


def test_ema_weight_and_first_batch():
    C = 3
    counts, mean_h, var_h = _history(C, [5, 0, 1])
    x = torch.randn(4, C, 3, dtype=torch.float64)
    _, mean, var, mb, vb, b = reference.forward(x, None, None, counts, mean_h, var_h, EPS, 0.25)
    torch.testing.assert_close(b, torch.tensor([0.25, 1.0, 0.25], dtype=torch.float64))
    a = 1 - b
    expected_mean = a * mean_h[0] + b * mb
    expected_var = a * (var_h[0] + (mean_h[0] - expected_mean) ** 2) + b * (vb + (mb - expected_mean) ** 2)
    torch.testing.assert_close(mean, expected_mean)
    torch.testing.assert_close(var, expected_var)


@pytest.mark.parametrize("ema_momentum", [None, 0.3])
@pytest.mark.parametrize("affine", [True, False])
def test_exact_gradient_gradcheck(ema_momentum, affine):
    """grad="exact" is the true gradient of the forward with history constant: finite differences."""
    C = 3
    counts, mean_h, var_h = _history(C, [40, 0, 3, 2, 2, 9], )
    x = torch.randn(3, C, 2, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(C, dtype=torch.float64, requires_grad=True) if affine else None
    b = torch.randn(C, dtype=torch.float64, requires_grad=True) if affine else None

    def f(x, w, b):
        return CrossMiniBatchNormFunction.apply(x, w, b, counts, mean_h, var_h, EPS, ema_momentum, True)[0]

    assert torch.autograd.gradcheck(f, (x, w, b))


@pytest.mark.parametrize("ema_momentum", [None, 0.3])
def test_renorm_gradient_is_batch_renormalization(ema_momentum):
    """grad="renorm" equals autograd of xhat = xhat_b * r + d with r and d held constant (SPEC 4)."""
    C = 4
    counts, mean_h, var_h = _history(C, [30, 0, 5, 1])
    x = torch.randn(3, C, 5, dtype=torch.float64) * 2 + 1
    w, bias = torch.randn(C, dtype=torch.float64), torch.randn(C, dtype=torch.float64)
    xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, bias))
    y = CrossMiniBatchNormFunction.apply(xs, ws, bs, counts, mean_h, var_h, EPS, ema_momentum, False)[0]
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, (xs, ws, bs), dy)

    xd, wd, bd = (t.clone().requires_grad_() for t in (x, w, bias))
    _, mean, var, _, _, _ = reference.forward(x, w, bias, counts, mean_h, var_h, EPS, ema_momentum)
    batch_mean = xd.mean((0, 2))
    invstd_b = torch.rsqrt(xd.var((0, 2), unbiased=False) + EPS)
    invstd = torch.rsqrt(var + EPS)
    xhat_b = (xd - batch_mean[:, None]) * invstd_b[:, None]
    r = (invstd / invstd_b).detach()
    d = ((batch_mean - mean) * invstd).detach()
    expected_y = wd[:, None] * (xhat_b * r[:, None] + d[:, None]) + bd[:, None]
    torch.testing.assert_close(y, expected_y)
    expected = torch.autograd.grad(expected_y, (xd, wd, bd), dy)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


def test_renorm_gradient_is_scale_invariant_and_orthogonal():
    """renorm's dx is orthogonal to x - batch_mean and to constants, as BatchNorm's (exactly so when
    eps vanishes against the variance)."""
    C = 2
    counts, mean_h, var_h = _history(C, [10, 10])
    x = (torch.randn(4, C, 6, dtype=torch.float64) * 3 + 1).requires_grad_()
    y = CrossMiniBatchNormFunction.apply(x, None, None, counts, mean_h, var_h, 1e-12, None, False)[0]
    (dx,) = torch.autograd.grad(y, x, torch.randn_like(y))
    centered = x.detach() - x.detach().mean((0, 2), keepdim=True)
    torch.testing.assert_close((dx * centered).sum((0, 2)), torch.zeros(C, dtype=torch.float64))
    torch.testing.assert_close(dx.sum((0, 2)), torch.zeros(C, dtype=torch.float64))


def test_exact_sum_xhat_is_not_zero_with_history():
    """With history the pooled xhat does not sum to zero over the micro-batch: no shortcut may assume it."""
    C = 2
    counts, mean_h, var_h = _history(C, [10, 10])
    x = torch.randn(4, C, 6, dtype=torch.float64) + 3
    _, mean, var, _, _, _ = reference.forward(x, None, None, counts, mean_h, var_h, EPS, None)
    xhat = (x - mean[:, None]) * torch.rsqrt(var + EPS)[:, None]
    assert xhat.sum((0, 2)).abs().min() > 1e-3


@pytest.mark.parametrize("exact", [False, True])
def test_empty_micro_batch_through_the_ops(exact):
    """An empty input gets empty outputs and zero sums, never a crash (torch's BatchNorm backward
    kernel itself cannot take one)."""
    x = torch.empty(0, 3, 2, 2)
    counts, mean_h, var_h = _history(3, [4, 4, 4], dtype=torch.float32)
    y, mean, var, batch_mean, batch_var, b = torch.ops.cmbn_ext.cmbn_forward(
        x, None, None, counts, mean_h, var_h, EPS, None, exact)
    assert y.shape == x.shape and torch.equal(b, torch.zeros(3))
    torch.testing.assert_close((mean, var), (mean_h[0], var_h[0]))  # history alone
    dx, dweight, dbias = torch.ops.cmbn_ext.cmbn_backward(torch.empty_like(x), x, None, mean, var,
                                                          batch_mean, batch_var, b, EPS, exact)
    assert dx.shape == x.shape and torch.equal(dweight, torch.zeros(3)) and torch.equal(dbias, torch.zeros(3))
    assert torch.equal(torch.ops.cmbn_ext.cmbn_backward_sums(x, x, batch_mean)[0], torch.zeros(3))


@pytest.mark.parametrize("exact", [False, True])
def test_phase_ops_compose_to_the_fused_ops(exact):
    """batch_stats -> pooled_forward and backward_sums -> backward_dx, the phases the distributed path
    splits the ops into, give what the fused ops give."""
    C = 3
    counts, mean_h, var_h = _history(C, [5, 0, 2])
    x = torch.randn(4, C, 3, 2, dtype=torch.float64) * 2 + 1
    w, bias = torch.randn(C, dtype=torch.float64), torch.randn(C, dtype=torch.float64)
    fused = torch.ops.cmbn_ext.cmbn_forward(x, w, bias, counts, mean_h, var_h, EPS, None, exact)
    batch_mean, batch_var = torch.ops.cmbn_ext.cmbn_batch_stats(x)
    count = torch.tensor(x.numel() // C)
    y, mean, var, b = torch.ops.cmbn_ext.cmbn_pooled_forward(x, w, bias, count, batch_mean, batch_var,
                                                             counts, mean_h, var_h, EPS, None)
    torch.testing.assert_close((y, mean, var, batch_mean, batch_var, b), fused)
    dy = torch.randn_like(x)
    dx, dweight, dbias = torch.ops.cmbn_ext.cmbn_backward(dy, x, w, mean, var, batch_mean, batch_var, b,
                                                          EPS, exact)
    sum_dy, sum_dy_xc = torch.ops.cmbn_ext.cmbn_backward_sums(dy, x, batch_mean)
    torch.testing.assert_close(sum_dy, dbias)
    torch.testing.assert_close(torch.ops.cmbn_ext.cmbn_backward_dx(
        dy, x, w, mean, var, batch_mean, batch_var, b, sum_dy, sum_dy_xc, count, EPS, exact), dx)
    torch.testing.assert_close(reference.parameter_grads(mean, var, batch_mean, sum_dy, sum_dy_xc, EPS),
                               (dweight, dbias))
