"""``CrossMiniBatchNormAct2d``: CmBN followed by a dropout and an activation, the counterpart of timm's
``BatchNormAct2d`` (timm builds many of its CNNs from that layer: CSPDarknet, RegNet, EfficientNet).

Its constructor takes ``BatchNormAct2d``'s arguments, so timm's models accept it as ``norm_layer=``,
bare or as a ``functools.partial`` carrying the CmBN options::

    timm.create_model("cspdarknet53", norm_layer=functools.partial(CrossMiniBatchNormAct2d, window=4))

``import cmbn_ext`` does not load this module (nor timm): ``cmbn_ext.CrossMiniBatchNormAct2d`` does,
and so does ``convert_batchnorm`` when it meets a timm layer. The layer works without timm too (with an
activation class rather than a timm activation name).
"""
import torch
import torch.nn as nn

from . import activations
from .modules import CrossMiniBatchNorm2d
from .user_warnings import warn

try:
    from timm.layers import create_act_layer, create_norm_act
except ImportError:  # timm is optional
    create_act_layer = create_norm_act = None


class CrossMiniBatchNormAct2d(CrossMiniBatchNorm2d):
    """``CrossMiniBatchNorm2d``, then ``drop``, then ``act``: the drop-in for timm's ``BatchNormAct2d``.

    Args:
        num_features, eps, momentum, affine, track_running_stats, device, dtype: as in
            ``torch.nn.BatchNorm2d``.
        apply_act, act_layer, act_kwargs, inplace, drop_layer: as in timm's ``BatchNormAct2d``:
            ``act_layer`` is a module class or (with timm installed) a timm activation name such as
            ``"silu"``; ``drop_layer`` a module class, built without arguments.
        fuse_activation: compute ``act`` inside the op (default) when it is one the op computes
            (``activations.MODULES``: ReLU, LeakyReLU, ELU, SiLU, Mish, Hardswish, Identity) and
            ``drop`` is an ``nn.Identity``; ``act`` stays the layer's child either way.
        options: ``CrossMiniBatchNorm2d``'s keyword-only arguments (``bias``, ``mode``, ``window``,
            ``grad``, ``process_group``, ``memory``); the activation is ``act``'s.

    The parameter and buffer names are BatchNorm's (``drop`` and ``act`` hold none), so a timm
    checkpoint loads as it does into ``BatchNormAct2d``. A new ``act`` or ``drop`` module is taken into
    account at the next forward.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 apply_act=True, act_layer=nn.ReLU, act_kwargs=None, inplace=True, drop_layer=None,
                 device=None, dtype=None, fuse_activation=True, **options):
        for name in ("activation", "activation_param"):
            if name in options:
                raise TypeError(f"CrossMiniBatchNormAct2d takes its activation from act_layer, not {name}=")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         **options)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = _activation(act_layer, act_kwargs, inplace) if apply_act else nn.Identity()
        self._fuse_activation = fuse_activation
        self._refresh_activation()

    def forward(self, x):
        if not isinstance(x, torch.Tensor):  # FX tracing: one node for the whole layer (or the error)
            return super().forward(x)
        self._refresh_if_replaced()
        y = super().forward(x)
        if self._act_fused:
            return y
        modules = self._modules
        return modules["act"](modules["drop"](y))

    def __setstate__(self, state):
        super().__setstate__(state)
        if "_fused_for" not in self.__dict__:  # a layer pickled before activations existed
            self._fuse_activation = True
            self._refresh_activation()

    def _refresh_activation(self):
        """Decide from ``act`` and ``drop`` whether the op computes the activation."""
        act, drop = self._modules["act"], self._modules["drop"]
        entry = activations.from_module(act) if self._fuse_activation and type(drop) is nn.Identity \
            else None
        self._act_fused = entry is not None
        self._fused_for = (act, drop)  # a plain tuple: not registered as children
        self._set_activation(*(entry or (activations.IDENTITY, 0.0)))
        if not self._act_fused and (activations.in_place(act) or activations.in_place(drop)):
            self._lean = False  # an in-place module after the op would change the output it keeps

    def _refresh_if_replaced(self):
        """A new ``act`` or ``drop`` module (a dict lookup each: the children may have been replaced)."""
        modules = self._modules
        if modules["act"] is not self._fused_for[0] or modules["drop"] is not self._fused_for[1]:
            self._refresh_activation()

    def fused_activation(self):
        self._refresh_if_replaced()
        return super().fused_activation()

    def extra_repr(self):
        text = super().extra_repr()
        return text if self._fuse_activation else text + ", fuse_activation=False"


def _activation(act_layer, act_kwargs, inplace):
    """The activation module, built as timm builds it (its ``create_act_layer`` when installed)."""
    kwargs = {"inplace": inplace, **(act_kwargs or {})}
    if act_layer is None:
        return nn.Identity()
    if create_act_layer is not None:
        act = create_act_layer(act_layer, **kwargs)
        return nn.Identity() if act is None else act
    if isinstance(act_layer, str):
        raise ValueError(f"act_layer={act_layer!r} names a timm activation, and timm is not installed: "
                         f"pip install timm, or pass a module class such as torch.nn.SiLU")
    try:
        return act_layer(**kwargs)
    except TypeError:  # an activation without an inplace argument
        kwargs.pop("inplace")
        return act_layer(**kwargs)


def _register_with_timm():
    """Let timm's ``get_norm_act_layer`` take the layer. It accepts a class only when it is one of
    timm's norm+act types, and passes ``act_layer`` only to those that require it: two sets, which the
    layer joins."""
    if create_norm_act is None:
        return
    try:
        for types in (create_norm_act._NORM_ACT_TYPES, create_norm_act._NORM_ACT_REQUIRES_ARG):
            types.add(CrossMiniBatchNormAct2d)
    except AttributeError:
        warn("this timm version builds norm layers differently: its models may refuse "
             "norm_layer=CrossMiniBatchNormAct2d; build the model with BatchNorm and "
             "cmbn_ext.convert_batchnorm(model) instead", RuntimeWarning)


_register_with_timm()
