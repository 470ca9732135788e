"""The activations a CmBN op can compute in place of a separate activation layer (SPEC section 3).

An activation is ``(code, param)``: the integer code the ops take (the kernels branch on it at run
time) and its one parameter (LeakyReLU's negative slope, ELU's alpha; 0 for the others). The codes
are part of the ops' schema: ``csrc/activation.h`` lists the same numbers.

Each function here is the math in plain PyTorch, in the statistics' dtype: ``apply`` the activation,
``derivative`` at the pre-activation value ``z``, and for the invertible ones (``INVERTIBLE``)
``invert`` an output back to ``z`` and ``derivative_from_output``. Derivatives follow torch's own
backward formulas (at a kink, the side torch takes).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

IDENTITY, RELU, LEAKY_RELU, ELU, SILU, MISH, HARDSWISH = range(7)
NAMES = {"identity": IDENTITY, "relu": RELU, "leaky_relu": LEAKY_RELU, "elu": ELU, "silu": SILU,
         "mish": MISH, "hardswish": HARDSWISH}
CODE_NAMES = {code: name for name, code in NAMES.items()}
# torch's module of each activation, and the attribute holding its parameter (its first argument).
MODULES = {nn.Identity: (IDENTITY, None), nn.ReLU: (RELU, None),
           nn.LeakyReLU: (LEAKY_RELU, "negative_slope"), nn.ELU: (ELU, "alpha"), nn.SiLU: (SILU, None),
           nn.Mish: (MISH, None), nn.Hardswish: (HARDSWISH, None)}
_MODULE_OF_CODE = {code: (cls, attribute) for cls, (code, attribute) in MODULES.items()}
DEFAULT_PARAMS = {LEAKY_RELU: 0.01, ELU: 1.0}


def invertible(code, param):
    """Whether the output determines the pre-activation value: what ``memory="lean"`` needs."""
    return code == IDENTITY or (code == LEAKY_RELU and param > 0) or (code == ELU and param > 0)


def from_module(module):
    """``(code, param)`` of an activation module that the ops compute, or None for any other module
    (a subclass may compute something else, so only these exact classes count)."""
    entry = MODULES.get(type(module))
    if entry is None:
        return None
    code, attribute = entry
    return code, float(getattr(module, attribute)) if attribute else 0.0


def from_name(name, param=None):
    """``(code, param)`` of an activation named as in ``NAMES``; a ValueError names the choices."""
    if name not in NAMES:
        raise ValueError(f"activation must be one of {tuple(NAMES)}, an instance of one of torch.nn's "
                         f"{', '.join(cls.__name__ for cls in MODULES)}, or None; "
                         f"got {name!r}")
    code = NAMES[name]
    if param is None:
        param = DEFAULT_PARAMS.get(code, 0.0)
    return code, float(param)


def to_module(code, param):
    """A torch module that computes the activation (for ``revert_to_batchnorm`` and printing)."""
    cls, attribute = _MODULE_OF_CODE[code]
    return cls(param) if attribute else cls()


def in_place(module):
    """Whether ``module`` (an activation or dropout) changes its input in place."""
    return getattr(module, "inplace", False) is True


def apply(z, code, param):
    """``act(z)``."""
    if code == IDENTITY:
        return z
    if code == RELU:
        return torch.relu(z)
    if code == LEAKY_RELU:
        return F.leaky_relu(z, param)
    if code == ELU:
        return F.elu(z, param)
    if code == SILU:
        return F.silu(z)
    if code == MISH:
        return F.mish(z)
    if code == HARDSWISH:
        return F.hardswish(z)
    raise ValueError(f"unknown activation code {code}")


def derivative(z, code, param):
    """``act'(z)``, as torch's backward of each activation takes it."""
    one = torch.ones_like(z)
    if code == IDENTITY:
        return one
    if code == RELU:
        return (z > 0).to(z.dtype)
    if code == LEAKY_RELU:
        return torch.where(z > 0, one, param * one)
    if code == ELU:
        return torch.where(z > 0, one, param * torch.exp(z))
    if code == SILU:
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))
    if code == MISH:
        t = torch.tanh(F.softplus(z))
        return t + z * torch.sigmoid(z) * (1 - t * t)
    if code == HARDSWISH:
        return torch.where(z < -3, 0 * one, torch.where(z <= 3, z / 3 + 0.5, one))
    raise ValueError(f"unknown activation code {code}")


def invert(out, code, param):
    """``z`` from ``act(z)``, for the invertible activations."""
    if code == IDENTITY:
        return out
    if code == LEAKY_RELU:
        return torch.where(out > 0, out, out / param)
    if code == ELU:
        return torch.where(out > 0, out, torch.log1p(out / param))
    raise ValueError(f"activation {CODE_NAMES.get(code, code)!r} is not invertible")


def derivative_from_output(out, code, param):
    """``act'(z)`` from the output ``act(z)``, for the invertible activations (``z > 0`` exactly where
    ``out > 0``)."""
    one = torch.ones_like(out)
    if code == IDENTITY:
        return one
    if code == LEAKY_RELU:
        return torch.where(out > 0, one, param * one)
    if code == ELU:
        return torch.where(out > 0, one, out + param)
    raise ValueError(f"activation {CODE_NAMES.get(code, code)!r} is not invertible")
