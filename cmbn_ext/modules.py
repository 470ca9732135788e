"""The layers: ``CrossMiniBatchNorm1d``, ``CrossMiniBatchNorm2d`` and ``CrossMiniBatchNorm3d``.

They subclass ``torch.nn.modules.batchnorm._BatchNorm`` (same parameters, buffers, ``state_dict`` keys
and printing) and add the window state of SPEC section 5 as four buffers, ``window_count``,
``window_mean``, ``window_var`` and ``window_step`` (``window_state.py`` says what they hold).
``SyncCrossMiniBatchNorm`` is the counterpart of ``torch.nn.SyncBatchNorm``; ``norm_act.py`` adds the
counterpart of timm's ``BatchNormAct2d``.

A training forward is one op, ``cmbn_train_forward``: the normalization and the update of the buffers,
with its autograd in C++ when the extension is built. The Python forward around it does little more per
call than BatchNorm's (options are checked when set, buffers read from the module's dicts; a cumulative
or deferred window is followed on the host, with the parameters' version counters), and nothing
branches in Python on a tensor's value, so a model that contains the layer compiles with
``torch.compile(fullgraph=True)`` (a layer without a ``process_group``). The distributed path reads
no tensor on the host either: the group's count stays on the device through the state update, and the
ranks' window positions are compared on the device and checked at ``end_window()``. A forward that
activation checkpointing recomputes runs ``cmbn_forward`` through ``CrossMiniBatchNormFunction``,
without touching the state a second time.
"""
import math
import numbers

import torch
import torch.distributed as dist
import torch.fx
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from . import activations
from .ops import CrossMiniBatchNormFunction, normalization_history
from .distributed import GroupCrossMiniBatchNorm, WindowAgreement, check_group_matches
from .reference import LEAN_MIN_WEIGHT, channel_view, normalize, stats_dtype, values_per_channel
from .user_warnings import warn
from .window_state import commit_window

MODES = ("cumulative", "sliding", "ema", "deferred")
# The modes whose windows end (after `window` micro-batches, or at end_window()) and are committed.
WINDOWED_MODES = ("cumulative", "deferred")
GRADS = ("renorm", "exact")
# When the running statistics of a windowed mode are updated: once per window, or after every
# micro-batch from the pooled statistics of the window so far (Darknet's CmBN).
RUNNING_STATS = ("window", "micro_batch")
# What the backward keeps: the input ("standard") or, for an invertible activation, the output ("lean").
MEMORY = ("standard", "lean")
WINDOW_BUFFERS = ("window_count", "window_mean", "window_var", "window_step")
HALF_DTYPES = (torch.float16, torch.bfloat16)
# window=None pools until end_window(); a window this long means it was most likely forgotten.
LONG_WINDOW = 1024


class OpenWindowWarning(UserWarning):
    """A window left open where it is most likely a mistake: across an optimizer step (the weights
    changed inside it), at ``eval()``, or growing without end."""


_warned = set()  # the kinds of OpenWindowWarning given so far: each is said once per process


def _warn_once(kind, message):
    if kind not in _warned:
        _warned.add(kind)
        warn(message, OpenWindowWarning)


class _HostWindow:
    """What the host knows of a cumulative or deferred layer's open window without reading the device:
    how many micro-batches it holds (``window_step``, counted here), and the affine parameters at its
    first micro-batch with the sum of their version counters (``Tensor._version``, which only grows, at
    every in-place change such as an optimizer step). ``version`` is None where that first micro-batch
    was not seen (a window loaded from a checkpoint, or copied). A plain object, changed in place:
    ``nn.Module.__setattr__`` costs host time at every call."""

    __slots__ = ("position", "weight", "bias", "version")

    def __init__(self, position=0):
        self.position, self.weight, self.bias, self.version = position, None, None, None

    def __reduce__(self):
        # A copy (deepcopy, pickle) has new parameters with new version counters: only the position
        # carries over.
        return _HostWindow, (self.position,)


class _LeanCheck:
    """Whether a ``memory="lean"`` layer's weight lets the backward divide by it: no ``|weight|`` below
    ``LEAN_MIN_WEIGHT``. Reading that costs a wait for the device, so the answer is kept with the
    weight it was read from and that weight's version counter (which grows at every in-place change,
    such as an optimizer step), and read again only when either changes."""

    __slots__ = ("weight", "version", "holds")

    def __init__(self):
        self.weight, self.version, self.holds = None, None, True

    def __reduce__(self):
        return _LeanCheck, ()  # a copy has other parameters: read again


def _resolve_activation(activation, activation_param):
    """``(code, param, module)`` of the ``activation=`` argument: None, a name of
    ``activations.NAMES`` (``activation_param`` its slope or alpha), or an instance of one of torch's
    activation modules (``module``, kept for ``revert_to_batchnorm``)."""
    if activation_param is not None and (isinstance(activation_param, bool) or not isinstance(
            activation_param, numbers.Real) or not math.isfinite(activation_param)):
        raise ValueError(f"activation_param must be a finite float, got {activation_param!r}")
    if activation is None or isinstance(activation, str):
        code, param = activations.from_name("identity" if activation is None else activation,
                                            activation_param)
        if activation_param is not None and code not in activations.DEFAULT_PARAMS:
            raise ValueError(f"activation_param is for 'leaky_relu' (its negative slope) and 'elu' (its "
                             f"alpha); activation={activation!r} takes none")
        return code, param, None
    if isinstance(activation, torch.nn.Module):
        entry = activations.from_module(activation)
        if entry is None:
            supported = ", ".join(f"torch.nn.{cls.__name__}" for cls in activations.MODULES)
            raise ValueError(f"activation: the op computes instances of exactly {supported}; got "
                             f"{type(activation).__module__}.{type(activation).__qualname__} (leave it "
                             f"as a module after the layer)")
        if activation_param is not None:
            raise ValueError("activation_param is read from the activation module; pass one or the other")
        return (*entry, activation)
    raise TypeError(f"activation must be None, a name ({', '.join(activations.NAMES)}) or a torch.nn "
                    f"activation module, got {type(activation).__name__}")


def _check_memory(memory):
    if memory not in MEMORY:
        raise ValueError(f"memory must be one of {MEMORY}, got {memory!r}")


def _check_eps(eps):
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a positive, finite float (it keeps 1 / sqrt(var + eps) finite), got "
                         f"{eps!r}")


def _check_options(mode, window, grad, momentum, process_group, running_stats="window"):
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if grad not in GRADS:
        raise ValueError(f"grad must be one of {GRADS}, got {grad!r}")
    if running_stats not in RUNNING_STATS:
        raise ValueError(f"running_stats must be one of {RUNNING_STATS}, got {running_stats!r}")
    if running_stats == "micro_batch" and mode not in WINDOWED_MODES:
        raise ValueError(f"running_stats='micro_batch' is for the modes {WINDOWED_MODES}: mode={mode!r} "
                         f"updates the running statistics after every micro-batch already")
    if window is None:
        if mode == "sliding":
            raise ValueError("window=None is for mode='cumulative' or 'deferred' (accumulate until "
                             "end_window()); mode='sliding' needs an int window >= 1")
    elif isinstance(window, bool) or not isinstance(window, int):
        raise TypeError(f"window must be an int >= 1 or None, got {window!r}")
    elif window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if mode == "ema" and (isinstance(momentum, bool) or not isinstance(momentum, (int, float))
                          or not 0 < momentum <= 1):
        raise ValueError(f"mode='ema' needs momentum to be a float in (0, 1], got {momentum!r}")
    if isinstance(process_group, str):
        if process_group != "world":
            raise ValueError(f"process_group must be a torch.distributed.ProcessGroup, 'world' or None, "
                             f"got {process_group!r}")
    elif process_group is not None and not isinstance(process_group, torch.distributed.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup, 'world' or None, got "
                        f"{type(process_group).__name__}")


class _CrossMiniBatchNorm(_BatchNorm):
    """Cross mini-Batch Normalization: BatchNorm whose training statistics pool earlier micro-batches.

    Args:
        num_features, eps, momentum, affine, track_running_stats, device, dtype, bias: as in
            ``torch.nn.BatchNorm2d`` (``bias=False``, keyword-only: a weight without a bias). ``eps``
            must be positive.
        mode: ``"cumulative"`` (default) pools every earlier micro-batch of the current window;
            ``"sliding"`` pools the previous ``window - 1`` micro-batches; ``"ema"`` pools an exponential
            average with weight ``momentum`` for the current micro-batch. BatchNorm's default
            ``momentum=0.1`` then averages over about 19 micro-batches (``2 / momentum - 1``); pass
            ``momentum=2 / (k + 1)`` to average over about ``k``, e.g. 0.4 for the 4 micro-batches of
            an optimizer step (the demo does). The default stays BatchNorm's so that ``momentum`` keeps
            one default in every mode, and ``convert_batchnorm`` keeps each layer's own.
            ``"deferred"`` (torchgpipe's and fairscale's DeferredBatchNorm) normalizes each micro-batch
            with its own statistics, exactly as BatchNorm does, and pools the window's micro-batches
            for the running statistics only.
        window: micro-batches per window (int >= 1), typically the micro-batches of one optimizer step.
            ``None`` (cumulative and deferred) accumulates until ``end_window()``. Unused by
            ``"ema"``.
        grad: ``"renorm"`` (default, scale-invariant like BatchNorm) or ``"exact"`` (the exact gradient
            of the forward with history held constant); see SPEC section 4.
        process_group: a ``torch.distributed`` process group whose ranks pool their micro-batches too,
            or ``"world"`` for all ranks (the default group, looked up at each training forward, so
            the layer may be built before ``init_process_group``); ``None`` (default) keeps each
            process alone. ``torch.distributed.group.WORLD`` is ``None`` until the process group is
            initialized: passed before then, it silently means "alone", which ``"world"`` avoids.
            Ranks whose windows disagree (another number of training forwards, ``end_window()`` or
            ``reset_window()`` calls) make the next ``end_window()`` raise.
        running_stats: ``"window"`` (default) commits each window's pooled statistics to the running
            statistics once, when it ends; ``"micro_batch"`` (cumulative and deferred modes) updates
            them after every micro-batch from the pooled statistics of the window so far, as Darknet's
            CmBN does (``num_batches_tracked`` then counts micro-batches). Fixed at construction.
        activation: the activation applied to the output inside the op (forward and backward), in
            place of an activation module after the layer: ``None`` (default, none), a name
            (``"relu"``, ``"leaky_relu"``, ``"elu"``, ``"silu"``, ``"mish"``, ``"hardswish"``,
            ``"identity"``) with ``activation_param`` for LeakyReLU's negative slope (default 0.01) and
            ELU's alpha (default 1.0), or an instance of exactly ``torch.nn.ReLU``, ``LeakyReLU``,
            ``ELU``, ``SiLU``, ``Mish``, ``Hardswish`` or ``Identity`` (its parameter read from it).
            Fixed at construction.
        memory: what the backward keeps. ``"standard"`` (default): the layer's input, from which the
            activation's derivative is recomputed (the results of BatchNorm then the activation, to
            rounding). ``"lean"``: the layer's output when the activation is invertible (none,
            LeakyReLU with a positive slope, ELU), from which the backward reconstructs the input, as
            InPlace-ABN does; the output is usually also what the next layer keeps, so the pair keeps
            one tensor. Other activations keep the input, as ``"standard"``. The reconstruction divides
            by the weight: a layer with any ``|weight| < reference.LEAN_MIN_WEIGHT`` keeps its input
            for that micro-batch instead, so gradients stay exact (a weight initialised to zero, such
            as timm's ``zero_init_last``, trains normally). That check reads the weight on the host
            once per change of the weight (an optimizer step), never under ``torch.compile``, where
            the weight is assumed large enough and the op takes ``LEAN_MIN_WEIGHT`` in place of a
            smaller magnitude. Code that changes the layer's output in place (``out += identity``)
            makes a lean layer's backward raise: use ``"standard"`` there. In fp16/bf16 the
            reconstruction rounds the output's error into the gradients, and an ELU layer keeps its
            input (a half ELU output far below zero cannot be inverted; see docs/memory.md).

    With a ``process_group`` the activation is applied after the layer's op, unfused, and the
    backward keeps the input whatever ``memory`` says.

    With ``window=1`` in cumulative mode the layer is exactly ``torch.nn.BatchNorm*d``. The window state
    is kept in fp32 (fp64 in an fp64 layer) whatever the layer's dtype. ``mode`` and ``running_stats``
    are fixed at construction, and so is ``window`` in sliding mode. As in BatchNorm, the parameters
    and running statistics must have the input's dtype, or be fp32 for fp16/bf16 input (autocast).

    A cumulative or deferred window that spans a change of ``weight`` or ``bias`` (an optimizer step
    inside the window), one still open at ``eval()`` (its micro-batches are not in the running
    statistics), and a ``window=None`` window of ``LONG_WINDOW`` micro-batches (a forgotten
    ``end_window()``), each give an ``OpenWindowWarning``, once per process.

    ``torch.fx`` tracing records the layer as one ``call_module`` node, as it records BatchNorm.
    """

    _version = 2

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 device=None, dtype=None, *, bias=True, mode="cumulative", window=4, grad="renorm",
                 process_group=None, running_stats="window", activation=None, activation_param=None,
                 memory="standard"):
        _check_eps(eps)
        _check_options(mode, window, grad, momentum, process_group, running_stats)
        _check_memory(memory)
        code, param, module = _resolve_activation(activation, activation_param)
        # bias only when False: torch releases before the argument have only the default
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device,
                         dtype=dtype, **({} if bias else {"bias": False}))
        self._mode = mode
        self._window = window
        self._grad = grad
        self._running_stats = running_stats
        self._every_micro_batch = running_stats == "micro_batch"  # the ops' flag, read per call
        self.process_group = process_group
        self._checkpoint_history = None  # see _history_for
        self._window_agreement = WindowAgreement()  # checked at end_window()
        self._host_window = _HostWindow() if mode in WINDOWED_MODES else None
        self._memory = memory
        self._lean_check = _LeanCheck()
        # Set by convert_batchnorm when the activation came from a module slot that now holds a
        # FusedActivation: revert_to_batchnorm puts the module back there rather than after the layer.
        self._activation_slot = False
        self._set_activation(code, param, module)
        slots = window - 1 if mode == "sliding" else 1
        history = {"device": device, "dtype": _history_dtype(dtype or torch.get_default_dtype())}
        self.register_buffer("window_count",
                             torch.zeros(slots, num_features, dtype=torch.long, device=device))
        self.register_buffer("window_mean", torch.zeros(slots, num_features, **history))
        self.register_buffer("window_var", torch.zeros(slots, num_features, **history))
        self.register_buffer("window_step", torch.zeros((), dtype=torch.long, device=device))

    @property
    def mode(self):
        return self._mode

    @mode.setter
    def mode(self, value):
        raise AttributeError("mode is fixed at construction (it shapes the window state); build a new "
                             "layer, or convert_batchnorm(revert_to_batchnorm(model), mode=...)")

    @property
    def running_stats(self):
        return self._running_stats

    @running_stats.setter
    def running_stats(self, value):
        raise AttributeError("running_stats is fixed at construction (it decides whether the open window "
                             "is in the running statistics already); build a new layer")

    @property
    def window(self):
        return self._window

    @window.setter
    def window(self, value):
        _check_options(self._mode, value, self._grad, self.momentum, None)
        if self._mode == "sliding" and value != self._window:
            raise AttributeError("the window of mode='sliding' is fixed at construction (it sizes the "
                                 "ring of history slots)")
        self._window = value

    def __setattr__(self, name, value):
        if name == "eps":  # checked when set, not at every forward; a plain attribute, as in BatchNorm
            _check_eps(value)
        super().__setattr__(name, value)

    @property
    def grad(self):
        return self._grad

    @grad.setter
    def grad(self, value):
        _check_options(self._mode, self._window, value, self.momentum, None)
        self._grad = value

    @property
    def memory(self):
        return self._memory

    @memory.setter
    def memory(self, value):
        _check_memory(value)
        self._memory = value
        self._refresh_activation()

    @property
    def activation(self):
        """The name of the activation the op computes (``activations.NAMES``), or None for none."""
        code = self._activation[0]
        return None if code == activations.IDENTITY else activations.CODE_NAMES[code]

    @property
    def activation_param(self):
        """LeakyReLU's negative slope or ELU's alpha (0.0 for the other activations)."""
        return self._activation[1]

    def __setstate__(self, state):
        super().__setstate__(state)
        if "_activation" not in self.__dict__:  # a layer pickled before activations existed
            self._memory, self._lean_check, self._activation_slot = "standard", _LeanCheck(), False
            self._set_activation(activations.IDENTITY, 0.0)

    def _refresh_activation(self):
        """Derive the per-call flags again after an option changed."""
        self._set_activation(*self._activation, self._activation_module)

    def fused_activation(self):
        """``(code, param)`` of the activation the layer's op computes (``activations.py``), or None
        when it computes none."""
        return None if self._activation[0] == activations.IDENTITY else self._activation

    def _set_activation(self, code, param, module=None):
        """The activation the op computes, and what follows from it per call: ``_lean``, whether the
        backward may keep the output (the weight permitting). ``module``: the activation module it
        stands for, kept (not as a child: the state dict stays BatchNorm's) for
        ``revert_to_batchnorm``."""
        self._activation = (code, param)  # the ops' two arguments, read per call
        self.__dict__["_activation_module"] = module
        self._lean = self._memory == "lean" and activations.invertible(code, param)
        # An fp16/bf16 ELU output rounds to -alpha for z below about -8 (fp16) or -5.5 (bf16), where
        # no z can be recovered from it: half-precision input keeps its input instead.
        self._lean_in_half = code != activations.ELU

    def _apply(self, fn, *args, **kwargs):
        # .half() / .to(bfloat16) move the window state but keep it in fp32: the history must not be
        # rounded to half (nor overflow it), as for the statistics themselves.
        kept = {name: getattr(self, name) for name in ("window_mean", "window_var")}
        module = super()._apply(fn, *args, **kwargs)
        for name, before in kept.items():
            after = self._buffers[name]
            source = after if before.is_meta else before  # to_empty(): nothing to keep
            self._buffers[name] = source.to(device=after.device, dtype=_history_dtype(after.dtype))
        return module

    def extra_repr(self):
        text = f"{super().extra_repr()}, mode={self.mode!r}, window={self.window}, grad={self.grad!r}"
        if self._running_stats != "window":
            text += f", running_stats={self._running_stats!r}"
        code, param = self._activation
        if code != activations.IDENTITY:
            text += f", activation={activations.CODE_NAMES[code]!r}"
            if code in activations.DEFAULT_PARAMS:
                text += f", activation_param={param}"
        if self._memory != "standard":
            text += f", memory={self._memory!r}"
        return text

    # ----------------------------------------------------------------------------------------- forward
    def forward(self, x):
        if not isinstance(x, torch.Tensor):
            return self._forward_traced(x)
        self._check_input(x)
        if not _is_dense(x):  # the kernels take contiguous or channels_last input
            x = x.contiguous()
        if not self.training:
            return self._forward_eval(x)
        recomputed = _recomputing()
        history = self._history_for(x, recomputed)
        group = self._active_group()
        if group is not None:
            return self._forward_across_group(x, history, recomputed, group)
        m = values_per_channel(x)
        if m == 0:
            return self._empty_output(x)
        if m == 1:
            self._check_more_than_one_value(x, self._normalization_history(history)[0])
        params = self._parameters  # dict lookups: nn.Module attribute access costs host time per call
        weight = params["weight"]
        keep_output = (self._lean and (self._lean_in_half or x.dtype not in HALF_DTYPES)
                       and self._weight_allows_lean(weight))
        if recomputed:  # the first run of this micro-batch updated the state already
            return CrossMiniBatchNormFunction.apply(
                x, weight, params["bias"], *self._normalization_history(history), self.eps,
                self._ema_momentum(), self._grad == "exact", *self._activation, keep_output)[0]
        self._note_micro_batch()
        return torch.ops.cmbn_ext.cmbn_train_forward(
            x, weight, params["bias"], *history, self._buffers["window_step"],
            *self._tracked_running_stats(), self.eps, self._ema_momentum(), self._grad == "exact",
            self._mode, self._window if self._mode in WINDOWED_MODES else None, self.momentum,
            self._every_micro_batch, *self._activation, keep_output)[0]

    def _weight_allows_lean(self, weight):
        """Whether the lean backward may divide by ``weight``: no ``|weight| < LEAN_MIN_WEIGHT``. Read
        on the host once per change of the weight (``_LeanCheck``); assumed under ``torch.compile``."""
        if weight is None or torch.compiler.is_compiling():
            return True
        check = self._lean_check
        if weight is not check.weight or weight._version != check.version:
            holds = weight.is_meta or not bool((weight.detach().abs() < LEAN_MIN_WEIGHT).any())
            check.weight, check.version, check.holds = weight, weight._version, holds
        return check.holds

    def _forward_traced(self, x):
        """``torch.fx`` symbolic tracing (``symbolic_trace``, torchvision's ``create_feature_extractor``)
        calls the forward with a ``Proxy``: the layer is recorded as one ``call_module`` node, as FX
        records torch's BatchNorm (a leaf module), so the traced module runs this very layer, which
        updates its window state as in eager mode. Anything else is an error."""
        if isinstance(x, torch.fx.Proxy):
            tracer = x.tracer
            return tracer.create_proxy("call_module", tracer.path_of_module(self), (x,), {})
        raise TypeError(f"{type(self).__name__}: expected a tensor, got {type(x).__name__}")

    def _forward_eval(self, x):
        """As BatchNorm: the running statistics whenever the layer has them, else the batch alone; then
        the activation (before half input's rounding, as in training)."""
        if values_per_channel(x) == 0:
            return self._empty_output(x)
        code, param = self._activation
        if self.running_mean is not None:
            if code == activations.IDENTITY:
                return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                    False, 0.0, self.eps)
            dtype = stats_dtype(x.dtype)
            return normalize(x, self.running_mean.to(dtype), self.running_var.to(dtype), self.weight,
                             self.bias, self.eps, code, param)
        no_history = (self.window_count[:0], self.window_mean[:0], self.window_var[:0])
        if values_per_channel(x) == 1:
            self._check_more_than_one_value(x, no_history[0])
        return CrossMiniBatchNormFunction.apply(x, self.weight, self.bias, *no_history, self.eps, None,
                                                self.grad == "exact", code, param)[0]

    def _active_group(self):
        """The process group this training forward pools across, or None for this process alone."""
        group = self.process_group
        if group.__class__ is str:  # "world": looked up now, so it can be given before init
            return _world_group(type(self).__name__)
        return group

    def _forward_across_group(self, x, history, recomputed, group):
        """Training with statistics shared across ``group`` (``distributed.py``). Every rank must call
        it, an empty micro-batch included: it takes part in the collectives."""
        check_group_matches(group, x)
        history = self._normalization_history(history)
        y, mean, var, batch_mean, batch_var, count, positions = GroupCrossMiniBatchNorm.apply(
            x, self.weight, self.bias, *history, self.eps, self._ema_momentum(), self.grad == "exact",
            group, self.window_step)
        self._window_agreement.record(positions)
        # The group's count is 1 only where every rank has at most one value per channel: only then
        # is it read on the host (every rank reads it, so every rank raises alike).
        if values_per_channel(x) <= 1 and int(count) == 1:
            self._check_more_than_one_value(x, history[0])
        if not recomputed:  # the count stays on the device: 0 (every rank empty) changes nothing
            with torch.no_grad():
                self._update_state(count, mean, var, batch_mean, batch_var)
        # The phase ops take no activation: applied here, unfused (the backward keeps the input).
        code, param = self._activation
        return y if code == activations.IDENTITY else activations.apply(y, code, param)

    def _history_for(self, x, recomputed):
        """The history ``(count, mean, var)`` this training forward pools with.

        Activation checkpointing (``torch.utils.checkpoint``) runs a forward a second time, during the
        backward. That recomputation must pool with the history the first run saw, and must not count
        the micro-batch twice: a forward that may be recomputed keeps a copy of its history for it.
        """
        buffers = self._buffers
        history = (buffers["window_count"], buffers["window_mean"], buffers["window_var"])
        if torch.compiler.is_compiling():
            return history
        if recomputed:
            saved, self._checkpoint_history = self._checkpoint_history, None
            if saved is None or saved[0] != x.shape:
                raise RuntimeError(
                    f"{type(self).__name__}: activation checkpointing recomputed a micro-batch whose "
                    f"history is gone: with CmBN inside a checkpointed region, run each micro-batch's "
                    f"backward before the next micro-batch's forward")
            return saved[1]
        if _may_be_recomputed():
            self._checkpoint_history = (x.shape, tuple(t.clone() for t in history))
        elif self._checkpoint_history is not None:  # nn.Module's __setattr__ costs host time per call
            self._checkpoint_history = None
        return history

    def _normalization_history(self, history):
        """The history a micro-batch is normalized with: none of the window's slots in deferred mode."""
        return normalization_history(*history, self._mode)

    def _ema_momentum(self):
        """The weight of the current micro-batch in EMA mode (None in the other modes)."""
        if self._mode != "ema":
            return None
        momentum = self.momentum
        if momentum.__class__ is not float:  # momentum is a plain attribute: check what it was set to
            _check_options(self._mode, self._window, self._grad, momentum, None)
            momentum = float(momentum)
        elif not 0 < momentum <= 1:
            _check_options(self._mode, self._window, self._grad, momentum, None)
        return momentum

    def _check_input(self, x):
        name = type(self).__name__
        self._check_input_dim(x)
        dtype = x.dtype
        if not dtype.is_floating_point:
            raise TypeError(f"{name}: expected a floating-point input, got dtype {dtype}")
        if x.shape[1] != self.num_features:
            raise ValueError(f"{name}: expected {self.num_features} channels (num_features), got input of "
                             f"shape {tuple(x.shape)}")
        params, buffers = self._parameters, self._buffers  # cheaper than attribute access, per call
        if x.device != buffers["window_mean"].device:
            raise RuntimeError(f"{name}: input is on {x.device} but the layer is on "
                               f"{buffers['window_mean'].device}; move one of them with .to()")
        for tensor_name, tensor in (("weight", params.get("weight")), ("bias", params.get("bias")),
                                    ("running_mean", buffers.get("running_mean")),
                                    ("running_var", buffers.get("running_var"))):
            if tensor is not None and tensor.dtype != dtype and not (
                    tensor.dtype == torch.float32 and dtype in HALF_DTYPES):
                raise RuntimeError(
                    f"{name}: input of dtype {dtype} but {tensor_name} of dtype {tensor.dtype}: as in "
                    f"BatchNorm, the parameters and running statistics must have the input's dtype, or "
                    f"be float32 for float16/bfloat16 input (autocast); convert one with .to()")

    def _check_more_than_one_value(self, x, history_count):
        if bool((history_count.sum(0) == 0).any()):
            raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                             f"{x.size()}")

    def _empty_output(self, x):
        """An empty micro-batch: an empty output, still connected to the parameters; no state changes."""
        y = x.clone()
        if self.weight is not None:
            y = y * channel_view(self.weight, x)
        if self.bias is not None:
            y = y + channel_view(self.bias, x)
        code, param = self._activation
        return activations.apply(y, code, param).to(x.dtype)

    # ------------------------------------------------------------------------------------------- state
    def _update_state(self, m, mean, var, batch_mean, batch_var):
        """Fold the micro-batch into the window and the running statistics (``window_state.py``);
        ``m``, its count per channel, a 0-dim int64 tensor."""
        torch.ops.cmbn_ext.cmbn_update_state(
            self.window_count, self.window_mean, self.window_var, self.window_step,
            *self._tracked_running_stats(), m, mean, var, batch_mean, batch_var, self.mode,
            self.window if self.mode in WINDOWED_MODES else None, self.momentum,
            self._every_micro_batch)
        self._note_micro_batch()

    def _note_micro_batch(self):
        """Follow a cumulative or deferred window on the host (reading ``window_step`` would wait for the
        device at every forward), and warn once when it spans a change of the weights or grows past
        ``LONG_WINDOW`` micro-batches (``window=None``). Nothing under ``torch.compile``."""
        host = self._host_window
        if host is None or torch.compiler.is_compiling():  # None: sliding and EMA pool across steps
            return
        params = self._parameters
        weight, bias = params["weight"], params["bias"]
        version = (0 if weight is None else weight._version) + (0 if bias is None else bias._version)
        if host.position == 0:
            host.weight, host.bias, host.version = weight, bias, version
        elif (version != host.version and host.version is not None and weight is host.weight
              and bias is host.bias):
            host.version = None  # said once per window at most
            self._warn_window_spans_update()
        host.position += 1
        window = self._window
        if window is None:
            if host.position == LONG_WINDOW:
                _warn_once("long", f"{type(self).__name__} with window=None has pooled {LONG_WINDOW} "
                                   f"micro-batches without end_window(): call cmbn_ext.end_window(model) "
                                   f"after each optimizer step, or set window= to the micro-batches per "
                                   f"step")
        elif host.position >= window:  # the op commits the window by count
            host.position = 0

    def _warn_window_spans_update(self):
        window = self._window
        size = "window=None, ended only by end_window()" if window is None else f"window={window}"
        _warn_once("step", f"{type(self).__name__} ({size}) pools micro-batches from before and after a "
                           f"change of its weight or bias (an optimizer step inside the window), whose "
                           f"statistics no longer match: end the windows at each optimizer step with "
                           f"cmbn_ext.end_windows_on_step(optimizer, model) (or cmbn_ext.end_window(model) "
                           f"after optimizer.step()), or build the layers with window= equal to the "
                           f"micro-batches per optimizer step (convert_batchnorm's default is window=4)")

    @torch.no_grad()
    def end_window(self):
        """Commit the window to the running statistics now and start a new one.

        Only cumulative and deferred modes have windows to commit; an empty window commits nothing.
        With ``running_stats="micro_batch"`` the window is in the running statistics already: it is
        only emptied. In sliding and EMA modes this does nothing to the state.

        With a ``process_group``, this is where the ranks' window positions are checked (in every
        mode): the training forwards compare them on the device without waiting for the result, and
        a ``RuntimeError`` here says that the ranks disagreed at one of them since the last
        ``end_window()``, before anything is committed. ``reset_window()`` on every rank clears it.
        """
        self._window_agreement.check(type(self).__name__)
        self._window_agreement.reset()
        if self._mode in WINDOWED_MODES:
            if self._every_micro_batch:
                for name in WINDOW_BUFFERS:
                    self._buffers[name].zero_()
            else:
                commit_window(self.window_count, self.window_mean, self.window_var, self.window_step,
                              *self._tracked_running_stats(), self.momentum)
            self._host_window.position = 0

    def _tracked_running_stats(self):
        """The running buffers to update: none once ``track_running_stats`` is off, as in BatchNorm."""
        if not self.track_running_stats:
            return None, None, None
        buffers = self._buffers
        return buffers["running_mean"], buffers["running_var"], buffers["num_batches_tracked"]

    @torch.no_grad()
    def reset_window(self):
        """Drop the window (the history) without committing it. In EMA mode the next micro-batch then
        starts a new average; the running statistics are kept."""
        for name in WINDOW_BUFFERS:
            getattr(self, name).zero_()
        if self._host_window is not None:
            self._host_window.position = 0
        self._checkpoint_history = None
        self._window_agreement.reset()

    def reset_running_stats(self):
        """BatchNorm's, and the window emptied: after ``to_empty()`` (FSDP, loaders that build on the
        meta device) ``reset_parameters()`` must leave no uninitialized history."""
        super().reset_running_stats()
        if "window_step" in self._buffers:  # _BatchNorm.__init__ resets before the window exists
            self.reset_window()

    def train(self, mode=True):
        if self.training and not mode:
            self._warn_if_window_open()
        return super().train(mode)

    def _warn_if_window_open(self):
        """At ``eval()``: a cumulative or deferred window's micro-batches are not in the running
        statistics yet (unless they went in after every micro-batch)."""
        if (self.mode not in WINDOWED_MODES or self._every_micro_batch or self.running_mean is None
                or self.window_step.is_meta):
            return
        steps = int(self.window_step)
        if steps:
            _warn_once("eval", f"{type(self).__name__} goes to eval() with an open window of {steps} "
                               f"micro-batch(es) that the running statistics do not hold yet: call "
                               f"cmbn_ext.end_window(model) after each optimizer step (or before eval(); "
                               f"reset_window(model) drops them)")

    # ----------------------------------------------------------------------------------- checkpoints
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        # The window state means something else in each mode (and window): record which, so that a load
        # into another layer can refuse it. state_dict() keys a module's metadata by prefix[:-1].
        if hasattr(destination, "_metadata"):
            local = destination._metadata.setdefault(prefix[:-1], {"version": self._version})
            local.update(cmbn_mode=self.mode, cmbn_window=self.window,
                         cmbn_running_stats=self._running_stats)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        has_window = any(prefix + name in state_dict for name in WINDOW_BUFFERS)
        # Checkpoints without the metadata (BatchNorm's, older ones, hand-built dicts) are trusted as before.
        foreign = (has_window and "cmbn_mode" in local_metadata
                   and not self._reads_window_state_of(local_metadata["cmbn_mode"],
                                                       local_metadata.get("cmbn_window"),
                                                       local_metadata.get("cmbn_running_stats",
                                                                          "window")))
        refused = foreign and _holds_history(state_dict, prefix)
        errors = [self._foreign_window_message(prefix, local_metadata)] if refused else []
        # A plain BatchNorm checkpoint has no window state: it loads as an empty window, and so does the
        # empty window of another mode or window, which means the same in every layer. (A partial state
        # dict without BatchNorm's entries leaves the window as it is.)
        if (foreign and not refused) or (
                not has_window and self._is_batchnorm_checkpoint(state_dict, prefix, local_metadata)):
            device = _checkpoint_device(state_dict, prefix, self._buffers["window_mean"].device)
            for name in WINDOW_BUFFERS:
                state_dict[prefix + name] = torch.zeros_like(getattr(self, name), device=device)
        # All or nothing: a checkpoint of another shape must not leave the layer half loaded.
        errors += [
            f"size mismatch for {prefix}{name}: copying a param with shape "
            f"{tuple(state_dict[prefix + name].shape)} from checkpoint, the shape in current model is "
            f"{tuple(tensor.shape)}"
            + (" (the window state of another mode or window)" if name in WINDOW_BUFFERS else "")
            for name, tensor in [*self._parameters.items(), *self._buffers.items()]
            if tensor is not None and prefix + name in state_dict
            and isinstance(state_dict[prefix + name], torch.Tensor)
            and state_dict[prefix + name].shape != tensor.shape
            and not (refused and name in WINDOW_BUFFERS)  # already named by the message above
        ]
        if errors:
            error_msgs.extend(errors)
            return
        before = len(error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        step = state_dict.get(prefix + "window_step")
        host = self._host_window
        if host is not None and len(error_msgs) == before and isinstance(step, torch.Tensor):
            # The host follows the loaded window from here; it did not see that window's first
            # micro-batch, so it cannot tell whether the weights changed since.
            host.position = 0 if step.is_meta else int(step)
            host.version = None

    def _is_batchnorm_checkpoint(self, state_dict, prefix, local_metadata):
        """Whether a state dict without window state holds this layer as BatchNorm saves it: its running
        mean; without running statistics, all its parameters; with neither, the metadata that
        ``state_dict()`` writes for every module."""
        if self.running_mean is not None:
            return prefix + "running_mean" in state_dict
        parameters = [name for name, p in self._parameters.items() if p is not None]
        if parameters:
            return all(prefix + name in state_dict for name in parameters)
        return "version" in local_metadata

    def _reads_window_state_of(self, mode, window, running_stats):
        """Whether this layer reads the window state of a layer with ``mode``, ``window`` and
        ``running_stats`` as meant.

        EMA ignores the window. In sliding mode the window sizes the ring and ``window_step`` picks its
        slot. In cumulative and deferred modes ``window_step`` counts toward the window's commit, so
        another window would move the commit (and ``window=None`` never commits by count): the
        ``window`` setter may do that on purpose, a checkpoint must not do it silently. Their
        ``running_stats`` says whether the open window is in the running statistics already.
        """
        return (mode == self.mode and (mode == "ema" or window == self.window)
                and running_stats == self._running_stats)

    def _foreign_window_message(self, prefix, local_metadata):
        saved_running_stats = local_metadata.get("cmbn_running_stats", "window")
        # running_stats is named only where it is not the default on either side
        named = {saved_running_stats, self._running_stats} != {"window"}
        saved = (f"mode={local_metadata['cmbn_mode']!r}, window={local_metadata.get('cmbn_window')}"
                 + (f", running_stats={saved_running_stats!r}" if named else ""))
        ours = (f"mode={self.mode!r}, window={self.window}"
                + (f", running_stats={self._running_stats!r}" if named else ""))
        return (f"window state mismatch for {prefix}window_*: the checkpoint holds the window state of "
                f"{saved}; this layer has {ours}: build the layer with the checkpoint's options, or load "
                f"with the window state removed from the state dict")


def _holds_history(state_dict, prefix):
    """Whether a checkpoint's window state holds any history: a step or a count. One that cannot be
    read here (missing, not a tensor, on the meta device) is taken to hold some."""
    step, count = (state_dict.get(prefix + name) for name in ("window_step", "window_count"))
    if not all(isinstance(t, torch.Tensor) and not t.is_meta for t in (step, count)):
        return True
    return bool(step.any()) or bool(count.any())


def _checkpoint_device(state_dict, prefix, default):
    """The device of a layer's entries in a checkpoint (BatchNorm's parameters and statistics), where
    its empty window state is made: ``load_state_dict(assign=True)`` into a layer built on the meta
    device takes the checkpoint's tensors as they are, and the window state must join them."""
    for name in ("running_mean", "running_var", "weight", "bias", "num_batches_tracked"):
        tensor = state_dict.get(prefix + name)
        if isinstance(tensor, torch.Tensor):
            return tensor.device
    return default


def _world_group(name):
    """The default process group, for ``process_group="world"``; an error if there is none yet."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{name}: process_group='world' but torch.distributed is not initialized: call "
                           f"torch.distributed.init_process_group() before the first training forward")
    return dist.group.WORLD


def _history_dtype(dtype):
    """The window state is fp64 in an fp64 layer and fp32 in every other."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _recomputing():
    """A forward inside a backward pass: activation checkpointing recomputing its region."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


def _may_be_recomputed():
    """A forward that activation checkpointing may run again: the first pass of a checkpointed region
    runs with gradients disabled (reentrant) or under saved-tensor hooks (non-reentrant)."""
    return (not torch.is_grad_enabled()
            or torch._C._autograd._top_saved_tensors_default_hooks(False) is not None)


def _is_dense(x):
    if x.is_contiguous():
        return True
    if x.dim() == 4:
        return x.is_contiguous(memory_format=torch.channels_last)
    return x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d)


class FusedActivation(torch.nn.Identity):
    """The slot of an activation that ``convert_batchnorm(..., fuse_activation=True)`` folded into the
    CmBN layer before it: an identity, which remembers the activation module (``original``) for
    ``revert_to_batchnorm`` without registering it as a child, so the state dict keeps its keys."""

    def __init__(self, original):
        super().__init__()
        self.__dict__["original"] = original

    def extra_repr(self):
        return f"computed by the CmBN layer before it: {self.original!r}"


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


class SyncCrossMiniBatchNorm(_CrossMiniBatchNorm):
    """CmBN over ``(N, C, *)`` input, pooled across a process group; the drop-in for
    ``torch.nn.SyncBatchNorm`` (``convert_batchnorm`` makes one of each, keeping its group).

    As in SyncBatchNorm, ``process_group=None`` is the default group whenever ``torch.distributed`` is
    initialized with more than one process, and the layer pools alone otherwise. ``options``:
    the keyword-only arguments of the other layers (``bias``, ``mode``, ``window``, ``grad``,
    ``running_stats``).
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 process_group=None, device=None, dtype=None, **options):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         process_group=process_group, **options)

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"{type(self).__name__}: expected at least 2D input (got {x.dim()}D input)")

    def _active_group(self):
        if self.process_group is None and dist.is_available() and dist.is_initialized() \
                and dist.get_world_size() > 1:
            return dist.group.WORLD
        return super()._active_group()
