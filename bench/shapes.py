"""The shapes and dtypes the benchmark measures, shared by benchmark.py (what it times), report.py (the
CPU targets are over the CPU target shapes) and traffic_model.py (the plans of the GPU shapes). A module
of its own, which imports none of them, so that their imports form a tree."""
import torch

GPU_SHAPES = [(8, 64, 112, 112), (8, 64, 56, 56), (16, 256, 56, 56), (8, 512, 28, 28),
              (8, 1024, 14, 14), (8, 2048, 7, 7), (8, 32, 512, 512), (8, 64, 256, 256),
              (8, 128, 128, 128), (8, 256, 64, 64), (8, 1024, 16, 16), (2, 32, 608, 608)]
# The CPU targets (report.CPU_TARGETS) are over these shapes.
CPU_TARGET_SHAPES = [(8, 64, 56, 56), (2, 256, 28, 28), (8, 512, 28, 28), (8, 1024, 14, 14),
                     (8, 2048, 7, 7), (2, 32, 32, 32), (1, 64, 16, 16)]
# The CPU target shapes first (the targets are over those), then the GPU shapes, where they fit in memory.
CPU_SHAPES = CPU_TARGET_SHAPES + [s for s in GPU_SHAPES if s not in CPU_TARGET_SHAPES]
DTYPES = {  # key -> (dtype, memory format)
    "fp16-cl": (torch.float16, torch.channels_last),
    "fp32": (torch.float32, torch.contiguous_format),
}
