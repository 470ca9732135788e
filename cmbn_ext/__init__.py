"""Cross mini-Batch Normalization (CmBN) for PyTorch: BatchNorm whose statistics pool the micro-batches
of one gradient-accumulation step, with CUDA kernels and a pure-PyTorch fallback."""
from .convert import (convert_batchnorm, convert_deferred_batch_norm, end_window, fused_activations,
                      reset_window, revert_to_batchnorm)
from .hooks import end_windows_on_step
from .modules import (CrossMiniBatchNorm1d, CrossMiniBatchNorm2d, CrossMiniBatchNorm3d,
                      FusedActivation, OpenWindowWarning, SyncCrossMiniBatchNorm)
from .kernel_plan import kernel_plan
from .ops import has_cpu_kernels, has_cuda_kernels
from .checkpoints import batchnorm_state_dict

__all__ = [
    "CrossMiniBatchNorm1d", "CrossMiniBatchNorm2d", "CrossMiniBatchNorm3d", "SyncCrossMiniBatchNorm",
    "OpenWindowWarning", "FusedActivation",
    "convert_batchnorm", "convert_deferred_batch_norm", "revert_to_batchnorm", "fused_activations",
    "end_window",
    "reset_window", "has_cuda_kernels", "has_cpu_kernels", "kernel_plan", "end_windows_on_step",
    "batchnorm_state_dict",
]
__version__ = "0.1.0"


def __getattr__(name):
    # timm's counterpart loads on first use: its module loads timm (optional), import cmbn_ext must not.
    if name == "CrossMiniBatchNormAct2d":
        from .norm_act import CrossMiniBatchNormAct2d
        return CrossMiniBatchNormAct2d
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
