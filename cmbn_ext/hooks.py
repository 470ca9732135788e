"""Windows that close with the optimizer: ``end_windows_on_step``.

A window should hold the micro-batches of one optimizer step. Rather than calling ``end_window(model)``
by hand after each step, register it once as an optimizer step post-hook. What can keep a step's
post-hook from running is handled here too: a ``GradScaler`` that skips ``optimizer.step()`` because the
gradients are not finite.
"""
import functools

import torch

from .convert import _cmbn_layers, end_window


def end_windows_on_step(optimizer, model, *, scaler=None):
    """End every CmBN window of ``model`` after each step of ``optimizer``.

    Args:
        optimizer: a ``torch.optim.Optimizer``, or several (a list or tuple): windows end after a step of
            any of them. Wrappers that hold the optimizer as ``.optimizer`` (accelerate's
            ``AcceleratedOptimizer``, mmengine's ``OptimWrapper``) or ``._optimizer`` (Lightning's
            ``LightningOptimizer``) are unwrapped.
        model: the module whose CmBN layers the optimizer's steps close: the model, or the part of it
            that this optimizer trains.
        scaler: the ``torch.amp.GradScaler`` that steps the optimizer, if any. When the gradients are not
            finite the scaler skips ``optimizer.step()``, and with it the post-hook; passing the scaler
            makes its ``step()`` end the window in that case too. (Layers with an int ``window`` also
            commit by themselves after ``window`` micro-batches, skipped step or not.)

    Returns:
        A handle: ``handle.remove()`` (or leaving ``with handle:``) unregisters everything.

    A window is committed once per step. With several optimizers stepping one after the other, the first
    step commits the window and the next ones find it empty, which commits nothing; the same holds for
    layers with ``window=k`` that already committed after their k-th micro-batch. A step that follows a
    shorter group of micro-batches (the last, partial one of an epoch) commits that partial window.

    Example::

        model = cmbn_ext.convert_batchnorm(model, window=None)
        cmbn_ext.end_windows_on_step(optimizer, model)
        for micro_batches in loader:
            for x, t in micro_batches:
                criterion(model(x), t).backward()
            optimizer.step()          # commits every CmBN window of model
            optimizer.zero_grad()
    """
    return WindowCloser(optimizer, model, scaler)


class WindowCloser:
    """The handle ``end_windows_on_step`` returns; ``remove()`` unregisters its hooks."""

    def __init__(self, optimizer, model, scaler=None):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"end_windows_on_step: model must be a torch.nn.Module, got "
                            f"{type(model).__name__}")
        require_cmbn_layers(model, "end_windows_on_step")
        optimizers = list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
        if not optimizers:
            raise ValueError("end_windows_on_step: no optimizer given")
        self._optimizers = [_unwrap(o) for o in optimizers]
        if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
            raise TypeError(f"end_windows_on_step: scaler must be a torch.amp.GradScaler or None, got "
                            f"{type(scaler).__name__}")
        self._model = model
        self._steps = 0  # post-hook calls: the scaler's wrapper compares it to tell a skipped step
        self._active = True
        self._handles = [o.register_step_post_hook(self._after_step) for o in self._optimizers]
        self._scaler = scaler
        self._scaler_step = self._wrap_scaler_step(scaler) if scaler is not None else None

    def _after_step(self, optimizer, args, kwargs):
        self._steps += 1
        end_window(self._model)

    def _wrap_scaler_step(self, scaler):
        """Make ``scaler.step(optimizer)`` end the windows when it skips the optimizer's step. Patched on
        this scaler instance only; ``remove()`` restores it."""
        self._replaced_step = scaler.__dict__.get("step")  # None: the class's own method
        original = scaler.step

        @functools.wraps(original)
        def step(optimizer, *args, **kwargs):
            steps_before = self._steps
            result = original(optimizer, *args, **kwargs)
            if (self._active and self._steps == steps_before
                    and any(_unwrap(optimizer) is o for o in self._optimizers)):
                end_window(self._model)  # the scaler skipped the step (non-finite gradients)
            return result

        scaler.step = step
        return step

    def remove(self):
        """Stop ending windows: unregister the step hooks and restore the scaler's ``step``."""
        if not self._active:
            return
        self._active = False
        for handle in self._handles:
            handle.remove()
        scaler = self._scaler
        if scaler is not None and scaler.__dict__.get("step") is self._scaler_step:
            if self._replaced_step is None:
                del scaler.step
            else:
                scaler.step = self._replaced_step
        # A wrapper registered on top of this one stays in place, inactive: it calls through.

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def require_cmbn_layers(model, caller):
    """A clear error for a model without CmBN layers, where ``caller`` would otherwise do nothing."""
    if next(_cmbn_layers(model), None) is None:
        raise ValueError(f"{caller}: the model has no CmBN layers (convert its BatchNorm layers with "
                         f"cmbn_ext.convert_batchnorm, or build it with CmBN layers)")


def set_cumulative_windows(model, window):
    """Set ``window`` on every cumulative-mode CmBN layer of ``model``: sliding windows are fixed at
    construction and EMA has none. For the integrations, which read it from the trainer's accumulation."""
    for layer in _cmbn_layers(model):
        if layer.mode in ("cumulative", "deferred") and layer.window != window:
            layer.window = window


def _unwrap(optimizer):
    """The ``torch.optim.Optimizer`` inside the wrappers of accelerate, mmengine and Lightning."""
    for name in ("optimizer", "_optimizer"):
        inner = getattr(optimizer, name, None)
        if isinstance(inner, torch.optim.Optimizer) and inner is not optimizer:
            return _unwrap(inner)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"end_windows_on_step: expected a torch.optim.Optimizer (or a list of them), got "
                        f"{type(optimizer).__name__}")
    return optimizer
