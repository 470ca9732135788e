"""ultralytics (YOLO): train with CmBN in place of BatchNorm.

    from ultralytics import YOLO
    from cmbn_ext.integrations.ultralytics import add_cmbn_callbacks

    model = YOLO("yolov8n.yaml")
    add_cmbn_callbacks(model)                          # CmBN options as keywords, e.g. mode="sliding"
    model.train(data="data.yaml", batch=8, nbs=64)     # 64 / 8 = 8 micro-batches per optimizer step

Why a callback: ultralytics' ``Conv`` hard-codes ``nn.BatchNorm2d``, and the trainer builds the model,
its optimizer and its ``ModelEMA`` itself. Converting in ``on_pretrain_routine_end``, after all three
exist, gets three things right:

- the optimizer keeps BatchNorm's parameter groups (no weight decay on the norm weights: ultralytics
  picks them by ``isinstance`` of torch's norm classes), and the conversion keeps the very parameters;
- the windows end at each optimizer step (``end_windows_on_step``, through the trainer's ``GradScaler``
  so a skipped step ends its window too). The trainer computes ``accumulate = nbs / batch`` and ramps it
  up from 1 during warmup, so the layers get ``window=None`` and follow the steps, whatever their count;
- the EMA model keeps plain BatchNorm layers. ``ModelEMA`` averages every floating-point entry of the
  state dict, and the window state (``window_mean``, ``window_var``) is not something to average: it
  would drift away from the integer ``window_count`` it belongs to. The EMA model only runs in eval
  mode, where CmBN and BatchNorm compute the same thing, and it is what ultralytics saves: the
  checkpoints stay plain BatchNorm models that load, fuse and export without cmbn_ext. If the trainer's
  model already had CmBN layers when the EMA was made, the EMA's are reverted to BatchNorm.
"""
from ..convert import _cmbn_layers, convert_batchnorm, revert_to_batchnorm
from ..hooks import end_windows_on_step


def add_cmbn_callbacks(model, **cmbn_options):
    """Register on ``model`` (a ``YOLO`` model or a trainer: anything with ``add_callback``) the callbacks
    that train it with CmBN: convert its BatchNorm layers once the trainer has built the model, optimizer
    and EMA, end the windows at each optimizer step, and unregister at the end of training.

    ``cmbn_options`` go to ``convert_batchnorm`` (``mode``, ``grad``, ``process_group``,
    ``fuse_activation=True`` and ``memory="lean"`` to keep less for the backward, ...);
    ``window`` defaults to ``None``: each window is the micro-batches of one optimizer step.
    """
    options = {"window": None, **cmbn_options}
    handles = {}

    def on_pretrain_routine_end(trainer):
        convert_batchnorm(trainer.model, **options)
        _keep_ema_batchnorm(trainer.ema)
        handles[id(trainer)] = end_windows_on_step(trainer.optimizer, trainer.model, scaler=trainer.scaler)

    def on_train_end(trainer):
        handle = handles.pop(id(trainer), None)
        if handle is not None:
            handle.remove()

    model.add_callback("on_pretrain_routine_end", on_pretrain_routine_end)
    model.add_callback("on_train_end", on_train_end)


def _keep_ema_batchnorm(ema):
    """Give ``ModelEMA`` back plain BatchNorm layers if it copied CmBN ones."""
    if ema is None or next(_cmbn_layers(ema.ema), None) is None:
        return
    revert_to_batchnorm(ema.ema)
    if hasattr(ema, "_pairs"):
        ema._pairs = None  # the cached (EMA tensor, model tensor) pairs, rebuilt from the new state dict
