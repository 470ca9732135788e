"""The small-batch training demo, ``python -m cmbn_ext.demo`` (see ``cli``): CmBN against BatchNorm and
GroupNorm under gradient accumulation, on two tasks that run offline. ``import cmbn_ext`` never imports
it; it needs the ``demo`` extra (scikit-image, scikit-learn, matplotlib, tqdm)."""
from .cli import DEFAULT_OUT, QUICK_TASKS, TASKS, main  # noqa: F401
