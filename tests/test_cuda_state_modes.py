"""The compiled state update and fused training op in deferred mode and with the running statistics
updated after every micro-batch (``every_micro_batch``, Darknet's CmBN), against ``window_state`` and
the reference on CPU copies of the same buffers, on the kernels test_cuda_kernels.py runs (the CUDA
kernels on a GPU or emulated, or the CPU kernels); skipped where it skips.
"""
import pytest
import torch

from cmbn_ext import ops
# The kernel suite's device (importing it skips this module where it skips) and its update_state
# helpers: buffers with history, statistics with non-finite channels, the comparison in each buffer's
# dtype.
from test_cuda_kernels import (DEVICE, EMULATED, STATE_DTYPES, assert_same_state,  # noqa: F401
                               make_state, micro_batch_statistics, poison_allocator, random_input,
                               run_state_steps, to_device)

UPDATE_STATE = torch.ops.cmbn_ext.cmbn_update_state
TRAIN_FORWARD = torch.ops.cmbn_ext.cmbn_train_forward
# name -> (mode, window, every_micro_batch)
STATE_MODES = {
    "deferred3": ("deferred", 3, False),
    "deferred_open": ("deferred", None, False),
    "deferred3_every": ("deferred", 3, True),
    "cumulative3_every": ("cumulative", 3, True),
    "cumulative_open_every": ("cumulative", None, True),
}


@pytest.mark.parametrize("channels", [1, 7, 1500])  # 1500: threads loop over the channels
@pytest.mark.parametrize("tracking", [True, False], ids=["tracked", "untracked"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative_average"])
@pytest.mark.parametrize("dtype_name", list(STATE_DTYPES))
@pytest.mark.parametrize("mode_name", list(STATE_MODES))
def test_update_state_matches_reference(mode_name, dtype_name, momentum, tracking, channels):
    """Seven micro-batches (windows of 3 end twice; non-finite channels every other step; m = 1 into
    an empty window is a count of 1, no running update), every buffer compared after each."""
    mode, window, every = STATE_MODES[mode_name]
    run_state_steps(mode, window, channels, STATE_DTYPES[dtype_name], tracking, momentum,
                    ms=[5, 1, 12, 2, 100, 3, 7], every_micro_batch=every)


def test_deferred_merges_the_micro_batch_own_statistics():
    """Deferred mode pools the micro-batch's own statistics into the window, not the ones it was
    normalized with: with different ``mean``/``var`` the window must not change."""
    state = to_device(make_state("deferred", 3, 5, torch.float32, True))
    other = to_device(make_state("deferred", 3, 5, torch.float32, True))
    mean, var, batch_mean, batch_var = (s.to(DEVICE) for s in micro_batch_statistics(
        5, torch.float32, seed=0, non_finite=False))
    m = torch.tensor(6, device=DEVICE)
    UPDATE_STATE(*state, m, mean, var, batch_mean, batch_var, "deferred", 3, 0.1)
    UPDATE_STATE(*other, m, mean + 1, var + 1, batch_mean, batch_var, "deferred", 3, 0.1)
    for got, want in zip(state, other):
        assert torch.equal(got, want)


@pytest.mark.parametrize("tracking", [True, False], ids=["tracked", "untracked"])
@pytest.mark.parametrize("mode_name", list(STATE_MODES))
def test_opcheck_update_state(mode_name, tracking):
    mode, window, every = STATE_MODES[mode_name]
    state = to_device(make_state(mode, window or 1, 6, torch.float32, tracking))
    stats = [s.to(DEVICE) for s in micro_batch_statistics(6, torch.float32, seed=0, non_finite=True)]
    torch.library.opcheck(UPDATE_STATE.default,
                          (*state, torch.tensor(8, device=DEVICE), *stats, mode, window, 0.1, every))


@pytest.mark.parametrize("every", [False, True], ids=["window", "every_micro_batch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_deferred_train_forward_matches_reference(dtype, every):
    """The fused op normalizes without the window (BatchNorm's output and gradient) and folds the
    micro-batch into it, as the reference does on the CPU."""
    channels = 6
    params = torch.float64 if dtype == torch.float64 else torch.float32
    cpu_state = make_state("deferred", 3, channels, params, True, step=1)
    kernel_state = to_device(cpu_state)
    weight = torch.rand(channels, dtype=params) + 0.5
    bias = torch.randn(channels, dtype=params)
    for step in range(3):
        poison_allocator(channels=channels)
        x = random_input((3, channels, 5, 4), dtype, seed=step)
        leaves = [t.clone().requires_grad_() for t in (x, weight.to(DEVICE), bias.to(DEVICE))]
        y = TRAIN_FORWARD(*leaves, *kernel_state, 1e-5, None, False, "deferred", 3, 0.1, every)[0]
        expected = torch.nn.functional.batch_norm(x.cpu().double(), None, None, weight.double(),
                                                  bias.double(), True, 0.0, 1e-5)
        tol = 1e-9 if dtype == torch.float64 else 2e-3 if dtype == torch.float16 else 2e-5
        torch.testing.assert_close(y.cpu().double(), expected, rtol=tol, atol=tol)
        with torch.no_grad():
            ops._reference_train_forward(x.cpu(), weight, bias, *cpu_state, 1e-5, None, False,
                                         "deferred", 3, 0.1, every)
        # The kernels' statistics against the reference's: the state agrees to their rounding.
        assert_same_state(kernel_state, cpu_state, params, f"step {step}", same_statistics=False)
        dy = random_input(x.shape, dtype, seed=10 + step)
        grad_x = torch.autograd.grad(y, leaves[0], dy)[0]
        x64 = x.cpu().double().requires_grad_()
        expected_dx = torch.autograd.grad(torch.nn.functional.batch_norm(
            x64, None, None, weight.double(), bias.double(), True, 0.0, 1e-5), x64, dy.cpu().double())[0]
        torch.testing.assert_close(grad_x.cpu().double(), expected_dx, rtol=tol * 10, atol=tol * 10)
