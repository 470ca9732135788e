"""CmBN across processes (SPEC section 7): the micro-batch statistics of every rank of a process group
are merged before pooling with the history, and the backward sums are all-reduced.

One collective per layer in the forward (an all-gather of each rank's ``(m, mean, var)`` and window
position) and one in the backward (an all-reduce of ``sum(dy)`` and ``sum(dy * (x - mean))``), between
the reduction and the elementwise phases of the ops. The result on every rank equals one process that
sees the micro-batches of all ranks concatenated: the same statistics, state and ``dx`` rows. The
parameter gradients are each rank's own contribution, as ``SyncBatchNorm``'s are: they add up over the
ranks to the single process's (DistributedDataParallel then averages them).

Nothing here reads a tensor on the host: the group's count stays on the device through the state
update, and the ranks' window positions are compared on the device (``WindowAgreement``), the host
reading the outcome only when the layer's ``end_window()`` asks for it.
"""
import torch
import torch.distributed as dist

from .ops import input_grads
from .reference import merge_history, parameter_grads, stats_dtype, values_per_channel

_BACKEND_DEVICE = {"nccl": "cuda", "gloo": "cpu"}
# torch 2.14 renamed all_gather_into_tensor; older releases have only the old name.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def check_group_matches(group, x):
    """A clear error for a group whose backend cannot carry ``x``'s device."""
    backend = str(dist.get_backend(group)).lower()
    wanted = _BACKEND_DEVICE.get(backend)
    if wanted is not None and x.device.type != wanted:
        raise ValueError(f"process_group uses the {backend} backend, which needs {wanted} tensors, but the "
                         f"input is on {x.device}; use a group with a matching backend "
                         f"(nccl for CUDA, gloo for CPU)")


def gather_batch_stats(x, window_step, group):
    """Every rank's ``(m, mean, var)`` merged in rank order (Chan's formula): the group's micro-batch.

    ``window_step`` travels in the same collective, so ranks whose windows disagree can be caught at no
    extra communication. Returns ``(count, mean, var, positions)``: ``count`` a 0-dim int64 tensor,
    ``positions`` every rank's ``window_step`` (float64, one per rank), all on ``x``'s device.
    """
    dtype = stats_dtype(x.dtype)
    m = values_per_channel(x)
    if m:
        batch_mean, batch_var = torch.ops.cmbn_ext.cmbn_batch_stats(x)
    else:  # an empty micro-batch still takes part in the collective, with a count of 0
        batch_mean = batch_var = torch.zeros(x.shape[1], dtype=dtype, device=x.device)
    # m filled in on the device: no copy from the host (a blocking one for a CUDA tensor)
    header = torch.stack([torch.full((), m, dtype=torch.float64, device=x.device),
                          window_step.to(device=x.device, dtype=torch.float64)])
    local = torch.cat([header, batch_mean.to(torch.float64), batch_var.to(torch.float64)])
    gathered = torch.empty(dist.get_world_size(group) * local.numel(), dtype=torch.float64,
                           device=x.device)
    _all_gather(gathered, local, group=group)
    gathered = gathered.view(-1, local.numel())
    C = x.shape[1]
    counts = gathered[:, 0].long()  # exact: counts are far below 2^53
    total, mean, var = merge_history(counts[:, None].expand(-1, C), gathered[:, 2:2 + C],
                                     gathered[:, 2 + C:], dtype)
    return total[0], mean, var, gathered[:, 1]


class WindowAgreement:
    """Whether the ranks of a group agreed on the window position at every training forward since the
    last ``reset()``, recorded on the device so that the forward never waits for it.

    ``record()`` folds in one forward's gathered positions (two small device operations); ``check()``
    reads the outcome on the host and raises if any rank disagreed. Every rank gathers the same
    positions, so every rank raises at the same ``check()``, and none is left waiting in a collective.
    """

    def __init__(self):
        self.reset()

    def reset(self):
        self.differed = None  # (world,) bool: ranks that disagreed with rank 0 at some forward
        self.last = None      # the positions of the latest forward, for the message

    def record(self, positions):
        differs = positions != positions[0]
        seen = self.differed
        if seen is None or seen.shape != differs.shape or seen.device != differs.device:
            self.differed = differs  # the first forward, or a new group or device: start over
        else:
            seen.logical_or_(differs)
        self.last = positions

    def check(self, name):
        """Raise if the ranks disagreed at a forward since the last ``reset()`` (a host read)."""
        if self.differed is None or not bool(self.differed.any()):
            return
        ranks = self.differed.nonzero().flatten().tolist()
        raise RuntimeError(
            f"{name}: CmBN ranks disagree on the window position: at a training forward since the last "
            f"end_window() or reset_window(), rank(s) {ranks} had another number of micro-batches in "
            f"the window than rank 0 "
            f"(at the latest forward, by rank: {self.last.long().tolist()}). Every rank must run the "
            f"same number of training forwards, end_window() and reset_window() calls. The window was "
            f"not committed; reset_window() on every rank starts the ranks over together")


class GroupCrossMiniBatchNorm(torch.autograd.Function):
    """The forward and backward of one micro-batch with statistics shared across ``group``.

    Returns ``(y, mean, var, batch_mean, batch_var, count, positions)``: the output, the pooled
    statistics, the group's micro-batch statistics and their count, for the layer's state update, and
    the ranks' window positions (``gather_batch_stats``).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, history_count, history_mean, history_var, eps, ema_momentum,
                exact_grad, group, window_step):
        count, batch_mean, batch_var, positions = gather_batch_stats(x, window_step, group)
        y, mean, var, b = torch.ops.cmbn_ext.cmbn_pooled_forward(
            x, weight, bias, count, batch_mean, batch_var, history_count, history_mean, history_var,
            eps, ema_momentum)
        ctx.save_for_backward(x, weight, mean, var, batch_mean, batch_var, b, count)
        ctx.eps, ctx.exact_grad, ctx.group = eps, exact_grad, group
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(mean, var, batch_mean, batch_var, count, positions)
        return y, mean, var, batch_mean, batch_var, count, positions

    @staticmethod
    def backward(ctx, grad_y, *_unused_statistics_grads):
        x, weight, mean, var, batch_mean, batch_var, b, count = ctx.saved_tensors
        sum_dy, sum_dy_xc = torch.ops.cmbn_ext.cmbn_backward_sums(grad_y, x, batch_mean)
        group_sums = torch.cat([sum_dy, sum_dy_xc])
        dist.all_reduce(group_sums, group=ctx.group)
        grad_x = torch.ops.cmbn_ext.cmbn_backward_dx(
            grad_y, x, weight, mean, var, batch_mean, batch_var, b, *group_sums.chunk(2), count,
            ctx.eps, ctx.exact_grad)
        grad_weight, grad_bias = parameter_grads(mean, var, batch_mean, sum_dy, sum_dy_xc, ctx.eps)
        return input_grads(ctx, grad_x, grad_weight, grad_bias, weight)
