"""``torch.compile(mode="reduce-overhead")``: the layers inside CUDA graphs (cudagraph trees).

A training micro-batch replays one recorded graph: the kernels read the window state where it lives and
update it in place (the layer's buffers are static inputs of the graph), the window's end is decided
on the device, and ``end_window()`` runs eagerly between replays on the same buffers. Outputs,
gradients and every buffer must match an eager copy of the model fed the same micro-batches, and no
graph may be skipped. Needs a GPU and the compiled kernels.
"""
import copy

import pytest
import torch
import torch._inductor.config
from torch._dynamo.utils import counters

import cmbn_ext

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and cmbn_ext.has_cuda_kernels()),
                                reason="needs a GPU and the compiled CUDA kernels")

DEVICE = "cuda"
# Loose: the convolutions may run other (TF32) algorithms in the compiled model. A state update lost
# or applied twice by a replay shows exactly in the integer buffers and as an error of order one in the
# others.
TOL = dict(rtol=1e-3, atol=1e-3)
CASES = {
    "cumulative3": dict(mode="cumulative", window=3),
    "cumulative_open_exact": dict(mode="cumulative", window=None, grad="exact"),
    "sliding3": dict(mode="sliding", window=3),
    "ema": dict(mode="ema", momentum=0.3),
    "deferred3": dict(mode="deferred", window=3),
    "cumulative3_every_micro_batch": dict(mode="cumulative", window=3, running_stats="micro_batch"),
}
MICRO_BATCHES = 8
# end_window() after these micro-batches (and after the last): a partial window, a window of 3 that
# ended on its own, then one of 1.
END_WINDOW_AFTER = (1, 5)


def _model(options, device):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        cmbn_ext.CrossMiniBatchNorm2d(8, **options),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 4, 1),
        cmbn_ext.CrossMiniBatchNorm2d(4, **options),
    ).to(device)


def _micro_batches(device):
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(2, 3, 8, 8, generator=generator).mul(1 + i).to(device),
             torch.randn(2, 4, 8, 8, generator=generator).to(device)) for i in range(MICRO_BATCHES)]


def _train_step(model, x, dy):
    """One micro-batch, forward and backward. Copies of what a later replay overwrites (the output and
    the gradients live in the graph's memory pool), the gradients reset for the next micro-batch."""
    torch.compiler.cudagraph_mark_step_begin()
    y = model(x)
    y.backward(dy)
    grads = [p.grad.clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = None
    return y.detach().clone(), grads


def _assert_same_state(graphed, eager, what):
    for (name, got), expected in zip(graphed.state_dict().items(), eager.state_dict().values()):
        if expected.is_floating_point():
            torch.testing.assert_close(got, expected, **TOL, msg=lambda m: f"{what}: {name}: {m}")
        else:  # counts and steps: a replay that lost or repeated a state update shows here
            assert torch.equal(got, expected), f"{what}: {name}: {got} != {expected}"


def _check_reduce_overhead_matches_eager(options, device):
    torch._dynamo.reset()  # each case compiles afresh (and stays under the recompile limit)
    counters.clear()
    eager = _model(options, device).train()
    graphed = copy.deepcopy(eager)
    compiled = torch.compile(graphed, mode="reduce-overhead", fullgraph=True)
    for step, (x, dy) in enumerate(_micro_batches(device)):
        y, grads = _train_step(compiled, x, dy)
        y_eager, grads_eager = _train_step(eager, x, dy)
        torch.testing.assert_close(y, y_eager, **TOL, msg=lambda m: f"y at micro-batch {step}: {m}")
        for got, expected in zip(grads, grads_eager):
            torch.testing.assert_close(got, expected, **TOL,
                                       msg=lambda m: f"a gradient at micro-batch {step}: {m}")
        _assert_same_state(graphed, eager, f"micro-batch {step}")
        if step in END_WINDOW_AFTER:
            cmbn_ext.end_window(graphed)
            cmbn_ext.end_window(eager)
            _assert_same_state(graphed, eager, f"end_window() after micro-batch {step}")
    cmbn_ext.end_window(graphed)
    cmbn_ext.end_window(eager)
    _assert_same_state(graphed, eager, "the last end_window()")

    compiled.eval()
    eager.eval()
    with torch.no_grad():
        for i, (x, _) in enumerate(_micro_batches(device)[:3]):
            torch.compiler.cudagraph_mark_step_begin()
            y = compiled(x).clone()
            torch.testing.assert_close(y, eager(x), **TOL, msg=lambda m: f"eval output {i}: {m}")
    _assert_same_state(graphed, eager, "eval")
    assert counters["inductor"]["cudagraph_skips"] == 0, (
        "a graph ran without CUDA graphs: TORCH_LOGS=cudagraphs says why")


@pytest.mark.parametrize("case", list(CASES))
def test_reduce_overhead_matches_eager(case):
    # A skipped graph is an error that names its reason, where this torch has the switch.
    patch = ({"triton.cudagraph_or_error": True}
             if hasattr(torch._inductor.config.triton, "cudagraph_or_error") else {})
    with torch._inductor.config.patch(patch):
        _check_reduce_overhead_matches_eager(CASES[case], DEVICE)
