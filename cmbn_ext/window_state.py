"""The layer's state update after a training micro-batch (SPEC sections 5 and 6), in plain PyTorch.

The reference for ``torch.ops.cmbn_ext.cmbn_update_state``, which updates the buffers in place:

- ``window_count`` (int64), ``window_mean``, ``window_var``: ``(S, C)`` history slots. Cumulative,
  deferred and EMA modes use one slot (the window so far, or the exponential average); sliding mode a
  ring of ``window - 1`` slots holding the previous micro-batches' own statistics. Deferred mode
  normalizes without its window: it pools the micro-batches' own statistics for the running ones only.
- ``window_step`` (int64 scalar): micro-batches since the window started (cumulative, deferred), in all
  (sliding: it picks the ring slot), or since the last reset (EMA).
- ``running_mean``, ``running_var``, ``num_batches_tracked``: BatchNorm's, or None.

Every decision is a tensor operation (``torch.where``), never a Python branch on a tensor's value: on
CUDA without the kernels it runs with no host synchronization, and it decides as the kernel does. The
micro-batch's count ``m`` is a tensor too, so that the group's count of the distributed path never
goes through the host; a count of 0 leaves the state as it is. A channel whose statistics are not
finite enters no state.
"""
import torch

from . import reference


def update_running(running_mean, running_var, num_batches_tracked, counted, valid, count, mean, var,
                   momentum):
    """BatchNorm's running update from pooled statistics of ``count`` values per channel.

    ``counted`` (scalar bool) says whether this is a tracked batch at all, ``valid`` (per channel) which
    channels have statistics to take. The variance is made unbiased with the pooled count;
    ``momentum=None`` is the cumulative average over tracked batches, as in BatchNorm.
    """
    if running_mean is None:
        return
    num_batches_tracked.add_(counted.to(torch.long))
    if momentum is None:
        factor = 1.0 / num_batches_tracked.clamp(min=1).to(torch.float64)
    else:
        factor = momentum
    valid = valid & counted & (count > 1)
    bessel = (count.to(torch.float64) / (count - 1).clamp(min=1).to(torch.float64)).to(var.dtype)
    for running, value in ((running_mean, mean), (running_var, var * bessel)):
        updated = running + (factor * (value - running)).to(running.dtype)
        running.copy_(torch.where(valid, updated, running))


def merge_micro_batch(window_count, window_mean, window_var, m, batch_mean, batch_var):
    """Deferred mode's window after a micro-batch: slot 0 (the window so far) merged with the
    micro-batch's own statistics over ``m`` values per channel (Chan's merge, count-weighted)."""
    dtype = torch.promote_types(batch_mean.dtype, window_mean.dtype)
    b = reference.current_weight(window_count[0], m, None, dtype)
    return reference.pool(window_mean[0].to(dtype), window_var[0].to(dtype), batch_mean.to(dtype),
                          batch_var.to(dtype), b)


def check_count(m, window_count):
    """``m`` as the op takes it: a 0-dim int64 tensor on the state's device or on the CPU."""
    if not isinstance(m, torch.Tensor):
        raise RuntimeError(f"cmbn_update_state: m must be a 0-dim int64 tensor, got {type(m).__name__}")
    if m.dtype != torch.int64 or m.dim() != 0:
        raise RuntimeError(f"cmbn_update_state: m must be a 0-dim int64 tensor, got one of dtype "
                           f"{m.dtype} and shape {tuple(m.shape)}")
    if m.device != window_count.device and m.device.type != "cpu":
        raise RuntimeError(f"cmbn_update_state: m is on {m.device} but window_count is on "
                           f"{window_count.device}")


def update_state(window_count, window_mean, window_var, window_step, running_mean, running_var,
                 num_batches_tracked, m, mean, var, batch_mean, batch_var, mode, window, momentum,
                 every_micro_batch=False):
    """Fold one micro-batch into the window and the running statistics, in place.

    ``m`` is the micro-batch's count per channel, a 0-dim int64 tensor (across processes the group's,
    which stays on the device); ``m <= 0`` (an empty micro-batch) leaves every buffer as it is.
    ``mean``/``var`` are the pooled statistics it was normalized with; ``batch_mean``/``batch_var`` its
    own. ``window`` is the window length of cumulative and deferred modes (None: until
    ``end_window()``), ``momentum`` the layer's. ``every_micro_batch`` (cumulative and deferred): the
    running statistics take the window's pooled statistics after every micro-batch, as Darknet's CmBN
    does, and a full window ends without a commit.
    """
    check_count(m, window_count)
    if m.device != window_count.device:  # a caller's CPU scalar: the state's device decides
        m = m.to(window_count.device)
    active = m > 0  # decided on the device: the host never reads m
    finite = torch.isfinite(torch.stack([mean, var, batch_mean, batch_var])).all(0)
    pooled_count = window_count.sum(0) + m
    if mode == "sliding":
        slots = window_count.shape[0]
        if slots:  # the micro-batch's own statistics replace the oldest slot
            slot = (window_step % slots).view(1)
            for buffer, value in ((window_count, m), (window_mean, batch_mean), (window_var, batch_var)):
                new = torch.where(finite, value, 0).to(buffer.dtype)
                buffer.index_copy_(0, slot, torch.where(active, new, buffer.index_select(0, slot)[0])
                                   .unsqueeze(0))
        window_step.add_(active.to(torch.long))
        update_running(running_mean, running_var, num_batches_tracked, active, finite, pooled_count,
                       mean, var, momentum)
        return
    if mode == "deferred":  # the micro-batch was normalized alone; the window pools it
        mean, var = merge_micro_batch(window_count, window_mean, window_var, m, batch_mean, batch_var)
    enters = finite & active
    count = torch.where(enters, pooled_count, window_count[0])
    mean = torch.where(enters, mean, window_mean[0])
    var = torch.where(enters, var, window_var[0])
    window_step.add_(active.to(torch.long))
    if mode == "ema":  # the running statistics are the pooled ones themselves
        if running_mean is not None:
            num_batches_tracked.add_(active.to(torch.long))
            running_mean.copy_(torch.where(enters, mean, running_mean))
            running_var.copy_(torch.where(enters, var, running_var))
    else:
        if every_micro_batch:  # Darknet: the running statistics take the window so far, every time
            update_running(running_mean, running_var, num_batches_tracked, active, finite, count,
                           mean, var, momentum)
        if window is not None:  # the window ends after its window-th micro-batch
            full = active & (window_step >= window)
            if not every_micro_batch:  # and is committed
                update_running(running_mean, running_var, num_batches_tracked, full,
                               torch.ones_like(finite), count, mean, var, momentum)
            count, mean, var = (torch.where(full, 0, t) for t in (count, mean, var))
            window_step.copy_(torch.where(full, 0, window_step))
    window_count.copy_(count.unsqueeze(0))
    window_mean.copy_(mean.unsqueeze(0))
    window_var.copy_(var.unsqueeze(0))


def commit_window(window_count, window_mean, window_var, window_step, running_mean, running_var,
                  num_batches_tracked, momentum):
    """``end_window()`` of cumulative and deferred modes: commit the window so far (nothing if it is
    empty) and empty it."""
    update_running(running_mean, running_var, num_batches_tracked, window_step > 0,
                   torch.ones_like(window_count[0], dtype=torch.bool), window_count[0], window_mean[0],
                   window_var[0], momentum)
    for buffer in (window_count, window_mean, window_var, window_step):
        buffer.zero_()
