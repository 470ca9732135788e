"""``CmBNCallback`` with the real Lightning Trainer on the CPU: windows follow accumulate_grad_batches (and
a GradientAccumulationScheduler), close at every optimizer step, skipped or not, and at the end of an
epoch. The running statistics are checked against BatchNorm over each expected window concatenated."""
import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")
from lightning.pytorch.callbacks import GradientAccumulationScheduler  # noqa: E402
from lightning.pytorch.plugins import MixedPrecision  # noqa: E402

from accumulation import (InputRecorder, assert_committed, cmbn_layer, micro_batch_loader,  # noqa: E402
                          tiny_model, window_sizes)
from cmbn_ext.integrations.lightning import CmBNCallback  # noqa: E402

# Lightning's advice for real runs (more dataloader workers, a logger, ...) is noise here; a window
# left open across a step or at eval() is an error.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning",
                                        "ignore::FutureWarning", "error::cmbn_ext.OpenWindowWarning")


class TinyModule(pl.LightningModule):
    def __init__(self, infinite_loss_at=None):
        super().__init__()
        self.model = tiny_model(window=None)
        self.infinite_loss_at = infinite_loss_at  # (epoch, batch_idx) whose loss is made infinite

    def training_step(self, batch, batch_idx):
        loss = self.model(batch[0]).square().mean()
        if (self.current_epoch, batch_idx) == self.infinite_loss_at:
            loss = loss * float("inf")
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class StateRecorder(pl.Callback):
    """The layer's state after each training batch (before the epoch-end hooks run)."""

    def __init__(self):
        self.after_batch = []  # (epoch, batch_idx, window, window_step, num_batches_tracked)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        layer = cmbn_layer(pl_module)
        self.after_batch.append((trainer.current_epoch, batch_idx, layer.window, int(layer.window_step),
                                 int(layer.num_batches_tracked)))


def fit(module, num_batches, epochs, callbacks, tmp_path, **trainer_options):
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, callbacks=callbacks,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, **trainer_options)
    trainer.fit(module, micro_batch_loader(num_batches))
    return trainer


def expected_states(num_batches, accumulate_per_epoch):
    """(epoch, batch_idx, window, window_step, num_batches_tracked) after each batch, when Lightning steps
    after every ``accumulate``-th batch of an epoch and after its last batch."""
    states, commits = [], 0
    for epoch, accumulate in enumerate(accumulate_per_epoch):
        in_window = 0
        for batch_idx in range(num_batches):
            in_window += 1
            if (batch_idx + 1) % accumulate == 0 or batch_idx == num_batches - 1:
                commits, in_window = commits + 1, 0
            states.append((epoch, batch_idx, accumulate, in_window, commits))
    return states


def test_windows_follow_accumulate_grad_batches(tmp_path):
    module, recorder = TinyModule(), StateRecorder()
    inputs = InputRecorder(cmbn_layer(module))
    fit(module, 7, 2, [CmBNCallback(), recorder], tmp_path, accumulate_grad_batches=3)
    assert recorder.after_batch == expected_states(7, [3, 3])
    assert_committed(cmbn_layer(module), inputs.inputs, window_sizes(7, 3) * 2)


def test_windows_follow_a_gradient_accumulation_scheduler(tmp_path):
    module, recorder = TinyModule(), StateRecorder()
    inputs = InputRecorder(cmbn_layer(module))
    # CmBNCallback first: it must still see the value the scheduler sets at the start of each epoch.
    callbacks = [CmBNCallback(), GradientAccumulationScheduler(scheduling={0: 2, 1: 3}), recorder]
    fit(module, 7, 2, callbacks, tmp_path)
    assert recorder.after_batch == expected_states(7, [2, 3])
    assert_committed(cmbn_layer(module), inputs.inputs, window_sizes(7, 2) + window_sizes(7, 3))


def test_a_step_the_grad_scaler_skips_still_ends_its_window(tmp_path):
    """The last, partial group of 2 (under a window of 4) has an infinite loss: the scaler skips its step,
    and the window is closed anyway, before the epoch-end hook runs."""
    module, recorder = TinyModule(infinite_loss_at=(0, 5)), StateRecorder()
    inputs = InputRecorder(cmbn_layer(module))
    scaler = torch.amp.GradScaler("cpu", init_scale=16.0)  # small: only the infinite loss overflows
    trainer = fit(module, 6, 1, [CmBNCallback(), recorder], tmp_path, accumulate_grad_batches=4,
                  plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    assert trainer.precision_plugin.scaler is scaler
    assert scaler.get_scale() == 8.0, "the scaler did not skip the last step (and it alone)"
    assert recorder.after_batch == expected_states(6, [4])
    assert_committed(cmbn_layer(module), inputs.inputs, [4, 2])


class ManualModule(TinyModule):
    """Manual optimization: its own accumulation, a step every 2 batches."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        self.manual_backward(self.model(batch[0]).square().mean())
        if batch_idx % 2 == 1:
            optimizer = self.optimizers()
            optimizer.step()
            optimizer.zero_grad()


def test_manual_optimization_keeps_the_window_and_ends_it_at_each_step(tmp_path):
    module, recorder = ManualModule(), StateRecorder()
    inputs = InputRecorder(cmbn_layer(module))
    fit(module, 5, 1, [CmBNCallback(), recorder], tmp_path)
    # window stays None; steps after batches 1 and 3; the epoch's end closes the window of batch 4.
    assert [state[2:] for state in recorder.after_batch] == [(None, 1, 0), (None, 0, 1), (None, 1, 1),
                                                              (None, 0, 2), (None, 1, 2)]
    assert_committed(cmbn_layer(module), inputs.inputs, [2, 2, 1])


def test_a_module_without_cmbn_layers_is_refused(tmp_path):
    module = TinyModule()
    cmbn_ext_free = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.BatchNorm2d(2),
                                        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    module.model = cmbn_ext_free
    with pytest.raises(ValueError, match="no CmBN layers"):
        fit(module, 2, 1, [CmBNCallback()], tmp_path)
