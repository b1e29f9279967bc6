"""Named scorers for train-time pruning: how the gradual callback ranks weights (low scores go first).

Each scorer says what it needs, and the callback arranges exactly that (see
:class:`gradprune.callbacks.GradualPruningCallback`):

- ``"weights"``: nothing but the weights. ``magnitude``: ``|W|``.
- ``"activations"``: per input channel ``j`` the sum over tokens of ``x_j^2`` of each target's inputs,
  collected by forward hooks during the last ``stat_batches`` training micro-batches before an event
  (padding left out, summed over data-parallel ranks). ``wanda``: ``|W_ij| * sqrt(sum x_j^2)`` (the same
  function as one-shot Wanda); ``ria``: relative importance times activations (Zhang et al. 2024).
- ``"hessians"``: per target SparseGPT's ``sum X X^T`` of its inputs over the same window as activations.
  ``sparsegpt`` does more than rank: at each event it prunes every layer to its exact count with
  SparseGPT (lowest ``w^2 / [H^-1]_jj^2`` per column block, already-pruned weights first) and updates the
  kept weights to make up for the pruned ones (optimal brain surgeon). Scope "layer", unstructured.
- ``"gradients"``: ``taylor``: first-order saliency ``sum over optimizer steps of |W * G|`` since the last
  event (the gradient before any masking; pruned weights score 0 anyway), kept in a float32 accumulator
  of 4 bytes per targeted weight.

The scores themselves come from :mod:`gradprune.methods` (one module per method), the same functions the
one-shot methods use. A scorer is ``score(target, statistic) -> tensor shaped like the stored weight``; ``statistic`` is None,
the target's float64 ``sum x^2`` vector, or its accumulated ``|W * G|``. Register more with
:func:`register_scorer`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Literal, Optional

import torch

from .methods.magnitude import magnitude_scores
from .methods.ria import ria_scores
from .methods.sparsegpt import sparsegpt_prune
from .methods.wanda import wanda_scores
from .targets import Target

Needs = Literal["weights", "activations", "gradients", "hessians"]
NEEDS = ("weights", "activations", "gradients", "hessians")
# what register_scorer accepts: a "hessians" rule also changes the weights (a Reconstruct), so it is built in
SCORE_ONLY_NEEDS = ("weights", "activations", "gradients")
# prune(target, hessian, count, keep) -> (new weight, keep-mask), both shaped like the stored weight
Reconstruct = Callable[[Target, torch.Tensor, int, Optional[torch.Tensor]], tuple]


@dataclass(frozen=True)
class Scorer:
    """A named rule: what it needs, and ``score(target, statistic)``; or, for a rule that also changes the
    kept weights (``sparsegpt``), ``prune(target, hessian, count, keep)`` instead of a score."""

    name: str
    needs: Needs
    score: Optional[Callable[[Target, Optional[torch.Tensor]], torch.Tensor]] = None
    prune: Optional[Reconstruct] = None


def _magnitude(target: Target, statistic: Optional[torch.Tensor]) -> torch.Tensor:
    return magnitude_scores(target)


def _wanda(target: Target, sum_sq: Optional[torch.Tensor]) -> torch.Tensor:
    return target.stored(wanda_scores(target.out_in(target.weight), sum_sq))


def _ria(target: Target, sum_sq: Optional[torch.Tensor]) -> torch.Tensor:
    return target.stored(ria_scores(target.out_in(target.weight), sum_sq))


def _taylor(target: Target, saliency: Optional[torch.Tensor]) -> torch.Tensor:
    return saliency


def _sparsegpt(target: Target, hessian: torch.Tensor, count: int, keep: Optional[torch.Tensor]) -> tuple:
    # a count k is sparsity k / numel, which the exact rounding turns back into exactly k
    weight, kept = sparsegpt_prune(target.out_in(target.weight), hessian, count / target.numel,
                                   keep=None if keep is None else target.out_in(keep))
    return target.stored(weight), target.stored(kept).contiguous()


_SCORERS: Dict[str, Scorer] = {
    "magnitude": Scorer("magnitude", "weights", _magnitude),
    "wanda": Scorer("wanda", "activations", _wanda),
    "ria": Scorer("ria", "activations", _ria),
    "taylor": Scorer("taylor", "gradients", _taylor),
    "sparsegpt": Scorer("sparsegpt", "hessians", prune=_sparsegpt),
}


def register_scorer(name: str, scorer: Callable, needs: Needs = "weights") -> None:
    """Make ``scorer`` available by ``name`` (e.g. to ``GradualPruningCallback(scorer=name)``).

    With ``needs="weights"`` a scorer is ``score(target) -> tensor``; otherwise ``score(target, statistic)``
    (see the module docstring for what ``statistic`` holds)."""
    if not callable(scorer):
        raise TypeError(f"scorer must be callable, got {scorer!r}")
    if needs not in SCORE_ONLY_NEEDS:
        raise ValueError(f"needs must be one of {list(SCORE_ONLY_NEEDS)}, got {needs!r}")
    score = (lambda target, statistic: scorer(target)) if needs == "weights" else scorer
    _SCORERS[name] = Scorer(name, needs, score)


def get_scorer(name: str) -> Scorer:
    if name not in _SCORERS:
        raise ValueError(f"scorer must be one of {sorted(_SCORERS)}, got {name!r}")
    return _SCORERS[name]


def scorer_names() -> list[str]:
    return sorted(_SCORERS)
