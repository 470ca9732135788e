"""PyTorch Lightning: ``CmBNCallback`` keeps the CmBN windows in step with the Trainer's gradient
accumulation.

    trainer = lightning.pytorch.Trainer(accumulate_grad_batches=4, callbacks=[CmBNCallback()])

Built on ``lightning.pytorch`` (``pip install cmbn_ext[lightning]``), or on the standalone
``pytorch_lightning`` package when ``lightning`` is not installed.
"""
try:
    from lightning.pytorch import Callback
except ImportError:  # the standalone package
    from pytorch_lightning import Callback

from ..convert import end_window
from ..hooks import require_cmbn_layers, set_cumulative_windows


class CmBNCallback(Callback):
    """Sets the window of every CmBN layer to ``trainer.accumulate_grad_batches`` and ends the windows at
    each optimizer step and at the end of each training epoch.

    The window follows a ``GradientAccumulationScheduler``: it is read again before every training batch,
    whichever order the callbacks run in. Windows end in ``on_before_optimizer_step``, which Lightning
    calls after the last micro-batch's backward whether or not a ``GradScaler`` then skips the step, so a
    skipped step closes its window too, as does the shorter last group of an epoch.

    Args:
        set_window: set the layers' ``window`` (cumulative mode only: sliding windows are fixed and EMA has
            none). Under manual optimization Lightning does not accumulate, so the windows are left as
            built and only end at each ``optimizer.step()``.
    """

    def __init__(self, set_window=True):
        super().__init__()
        self.set_window = set_window

    def on_train_start(self, trainer, pl_module):
        require_cmbn_layers(pl_module, "CmBNCallback")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not (self.set_window and pl_module.automatic_optimization):
            return
        set_cumulative_windows(pl_module, trainer.accumulate_grad_batches)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        end_window(pl_module)

    def on_train_epoch_end(self, trainer, pl_module):
        end_window(pl_module)
