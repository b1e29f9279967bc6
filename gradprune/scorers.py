"""Named weight scorers for train-time pruning: ``score(target) -> tensor shaped like the weight``; low
scores are pruned first. The scores come from :mod:`gradprune.methods` (one module per method); register
new ones (activation-aware, movement) with :func:`register_scorer`."""
from __future__ import annotations

from typing import Callable, Dict

import torch

from .methods.magnitude import magnitude_scores
from .targets import Target

Scorer = Callable[[Target], torch.Tensor]
_SCORERS: Dict[str, Scorer] = {"magnitude": magnitude_scores}


def register_scorer(name: str, scorer: Scorer) -> None:
    """Make ``scorer`` available by ``name`` (e.g. to ``GradualPruningCallback(scorer=name)``)."""
    if not callable(scorer):
        raise TypeError(f"scorer must be callable, got {scorer!r}")
    _SCORERS[name] = scorer


def get_scorer(name: str) -> Scorer:
    if name not in _SCORERS:
        raise ValueError(f"scorer must be one of {sorted(_SCORERS)}, got {name!r}")
    return _SCORERS[name]


def scorer_names() -> list[str]:
    return sorted(_SCORERS)
