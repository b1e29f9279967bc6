"""RIA: Relative Importance and Activations (Zhang et al., ICLR 2024, "Plug-and-Play").

The score of weight W_ij of a Linear layer (out_features i, in_features j):

    score_ij = (|W_ij| / sum_i |W_ij| + |W_ij| / sum_j |W_ij|) * (sqrt(sum over tokens of x_j^2))^a

The first term is W_ij's share of its input column (all the outputs fed by input j), the second its share
of its output row (all the inputs of output i): a weight that is large relative to its neighbours in
either direction is kept even in a row or column of small weights. The last factor is the activation
norm of input channel j to the power a (a = 0.5 in the paper; a = 0 ignores the activations, a = 1 is
the norm itself as in Wanda). The statistics are those of Wanda: the sum over calibration (or training)
tokens of the squared inputs of the layer, one number per input channel.

Published (WikiText-2 perplexity, Llama-3-8B, dense 6.14): 50% unstructured RIA 9.34, Wanda 10.82,
SparseGPT 9.40; 2:4 RIA 23.08, Wanda 24.18, SparseGPT 16.26. Llama-3-70B at 50%: RIA 5.49, SparseGPT
5.79, Wanda 6.56. Its cost is about Wanda's (two sums over |W| more).
"""
from __future__ import annotations

import math

import torch

from typing import Any, Mapping, Optional, Sequence

from ..calibration import ChannelStats
from ..selection import select_masks_unchecked
from ..targets import Target
from ..validation import Problems
from .base import NM, Job, Method

#: What RIA needs besides the weights: the per-input-channel sum of squared activations (as Wanda).
STATISTICS = ("sum_sq",)
#: The paper's exponent of the activation norm.
DEFAULT_A = 0.5


def ria_scores(weight: torch.Tensor, sum_sq: torch.Tensor, a: float = DEFAULT_A,
               column_sums: Optional[torch.Tensor] = None) -> torch.Tensor:
    """RIA scores of an (out, in) weight, float32, shaped like ``weight`` (higher = more important).

    ``(|W_ij| / sum_i |W_ij| + |W_ij| / sum_j |W_ij|) * sqrt(sum_sq_j) ** a``, where ``sum_sq`` (in,) is
    the sum over tokens of the squared inputs of the layer. A row or column whose absolute sum is zero
    holds only zeros: its relative-importance term is 0 (not 0 / 0). ``a = 0`` ignores the activations
    (``0 ** 0`` counts as 1, so a channel that never fired does not zero its scores).

    ``column_sums`` (in,): ``sum_i |W_ij|`` over the whole weight, for a ``weight`` that holds only some of
    its rows (a shard of a row-sharded weight, :mod:`gradprune.sharding`); default: summed from ``weight``.
    """
    problems = Problems()
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        problems.add(f"weight must be a 2-D (out_features, in_features) tensor, got {shape}")
    elif not isinstance(sum_sq, torch.Tensor) or tuple(sum_sq.shape) != (weight.shape[1],):
        shape = tuple(sum_sq.shape) if isinstance(sum_sq, torch.Tensor) else type(sum_sq).__name__
        problems.add(f"sum_sq must be a tensor of shape ({weight.shape[1]},) (one sum per input channel), got {shape}")
    elif bool((sum_sq < 0).any()) or bool(sum_sq.isnan().any()):
        problems.add("sum_sq must hold sums of squares (>= 0, not NaN), got negative or NaN entries")
    if isinstance(a, bool) or not isinstance(a, (int, float)) or math.isnan(a) or math.isinf(a) or a < 0:
        problems.add(f"a (the activation exponent) must be a finite number >= 0, got {a!r}")
    problems.raise_if_any()

    w = weight.detach().abs().to(torch.float32)
    if column_sums is None:
        column_sums = w.sum(dim=0, keepdim=True)  # sum over i (outputs) for each input j
    else:
        column_sums = column_sums.detach().to(device=w.device, dtype=torch.float32).reshape(1, -1)
    row_sums = w.sum(dim=1, keepdim=True)  # sum over j (inputs) for each output i
    one = torch.ones((), dtype=w.dtype, device=w.device)
    relative = w / torch.where(column_sums > 0, column_sums, one) + w / torch.where(row_sums > 0, row_sums, one)
    stats = sum_sq.detach().to(device=w.device)
    stats = stats if stats.dtype == torch.float64 else stats.to(torch.float32)
    activation = stats.sqrt().pow(a).to(torch.float32)
    return relative * activation.unsqueeze(0)


# -- the one-shot method ---------------------------------------------------------------------------------
def prune_ria(job: Job, targets: Sequence[Target], stats: Mapping[str, ChannelStats]) -> None:
    """The core rule (option ``scope``, default "row") on :func:`ria_scores` with exponent option ``a``,
    monotone with the targets' current masks."""
    a = job.options["a"]
    masks = select_masks_unchecked(
        targets, job.sparsity, lambda t: t.stored(ria_scores(t.out_in(t.weight), stats[t.name].l2_sq, a)),
        job.options["scope"], job.nm, job.registry.current(targets), counts=job.counts,
    )
    job.registry.update(targets, masks)


def _check(problems: Problems, options: Mapping[str, Any], nm: NM, pattern: str) -> None:
    a = options["a"]
    if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 <= a < math.inf:
        problems.add(f"a (RIA's activation exponent) must be a finite number >= 0, got {a!r}")


def ria_sum_sq_scores(target: Target, sum_sq: torch.Tensor) -> torch.Tensor:
    """:func:`ria_scores` (exponent :data:`DEFAULT_A`) of a target from its per-input-channel ``sum x^2``,
    shaped like its stored weight (the train-time score, on a training window's sums)."""
    return target.stored(ria_scores(target.out_in(target.weight), sum_sq))


RIA = Method("ria", statistics="channel", options={"scope": "row", "a": DEFAULT_A}, prune=prune_ria, check=_check,
             train_score=ria_sum_sq_scores)
