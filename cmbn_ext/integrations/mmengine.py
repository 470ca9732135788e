"""mmengine and mmcv: the CmBN layers as norm layers, and a Hook that ends windows with the optimizer.

Importing this module registers, in mmengine's root ``MODELS`` registry (which the registries of mmcv,
mmdet, mmseg, ... fall back to):

- ``"CmBN"`` and ``"CmBN2d"``: ``CrossMiniBatchNorm2d``; ``"CmBN1d"``, ``"CmBN3d"``: the 1d and 3d
  layers; ``"SyncCmBN"``: ``SyncCrossMiniBatchNorm`` (mmcv's ``"SyncBN"`` counterpart). mmcv's
  ``build_norm_layer(dict(type="CmBN2d", window=4), 64)`` builds one, named with the abbreviation ``bn``
  (the layers are BatchNorm subclasses), so checkpoints of BatchNorm models load.

and ``CmBNHook`` in ``HOOKS``. In a config::

    custom_imports = dict(imports=["cmbn_ext.integrations.mmengine"], allow_failed_imports=False)
    norm_cfg = dict(type="CmBN2d", window=4)
    optim_wrapper = dict(optimizer=dict(type="SGD", lr=0.01), accumulative_counts=4)
    custom_hooks = [dict(type="CmBNHook")]
"""
from mmengine.hooks import Hook
from mmengine.registry import HOOKS, MODELS

from ..convert import end_window
from ..hooks import require_cmbn_layers, set_cumulative_windows
from ..modules import (CrossMiniBatchNorm1d, CrossMiniBatchNorm2d, CrossMiniBatchNorm3d,
                       SyncCrossMiniBatchNorm)

for _name, _layer in (("CmBN", CrossMiniBatchNorm2d), ("CmBN1d", CrossMiniBatchNorm1d),
                      ("CmBN2d", CrossMiniBatchNorm2d), ("CmBN3d", CrossMiniBatchNorm3d),
                      ("SyncCmBN", SyncCrossMiniBatchNorm)):
    MODELS.register_module(_name, module=_layer)


@HOOKS.register_module()
class CmBNHook(Hook):
    """Ends every CmBN window of the model when the optimizer wrapper updates the parameters.

    mmengine accumulates gradients inside the ``OptimWrapper`` (``accumulative_counts``): it steps after
    every ``accumulative_counts``-th iteration and after the last iteration of training, across epoch
    boundaries. After each training iteration this hook asks each wrapper whether it counted a backward
    and updated in it (``should_update()``), and ends the windows if so. That is the wrapper's own
    decision, so a step that ``AmpOptimWrapper``'s loss scaler skips (non-finite gradients) ends its window
    too. With an ``OptimWrapperDict`` (several optimizers), an update of any of them ends the windows.

    Args:
        set_window: before training, set the window of every cumulative-mode CmBN layer to the wrappers'
            ``accumulative_counts`` (when they all agree), so each window also commits by count.
    """

    priority = "NORMAL"

    def __init__(self, set_window=True):
        self.set_window = set_window
        self._inner_counts = {}

    def before_train(self, runner):
        require_cmbn_layers(runner.model, "CmBNHook")
        wrappers = _optim_wrappers(runner.optim_wrapper)
        self._inner_counts = {id(wrapper): wrapper.inner_count for wrapper in wrappers}
        # mmengine has no public accessor for the accumulation count.
        counts = {getattr(wrapper, "_accumulative_counts", None) for wrapper in wrappers}
        if self.set_window and len(counts) == 1 and isinstance(next(iter(counts)), int):
            set_cumulative_windows(runner.model, counts.pop())

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        updated = False
        for wrapper in _optim_wrappers(runner.optim_wrapper):
            counted = wrapper.inner_count != self._inner_counts.get(id(wrapper))
            self._inner_counts[id(wrapper)] = wrapper.inner_count
            updated |= counted and wrapper.should_update()
        if updated:
            end_window(runner.model)


def _optim_wrappers(optim_wrapper):
    """The ``OptimWrapper``s of a wrapper or of an ``OptimWrapperDict``."""
    if hasattr(optim_wrapper, "optim_wrappers"):
        return list(optim_wrapper.optim_wrappers.values())
    return [optim_wrapper]
