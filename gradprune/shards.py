"""Weights sharded by rows across ranks (FSDP2's ``fully_shard``): the tensor helpers the rest of the core
builds on. No other gradprune module is imported here.

FSDP2 keeps every parameter as a DTensor sharded along dim 0 (its rows; a Linear's output features)
across the ranks of its device mesh: rank ``r`` of ``n`` holds rows ``[r * c, min((r + 1) * c, rows))``
with ``c = ceil(rows / n)`` (``torch.chunk``'s split). The pruning core works on those local rows:

- :func:`local` is a tensor's local part (the tensor itself when it is not a DTensor); masks of a sharded
  weight are bool tensors shaped like its local rows, and enforcement, optimizer-state resets and scores
  all act on local tensors.
- :func:`row_shard` says which rows a rank holds and over which process group the rows are spread
  (None for a weight every rank holds whole). Placements other than ``Shard(0)`` and ``Replicate``
  (tensor parallelism's column or row splits, ``Partial``) are refused with a ValueError.
- :func:`full_mask` gathers a whole mask from the shards (checkpoints hold whole masks) and
  :func:`local_rows` slices a whole tensor to a rank's rows (a resumed run's masks).
- :func:`count_zeros` and :func:`count_pruned` count over all shards (all-reduced), for sparsity reports.

The mask rule for sharded weights (scores and selection) is :mod:`gradprune.sharding`. Every function here
that takes a sharded weight is a collective: all ranks of the group call it, in the same order.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist


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


def sum_over(group, values: list[int], device=None) -> list[int]:
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
        group = one_group([pairs[i][0] for i in sharded])
        for i, total in zip(sharded, sum_over(group, [counts[i] for i in sharded])):
            counts[i] = total
    return counts


def one_group(weights: Sequence[torch.Tensor]):
    """The shard group shared by these row-sharded weights (ValueError if they are spread differently)."""
    meshes = {id(w.device_mesh): w for w in weights}
    first = weights[0]
    for w in meshes.values():
        if w.device_mesh != first.device_mesh or tuple(w.placements) != tuple(first.placements):
            raise ValueError(f"targets are sharded over different device meshes or placements ({first.device_mesh}, "
                             f"{first.placements} and {w.device_mesh}, {w.placements}): prune them in separate calls")
    return row_shard(first).group
