"""Shared helpers: independent expectations the layer is checked against."""
import pytest
import torch

import emulation

# CMBN_EMULATED_KERNELS=1 (or asan): the CUDA kernels compiled for the CPU serve CPU tensors in this
# whole run (tests/emulation), so every layer test checks them too. First, before anything imports
# cmbn_ext: such a process keeps the package's own compiled kernels unloaded.
emulation.load_if_requested()

from cmbn_ext import modules  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    """Each test sees the once-per-process warnings (OpenWindowWarning) as a new process would."""
    monkeypatch.setattr(modules, "_warned", set())


def bn_stats(x):
    """Plain biased BatchNorm statistics of ``x`` in fp64, computed directly."""
    dims = [0] + list(range(2, x.dim()))
    x = x.double()
    return x.mean(dims), x.var(dims, unbiased=False)


def bn_forward(x, weight, bias, eps=1e-5):
    """Training-mode BatchNorm over ``x`` alone (torch's own)."""
    return torch.nn.functional.batch_norm(x, None, None, weight, bias, True, 0.0, eps)


def state_of(layer):
    """A deep copy of every buffer and parameter, for exact before/after comparisons."""
    return {k: v.detach().clone() for k, v in layer.state_dict().items()}


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
