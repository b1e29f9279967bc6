"""Mask selection: which weights to prune, given scores and a target sparsity.

The rule, in one place:

- In every comparison group exactly ``exact_count(sparsity, group_size) = floor(sparsity * size + 0.5)``
  (at most ``size - 1``: rounding never empties a group) elements are pruned: the lowest scores, ties broken by position (lower index first, and for the
  ``global`` scope earlier targets first). The group is each weight tensor (``layer``), all targets
  together (``global``) or each output row (``row``, Wanda's group).
- Masks are monotone: weights pruned by an earlier mask are pruned again first (their score is treated as
  -inf), so moving from s_prev to s removes (s - s_prev) / (1 - s_prev) of what remains and the cumulative
  count is still exact.
- ``N:M`` patterns allow at most N pruned weights in every M consecutive weights along the input
  dimension: only the N lowest of each group of M are candidates. At sparsity N/M every group has exactly
  N pruned; below it (a gradual ramp) the count is still exact and no group exceeds N.

Scores are float32 copies made one target at a time. The global scope never concatenates scores: it finds
the k-th smallest score by radix selection over float32's ordered bit patterns (two counting passes of
16 bits each), then marks the pruned weights in a third pass, each pass reading a target's scores as the
score function returned them, in chunks of 2^17 elements prepared one at a time (no float32 copy of a
whole tensor), so its extra memory is the masks plus the largest target's scores and about a MB, with no sort and no torch.quantile size
limit; the time is linear in the number of weights (scripts/bench_scale.py).
"""
from __future__ import annotations

import math
from typing import Callable, Iterator, Literal, Mapping, Optional, Sequence

import torch

from .masks import fill_pruned_
from .targets import Target
from .validation import Problems, check_choice, check_pattern, check_sparsity

Scope = Literal["layer", "global", "row"]
SCOPES = ("layer", "global", "row")
ScoreFn = Callable[[Target], torch.Tensor]


Rounding = Literal["nearest", "floor"]
ROUNDINGS = ("nearest", "floor")


def exact_count(sparsity: float, size: int, rounding: Rounding = "nearest") -> int:
    """How many of ``size`` elements a group at ``sparsity`` prunes: round half up, or with
    ``rounding="floor"`` ``int(sparsity * size)`` (the Wanda reference's per-row count)."""
    if rounding == "floor":
        count = int(sparsity * size)
    else:
        count = int(math.floor(sparsity * size + 0.5))
    # rounding never removes a whole group unless 100% was asked for (a 1-weight row at 0.5, say)
    return min(count, size - 1) if sparsity < 1 and size > 0 else count


def validate_selection(targets: Sequence[Target], sparsity: float, scope: str, pattern: str,
                       rounding: str = "nearest") -> Optional[tuple[int, int]]:
    """Check selection arguments against the targets; return the parsed N:M pattern (or None).

    Callers that select many times with the same arguments (block by block) check once here and then
    call :func:`select_masks_unchecked`."""
    problems = Problems()
    check_sparsity(problems, "sparsity", sparsity)
    check_choice(problems, "scope", scope, SCOPES)
    check_choice(problems, "rounding", rounding, ROUNDINGS)
    problems.raise_if_any()
    nm = check_pattern(problems, pattern, "sparsity", sparsity)
    problems.raise_if_any()
    if nm is not None:
        for t in targets:
            if t.in_features % nm[1]:
                raise ValueError(
                    f"pattern {pattern!r}: layer {t.name!r} has in_features={t.in_features}, not divisible by M={nm[1]}"
                )
    return nm


def _prepared_scores(target: Target, score_fn: ScoreFn, keep: Optional[torch.Tensor], nm) -> torch.Tensor:
    """Float32 (out, in) scores of one target with already-pruned weights at -inf and, for N:M, the
    weights that may not be pruned at +inf. Always a fresh tensor."""
    raw = score_fn(target)
    if raw.shape != target.weight.shape:
        raise ValueError(f"scores for {target.name!r} have shape {tuple(raw.shape)}, expected {tuple(target.weight.shape)}")
    return prepare_scores(target.name, target.out_in(raw), None if keep is None else target.out_in(keep), nm)


def prepare_scores(name: str, view: torch.Tensor, keep: Optional[torch.Tensor], nm) -> torch.Tensor:
    """A fresh float32 copy of the (out, in) scores ``view`` with -0.0 as +0.0, NaN refused, the weights
    pruned by the (out, in) ``keep`` at -inf and, for N:M, the weights that may not be pruned at +inf
    (the preparation of every scope; :mod:`gradprune.sharding` calls it on a shard's rows)."""
    scores = torch.empty(view.shape, dtype=torch.float32, device=view.device)
    scores.copy_(view)
    del view
    scores += 0.0  # -0.0 -> +0.0 so that equal scores compare equal bit for bit
    if scores.isnan().any():
        raise ValueError(f"scores for {name!r} contain NaN")
    if keep is not None:
        fill_pruned_(scores, keep, float("-inf"))
    if nm is not None:
        n, m = nm
        grouped = scores.view(scores.shape[0], -1, m)
        order = grouped.argsort(dim=-1, stable=True)
        candidate = torch.zeros_like(grouped, dtype=torch.bool)
        candidate.scatter_(-1, order[..., :n], True)
        candidate |= grouped == float("-inf")
        grouped.masked_fill_(~candidate, float("inf"))
    return scores


# Elements per chunk of the radix passes: their temporaries (about 9 bytes per element, 1.2 MB) stay small
# next to any weight worth pruning, and chunks are large enough that the per-chunk overhead is negligible.
_CHUNK = 1 << 17


def _order_keys(scores: torch.Tensor) -> torch.Tensor:
    """int32 keys whose integer order is the float order of ``scores`` (float32, no NaN): the bits of
    non-negative floats as they are, those of negative floats with all but the sign bit flipped."""
    bits = scores.view(torch.int32)
    return ((bits >> 31) & 0x7FFFFFFF).bitwise_xor_(bits)


class _ChunkedScores:
    """A target's raw scores (as the score function returned them, stored (out, in)) prepared chunk by
    chunk as :func:`_prepared_scores` prepares a whole tensor: float32, -0.0 as +0.0, NaN refused, pruned
    weights at -inf. The global scope's way to avoid a float32 copy of each target's scores."""

    def __init__(self, target: Target, score_fn: ScoreFn, keep: Optional[torch.Tensor]) -> None:
        raw = score_fn(target)
        if raw.shape != target.weight.shape:
            raise ValueError(f"scores for {target.name!r} have shape {tuple(raw.shape)}, expected {tuple(target.weight.shape)}")
        self.name, self.raw, self.keep = target.name, raw.reshape(-1), keep
        self.shape, self.device = raw.shape, raw.device

    def chunks(self) -> Iterator[torch.Tensor]:
        keep = self.keep.reshape(-1) if self.keep is not None else None
        for start in range(0, self.raw.numel(), _CHUNK):
            chunk = self.raw[start:start + _CHUNK].to(torch.float32, copy=True)
            chunk += 0.0  # -0.0 -> +0.0 so that equal scores compare equal bit for bit
            if chunk.isnan().any():
                raise ValueError(f"scores for {self.name!r} contain NaN")
            if keep is not None:
                fill_pruned_(chunk, keep[start:start + _CHUNK], float("-inf"))
            yield chunk


def _chunks(scores) -> Iterator[torch.Tensor]:
    if isinstance(scores, _ChunkedScores):
        yield from scores.chunks()
        return
    flat = scores.reshape(-1)
    for start in range(0, flat.numel(), _CHUNK):
        yield flat[start:start + _CHUNK]


def _drop_lowest(score_tensors: Callable[[], Iterator[torch.Tensor]], k: int) -> list[torch.Tensor]:
    """Keep-masks (bool) that drop exactly the k lowest elements over all tensors yielded by
    ``score_tensors()`` (called up to three times); ties go to the earlier tensor and lower flat index.
    Each tensor is read in chunks of :data:`_CHUNK` elements, so the temporaries do not grow with it."""
    if k <= 0:
        return [torch.ones(s.shape, dtype=torch.bool, device=s.device) for s in score_tensors()]
    # Passes 1 and 2: histograms of the high, then (within the chosen bucket) the low 16 bits of the keys
    # locate the k-th smallest key exactly.
    high_counts = None
    for scores in score_tensors():
        for chunk in _chunks(scores):
            high = _order_keys(chunk).bitwise_right_shift_(16).add_(32768)
            counts = torch.bincount(high, minlength=65536)
            high_counts = counts if high_counts is None else high_counts.add_(counts.to(high_counts.device))
        del scores
    cum = high_counts.cumsum(0)
    high_bucket = int(torch.searchsorted(cum, torch.tensor(k, device=cum.device)))
    below = int(cum[high_bucket - 1]) if high_bucket > 0 else 0
    low_counts = None
    for scores in score_tensors():
        for chunk in _chunks(scores):
            keys = _order_keys(chunk)
            low = keys[(keys >> 16) == high_bucket - 32768].bitwise_and_(0xFFFF)
            counts = torch.bincount(low, minlength=65536)
            low_counts = counts if low_counts is None else low_counts.add_(counts.to(low_counts.device))
        del scores
    cum = low_counts.cumsum(0)
    low_bucket = int(torch.searchsorted(cum, torch.tensor(k - below, device=cum.device)))
    below += int(cum[low_bucket - 1]) if low_bucket > 0 else 0
    threshold = (high_bucket - 32768) * 65536 + low_bucket
    # Pass 3: drop everything below the k-th key, and the first `ties` elements equal to it.
    ties = k - below
    keeps = []
    for scores in score_tensors():
        keep = torch.empty(scores.shape, dtype=torch.bool, device=scores.device)
        for chunk, kept in zip(_chunks(scores), _chunks(keep)):
            keys = _order_keys(chunk)
            torch.gt(keys, threshold, out=kept)
            equal = keys == threshold
            if ties > 0:
                positions = equal.nonzero().flatten()
                kept[positions[ties:]] = True
                ties -= min(ties, positions.numel())
            else:
                kept |= equal
        keeps.append(keep)
        del scores
    return keeps


def drop_lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask dropping exactly the ``k`` lowest elements of one float32 tensor (ties to the lower flat
    index): the layer rule, for callers that select inside their own groups (SparseGPT's column blocks)."""
    return _drop_lowest(lambda: iter([scores]), k)[0]


def drop_lowest_per_row(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask dropping exactly the ``k`` lowest of every row (ties to the lower column): the row rule."""
    return _drop_lowest_per_row(scores, k)


def _drop_lowest_per_row(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask dropping exactly the k lowest of every row (ties to the lower column)."""
    if k <= 0:
        return torch.ones_like(scores, dtype=torch.bool)
    kth = scores.kthvalue(k, dim=1, keepdim=True).values
    pruned = scores < kth
    equal = scores == kth
    missing = k - pruned.sum(dim=1, keepdim=True)
    pruned |= equal & (equal.cumsum(dim=1) <= missing)
    return pruned.logical_not_()


def _drop_count(scores: torch.Tensor, k: int, scope: Scope) -> torch.Tensor:
    """Keep-mask of one (out, in) score matrix dropping exactly ``k``: the lowest of the layer, or spread
    over the rows (``k // out`` each, one more in the first ``k % out`` rows)."""
    if scope != "row":
        return _drop_lowest(lambda: iter([scores]), k)[0]
    per_row, extra = divmod(k, scores.shape[0])
    if extra == 0:
        return _drop_lowest_per_row(scores, per_row)
    return torch.cat([_drop_lowest_per_row(scores[:extra], per_row + 1), _drop_lowest_per_row(scores[extra:], per_row)])


def select_masks(
    targets: Sequence[Target],
    sparsity: float,
    score_fn: Optional[ScoreFn] = None,
    scope: Scope = "layer",
    pattern: str = "unstructured",
    masks: Optional[Mapping[str, torch.Tensor]] = None,
    rounding: Rounding = "nearest",
    counts: Optional[Mapping[str, int]] = None,
) -> dict[str, torch.Tensor]:
    """Keep-masks (bool, True = kept, shaped like each stored weight) at exactly ``sparsity``.

    Args:
        targets: from :func:`gradprune.find_targets`.
        sparsity: fraction of each comparison group to prune, in [0, 1).
        score_fn: maps a target to scores shaped like its stored weight; low scores are pruned first.
            Default: ``|W|`` (:func:`gradprune.methods.magnitude.magnitude_scores`).
        scope: comparison group: "layer", "global" or "row".
        pattern: "unstructured" or "N:M" (e.g. "2:4").
        masks: current keep-masks by target name; the result only ever removes more weights.
        rounding: how a group's count is rounded: "nearest" (half up, the default) or "floor"
            (``int(sparsity * size)``, as the Wanda reference does per row).
        counts: per-target numbers of weights to prune (layer budgets such as OWL's), instead of
            ``sparsity``; scope "layer" or "row", unstructured only.

    Nothing is modified: the caller applies the masks (see :class:`gradprune.MaskRegistry`).
    """
    nm = validate_selection(targets, sparsity, scope, pattern, rounding)
    if score_fn is None:
        from .methods.magnitude import magnitude_scores as score_fn  # the methods build on this module
    return select_masks_unchecked(targets, sparsity, score_fn, scope, nm, masks, rounding, counts)


def select_masks_unchecked(
    targets: Sequence[Target],
    sparsity: float,
    score_fn: ScoreFn,
    scope: Scope,
    nm: Optional[tuple[int, int]],
    masks: Optional[Mapping[str, torch.Tensor]] = None,
    rounding: Rounding = "nearest",
    counts: Optional[Mapping[str, int]] = None,
) -> dict[str, torch.Tensor]:
    """:func:`select_masks` for arguments already checked by :func:`validate_selection` (``nm`` is what
    it returned, None for unstructured): the one-shot pipeline checks once and then selects per block.

    ``counts`` (per-target budgets such as OWL's) replaces ``sparsity``: target ``t`` prunes exactly
    ``counts[t.name]`` weights (already-pruned ones included): its lowest scores with scope "layer", or with
    scope "row" ``k // out`` per row and one more in the first ``k % out`` rows. Not with "global" or N:M."""
    masks = masks or {}
    if counts is not None and (scope == "global" or nm is not None):
        raise ValueError(f"per-target counts (layer budgets) work with scope 'layer' or 'row' and unstructured "
                         f"patterns, got scope={scope!r}, pattern N:M={nm}")

    def prepared(t: Target) -> torch.Tensor:
        return _prepared_scores(t, score_fn, masks.get(t.name), nm)

    keep_by_name: dict[str, torch.Tensor] = {}
    if scope == "global":
        k = exact_count(sparsity, sum(t.numel for t in targets), rounding)
        def scores(t: Target):  # unstructured, stored (out, in): prepared chunk by chunk, no float32 copy
            if nm is None and not t.transposed:
                return _ChunkedScores(t, score_fn, masks.get(t.name))
            return prepared(t)

        keeps = _drop_lowest(lambda: (scores(t) for t in targets), k)
        keep_by_name = {t.name: keep for t, keep in zip(targets, keeps)}
        del keeps
    else:
        for t in targets:
            scores = prepared(t)
            if counts is not None:
                keep_by_name[t.name] = _drop_count(scores, counts[t.name], scope)
            elif scope == "row":
                keep_by_name[t.name] = _drop_lowest_per_row(scores, exact_count(sparsity, t.in_features, rounding))
            else:
                keep_by_name[t.name] = _drop_lowest(lambda: iter([scores]), exact_count(sparsity, t.numel, rounding))[0]
            del scores

    result = {}
    for t in targets:
        keep = t.stored(keep_by_name.pop(t.name)).contiguous()
        if t.name in masks:
            keep &= masks[t.name].to(keep.device)
        result[t.name] = keep
    return result
