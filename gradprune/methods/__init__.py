"""Pruning methods, one module each: the maths as pure functions plus one :class:`Method` entry (which
statistics it needs, its options and their checks, how it scores or prunes one-shot and during training).

- :mod:`.magnitude`: ``|W|``.
- :mod:`.wanda`: ``|W| * ||X_j||_2`` and the adaptive per-row rule.
- :mod:`.sparsegpt`: OBS pruning with weight updates from the layer Hessians.
- :mod:`.ria`: relative importance and activations (Zhang et al. 2024).
- :mod:`.taylor`: first-order Taylor saliency ``sum |W * G|`` (train-time only).
- :mod:`.owl`: outlier-weighted layer budgets (Yin et al. 2024): ``allocation="owl"`` of the one-shot
  pipeline and of the gradual callback.

Both the one-shot pipeline (:mod:`gradprune.oneshot`) and the gradual scorers (:mod:`gradprune.scorers`)
draw from one table (:mod:`.registry`), so each score exists once. A new method is a module with its
functions and its ``Method`` entry, added with :func:`register_method`.
"""
from __future__ import annotations

from .base import Job, Method, prune_by_scores
from .magnitude import MAGNITUDE, magnitude_scores
from .registry import METHODS, SCORERS, MethodView, register_method
from .ria import RIA, ria_scores
from .sparsegpt import SPARSEGPT, inverse_hessian_factor, sparsegpt_prune
from .taylor import TAYLOR, taylor_scores
from .wanda import WANDA, wanda_adaptive_keep, wanda_scores

for _method in (MAGNITUDE, WANDA, SPARSEGPT, RIA, TAYLOR):
    register_method(_method, replace=True)  # replace: a reload of this module registers them again
del _method


def get_method(name: str) -> Method:
    """The one-shot method called ``name`` (KeyError if there is none; callers check names first)."""
    return METHODS[name]


__all__ = [
    "METHODS", "SCORERS", "Job", "Method", "MethodView", "get_method", "inverse_hessian_factor", "magnitude_scores",
    "prune_by_scores", "register_method", "ria_scores", "sparsegpt_prune", "taylor_scores", "wanda_adaptive_keep",
    "wanda_scores",
]
