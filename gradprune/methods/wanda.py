"""Wanda (Sun et al. 2023): score ``|W_ij| * sqrt(sum over tokens of x_j^2)`` from per-input-channel
activation sums.

Masks by the core rule: per output row exactly ``int(in_features * s)`` lowest by default (the
reference's count), ``N:M`` along the input dimension, or ``scope="layer"/"global"``.
:func:`wanda_adaptive_keep` is the paper appendix's variant (one alpha per layer found by bisection, a
different count per row).
"""
from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import torch

from ..calibration import ChannelStats
from ..targets import Target
from ..validation import Problems
from .base import NM, Job, Method, prune_by_scores

log = logging.getLogger(__name__)


def wanda_scores(weight: torch.Tensor, sum_sq: torch.Tensor) -> torch.Tensor:
    """Wanda's score of an (out, in) weight: ``|W_ij| * sqrt(sum_sq_j)``, sum_sq = sum of squared inputs."""
    return weight.detach().abs().to(torch.float32) * sum_sq.sqrt().to(device=weight.device, dtype=torch.float32).unsqueeze(0)


def wanda_sum_sq_scores(target: Target, sum_sq: torch.Tensor) -> torch.Tensor:
    """:func:`wanda_scores` of a target from its per-input-channel ``sum x^2``, shaped like its stored
    weight (the train-time score, on a training window's sums)."""
    return target.stored(wanda_scores(target.out_in(target.weight), sum_sq))


def wanda_target_scores(target: Target, stats: ChannelStats) -> torch.Tensor:
    """:func:`wanda_scores` of a target from its calibration statistics, shaped like its stored weight."""
    return wanda_sum_sq_scores(target, stats.l2_sq)


def wanda_adaptive_keep(scores: torch.Tensor, sparsity: float, tolerance: float = 0.001) -> torch.Tensor:
    """Keep-mask of Wanda's adaptive variant for one (out, in) score matrix (scores >= 0).

    Per row, the scores are sorted (stable) and summed cumulatively; a row prunes its lowest scores whose
    cumulative sum stays within ``alpha`` times the row's total. One ``alpha`` per layer is found by
    bisection (start 0.4 in [0, 0.8]) until the layer's sparsity is within ``tolerance`` of the target.
    """
    ordered, order = scores.sort(dim=1, stable=True)
    cumulative = ordered.cumsum(dim=1)
    totals = scores.sum(dim=1, keepdim=True)

    def counts(alpha: float) -> torch.Tensor:
        return (cumulative <= alpha * totals).sum(dim=1)

    alpha, low, high = 0.4, 0.0, 0.8
    k = counts(alpha)
    achieved = float(k.sum()) / scores.numel()
    while abs(achieved - sparsity) > tolerance and high - low >= tolerance:
        if achieved > sparsity:
            alpha, high = (alpha + low) / 2, alpha
        else:
            alpha, low = (alpha + high) / 2, alpha
        k = counts(alpha)
        achieved = float(k.sum()) / scores.numel()
    log.debug("adaptive Wanda: alpha %.4f gives sparsity %.4f (target %.4f)", alpha, achieved, sparsity)
    kept_ranks = torch.arange(scores.shape[1], device=scores.device).unsqueeze(0) >= k.unsqueeze(1)
    return torch.zeros_like(kept_ranks).scatter_(1, order, kept_ranks)


def prune_wanda(job: Job, targets: Sequence[Target], stats: Mapping[str, ChannelStats]) -> None:
    """The core rule on Wanda's scores (per row: ``int(in * s)``, the reference's count), or with
    ``adaptive`` the adaptive per-row rule, monotone with the current masks."""
    if not job.options["adaptive"]:
        prune_by_scores(job, targets, stats, rounding="floor" if job.options["scope"] == "row" else "nearest")
        return
    current = job.registry.current(targets)
    masks = {}
    for t in targets:
        scores = t.out_in(wanda_target_scores(t, stats[t.name])).clone()
        if t.name in current:
            scores.masked_fill_(~t.out_in(current[t.name]), 0.0)
        masks[t.name] = t.stored(wanda_adaptive_keep(scores, job.sparsity, job.options["alpha_tolerance"])).contiguous()
    job.registry.update(targets, masks)


def _check(problems: Problems, options: Mapping[str, Any], nm: NM, pattern: str) -> None:
    if not isinstance(options["adaptive"], bool):
        problems.add(f"adaptive must be True or False, got {options['adaptive']!r}")
    tolerance = options["alpha_tolerance"]  # bounds the bisection: it stops once the bracket is below it
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 < tolerance < 1:
        problems.add(f"alpha_tolerance must be a number in (0, 1), got {tolerance!r}")
    if options["adaptive"] and nm is not None:
        problems.add(f"adaptive=True (Wanda's adaptive variant) works only with pattern='unstructured', got {pattern!r}")
    if options["adaptive"] and options["allocation"] == "owl":
        problems.add("adaptive=True finds its own per-row counts: it does not combine with allocation='owl'")
    if options["adaptive"] and options["scope"] != "row":
        problems.add(f"adaptive=True is a per-row rule: use scope='row', got scope={options['scope']!r}")


WANDA = Method(
    "wanda", statistics="channel", options={"scope": "row", "adaptive": False, "alpha_tolerance": 0.001},
    score=wanda_target_scores, prune=prune_wanda, check=_check, train_score=wanda_sum_sq_scores,
)
