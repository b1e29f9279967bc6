"""Pruning methods, one module each: the maths as pure functions plus one :class:`Method` entry (which
statistics it needs, its options and their checks, how it scores or prunes).

- :mod:`.magnitude`: ``|W|``.
- :mod:`.wanda`: ``|W| * ||X_j||_2`` and the adaptive per-row rule.
- :mod:`.sparsegpt`: OBS pruning with weight updates from the layer Hessians.
- :mod:`.ria`: relative importance and activations (Zhang et al. 2024).
- :mod:`.owl`: outlier-weighted layer budgets (Yin et al. 2024), pure functions, not yet a pipeline option.

Both the one-shot pipeline (:mod:`gradprune.oneshot`) and the gradual scorers (:mod:`gradprune.scorers`)
draw from here. A new method (RIA, ...) is a module with its score function and entry, listed in
``METHODS`` below.
"""
from __future__ import annotations

from .base import Job, Method, prune_by_scores
from .magnitude import MAGNITUDE, magnitude_scores
from .ria import RIA, ria_scores
from .sparsegpt import SPARSEGPT, inverse_hessian_factor, sparsegpt_prune
from .wanda import WANDA, wanda_adaptive_keep, wanda_scores

METHODS: dict[str, Method] = {m.name: m for m in (MAGNITUDE, WANDA, SPARSEGPT, RIA)}


def get_method(name: str) -> Method:
    """The registry entry called ``name`` (KeyError if there is none; callers check names first)."""
    return METHODS[name]


__all__ = [
    "METHODS", "Job", "Method", "get_method", "inverse_hessian_factor", "magnitude_scores", "prune_by_scores",
    "ria_scores", "sparsegpt_prune", "wanda_adaptive_keep", "wanda_scores",
]
