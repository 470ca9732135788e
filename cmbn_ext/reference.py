"""The math of Cross mini-Batch Normalization in plain PyTorch.

This file is the single source of truth for what the layer computes (``SPEC.md`` sections 1 to 4).
It is the CPU implementation of the ``cmbn_ext`` ops and the oracle the CUDA kernels are tested
against. Every function is pure: state lives in the modules, never here.

Shapes: ``x`` is ``(N, C, *)``; per-channel statistics are ``(C,)``; history is ``(S, C)``: S slots of
``(count, mean, biased var)`` that are merged in slot order before pooling with the micro-batch.
"""
import torch


def stats_dtype(dtype):
    """Statistics and arithmetic run in fp64 for fp64 input, in fp32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def reduce_dims(x):
    """All dimensions but the channel one."""
    return [0] + list(range(2, x.dim()))


def channel_view(t, x):
    """A per-channel ``(C,)`` tensor shaped to broadcast against ``x``."""
    return t.view([1, -1] + [1] * (x.dim() - 2))


def values_per_channel(x):
    """``m``: how many values of one channel a micro-batch holds."""
    return x.numel() // x.shape[1] if x.shape[1] else 0


def batch_stats(x):
    """Mean and biased variance per channel of one micro-batch.

    ``torch.var_mean`` reduces with Welford/two-pass accumulation, never ``E[x^2] - E[x]^2``, so a large
    mean does not cancel the variance away.
    """
    var, mean = torch.var_mean(x.to(stats_dtype(x.dtype)), dim=reduce_dims(x), correction=0)
    return mean, var


def pool(mean_a, var_a, mean_b, var_b, b):
    """Pool two sets of statistics, ``b`` weighing the second and ``1 - b`` the first (SPEC section 2).

    The between-set term ``(mean_i - mean)^2`` keeps the pooled variance exact.
    """
    a = 1 - b
    mean = a * mean_a + b * mean_b
    var = a * (var_a + (mean_a - mean) ** 2) + b * (var_b + (mean_b - mean) ** 2)
    return mean, var


def merge_history(count, mean, var, dtype):
    """Merge the ``(S, C)`` history slots into one ``(count, mean, var)`` per channel, in slot order.

    Each slot enters with its share of the running count (Chan's merge); empty slots weigh nothing.
    """
    total = torch.zeros(count.shape[1:], dtype=torch.int64, device=count.device)
    merged_mean = torch.zeros(count.shape[1:], dtype=dtype, device=count.device)
    merged_var = torch.zeros_like(merged_mean)
    for slot in range(count.shape[0]):
        total = total + count[slot]
        share = count[slot].to(torch.float64) / total.clamp(min=1).to(torch.float64)
        merged_mean, merged_var = pool(merged_mean, merged_var, mean[slot].to(dtype),
                                       var[slot].to(dtype), share.to(dtype))
    return total, merged_mean, merged_var


def current_weight(history_count, m, ema_momentum, dtype):
    """``b``: the weight of the current micro-batch (SPEC section 2's table).

    Count-weighted ``m / (n_h + m)`` when ``ema_momentum`` is None, else ``ema_momentum``; always 1 when
    there is no history. The ratio is taken in fp64 because counts may exceed what fp32 holds exactly.
    """
    if ema_momentum is None:
        b = m / (history_count + m).to(torch.float64)
    else:
        b = torch.where(history_count > 0,
                        torch.full(history_count.shape, ema_momentum, dtype=torch.float64,
                                   device=history_count.device), 1.0)
    return b.to(dtype)


def normalize(x, mean, var, weight, bias, eps):
    """``y = weight * (x - mean) / sqrt(var + eps) + bias`` in the statistics' dtype, stored like ``x``."""
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.to(scale.dtype)
    centered = x - channel_view(mean, x)
    y = torch.empty_like(x)
    if bias is None:
        torch.mul(centered, channel_view(scale, x), out=y)
    else:
        torch.addcmul(channel_view(bias.to(scale.dtype), x), centered, channel_view(scale, x), out=y)
    return y


def forward(x, weight, bias, history_count, history_mean, history_var, eps, ema_momentum):
    """The training forward of one micro-batch.

    Returns ``(y, mean, var, batch_mean, batch_var, b)``: the output, the pooled statistics it was
    normalized with, the micro-batch's own statistics and the weight ``b`` the micro-batch had.
    """
    dtype = stats_dtype(x.dtype)
    batch_mean, batch_var = batch_stats(x)
    n_h, mean_h, var_h = merge_history(history_count, history_mean, history_var, dtype)
    b = current_weight(n_h, values_per_channel(x), ema_momentum, dtype)
    mean, var = pool(mean_h, var_h, batch_mean, batch_var, b)
    y = normalize(x, mean, var, weight, bias, eps)
    return y, mean, var, batch_mean, batch_var, b


def backward(grad_y, x, weight, mean, var, batch_mean, batch_var, b, eps, exact):
    """Closed-form gradients of SPEC section 4, history held constant.

    Returns ``(grad_x, grad_weight, grad_bias)``; the parameter gradients are per channel in the
    statistics' dtype. Both choices of ``grad`` reduce to two sums over the micro-batch,
    ``sum(dy)`` and ``sum(dy * (x - batch_mean))``, and then write
    ``dx = coef_dy * dy + coef_xc * (x - batch_mean) + const`` per channel.
    """
    dtype = stats_dtype(x.dtype)
    dims = reduce_dims(x)
    m = values_per_channel(x)
    invstd = torch.rsqrt(var + eps)
    w = torch.ones_like(invstd) if weight is None else weight.to(dtype)

    centered = x - channel_view(batch_mean, x)
    sum_dy = grad_y.sum(dims, dtype=dtype)
    sum_dy_xc = (grad_y * centered).sum(dims, dtype=dtype)
    # Pooled xhat = (x - mean) * invstd = (centered + batch_mean - mean) * invstd.
    shift = batch_mean - mean
    grad_weight = invstd * (sum_dy_xc + shift * sum_dy)  # sum(dy * xhat)
    grad_bias = sum_dy

    coef_dy = invstd * w  # d xhat / d x is invstd, g = dy * weight
    if exact:
        # dx = invstd * (g - (b/m) sum(g) - xhat (b/m) sum(g * xhat))
        k = b / m
        coef_xc = -coef_dy * invstd * k * grad_weight
        const = -coef_dy * k * sum_dy + coef_xc * shift
    else:
        # dx = invstd * (g - sum(g)/m - xhat_b sum(g * xhat_b)/m), xhat_b = centered * invstd_b
        invstd_b_sq = 1 / (batch_var + eps)
        coef_xc = -coef_dy * invstd_b_sq * sum_dy_xc / m
        const = -coef_dy * sum_dy / m

    partial = torch.addcmul(channel_view(const, x), centered, channel_view(coef_xc, x))
    grad_x = torch.empty_like(x)
    torch.addcmul(partial, grad_y, channel_view(coef_dy, x), out=grad_x)
    return grad_x, grad_weight, grad_bias
