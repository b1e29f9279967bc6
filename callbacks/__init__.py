"""Lightning callbacks of gradprune, installed as ``gradprune.callbacks``.

Callbacks decide *when* to prune; the core in :mod:`gradprune` decides *what*.
"""
from .base import PruningCallback
from .gradual import GradualPruningCallback
from .gradual_structured import GradualStructuredPruningCallback
from .mask_modes import DynamicMasks, LearnedMasks
from .monitor import SparsityMonitor
from .oneshot import MagnitudePruningCallback, RIAPruningCallback, SparseGPTPruningCallback, WandaPruningCallback
from .strategies import MaskMode
from .structured import StructuredPruningCallback
from .task_eval import TaskEvalCallback

__all__ = [
    "GradualPruningCallback",
    "DynamicMasks",
    "GradualStructuredPruningCallback",
    "LearnedMasks",
    "MagnitudePruningCallback",
    "MaskMode",
    "PruningCallback",
    "RIAPruningCallback",
    "SparseGPTPruningCallback",
    "SparsityMonitor",
    "StructuredPruningCallback",
    "TaskEvalCallback",
    "WandaPruningCallback",
]
