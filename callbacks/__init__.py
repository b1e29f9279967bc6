"""Lightning callbacks of gradprune, installed as ``gradprune.callbacks``.

Callbacks decide *when* to prune; the core in :mod:`gradprune` decides *what*.
"""
from .base import PruningCallback
from .gradual import GradualPruningCallback
from .monitor import SparsityMonitor

__all__ = [
    "GradualPruningCallback",
    "PruningCallback",
    "SparsityMonitor",
]
