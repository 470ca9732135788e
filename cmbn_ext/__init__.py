"""Cross mini-Batch Normalization (CmBN) for PyTorch: BatchNorm whose statistics pool the micro-batches
of one gradient-accumulation step, with CUDA kernels and a pure-PyTorch fallback."""
from .convert import convert_batchnorm, end_window, reset_window, revert_to_batchnorm
from .modules import CrossMiniBatchNorm1d, CrossMiniBatchNorm2d, CrossMiniBatchNorm3d
from .ops import has_cuda_kernels

__all__ = [
    "CrossMiniBatchNorm1d", "CrossMiniBatchNorm2d", "CrossMiniBatchNorm3d",
    "convert_batchnorm", "revert_to_batchnorm", "end_window", "reset_window", "has_cuda_kernels",
]
__version__ = "0.1.0"
