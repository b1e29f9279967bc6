"""Weights sharded by rows across ranks (FSDP2's ``fully_shard``): the helpers and the mask rule for them.

FSDP2 keeps every parameter as a DTensor sharded along dim 0 (its rows; a Linear's output features)
across the ranks of its device mesh: rank ``r`` of ``n`` holds rows ``[r * c, min((r + 1) * c, rows))``
with ``c = ceil(rows / n)`` (``torch.chunk``'s split). The pruning core works on those local rows:

- :func:`local` is a tensor's local part (the tensor itself when it is not a DTensor); masks of a sharded
  weight are bool tensors shaped like its local rows, and enforcement, optimizer-state resets and scores
  all act on local tensors.
- :func:`row_shard` says which rows a rank holds and over which process group the rows are spread
  (None for a weight every rank holds whole). Placements other than ``Shard(0)`` and ``Replicate``
  (tensor parallelism's column or row splits, ``Partial``) are refused with a ValueError.
- :func:`select_sharded_masks` is :func:`gradprune.select_masks` for such weights, with the same result
  as one process holding every whole tensor (the exact count, lowest scores first, ties to the earlier
  target and the lower flat index). Scope ``row`` needs no communication: a row never spans ranks.
  Scopes ``layer`` and ``global`` find the k-th smallest score with the radix selection of
  :mod:`gradprune.selection` on histograms summed over the ranks (two all-reduces of 65536 int64 bins:
  the high 16 bits of the float32 order keys, then the low 16 bits inside the bin holding the k-th value,
  which makes the threshold exact), then one all-reduce of how many scores equal the threshold on each
  rank of each target, so every rank knows how many of its ties to prune (ties go to the earlier target,
  then the lower rank, then the lower local index: the flat order of the whole tensors).
- :func:`full_mask` gathers a whole mask from the shards (checkpoints hold whole masks) and
  :func:`local_rows` slices a whole tensor to a rank's rows (a resumed run's masks).
- :func:`count_zeros` and :func:`count_pruned` count over all shards (all-reduced), for sparsity reports.

Every function here that takes a sharded weight is a collective: all ranks of the group call it, in the
same order, with the same targets.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import torch
import torch.distributed as dist

from .targets import Target


def _dtensor_class():
    """DTensor if torch's DTensor module is loaded, else None: no tensor can be a DTensor before it is, and
    importing it costs about 0.4 s (and needs a torch built with distributed support), so it is not
    imported here."""
    for name in ("torch.distributed.tensor", "torch.distributed._tensor"):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "DTensor"):
            return module.DTensor
    return None


def _placements():
    """(Shard, Replicate), from the loaded DTensor module (only asked about DTensors, so it is loaded)."""
    try:
        from torch.distributed.tensor import Replicate, Shard
    except ImportError:  # pragma: no cover - torch 2.4
        from torch.distributed._tensor import Replicate, Shard  # type: ignore
    return Shard, Replicate

#: Train-time scorers that work on row-sharded weights: magnitude (|W|, local), wanda (|W| times the
#: all-reduced per-input-column activation norm, local), ria (its column sums are all-reduced too).
SHARDED_SCORERS = ("magnitude", "wanda", "ria")


def is_sharded(tensor: object) -> bool:
    """Whether ``tensor`` is a DTensor (FSDP2's parameters, their gradients and optimizer state)."""
    cls = _dtensor_class()
    return cls is not None and isinstance(tensor, cls)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The rank's local part of a DTensor (its storage: in-place changes reach the DTensor), or the tensor
    itself. Taken outside autograd."""
    if is_sharded(tensor):
        with torch.no_grad():
            return tensor.to_local()
    return tensor


@dataclass(frozen=True)
class RowShard:
    """Which rows of a row-sharded weight this rank holds, and the ranks the rows are spread over."""

    rows: int  # rows of the whole tensor
    offset: int  # first row held here
    local_rows: int
    group: object  # the process group of the sharded mesh dimension
    size: int  # ranks in that group
    rank: int  # this rank's index in it


def placement_problem(name: str, weight: torch.Tensor) -> Optional[str]:
    """Why ``weight`` (a target's weight) cannot be pruned sharded, or None: only ``Shard(0)`` (FSDP2's
    rows) on one mesh dimension, and ``Replicate`` on others (HSDP), are supported."""
    if not is_sharded(weight):
        return None
    Shard, Replicate = _placements()
    placements = tuple(weight.placements)
    shards = [p for p in placements if isinstance(p, Shard)]
    others = [p for p in placements if not isinstance(p, (Shard, Replicate))]
    if others or any(p.dim != 0 for p in shards) or len(shards) > 1:
        return (f"{name!r} has placements {placements} on mesh {tuple(weight.device_mesh.mesh.shape)}: only weights "
                "sharded along their rows (Shard(0), as fully_shard does) on one mesh dimension are supported, not "
                "tensor parallelism (column or row splits, Partial)")
    return None


def row_shard(weight: torch.Tensor) -> Optional[RowShard]:
    """The rows this rank holds of a row-sharded DTensor ``weight``; None when every rank holds it whole
    (a plain tensor, or a DTensor only replicated)."""
    if not is_sharded(weight):
        return None
    problem = placement_problem("the weight", weight)
    if problem is not None:
        raise ValueError(problem)
    Shard, _ = _placements()
    placements = tuple(weight.placements)
    dims = [i for i, p in enumerate(placements) if isinstance(p, Shard)]
    if not dims:
        return None
    mesh, dim = weight.device_mesh, dims[0]
    size, rank = mesh.size(dim), mesh.get_local_rank(dim)
    rows = weight.shape[0]
    chunk = -(-rows // size)
    offset = min(rank * chunk, rows)
    local_rows = weight.to_local().shape[0]
    if local_rows != max(0, min(chunk, rows - offset)):  # not torch.chunk's split: nothing here would be right
        raise ValueError(f"a weight of {rows} rows sharded over {size} ranks holds {local_rows} rows on rank {rank}, "
                         f"expected torch.chunk's split ({chunk} per rank)")
    return RowShard(rows, offset, local_rows, mesh.get_group(dim), size, rank)


def local_rows(whole: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The rows of ``whole`` (shaped like the whole ``weight``) that this rank holds of ``weight``."""
    shard = row_shard(weight)
    if shard is None:
        return whole
    return whole[shard.offset:shard.offset + shard.local_rows]


def local_shape(weight: torch.Tensor) -> tuple:
    """The shape of the part of ``weight`` held here (masks of sharded weights have it)."""
    return tuple(local(weight).shape)


def full_mask(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The whole bool mask of ``weight`` from every rank's local ``mask`` (a collective over the weight's
    shard group; every rank gets it, on the CPU). A weight held whole returns ``mask``."""
    shard = row_shard(weight)
    if shard is None:
        return mask
    chunk = -(-shard.rows // shard.size)
    padded = torch.zeros((chunk, *mask.shape[1:]), dtype=torch.uint8)
    padded[:mask.shape[0]] = mask.detach().cpu().to(torch.uint8)
    parts = [torch.empty_like(padded) for _ in range(shard.size)]
    dist.all_gather(parts, padded, group=shard.group)
    return torch.cat(parts)[:shard.rows].to(torch.bool)


def _sum_over(group, values: list[int], device=None) -> list[int]:
    tensor = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(tensor, group=group)
    return [int(v) for v in tensor.tolist()]


def count_pruned(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[int]:
    """Pruned (False) entries of each (weight, local mask) pair, over all shards of the weight (one
    all-reduce for all sharded pairs; every rank gets the same numbers)."""
    return _count(pairs, lambda weight, mask: int(mask.numel() - mask.count_nonzero()))


def count_zeros(weights: Sequence[torch.Tensor]) -> list[int]:
    """Exact zeros of each weight over all its shards (one all-reduce for all sharded weights)."""
    return _count([(w, None) for w in weights], lambda weight, _: int(local(weight).numel() - torch.count_nonzero(local(weight))))


def _count(pairs, count) -> list[int]:
    with torch.no_grad():
        counts = [count(weight, mask) for weight, mask in pairs]
    sharded = [i for i, (weight, _) in enumerate(pairs) if row_shard(weight) is not None]
    if sharded:
        group = _one_group([pairs[i][0] for i in sharded])
        for i, total in zip(sharded, _sum_over(group, [counts[i] for i in sharded])):
            counts[i] = total
    return counts


def _one_group(weights: Sequence[torch.Tensor]):
    """The shard group shared by these row-sharded weights (ValueError if they are spread differently)."""
    meshes = {id(w.device_mesh): w for w in weights}
    first = weights[0]
    for w in meshes.values():
        if w.device_mesh != first.device_mesh or tuple(w.placements) != tuple(first.placements):
            raise ValueError(f"targets are sharded over different device meshes or placements ({first.device_mesh}, "
                             f"{first.placements} and {w.device_mesh}, {w.placements}): prune them in separate calls")
    return row_shard(first).group


# -- scores -------------------------------------------------------------------------------------------------
def sharded_scores(scorer: str, target: Target, statistic: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Scores of the rows of ``target`` held here, (local_rows, in_features), for a scorer of
    :data:`SHARDED_SCORERS`; ``statistic`` is the (all-reduced) per-input-column ``sum x^2`` of wanda / ria.
    A collective for ``ria`` on a sharded weight (its column sums are all-reduced)."""
    from .methods.ria import ria_scores
    from .methods.wanda import wanda_scores

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
    from .selection import _drop_lowest, _drop_lowest_per_row, exact_count, prepare_scores, validate_selection

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

    keeps: dict[str, torch.Tensor] = {}
    if scope == "row":
        for t in targets:
            keeps[t.name] = _drop_lowest_per_row(prepared(t), exact_count(sparsity, t.in_features, rounding))
    elif scope == "layer":
        for t in targets:
            k = exact_count(sparsity, t.numel, rounding)
            if row_shard(t.weight) is None:
                keeps[t.name] = _drop_lowest(lambda: iter([prepared(t)]), k)[0]
            else:
                keeps[t.name] = _drop_lowest_sharded([t], prepared, k)[0]
    else:
        k = exact_count(sparsity, sum(t.numel for t in targets), rounding)
        if any(row_shard(t.weight) is not None for t in targets):
            keeps = dict(zip((t.name for t in targets), _drop_lowest_sharded(targets, prepared, k)))
        else:
            keeps = dict(zip((t.name for t in targets), _drop_lowest(lambda: (prepared(t) for t in targets), k)))
    result = {}
    for t in targets:
        keep = keeps.pop(t.name).contiguous()
        if t.name in masks:
            keep &= masks[t.name].to(keep.device)
        result[t.name] = keep
    return result


_BINS = 65536


def _drop_lowest_sharded(targets: Sequence[Target], prepared: Callable[[Target], torch.Tensor], k: int) -> list[torch.Tensor]:
    """Local keep-masks dropping exactly the k lowest scores over the whole tensors of ``targets`` (some
    row-sharded, some whole on every rank), ties to the earlier target, then the lower row and column: the
    flat order one process would use. Histograms and tie counts are summed over the shard group."""
    from .selection import _order_keys

    group = _one_group([t.weight for t in targets if row_shard(t.weight) is not None])
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
                keys = _order_keys(prepared(t).reshape(-1))
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
        keys = _order_keys(prepared(t))
        keeps.append(keys > threshold)
        equals.append(keys == threshold)
        if counted:
            table[i * size + (rank if shards[i] is not None else 0)] = int(equals[-1].sum())
    table = _sum_over(group, table)
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
