"""``end_windows_on_step``: windows end with the optimizer's steps, skipped steps and several optimizers
included. The running statistics are checked against BatchNorm over each window concatenated."""
import pytest
import torch

import cmbn_ext
from accumulation import InputRecorder, assert_committed, cmbn_layer, tiny_model, window_sizes


def run(model, optimizers, groups, *, scaler=None, skip=(), check_after_step=None):
    """A gradient-accumulation loop: ``groups[i]`` micro-batches of 2 samples, then a step of every
    optimizer (through ``scaler`` if given). Steps whose index is in ``skip`` get an infinite loss, so a
    scaler skips them."""
    for step, micro_batches in enumerate(groups):
        for _ in range(micro_batches):
            loss = model(torch.randn(2, 3, 6, 6)).square().mean()
            if step in skip:
                loss = loss * float("inf")
            (scaler.scale(loss) if scaler else loss).backward()
        for optimizer in optimizers:
            if scaler:
                scaler.step(optimizer)
            else:
                optimizer.step()
        if scaler:
            scaler.update()
        for optimizer in optimizers:
            optimizer.zero_grad()
        if check_after_step:
            check_after_step(step)


@pytest.mark.parametrize("window", [None, 3])
def test_windows_end_at_each_step(window):
    model = tiny_model(window)
    layer, recorder = cmbn_layer(model), InputRecorder(cmbn_layer(model))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    groups = [3, 2, 3, 1]  # a count of 3 commits by itself when window=3: once, not twice
    cmbn_ext.end_windows_on_step(optimizer, model)

    def closed(step):
        assert int(layer.window_step) == 0 and int(layer.window_count.sum()) == 0
        assert int(layer.num_batches_tracked) == step + 1

    run(model, [optimizer], groups, check_after_step=closed)
    assert_committed(layer, recorder.inputs, groups)


def test_partial_last_window_of_an_epoch():
    """10 micro-batches, a step every 4 and one after the last: windows of 4, 4 and 2."""
    model = tiny_model(window=4)
    layer, recorder = cmbn_layer(model), InputRecorder(cmbn_layer(model))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    cmbn_ext.end_windows_on_step(optimizer, model)
    run(model, [optimizer], window_sizes(10, 4))
    assert window_sizes(10, 4) == [4, 4, 2]
    assert_committed(layer, recorder.inputs, [4, 4, 2])


def test_without_the_hook_the_window_stays_open():
    """The control: with window=None nothing else ends the windows."""
    model = tiny_model(window=None)
    layer = cmbn_layer(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    run(model, [optimizer], [2, 2])
    assert int(layer.window_step) == 4 and int(layer.num_batches_tracked) == 0


def test_a_step_skipped_by_the_grad_scaler_still_ends_the_window():
    model = tiny_model(window=None)
    layer, recorder = cmbn_layer(model), InputRecorder(cmbn_layer(model))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    cmbn_ext.end_windows_on_step(optimizer, model, scaler=scaler)
    weights = []
    run(model, [optimizer], [2, 3, 2], scaler=scaler, skip={1},
        check_after_step=lambda step: weights.append(model[0].weight.detach().clone()))
    assert not torch.equal(weights[0], weights[2])
    assert torch.equal(weights[0], weights[1]), "the scaler did not skip the step"
    assert scaler.get_scale() == 2.0 ** 15  # halved once, by the skipped step
    assert int(layer.window_step) == 0
    assert_committed(layer, recorder.inputs, [2, 3, 2])


def test_a_skipped_step_without_the_scaler_is_closed_by_an_int_window():
    """The count fallback: a layer with window=k commits after its k-th micro-batch by itself."""
    model = tiny_model(window=3)
    layer, recorder = cmbn_layer(model), InputRecorder(cmbn_layer(model))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    cmbn_ext.end_windows_on_step(optimizer, model)
    run(model, [optimizer], [3, 3, 3], scaler=scaler, skip={1})
    assert_committed(layer, recorder.inputs, [3, 3, 3])


@pytest.mark.parametrize("with_scaler", [False, True])
def test_several_optimizers_commit_each_window_once(with_scaler):
    model = tiny_model(window=None)
    layer, recorder = cmbn_layer(model), InputRecorder(cmbn_layer(model))
    body = torch.optim.SGD(model[:2].parameters(), lr=0.1)
    head = torch.optim.Adam(model[5].parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu") if with_scaler else None
    cmbn_ext.end_windows_on_step([body, head], model, scaler=scaler)
    groups = [2, 3, 1]
    run(model, [body, head], groups, scaler=scaler, skip={1} if with_scaler else (),
        check_after_step=lambda step: assert_committed(layer, recorder.inputs, groups[:step + 1]))


def test_one_optimizer_per_part_of_the_model():
    """Each optimizer closes the windows of the part it trains, and only those."""
    model = torch.nn.Sequential(tiny_model(window=None), tiny_model(window=None))
    first, second = (torch.optim.SGD(part.parameters(), lr=0.1) for part in model)
    cmbn_ext.end_windows_on_step(first, model[0])
    cmbn_ext.end_windows_on_step(second, model[1])
    for part in model:
        part(torch.randn(2, 3, 6, 6)).sum().backward()
    first.step()
    assert int(cmbn_layer(model[0]).window_step) == 0
    assert int(cmbn_layer(model[1]).window_step) == 1
    second.step()
    assert int(cmbn_layer(model[1]).window_step) == 0


def test_remove_unregisters_everything():
    model = tiny_model(window=None)
    layer = cmbn_layer(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    with cmbn_ext.end_windows_on_step(optimizer, model, scaler=scaler):
        assert "step" in vars(scaler)
        run(model, [optimizer], [2], scaler=scaler, skip={0})
        assert int(layer.num_batches_tracked) == 1
    assert "step" not in vars(scaler)
    run(model, [optimizer], [2], scaler=scaler, skip={0})
    run(model, [optimizer], [2])
    assert int(layer.num_batches_tracked) == 1 and int(layer.window_step) == 4


def test_remove_keeps_a_scaler_wrapper_registered_later():
    model = tiny_model(window=None)
    layer = cmbn_layer(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    first = cmbn_ext.end_windows_on_step(optimizer, model, scaler=scaler)
    second = cmbn_ext.end_windows_on_step(optimizer, model, scaler=scaler)
    first.remove()
    run(model, [optimizer], [2], scaler=scaler, skip={0})
    assert int(layer.num_batches_tracked) == 1  # the second registration still ends skipped steps
    second.remove()
    assert "step" in vars(scaler)  # the first one's inactive wrapper, which calls through
    run(model, [optimizer], [2], scaler=scaler, skip={0})
    assert int(layer.num_batches_tracked) == 1


def test_bad_arguments():
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        cmbn_ext.end_windows_on_step(model, model)
    with pytest.raises(TypeError, match="nn.Module"):
        cmbn_ext.end_windows_on_step(optimizer, optimizer)
    with pytest.raises(ValueError, match="no CmBN layers"):
        cmbn_ext.end_windows_on_step(optimizer, torch.nn.BatchNorm2d(3))
    with pytest.raises(ValueError, match="no optimizer"):
        cmbn_ext.end_windows_on_step([], model)
    with pytest.raises(TypeError, match="GradScaler"):
        cmbn_ext.end_windows_on_step(optimizer, model, scaler=optimizer)
    assert not optimizer._optimizer_step_post_hooks  # nothing was left registered
