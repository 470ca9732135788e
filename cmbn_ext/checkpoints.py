"""From a CmBN model to a plain BatchNorm checkpoint, without touching the model.

A BatchNorm checkpoint loads into a CmBN model as it is (strictly: the window starts empty). The other
way, a CmBN model's ``state_dict()`` holds the window state (``window_*`` entries), which a BatchNorm
model does not have, and an open cumulative or deferred window whose micro-batches are not in the
running statistics yet. ``batchnorm_state_dict`` gives what ``end_window`` then ``revert_to_batchnorm``
then ``state_dict()`` would give, and leaves the model as it is: its window stays open.
"""
import torch

from .modules import WINDOW_BUFFERS, WINDOWED_MODES, _CrossMiniBatchNorm
from .window_state import commit_window

# What a CmBN layer adds to its state_dict metadata (see _CrossMiniBatchNorm._save_to_state_dict).
_CMBN_METADATA = ("cmbn_mode", "cmbn_window", "cmbn_running_stats")


def batchnorm_state_dict(model):
    """The ``state_dict`` of a plain-BatchNorm copy of ``model``, which ``model`` itself keeps.

    Every CmBN layer's open window is committed to its running statistics as ``end_window()`` would
    commit it (cumulative and deferred modes; sliding and EMA modes have nothing to commit), and its
    ``window_*`` entries are left out, so the result loads strictly into the model that
    ``revert_to_batchnorm`` gives, or into the BatchNorm model it was converted from. It equals, bit for
    bit, ``end_window(model); revert_to_batchnorm(model).state_dict()``, without changing the model:
    the open windows stay open and training goes on from them.

    As in ``state_dict()``, the entries that need no commit share their storage with the model's
    tensors. A layer whose ranks disagreed on the window position (with a ``process_group``) raises as
    its ``end_window()`` does.

    Example::

        torch.save(cmbn_ext.batchnorm_state_dict(model), "model_batchnorm.pt")
    """
    state = model.state_dict()
    metadata = getattr(state, "_metadata", {})
    for name, layer in model.named_modules(remove_duplicate=False):  # a shared layer under every name
        if not isinstance(layer, _CrossMiniBatchNorm):
            continue
        prefix = f"{name}." if name else ""
        for buffer in WINDOW_BUFFERS:
            state.pop(prefix + buffer, None)
        local = metadata.get(name)
        if local is not None:
            for key in _CMBN_METADATA:
                local.pop(key, None)
        state.update(_committed_running_stats(layer, prefix))
    return state


@torch.no_grad()
def _committed_running_stats(layer, prefix):
    """``{key: tensor}`` of the layer's running statistics once ``end_window()`` has committed its
    window, computed on copies; empty when ``end_window()`` would not change them."""
    layer._window_agreement.check(type(layer).__name__)
    if (layer.mode not in WINDOWED_MODES or layer.running_stats == "micro_batch"
            or not layer.track_running_stats or layer.running_mean is None):
        return {}
    running = {name: getattr(layer, name).detach().clone()
               for name in ("running_mean", "running_var", "num_batches_tracked")}
    window = [getattr(layer, name).detach().clone() for name in WINDOW_BUFFERS]
    commit_window(*window, running["running_mean"], running["running_var"],
                  running["num_batches_tracked"], layer.momentum)
    return {prefix + name: tensor for name, tensor in running.items()}
