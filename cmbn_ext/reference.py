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


def channel_view(t, x):
    """A per-channel ``(C,)`` tensor shaped to broadcast against ``x``."""
    return t.view([1, -1] + [1] * (x.dim() - 2))


def values_per_channel(x):
    """``m``: how many values of one channel a micro-batch holds."""
    return x.numel() // x.shape[1] if x.shape[1] else 0


def batch_stats(x):
    """Mean and biased variance per channel of one micro-batch.

    torch's per-channel BatchNorm statistics accumulate with Welford's method, never
    ``E[x^2] - E[x]^2``, so a large mean does not cancel the variance away. Half input is widened first:
    its statistics must not be rounded to half.
    """
    dtype = stats_dtype(x.dtype)
    mean, var = torch.batch_norm_update_stats(x.to(dtype), None, None, 0.0)
    return mean.to(dtype), var.to(dtype)


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
    """``y = weight * (x - mean) / sqrt(var + eps) + bias``, computed in the statistics' dtype and stored
    in the dtype and memory format of ``x``.

    This is BatchNorm's inference transform with ``(mean, var)`` in place of the running statistics,
    so torch's fused per-channel kernel does it in one pass.
    """
    dtype = mean.dtype
    y = torch.batch_norm(x, _as(weight, dtype), _as(bias, dtype), mean, var, False, 0.0, eps,
                         torch.backends.cudnn.enabled)
    return _like(y, x)


def _as(t, dtype):
    return None if t is None else t.to(dtype)


def _like(t, x):
    """``t`` with the strides of ``x`` (outputs keep the input's memory format, whatever its shape)."""
    return t if t.stride() == x.stride() else torch.empty_like(x).copy_(t)


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
    statistics' dtype. With ``g = dy * weight``, pooled ``xhat = (x - mean) * invstd`` and the
    micro-batch's own ``xhat_b = (x - batch_mean) * invstd_b``:

    - ``grad_weight = sum(dy * xhat)``, ``grad_bias = sum(dy)``;
    - renorm: ``dx = invstd * (g - sum(g)/m - xhat_b * sum(g * xhat_b)/m)``. That is BatchNorm's training
      backward about the micro-batch's own statistics with the weight scaled by ``invstd / invstd_b``,
      so torch's fused BatchNorm backward computes it, with both sums, in one call;
    - exact: ``dx = invstd * (g - (b/m) * sum(g) - xhat * (b/m) * sum(g * xhat))``.
    """
    dtype = stats_dtype(x.dtype)
    m = values_per_channel(x)
    grad_y = grad_y.to(x.dtype).contiguous(memory_format=_memory_format(x))
    invstd = torch.rsqrt(var + eps)
    invstd_b = torch.rsqrt(batch_var + eps)
    w = torch.ones_like(invstd) if weight is None else weight.to(dtype)
    # (grad_x about the micro-batch statistics, sum(dy * xhat_b), sum(dy))
    grad_x, sum_dy_xhat_b, sum_dy = torch.ops.aten.native_batch_norm_backward(
        grad_y, x, w * invstd / invstd_b, None, None, batch_mean, invstd_b, True, eps,
        [not exact, True, True])
    sum_dy_xhat_b, sum_dy = sum_dy_xhat_b.to(dtype), sum_dy.to(dtype)
    # xhat = xhat_b * invstd / invstd_b + (batch_mean - mean) * invstd
    grad_weight = sum_dy_xhat_b * invstd / invstd_b + (batch_mean - mean) * invstd * sum_dy
    if exact:
        coef_dy = invstd * w
        coef_sum = -coef_dy * b / m  # multiplies sum(dy) and, with xhat, sum(dy * xhat)
        xhat = (x - channel_view(mean, x)) * channel_view(invstd, x)
        grad_x = torch.addcmul(torch.addcmul(channel_view(coef_sum * sum_dy, x), xhat,
                                             channel_view(coef_sum * grad_weight, x)),
                               grad_y, channel_view(coef_dy, x))
    return _like(grad_x.to(x.dtype), x), grad_weight, sum_dy


def _memory_format(x):
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format
