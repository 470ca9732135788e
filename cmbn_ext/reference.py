"""The math of Cross mini-Batch Normalization in plain PyTorch.

This file is the single source of truth for what the layer computes (``SPEC.md`` sections 1 to 4).
It is the CPU implementation of the ``cmbn_ext`` ops and the oracle the CUDA kernels are tested
against. Every function is pure: state lives in the modules, never here.

Shapes: ``x`` is ``(N, C, *)``; per-channel statistics are ``(C,)``; history is ``(S, C)``: S slots of
``(count, mean, biased var)`` that are merged in slot order before pooling with the micro-batch.
"""
import torch

from . import activations

# memory="lean" divides by the weight to recover the normalized input: a weight of smaller magnitude
# is taken as this magnitude, with its sign (zero as positive). The layers keep their input instead
# whenever a weight is that small (modules.py), so this only guards the division.
LEAN_MIN_WEIGHT = 1e-3


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
    its statistics must not be rounded to half. An empty micro-batch has zeros, which weigh nothing
    beside its count of 0.
    """
    dtype = stats_dtype(x.dtype)
    if values_per_channel(x) == 0:
        return _zero_stats(x), _zero_stats(x)
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
    The merge starts from slot 0 as it is: with S = 1 (cumulative and EMA modes) there is nothing to
    compute.
    """
    if count.shape[0] == 0:
        zeros = torch.zeros(count.shape[1:], dtype=dtype, device=count.device)
        return torch.zeros_like(zeros, dtype=torch.int64), zeros, zeros
    total, merged_mean, merged_var = count[0], mean[0].to(dtype), var[0].to(dtype)
    for slot in range(1, count.shape[0]):
        total = total + count[slot]
        share = count[slot].to(torch.float64) / total.clamp(min=1).to(torch.float64)
        merged_mean, merged_var = pool(merged_mean, merged_var, mean[slot].to(dtype),
                                       var[slot].to(dtype), share.to(dtype))
    return total, merged_mean, merged_var


def current_weight(history_count, m, ema_momentum, dtype):
    """``b``: the weight of the current micro-batch (SPEC section 2's table).

    Count-weighted ``m / (n_h + m)`` when ``ema_momentum`` is None, else ``ema_momentum``; always 1 when
    there is no history. The ratio is taken in fp64 because counts may exceed what fp32 holds exactly.
    ``m`` is an int or a 0-dim int64 tensor (the group's count, or the state update's); the ratio is
    written as torch evaluates ``int / tensor`` (a reciprocal, then a product), so both give one result.
    """
    if ema_momentum is None:
        b = (history_count + m).to(torch.float64).reciprocal() * m
    else:
        b = torch.where(history_count > 0,
                        torch.full(history_count.shape, ema_momentum, dtype=torch.float64,
                                   device=history_count.device), 1.0)
    return b.to(dtype)


def normalize(x, mean, var, weight, bias, eps, activation=activations.IDENTITY, activation_param=0.0):
    """``act(weight * (x - mean) / sqrt(var + eps) + bias)``, computed in the statistics' dtype and
    stored in the dtype and memory format of ``x``.

    This is BatchNorm's inference transform with ``(mean, var)`` in place of the running statistics,
    so torch's fused per-channel kernel does it in one pass; an activation other than the identity
    is applied before the result is rounded to ``x``'s dtype.
    """
    dtype = mean.dtype
    fused = activation != activations.IDENTITY
    y = torch.batch_norm(x.to(dtype) if fused else x, _as(weight, dtype), _as(bias, dtype), mean, var,
                         False, 0.0, eps, torch.backends.cudnn.enabled)
    if fused:
        y = activations.apply(y, activation, activation_param).to(x.dtype)
    return _like(y, x)


def _as(t, dtype):
    return None if t is None else t.to(dtype)


def _like(t, x):
    """``t`` with the strides of ``x`` (outputs keep the input's memory format, whatever its shape)."""
    return t if t.stride() == x.stride() else torch.empty_like(x).copy_(t)


def pooled_forward(x, weight, bias, count, batch_mean, batch_var, history_count, history_mean,
                   history_var, eps, ema_momentum, activation=activations.IDENTITY, activation_param=0.0):
    """Pool the micro-batch's statistics (over ``count`` values per channel) with the history and
    normalize ``x`` with the result.

    ``count`` is usually ``x``'s own ``m``; across processes it is the whole group's, and the statistics
    are the group's. ``y`` is the activation's output when there is one. Returns ``(y, mean, var, b)``.
    """
    dtype = stats_dtype(x.dtype)
    n_h, mean_h, var_h = merge_history(history_count, history_mean, history_var, dtype)
    b = current_weight(n_h, count, ema_momentum, dtype)
    mean, var = pool(mean_h, var_h, batch_mean.to(dtype), batch_var.to(dtype), b)
    return normalize(x, mean, var, weight, bias, eps, activation, activation_param), mean, var, b


def forward(x, weight, bias, history_count, history_mean, history_var, eps, ema_momentum,
            activation=activations.IDENTITY, activation_param=0.0):
    """The training forward of one micro-batch.

    Returns ``(y, mean, var, batch_mean, batch_var, b)``: the output (after the activation), the
    pooled statistics it was normalized with, the micro-batch's own statistics and the weight ``b`` the micro-batch had.
    """
    batch_mean, batch_var = batch_stats(x)
    y, mean, var, b = pooled_forward(x, weight, bias, values_per_channel(x), batch_mean, batch_var,
                                     history_count, history_mean, history_var, eps, ema_momentum,
                                     activation, activation_param)
    return y, mean, var, batch_mean, batch_var, b


def backward_sums(grad_y, x, batch_mean):
    """The two per-channel sums every gradient needs: ``sum(dy)`` and ``sum(dy * (x - batch_mean))``.

    BatchNorm's backward reduction with a unit ``invstd`` computes exactly these.
    """
    dtype = stats_dtype(x.dtype)
    if values_per_channel(x) == 0:  # torch's BatchNorm backward cannot take an empty input
        return _zero_stats(x), _zero_stats(x)
    grad_y = _match_layout(grad_y, x)
    _, sum_dy_xc, sum_dy = torch.ops.aten.native_batch_norm_backward(
        grad_y, x, None, None, None, batch_mean, torch.ones_like(batch_mean), True, 0.0,
        [False, True, True])
    return sum_dy.to(dtype), sum_dy_xc.to(dtype)


def parameter_grads(mean, var, batch_mean, sum_dy, sum_dy_xc, eps):
    """``grad_weight = sum(dy * xhat)`` and ``grad_bias = sum(dy)`` from the two sums, using
    ``xhat = (x - batch_mean) * invstd + (batch_mean - mean) * invstd``."""
    invstd = torch.rsqrt(var + eps)
    return invstd * (sum_dy_xc + (batch_mean - mean) * sum_dy), sum_dy


def backward_dx(grad_y, x, weight, mean, var, batch_mean, batch_var, b, sum_dy, sum_dy_xc, count, eps,
                exact):
    """``dx`` of SPEC section 4 from the two sums taken over ``count`` values per channel.

    With ``g = dy * weight``, pooled ``xhat = (x - mean) * invstd`` and the micro-batch's own
    ``xhat_b = (x - batch_mean) * invstd_b``:

    - renorm: ``dx = invstd * (g - sum(g)/m - xhat_b * sum(g * xhat_b)/m)``;
    - exact: ``dx = invstd * (g - (b/m) * sum(g) - xhat * (b/m) * sum(g * xhat))``.

    Both are written ``coef_dy * dy + coef_xc * (x - batch_mean) + const`` per channel.
    """
    dtype = stats_dtype(x.dtype)
    invstd = torch.rsqrt(var + eps)
    coef_dy = invstd if weight is None else invstd * weight.to(dtype)
    if exact:
        k = b / count
        sum_dy_xhat, _ = parameter_grads(mean, var, batch_mean, sum_dy, sum_dy_xc, eps)
        coef_xc = -coef_dy * k * sum_dy_xhat * invstd
        const = -coef_dy * k * sum_dy + coef_xc * (batch_mean - mean)
    else:
        coef_xc = -coef_dy * sum_dy_xc / (count * (batch_var + eps))
        const = -coef_dy * sum_dy / count
    grad_y = _match_layout(grad_y, x)
    centered = x - channel_view(batch_mean, x)
    partial = torch.addcmul(channel_view(const, x), centered, channel_view(coef_xc, x))
    grad_x = torch.empty_like(x)
    torch.addcmul(partial, grad_y, channel_view(coef_dy, x), out=grad_x)
    return grad_x


def backward(grad_y, x, weight, mean, var, batch_mean, batch_var, b, eps, exact, bias=None,
             activation=activations.IDENTITY, activation_param=0.0, from_output=False):
    """Closed-form gradients of SPEC section 4 for one process, history held constant.

    With an activation, ``grad_y`` is the gradient of its output: it is multiplied by the
    activation's derivative at the pre-activation value first (SPEC section 3). ``from_output``
    (``memory="lean"``, invertible activations): ``x`` is the layer's output, from which the
    pre-activation value and the normalized input are recovered (``activation_input``).

    Returns ``(grad_x, grad_weight, grad_bias)``, the parameter gradients per channel in the statistics'
    dtype. The renorm ``dx`` is BatchNorm's training backward about the micro-batch's own statistics
    with the weight scaled by ``invstd / invstd_b``, so torch's fused BatchNorm backward computes it
    and both sums in one call; ``backward_dx`` is the same formula written out.
    """
    if activation != activations.IDENTITY or from_output:
        return _backward_through_activation(grad_y, x, weight, mean, var, batch_mean, batch_var, b, eps,
                                            exact, bias, activation, activation_param, from_output)
    if exact or values_per_channel(x) == 0:
        sum_dy, sum_dy_xc = backward_sums(grad_y, x, batch_mean)
        grad_x = backward_dx(grad_y, x, weight, mean, var, batch_mean, batch_var, b, sum_dy, sum_dy_xc,
                             values_per_channel(x), eps, exact)
    else:
        dtype = stats_dtype(x.dtype)
        invstd = torch.rsqrt(var + eps)
        invstd_b = torch.rsqrt(batch_var + eps)
        scale = invstd / invstd_b if weight is None else weight.to(dtype) * invstd / invstd_b
        grad_x, sum_dy_xhat_b, sum_dy = torch.ops.aten.native_batch_norm_backward(
            _match_layout(grad_y, x), x, scale, None, None, batch_mean, invstd_b, True, eps,
            [True, True, True])
        grad_x = _like(grad_x, x)
        sum_dy, sum_dy_xc = sum_dy.to(dtype), sum_dy_xhat_b.to(dtype) / invstd_b
    grad_weight, grad_bias = parameter_grads(mean, var, batch_mean, sum_dy, sum_dy_xc, eps)
    return grad_x, grad_weight, grad_bias


def activation_input(saved, weight, mean, var, bias, eps, activation, activation_param, from_output):
    """``(x, dact)`` in the statistics' dtype: the layer's input and the activation's derivative at the
    pre-activation value ``z``. ``saved`` is the input (``z`` recomputed from it) or, ``from_output``,
    the output: then ``z = act^-1(output)``, ``xhat = (z - bias) / weight`` (a weight below
    ``LEAN_MIN_WEIGHT`` in magnitude taken as that magnitude) and ``x = mean + xhat * sqrt(var + eps)``.
    """
    dtype = stats_dtype(saved.dtype)
    saved = saved.to(dtype)
    if from_output:
        if not activations.invertible(activation, activation_param):
            raise ValueError(f"cmbn_backward: from_output needs an invertible activation, got "
                             f"{activations.CODE_NAMES.get(activation, activation)!r} with parameter "
                             f"{activation_param}")
        z = activations.invert(saved, activation, activation_param)
        if bias is not None:
            z = z - channel_view(bias.to(dtype), saved)
        if weight is not None:
            w = weight.to(dtype)
            magnitude = w.abs().clamp(min=LEAN_MIN_WEIGHT)
            z = z / channel_view(torch.where(w < 0, -magnitude, magnitude), saved)
        x = z * channel_view(torch.sqrt(var + eps), saved) + channel_view(mean, saved)
        return x, activations.derivative_from_output(saved, activation, activation_param)
    z = (saved - channel_view(mean, saved)) * channel_view(torch.rsqrt(var + eps), saved)
    if weight is not None:
        z = z * channel_view(weight.to(dtype), saved)
    if bias is not None:
        z = z + channel_view(bias.to(dtype), saved)
    return saved, activations.derivative(z, activation, activation_param)


def _backward_through_activation(grad_y, saved, weight, mean, var, batch_mean, batch_var, b, eps, exact,
                                 bias, activation, activation_param, from_output):
    """``backward`` with an activation or from the output: the identity's formulas on the recovered
    input and ``dy * act'(z)``, in the statistics' dtype; ``grad_x`` in the dtype and memory format
    of ``saved``."""
    x, dact = activation_input(saved, weight, mean, var, bias, eps, activation, activation_param,
                               from_output)
    grad_z = _match_layout(grad_y, saved).to(x.dtype) * dact
    grad_x, grad_weight, grad_bias = backward(grad_z, x, weight, mean, var, batch_mean, batch_var, b,
                                              eps, exact)
    return _like(grad_x.to(saved.dtype), saved), grad_weight, grad_bias


def _zero_stats(x):
    return torch.zeros(x.shape[1], dtype=stats_dtype(x.dtype), device=x.device)


def _match_layout(grad_y, x):
    """``grad_y`` in the dtype and memory format of ``x``: autograd may hand it over in another."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        fmt = torch.channels_last
    elif x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        fmt = torch.channels_last_3d
    else:
        fmt = torch.contiguous_format
    return grad_y.to(x.dtype).contiguous(memory_format=fmt)
