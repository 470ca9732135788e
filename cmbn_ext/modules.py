"""The layers: ``CrossMiniBatchNorm1d``, ``CrossMiniBatchNorm2d`` and ``CrossMiniBatchNorm3d``.

They subclass ``torch.nn.modules.batchnorm._BatchNorm`` (same parameters, buffers, ``state_dict`` keys
and printing) and add the window state of SPEC section 5 as four buffers, ``window_count``,
``window_mean``, ``window_var`` and ``window_step`` (``window_state.py`` says what they hold).

A training forward is two ops: ``cmbn_forward`` (through ``CrossMiniBatchNormFunction`` for autograd)
and ``cmbn_update_state`` (in place on the buffers). Neither branches in Python on a tensor's value, so a model that contains
the layer compiles with ``torch.compile(fullgraph=True)``.
"""
import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from .ops import CrossMiniBatchNormFunction
from .distributed import GroupCrossMiniBatchNorm, check_group_matches
from .reference import channel_view, values_per_channel
from .window_state import commit_window

MODES = ("cumulative", "sliding", "ema")
GRADS = ("renorm", "exact")
WINDOW_BUFFERS = ("window_count", "window_mean", "window_var", "window_step")


def _check_options(mode, window, grad, momentum, process_group):
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if grad not in GRADS:
        raise ValueError(f"grad must be one of {GRADS}, got {grad!r}")
    if window is None:
        if mode == "sliding":
            raise ValueError("window=None is for mode='cumulative' (accumulate until end_window()); "
                             "mode='sliding' needs an int window >= 1")
    elif isinstance(window, bool) or not isinstance(window, int):
        raise TypeError(f"window must be an int >= 1 or None, got {window!r}")
    elif window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if mode == "ema" and (isinstance(momentum, bool) or not isinstance(momentum, (int, float))
                          or not 0 < momentum <= 1):
        raise ValueError(f"mode='ema' needs momentum to be a float in (0, 1], got {momentum!r}")
    if process_group is not None and not isinstance(process_group, torch.distributed.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup or None, got "
                        f"{type(process_group).__name__}")


class _CrossMiniBatchNorm(_BatchNorm):
    """Cross mini-Batch Normalization: BatchNorm whose training statistics pool earlier micro-batches.

    Args:
        num_features, eps, momentum, affine, track_running_stats, device, dtype: as in
            ``torch.nn.BatchNorm2d``.
        mode: ``"cumulative"`` (default) pools every earlier micro-batch of the current window;
            ``"sliding"`` pools the previous ``window - 1`` micro-batches; ``"ema"`` pools an exponential
            average with weight ``momentum`` for the current micro-batch.
        window: micro-batches per window (int >= 1), typically the micro-batches of one optimizer step.
            ``None`` (cumulative only) accumulates until ``end_window()``. Unused by ``"ema"``.
        grad: ``"renorm"`` (default, scale-invariant like BatchNorm) or ``"exact"`` (the exact gradient
            of the forward with history held constant); see SPEC section 4.
        process_group: a ``torch.distributed`` process group whose ranks pool their micro-batches too
            (``torch.distributed.group.WORLD`` for all); ``None`` (default) keeps each process alone.

    With ``window=1`` in cumulative mode the layer is exactly ``torch.nn.BatchNorm*d``.
    """

    _version = 2

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, *,
                 mode="cumulative", window=4, grad="renorm", process_group=None, device=None,
                 dtype=None):
        _check_options(mode, window, grad, momentum, process_group)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device,
                         dtype=dtype)
        self.mode = mode
        self.window = window
        self.grad = grad
        self.process_group = process_group
        slots = window - 1 if mode == "sliding" else 1
        self.register_buffer("window_count",
                             torch.zeros(slots, num_features, dtype=torch.long, device=device))
        self.register_buffer("window_mean", torch.zeros(slots, num_features, device=device, dtype=dtype))
        self.register_buffer("window_var", torch.zeros(slots, num_features, device=device, dtype=dtype))
        self.register_buffer("window_step", torch.zeros((), dtype=torch.long, device=device))

    def extra_repr(self):
        return f"{super().extra_repr()}, mode={self.mode!r}, window={self.window}, grad={self.grad!r}"

    # ----------------------------------------------------------------------------------------- forward
    def forward(self, x):
        self._check_input(x)
        if not _is_dense(x):  # the kernels take contiguous or channels_last input
            x = x.contiguous()
        if self.training and self.process_group is not None:
            return self._forward_across_group(x)
        if values_per_channel(x) == 0:
            return self._empty_output(x)
        if not self.training and self.track_running_stats:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False,
                                0.0, self.eps)
        if self.training:
            history = (self.window_count, self.window_mean, self.window_var)
        else:  # eval without running statistics: the current batch alone
            history = (self.window_count[:0], self.window_mean[:0], self.window_var[:0])
        m = values_per_channel(x)
        if m == 1:
            self._check_more_than_one_value(x, history[0])
        ema_momentum = float(self.momentum) if self.mode == "ema" else None
        y, mean, var, batch_mean, batch_var, _ = CrossMiniBatchNormFunction.apply(
            x, self.weight, self.bias, *history, self.eps, ema_momentum, self.grad == "exact")
        if self.training:
            with torch.no_grad():
                self._update_state(m, mean, var, batch_mean, batch_var)
        return y

    def _forward_across_group(self, x):
        """Training with statistics shared across ``process_group`` (``distributed.py``). Every rank
        must call it, an empty micro-batch included: it takes part in the collectives."""
        check_group_matches(self.process_group, x)
        ema_momentum = float(self.momentum) if self.mode == "ema" else None
        y, mean, var, batch_mean, batch_var, count = GroupCrossMiniBatchNorm.apply(
            x, self.weight, self.bias, self.window_count, self.window_mean, self.window_var, self.eps,
            ema_momentum, self.grad == "exact", self.process_group, self.window_step)
        count = int(count)
        if count == 1:
            self._check_more_than_one_value(x, self.window_count)
        if count:
            with torch.no_grad():
                self._update_state(count, mean, var, batch_mean, batch_var)
        return y

    def _check_input(self, x):
        name = type(self).__name__
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(x).__name__}")
        self._check_input_dim(x)
        if not x.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point input, got dtype {x.dtype}")
        if x.shape[1] != self.num_features:
            raise ValueError(f"{name}: expected {self.num_features} channels (num_features), got input of "
                             f"shape {tuple(x.shape)}")
        if x.device != self.window_mean.device:
            raise RuntimeError(f"{name}: input is on {x.device} but the layer is on "
                               f"{self.window_mean.device}; move one of them with .to()")

    def _check_more_than_one_value(self, x, history_count):
        if bool((history_count.sum(0) == 0).any()):
            raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                             f"{x.size()}")

    def _empty_output(self, x):
        """An empty micro-batch: an empty output, still connected to the parameters; no state changes."""
        y = x.clone()
        if self.affine:
            y = (y * channel_view(self.weight, x) + channel_view(self.bias, x)).to(x.dtype)
        return y

    # ------------------------------------------------------------------------------------------- state
    def _update_state(self, m, mean, var, batch_mean, batch_var):
        """Fold the micro-batch into the window and the running statistics (``window_state.py``)."""
        torch.ops.cmbn_ext.cmbn_update_state(
            self.window_count, self.window_mean, self.window_var, self.window_step, self.running_mean,
            self.running_var, self.num_batches_tracked, m, mean, var, batch_mean, batch_var, self.mode,
            self.window if self.mode == "cumulative" else None, self.momentum)

    @torch.no_grad()
    def end_window(self):
        """Commit the window to the running statistics now and start a new one.

        Only cumulative mode has windows to commit; an empty window commits nothing. In sliding and
        EMA modes this does nothing.
        """
        if self.mode == "cumulative":
            commit_window(self.window_count, self.window_mean, self.window_var, self.window_step,
                          self.running_mean, self.running_var, self.num_batches_tracked, self.momentum)

    @torch.no_grad()
    def reset_window(self):
        """Drop the window (the history) without committing it. In EMA mode the next micro-batch then
        starts a new average; the running statistics are kept."""
        for name in WINDOW_BUFFERS:
            getattr(self, name).zero_()

    # ----------------------------------------------------------------------------------- checkpoints
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A plain BatchNorm checkpoint has no window state: it loads as an empty window.
        for name in WINDOW_BUFFERS:
            state_dict.setdefault(prefix + name, torch.zeros_like(getattr(self, name)))
        # All or nothing: a checkpoint of another shape must not leave the layer half loaded.
        mismatched = [
            f"size mismatch for {prefix}{name}: copying a param with shape {tuple(state_dict[prefix + name].shape)} "
            f"from checkpoint, the shape in current model is {tuple(tensor.shape)}"
            + (" (the window state of another mode or window)" if name in WINDOW_BUFFERS else "")
            for name, tensor in [*self._parameters.items(), *self._buffers.items()]
            if tensor is not None and prefix + name in state_dict
            and isinstance(state_dict[prefix + name], torch.Tensor)
            and state_dict[prefix + name].shape != tensor.shape
        ]
        if mismatched:
            error_msgs.extend(mismatched)
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


def _is_dense(x):
    if x.is_contiguous():
        return True
    if x.dim() == 4:
        return x.is_contiguous(memory_format=torch.channels_last)
    return x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d)


class CrossMiniBatchNorm1d(_CrossMiniBatchNorm):
    """CmBN over ``(N, C)`` or ``(N, C, L)`` input; the drop-in for ``torch.nn.BatchNorm1d``."""

    def _check_input_dim(self, x):
        if x.dim() not in (2, 3):
            raise ValueError(f"{type(self).__name__}: expected 2D or 3D input (got {x.dim()}D input)")


class CrossMiniBatchNorm2d(_CrossMiniBatchNorm):
    """CmBN over ``(N, C, H, W)`` input; the drop-in for ``torch.nn.BatchNorm2d``."""

    def _check_input_dim(self, x):
        if x.dim() != 4:
            raise ValueError(f"{type(self).__name__}: expected 4D input (got {x.dim()}D input)")


class CrossMiniBatchNorm3d(_CrossMiniBatchNorm):
    """CmBN over ``(N, C, D, H, W)`` input; the drop-in for ``torch.nn.BatchNorm3d``."""

    def _check_input_dim(self, x):
        if x.dim() != 5:
            raise ValueError(f"{type(self).__name__}: expected 5D input (got {x.dim()}D input)")
