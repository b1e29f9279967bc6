"""Pruning weights sharded by rows across ranks (FSDP2's ``fully_shard``): their scores and the mask rule.

The tensor helpers (:func:`~gradprune.shards.local`, :func:`~gradprune.shards.row_shard`, ...) live in
:mod:`gradprune.shards` and are importable from here too.

- :func:`select_sharded_masks` is :func:`gradprune.select_masks` for such weights, with the same result
  as one process holding every whole tensor (the exact count, lowest scores first, ties to the earlier
  target and the lower flat index). Scope ``row`` needs no communication: a row never spans ranks.
  Scopes ``layer`` and ``global`` find the k-th smallest score with the radix selection of
  :mod:`gradprune.kselect` on histograms summed over the ranks (two all-reduces of 65536 int64 bins:
  the high 16 bits of the float32 order keys, then the low 16 bits inside the bin holding the k-th value,
  which makes the threshold exact), then one all-reduce of how many scores equal the threshold on each
  rank of each target, so every rank knows how many of its ties to prune (ties go to the earlier target,
  then the lower rank, then the lower local index: the flat order of the whole tensors).
- :func:`sharded_scores`: the train-time scorers that work on local rows (:data:`SHARDED_SCORERS`).

Every function here that takes a sharded weight is a collective: all ranks of the group call it, in the
same order, with the same targets.
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence

import torch
import torch.distributed as dist

from .kselect import drop_lowest, drop_lowest_over, order_keys
from .methods.ria import ria_scores
from .methods.wanda import wanda_scores
from .selection import keep_masks_by_scope, prepare_scores, validate_selection
from .shards import (RowShard, count_pruned, count_zeros, full_mask, is_sharded, local, local_rows, local_shape,
                     one_group, placement_problem, row_shard, sum_over)
from .targets import Target

#: Train-time scorers that work on row-sharded weights: magnitude (|W|, local), wanda (|W| times the
#: all-reduced per-input-column activation norm, local), ria (its column sums are all-reduced too).
SHARDED_SCORERS = ("magnitude", "wanda", "ria")

__all__ = [
    "SHARDED_SCORERS", "RowShard", "count_pruned", "count_zeros", "full_mask", "is_sharded", "local", "local_rows",
    "local_shape", "placement_problem", "row_shard", "select_sharded_masks", "sharded_scores",
]


# -- scores -------------------------------------------------------------------------------------------------
def sharded_scores(scorer: str, target: Target, statistic: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Scores of the rows of ``target`` held here, (local_rows, in_features), for a scorer of
    :data:`SHARDED_SCORERS`; ``statistic`` is the (all-reduced) per-input-column ``sum x^2`` of wanda / ria.
    A collective for ``ria`` on a sharded weight (its column sums are all-reduced)."""
    if target.transposed:
        raise ValueError(f"{target.name!r} is stored (in, out) (GPT-2 Conv1D): sharded pruning needs (out, in) weights")
    weight = local(target.weight.detach())
    if scorer == "magnitude":
        return weight.abs()
    if scorer == "wanda":
        return wanda_scores(weight, statistic)
    if scorer == "ria":
        columns = weight.abs().to(torch.float32).sum(dim=0)
        shard = row_shard(target.weight)
        if shard is not None:
            dist.all_reduce(columns, group=shard.group)
        return ria_scores(weight, statistic, column_sums=columns)
    raise ValueError(f"scorer {scorer!r} is not supported on sharded weights: use one of {list(SHARDED_SCORERS)}")


# -- selection ----------------------------------------------------------------------------------------------
LocalScoreFn = Callable[[Target], torch.Tensor]


def select_sharded_masks(
    targets: Sequence[Target],
    sparsity: float,
    score_fn: Optional[LocalScoreFn] = None,
    scope: str = "layer",
    pattern: str = "unstructured",
    masks: Optional[Mapping[str, torch.Tensor]] = None,
    rounding: str = "nearest",
) -> dict[str, torch.Tensor]:
    """Keep-masks of the rows held here, exactly those :func:`gradprune.select_masks` would give one
    process holding the whole tensors with the same scores.

    Args:
        targets: (out, in) weights, row-sharded DTensors or tensors every rank holds whole (mixed is fine).
        sparsity: fraction of each comparison group to prune, in [0, 1).
        score_fn: maps a target to the scores of its local rows, shaped like them (default ``|W|``; see
            :func:`sharded_scores`).
        scope: "layer", "global" or "row", as in :func:`gradprune.select_masks`.
        pattern: "unstructured" or "N:M" (N:M groups run along a row, so they are local).
        masks: current local keep-masks by target name; the result only ever removes more weights.
        rounding: "nearest" or "floor", as in :func:`gradprune.select_masks`.

    A collective for sharded targets with scope "layer" or "global": every rank of the shard group calls it
    with the same targets in the same order. Nothing is modified.
    """
    nm = validate_selection(targets, sparsity, scope, pattern, rounding)
    masks = masks or {}
    problems = [p for p in (placement_problem(t.name, t.weight) for t in targets) if p]
    problems += [f"{t.name!r} is stored (in, out) (GPT-2 Conv1D)" for t in targets if t.transposed]
    if problems:
        raise ValueError("sharded selection needs (out, in) weights sharded along rows: " + "; ".join(problems))
    if score_fn is None:
        score_fn = lambda t: sharded_scores("magnitude", t)  # noqa: E731

    def prepared(t: Target) -> torch.Tensor:
        raw = score_fn(t)
        expected = local_shape(t.weight)
        if tuple(raw.shape) != expected:
            raise ValueError(f"scores for {t.name!r} have shape {tuple(raw.shape)}, expected the local rows' {expected}")
        keep = masks.get(t.name)
        return prepare_scores(t.name, raw, None if keep is None else keep.to(raw.device), nm)

    def drop_layer(t: Target, k: int) -> torch.Tensor:
        if row_shard(t.weight) is None:
            return drop_lowest(prepared(t), k)
        return _drop_lowest_sharded([t], prepared, k)[0]

    def drop_global(k: int) -> list[torch.Tensor]:
        if any(row_shard(t.weight) is not None for t in targets):
            return _drop_lowest_sharded(targets, prepared, k)
        return drop_lowest_over(lambda: (prepared(t) for t in targets), k)

    return keep_masks_by_scope(targets, sparsity, scope, rounding, masks, prepared, drop_layer, drop_global)


_BINS = 65536


def _drop_lowest_sharded(targets: Sequence[Target], prepared: Callable[[Target], torch.Tensor], k: int) -> list[torch.Tensor]:
    """Local keep-masks dropping exactly the k lowest scores over the whole tensors of ``targets`` (some
    row-sharded, some whole on every rank), ties to the earlier target, then the lower row and column: the
    flat order one process would use. Histograms and tie counts are summed over the shard group."""
    group = one_group([t.weight for t in targets if row_shard(t.weight) is not None])
    shards = [row_shard(t.weight) for t in targets]
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    # A weight held whole on every rank is counted once, as if rank 0 held it.
    counts_here = [s is not None or rank == 0 for s in shards]
    if k <= 0:
        return [torch.ones(local_shape(t.weight), dtype=torch.bool, device=local(t.weight).device) for t in targets]

    def histogram(select) -> torch.Tensor:
        total = torch.zeros(_BINS, dtype=torch.int64)
        for t, counted in zip(targets, counts_here):
            if counted:
                keys = order_keys(prepared(t).reshape(-1))
                values = select(keys)
                if values.numel():
                    total += torch.bincount(values, minlength=_BINS).cpu()
        dist.all_reduce(total, group=group)
        return total

    cum = histogram(lambda keys: (keys >> 16) + 32768).cumsum(0)
    high = int(torch.searchsorted(cum, torch.tensor(k)))
    below = int(cum[high - 1]) if high > 0 else 0
    cum = histogram(lambda keys: keys[(keys >> 16) == high - 32768] & 0xFFFF).cumsum(0)
    low = int(torch.searchsorted(cum, torch.tensor(k - below)))
    below += int(cum[low - 1]) if low > 0 else 0
    threshold = (high - 32768) * 65536 + low
    # Ties: how many scores equal the threshold on each rank of each target, summed over ranks, decide
    # how many of its own each rank prunes (flat order: target, then rank, then local position).
    keeps, equals, table = [], [], [0] * (len(targets) * size)
    for i, (t, counted) in enumerate(zip(targets, counts_here)):
        keys = order_keys(prepared(t))
        keeps.append(keys > threshold)
        equals.append(keys == threshold)
        if counted:
            table[i * size + (rank if shards[i] is not None else 0)] = int(equals[-1].sum())
    table = sum_over(group, table)
    ties = k - below
    for i in range(len(targets)):
        slot = rank if shards[i] is not None else 0
        for r in range(size):
            take = min(ties, table[i * size + r])
            if r == slot:
                positions = equals[i].reshape(-1).nonzero().flatten()
                keeps[i].reshape(-1)[positions[take:]] = True
            ties -= take
    return keeps
