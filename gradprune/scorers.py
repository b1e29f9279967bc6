"""Named scorers for train-time pruning: how the gradual callback ranks weights (low scores go first).

A view of the one method table (:mod:`gradprune.methods.registry`): a scorer is a method with train-time
scoring, under the same name as its one-shot method. Each says what it needs, and the callback arranges
exactly that (see :class:`gradprune.callbacks.GradualPruningCallback`):

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

A scorer is ``score(target, statistic) -> tensor shaped like the stored weight``; ``statistic`` is None,
the target's float64 ``sum x^2`` vector, or its accumulated ``|W * G|``. Add more with
:func:`gradprune.methods.register_method` (a ``Method`` with ``train_score``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch

from .methods import METHODS, SCORERS, Method, register_method
from .methods.base import NEEDS, TrainPruneFn, TrainScoreFn
from .targets import Target

Needs = Literal["weights", "activations", "gradients", "hessians"]
NEEDS_NAMES = tuple(NEEDS.values())
# what register_scorer accepts: a "hessians" rule also changes the weights (a train_prune), so it is a Method
SCORE_ONLY_NEEDS = ("weights", "activations", "gradients")
# prune(target, hessian, count, keep) -> (new weight, keep-mask), both shaped like the stored weight
Reconstruct = TrainPruneFn


@dataclass(frozen=True)
class Scorer:
    """A method's train-time side, as the gradual callback reads it: what it needs, and
    ``score(target, statistic)``; or, for a rule that also changes the kept weights (``sparsegpt``),
    ``prune(target, hessian, count, keep)`` instead of a score."""

    name: str
    needs: Needs
    score: Optional[TrainScoreFn] = None
    prune: Optional[Reconstruct] = None

    @classmethod
    def of(cls, method: Method) -> "Scorer":
        return cls(method.name, method.needs, method.train_score, method.train_prune)


def get_scorer(name: str) -> Scorer:
    """The train-time side of the method called ``name`` (ValueError naming the choices if there is none)."""
    if name not in SCORERS:
        raise ValueError(f"scorer must be one of {scorer_names()}, got {name!r}")
    return Scorer.of(SCORERS[name])


def scorer_names() -> list[str]:
    """The names of the methods with train-time scoring, sorted."""
    return sorted(SCORERS)


def register_scorer(name: str, scorer: Callable, needs: Needs = "weights") -> None:
    """Shorthand for :func:`gradprune.methods.register_method` with a train-time-only method: make
    ``scorer`` available by ``name`` (e.g. to ``GradualPruningCallback(scorer=name)``), replacing any
    train-time-only method of that name.

    With ``needs="weights"`` a scorer is ``score(target) -> tensor``; otherwise ``score(target, statistic)``
    (see the module docstring for what ``statistic`` holds)."""
    if not callable(scorer):
        raise TypeError(f"scorer must be callable, got {scorer!r}")
    if needs not in SCORE_ONLY_NEEDS:
        raise ValueError(f"needs must be one of {list(SCORE_ONLY_NEEDS)}, got {needs!r}")
    if name in METHODS:
        raise ValueError(f"{name!r} is a one-shot method too: replace it with register_method(Method(...), replace=True)")
    statistics = {value: key for key, value in NEEDS.items()}[needs]

    def score(target: Target, statistic: Optional[torch.Tensor]) -> torch.Tensor:
        return scorer(target) if needs == "weights" else scorer(target, statistic)

    register_method(Method(name, statistics=statistics, train_score=score), replace=True)
