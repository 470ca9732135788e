"""Hugging Face accelerate, the real package on the CPU: the loop with ``accelerator.accumulate(model)``
ends the windows when ``accelerator.sync_gradients`` says a step happened (or through
``end_windows_on_step`` on the prepared optimizer), including the short last group of an epoch."""
import pytest
import torch

accelerate = pytest.importorskip("accelerate")
from accelerate.state import AcceleratorState, GradientState  # noqa: E402

import cmbn_ext  # noqa: E402
from accumulation import (InputRecorder, assert_committed, cmbn_layer, micro_batch_loader,  # noqa: E402
                          tiny_model, window_sizes)

# A window left open across an optimizer step (or at eval()) is an error.
pytestmark = pytest.mark.filterwarnings("error::cmbn_ext.OpenWindowWarning")

NUM_BATCHES, ACCUMULATE, EPOCHS = 10, 4, 2


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():
    """accelerate keeps its state in process-wide singletons."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.mark.parametrize("close_with", ["sync_gradients", "end_windows_on_step"])
def test_windows_end_with_the_accumulated_steps(close_with):
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=ACCUMULATE)
    model = tiny_model(window=accelerator.gradient_accumulation_steps)
    layer, recorder = cmbn_layer(model), InputRecorder(cmbn_layer(model))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer, loader = accelerator.prepare(model, optimizer, micro_batch_loader(NUM_BATCHES))
    if close_with == "end_windows_on_step":
        cmbn_ext.end_windows_on_step(optimizer, model)  # the AcceleratedOptimizer's inner optimizer

    states, synced = [], []
    for _ in range(EPOCHS):
        for (x,) in loader:
            with accelerator.accumulate(model):
                accelerator.backward(model(x).square().mean())
                optimizer.step()
                optimizer.zero_grad()
            if close_with == "sync_gradients" and accelerator.sync_gradients:
                cmbn_ext.end_window(model)
            synced.append(accelerator.sync_gradients)
            states.append((int(layer.window_step), int(layer.num_batches_tracked)))

    sizes = window_sizes(NUM_BATCHES, ACCUMULATE) * EPOCHS  # [4, 4, 2, 4, 4, 2]
    ends = [sum(sizes[:i + 1]) - 1 for i in range(len(sizes))]
    assert [i for i, sync in enumerate(synced) if sync] == ends  # accelerate steps as expected
    expected, in_window, commits = [], 0, 0
    for i in range(len(states)):
        in_window, commits = (0, commits + 1) if i in ends else (in_window + 1, commits)
        expected.append((in_window, commits))
    assert states == expected
    assert_committed(layer, recorder.inputs, sizes)
