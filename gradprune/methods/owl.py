"""OWL: outlier-weighted layer-wise sparsity budgets (Yin et al., ICML 2024), as pure functions.

1. Outlier ratio of a decoder block: the share of its (Wanda) scores, all its targets' scores taken
   together, above ``m`` times their mean (m = 5 in the paper): :func:`outlier_ratio`.
2. Budgets: block sparsities spread linearly in the outlier ratio within [s - lam, s + lam] (lam = 0.08),
   more outliers -> less sparsity, the mean over all targeted weights kept at s: :func:`owl_budgets`.
3. Integer prune counts per target whose total is exactly the count of a uniform s: :func:`exact_counts`.

Budget construction (an affine map of the ratio z_l of block l with n_l targeted weights)::

    zbar = sum_l n_l z_l / sum_l n_l                 (size-weighted mean ratio)
    u_l  = (zbar - z_l) / max_l |zbar - z_l|         (in [-1, 1], size-weighted mean 0)
    budget_l = s + lam * u_l

so the block furthest from the mean sits exactly at s - lam or s + lam, and all equal ratios give s
everywhere. The OWL reference code instead min-max scales the ratios to [0, 2 lam] and subtracts their
*unweighted* mean: its budgets span exactly 2 lam but can leave [s - lam, s + lam] (one outlier block
among L gets s - 2 lam + 2 lam / L), and its mean is s only when all blocks have the same size. This map
keeps both promises; its span is 2 lam when the extreme ratios lie symmetric about the mean, less otherwise.

Published: LLaMA-1-7B at 70% unstructured, WikiText-2 perplexity: Wanda 85.8 -> 24.6 with OWL, SparseGPT
26.3 -> 19.5. The gains are mostly at 60-80% sparsity, small at 50%.
"""
from __future__ import annotations

import math
from typing import Dict, List, Mapping, Sequence

import torch

from ..selection import exact_count
from ..targets import Target
from ..validation import Problems, check_sparsity
from .wanda import wanda_scores

#: What OWL needs to rank blocks: the Wanda scores of every target (so Wanda's sum of squared inputs).
STATISTICS = ("sum_sq",)
DEFAULT_M = 5.0
DEFAULT_LAMBDA = 0.08


def outlier_ratio(scores_of_block: Sequence[torch.Tensor], m: float = DEFAULT_M) -> float:
    """Share of a block's scores (all its targets' score tensors together) strictly above ``m`` times
    their mean. Accumulates in float64; a block whose scores are all zero has ratio 0."""
    problems = Problems()
    if isinstance(m, bool) or not isinstance(m, (int, float)) or math.isnan(m) or not m > 0:
        problems.add(f"m (the outlier threshold, a multiple of the mean score) must be > 0, got {m!r}")
    tensors = list(scores_of_block) if not isinstance(scores_of_block, torch.Tensor) else [scores_of_block]
    if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
        problems.add(f"scores_of_block must be a non-empty list of score tensors, got {type(scores_of_block).__name__} "
                     f"of {[type(t).__name__ for t in tensors]}")
    problems.raise_if_any()
    total = sum(t.numel() for t in tensors)
    if total == 0:
        raise ValueError("scores_of_block holds no scores (every tensor is empty)")
    mean = sum(float(t.detach().sum(dtype=torch.float64)) for t in tensors) / total
    threshold = m * mean
    above = sum(int((t.detach().to(torch.float64) > threshold).sum()) for t in tensors)
    return above / total


def owl_budgets(
    ratios: Sequence[float], sizes: Sequence[int], sparsity: float, lam: float = DEFAULT_LAMBDA
) -> List[float]:
    """Per-block sparsities, affine in the outlier ratio (more outliers -> lower sparsity), each within
    [sparsity - lam, sparsity + lam], with size-weighted mean ``sparsity`` (see the module docstring).

    Args:
        ratios: outlier ratio of each block (:func:`outlier_ratio`).
        sizes: number of targeted weights in each block (the weights of the mean).
        sparsity: the overall target s in [0, 1).
        lam: the half-width of the budget range, in [0, min(s, 1 - s)] so every budget stays in [0, 1].
    """
    problems = Problems()
    check_sparsity(problems, "sparsity", sparsity)
    ratios = list(ratios)
    sizes = list(sizes)
    if len(ratios) != len(sizes) or not ratios:
        problems.add(f"ratios and sizes must be non-empty and of equal length (one per block), got "
                     f"{len(ratios)} ratios and {len(sizes)} sizes")
    bad_ratios = [r for r in ratios if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r)]
    if bad_ratios:
        problems.add(f"ratios must be finite numbers, got {bad_ratios!r}")
    bad_sizes = [n for n in sizes if isinstance(n, bool) or not isinstance(n, int) or n <= 0]
    if bad_sizes:
        problems.add(f"sizes must be positive integers (targeted weights per block), got {bad_sizes!r}")
    check_lambda(problems, lam, sparsity, "lam")
    problems.raise_if_any()

    total = sum(sizes)
    mean_ratio = math.fsum(n * z for n, z in zip(sizes, ratios)) / total
    offsets = [mean_ratio - z for z in ratios]
    spread = max(abs(d) for d in offsets)
    if spread == 0 or lam == 0:
        return [float(sparsity)] * len(ratios)
    units = [d / spread for d in offsets]
    # zbar is rounded, so sum n_l u_l can be a few ulps off 0: subtract that residue from every u_l (a shift
    # of ~1e-16 that keeps the order), then clip to [-1, 1] (a no-op unless by ulps).
    residue = math.fsum(n * u for n, u in zip(sizes, units)) / total
    units = [min(1.0, max(-1.0, u - residue)) for u in units]
    return [min(1.0, max(0.0, sparsity + lam * u)) for u in units]


def exact_counts(
    budgets: Sequence[float], target_sizes_per_block: Sequence[Sequence[int]], sparsity: float
) -> List[List[int]]:
    """How many weights each target prunes: integers whose grand total is exactly
    ``exact_count(sparsity, N)`` (= floor(s * N + 0.5), N = all targeted weights), each as close as
    possible to ``budget_of_its_block * numel`` (largest-remainder rounding; ties go to the earlier block,
    then the earlier target, so the result is deterministic). No count exceeds its target's numel.

    The budgets must average to ``sparsity`` over the targeted weights (as :func:`owl_budgets` makes them),
    up to rounding: a gap of more than one weight per target is an error, not silently absorbed.
    """
    problems = Problems()
    check_sparsity(problems, "sparsity", sparsity)
    budgets = list(budgets)
    blocks = [list(sizes) for sizes in target_sizes_per_block]
    if len(budgets) != len(blocks) or not budgets:
        problems.add(f"budgets and target_sizes_per_block must be non-empty and of equal length (one per block), "
                     f"got {len(budgets)} budgets and {len(blocks)} blocks")
    bad_budgets = [b for b in budgets if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 <= b <= 1]
    if bad_budgets:
        problems.add(f"budgets must be sparsities in [0, 1], got {bad_budgets!r}")
    bad_sizes = [n for sizes in blocks for n in sizes if isinstance(n, bool) or not isinstance(n, int) or n < 0]
    if bad_sizes or any(not sizes for sizes in blocks):
        problems.add(f"target_sizes_per_block must hold a non-empty list of target numels (ints >= 0) per block, "
                     f"got {[list(s) for s in blocks]!r}")
    problems.raise_if_any()

    total_weights = sum(n for sizes in blocks for n in sizes)
    goal = exact_count(sparsity, total_weights)
    ideal = [[b * n for n in sizes] for b, sizes in zip(budgets, blocks)]
    counts = [[min(n, max(0, math.floor(x))) for x, n in zip(row, sizes)] for row, sizes in zip(ideal, blocks)]
    flat = [(bi, ti) for bi, sizes in enumerate(blocks) for ti in range(len(sizes))]
    gap = math.fsum(x for row in ideal for x in row) - sparsity * total_weights
    if abs(gap) > len(flat) + 1:
        mean = math.fsum(x for row in ideal for x in row) / max(1, total_weights)
        raise ValueError(f"budgets average {mean:.6g} over the targeted weights but sparsity is {sparsity!r}: "
                         f"they must average to sparsity (as owl_budgets makes them)")
    missing = goal - sum(sum(row) for row in counts)

    def remainder(key):
        bi, ti = key
        return ideal[bi][ti] - counts[bi][ti]

    while missing != 0:  # one pass is enough unless the budgets are off by more than rounding
        step = 1 if missing > 0 else -1
        # add to the largest remainders first, or take from the smallest first; sorted() is stable on ties
        # (also with reverse=True), so ties keep block order, then target order
        order = sorted(flat, key=remainder, reverse=step > 0)
        changed = False
        for bi, ti in order:
            if missing == 0:
                break
            new = counts[bi][ti] + step
            if 0 <= new <= blocks[bi][ti]:
                counts[bi][ti] = new
                missing -= step
                changed = True
        if not changed:  # cannot happen: 0 <= goal <= total_weights
            raise RuntimeError("exact_counts could not place the prune counts")
    return counts


def check_lambda(problems: Problems, lam: object, sparsity: object, name: str = "owl_lambda") -> None:
    """``lam`` must lie in [0, min(s, 1 - s)] so that every budget stays in [0, 1]."""
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or math.isnan(lam):
        problems.add(f"{name} must be a number in [0, min(sparsity, 1 - sparsity)], got {lam!r}")
    elif isinstance(sparsity, (int, float)) and not isinstance(sparsity, bool) and 0 <= sparsity < 1:
        limit = min(sparsity, 1 - sparsity)
        if not 0 <= lam <= limit + 1e-12:  # 1 - 0.9 is 0.09999999999999998 in floats; lam = 0.1 is meant
            problems.add(f"{name} must be in [0, {limit:g}] = [0, min(sparsity, 1 - sparsity)] at sparsity "
                         f"{sparsity!r}, got {lam!r}")


def owl_target_counts(blocks: Sequence[Sequence[Target]], sum_sq: Mapping[str, torch.Tensor], sparsity: float,
                      lam: float = DEFAULT_LAMBDA, m: float = DEFAULT_M) -> tuple[Dict[str, int], List[float]]:
    """OWL end to end: each block's outlier ratio of its Wanda scores (``sum_sq``: Wanda's statistic per
    target), the budgets, and exact per-target prune counts. Returns (counts by target name, block budgets)."""
    ratios = [outlier_ratio([wanda_scores(t.out_in(t.weight), sum_sq[t.name]) for t in block], m) for block in blocks]
    sizes = [sum(t.numel for t in block) for block in blocks]
    budgets = owl_budgets(ratios, sizes, sparsity, lam)
    counts = exact_counts(budgets, [[t.numel for t in block] for block in blocks], sparsity)
    return {t.name: k for block, ks in zip(blocks, counts) for t, k in zip(block, ks)}, budgets


def monotone_counts(desired: Mapping[str, int], current: Mapping[str, int]) -> Dict[str, int]:
    """Counts that never go below what a target has already pruned (masks only grow), with the same total
    as ``desired`` where that is possible: targets raised to their current count are paid for by the others,
    in proportion to how far each is above its own current count (largest remainder, ties to the earlier)."""
    counts = {name: max(k, current.get(name, 0)) for name, k in desired.items()}
    excess = sum(counts.values()) - sum(desired.values())
    room = {name: counts[name] - current.get(name, 0) for name in counts}
    total_room = sum(room.values())
    if excess <= 0 or total_room == 0:
        return counts
    excess = min(excess, total_room)
    shares = {name: excess * r / total_room for name, r in room.items()}
    taken = {name: min(room[name], math.floor(share)) for name, share in shares.items()}
    left = excess - sum(taken.values())
    for name in sorted(counts, key=lambda n: -(shares[n] - taken[n])):  # stable: ties keep the earlier target
        if left == 0:
            break
        if taken[name] < room[name]:
            taken[name] += 1
            left -= 1
    return {name: counts[name] - taken[name] for name in counts}
