"""``warn``: a warning that points at the user's line, not at the library's.

A layer's warning is raised several calls below the user's code (``model(x)`` goes through
``nn.Module.__call__``, ``Sequential.forward``, ...; ``model.eval()`` through ``Module.train`` of every
parent), and the depth varies, so a fixed ``stacklevel`` cannot find the user's line. This counts the
frames of cmbn_ext, of torch and of the import machinery above the warning instead.
"""
import os
import sys
import warnings

import torch

_LIBRARY_DIRS = tuple(os.path.dirname(os.path.abspath(path)) + os.sep
                      for path in (__file__, torch.__file__))


def _is_library_frame(frame):
    filename = frame.f_code.co_filename
    if filename.startswith("<"):
        return filename.startswith("<frozen importlib")
    return os.path.abspath(filename).startswith(_LIBRARY_DIRS)


def warn(message, category=UserWarning):
    """``warnings.warn`` attributed to the first caller outside cmbn_ext and torch."""
    frame, stacklevel = sys._getframe(1), 2  # stacklevel 2: warn()'s caller
    while frame.f_back is not None and _is_library_frame(frame):
        frame, stacklevel = frame.f_back, stacklevel + 1
    warnings.warn(message, category, stacklevel=stacklevel)
