"""``torch.compile(mode="reduce-overhead")``: the layers inside CUDA graphs (cudagraph trees).

A training micro-batch replays one recorded graph: the kernels read the window state where it lives and
update it in place (the layer's buffers are static inputs of the graph), the window's end is decided
on the device, and ``end_window()`` runs eagerly between replays on the same buffers. Outputs,
gradients and every buffer must match an eager copy of the model fed the same micro-batches, and no
graph may be skipped. One shape takes the cooperative single-read launches (a grid barrier), which are
captured as well. Needs a GPU and the compiled kernels.
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


def _micro_batches(device, shape=(2, 3, 8, 8), out_shape=(2, 4, 8, 8)):
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(shape, generator=generator).mul(1 + i).to(device),
             torch.randn(out_shape, generator=generator).to(device)) for i in range(MICRO_BATCHES)]


# A layer alone over 4 channels of 2 x 256 x 256 fp32 values: each channel spans several blocks and
# fits on chip, so forward and backward take the cooperative single-read launch (a grid barrier).
COOPERATIVE_SHAPE = (2, 4, 256, 256)


def _cooperative_model(options, device):
    torch.manual_seed(0)
    return torch.nn.Sequential(cmbn_ext.CrossMiniBatchNorm2d(COOPERATIVE_SHAPE[1], **options)).to(device)


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


def _check_reduce_overhead_matches_eager(options, device, model=_model, micro_batches=_micro_batches):
    torch._dynamo.reset()  # each case compiles afresh (and stays under the recompile limit)
    counters.clear()
    eager = model(options, device).train()
    graphed = copy.deepcopy(eager)
    compiled = torch.compile(graphed, mode="reduce-overhead", fullgraph=True)
    for step, (x, dy) in enumerate(micro_batches(device)):
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
        for i, (x, _) in enumerate(micro_batches(device)[:3]):
            torch.compiler.cudagraph_mark_step_begin()
            y = compiled(x).clone()
            torch.testing.assert_close(y, eager(x), **TOL, msg=lambda m: f"eval output {i}: {m}")
    _assert_same_state(graphed, eager, "eval")
    assert counters["inductor"]["cudagraph_skips"] == 0, (
        "a graph ran without CUDA graphs: TORCH_LOGS=cudagraphs says why")


def _no_skipped_graphs():
    """A skipped graph is an error that names its reason, where this torch has the switch."""
    return torch._inductor.config.patch(
        {"triton.cudagraph_or_error": True}
        if hasattr(torch._inductor.config.triton, "cudagraph_or_error") else {})


@pytest.mark.parametrize("case", list(CASES))
def test_reduce_overhead_matches_eager(case):
    with _no_skipped_graphs():
        _check_reduce_overhead_matches_eager(CASES[case], DEVICE)


@pytest.mark.parametrize("case", ["cumulative3", "ema"])
def test_cooperative_launches_are_captured_and_replayed(case, monkeypatch):
    """The cooperative single-read path, forward and backward, recorded into the graphs and replayed:
    the same results and state as eager."""
    monkeypatch.delenv("CMBN_KERNEL_PATH", raising=False)
    x = torch.empty(COOPERATIVE_SHAPE, device=DEVICE)
    for backward in (False, True):
        plan = cmbn_ext.kernel_plan(x, backward=backward)
        assert plan["path"] == "single_read" and plan["cooperative"], (backward, plan)
    with _no_skipped_graphs():
        _check_reduce_overhead_matches_eager(
            CASES[case], DEVICE, model=_cooperative_model,
            micro_batches=lambda device: _micro_batches(device, COOPERATIVE_SHAPE, COOPERATIVE_SHAPE))


def test_cooperative_launches_in_a_captured_graph():
    """The op's cooperative forward and backward captured with torch.cuda.graph and replayed on new
    data give eager's bits (the same kernels run in both)."""
    weight = torch.randn(COOPERATIVE_SHAPE[1], device=DEVICE)
    bias = torch.randn(COOPERATIVE_SHAPE[1], device=DEVICE)
    history = (torch.full((1, COOPERATIVE_SHAPE[1]), 1000, dtype=torch.long, device=DEVICE),
               torch.randn(1, COOPERATIVE_SHAPE[1], device=DEVICE),
               torch.rand(1, COOPERATIVE_SHAPE[1], device=DEVICE) + 0.5)
    static_x = torch.randn(COOPERATIVE_SHAPE, device=DEVICE)
    static_dy = torch.randn(COOPERATIVE_SHAPE, device=DEVICE)

    def step(x, dy):
        outputs = torch.ops.cmbn_ext.cmbn_forward(x, weight, bias, *history, 1e-5, None, False)
        return outputs, torch.ops.cmbn_ext.cmbn_backward(dy, x, weight, *outputs[1:], 1e-5, False)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step(static_x, static_dy)  # warm up outside the capture (plans, workspaces)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_outputs, static_grads = step(static_x, static_dy)
    for seed in range(3):
        generator = torch.Generator(device=DEVICE).manual_seed(seed)
        x = torch.randn(COOPERATIVE_SHAPE, device=DEVICE, generator=generator).mul_(1 + seed)
        dy = torch.randn(COOPERATIVE_SHAPE, device=DEVICE, generator=generator)
        static_x.copy_(x)
        static_dy.copy_(dy)
        graph.replay()
        outputs, grads = step(x, dy)
        for got, expected in zip((*static_outputs, *static_grads), (*outputs, *grads)):
            assert torch.equal(got, expected), f"replay {seed}"
