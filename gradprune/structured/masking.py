"""Gradual structured pruning as pure functions: how many units an event masks, which ones, and their masks.

Whole units (:mod:`gradprune.structured.units`) are masked in the model's :class:`gradprune.MaskRegistry`
instead of removed, so training goes on with the same shapes and the optimizer untouched; a structured
export (:func:`gradprune.structured.remove_zeroed_units`) removes them physically at the end.

- :func:`unit_count`: the exact number of units a fraction asks for, ``floor(f * n + 0.5)`` (monotone in
  ``f``, so masks only grow along a non-decreasing schedule). It is never capped: a fraction that would
  reach every unit of a layer is refused by :func:`check_counts` instead.
- :func:`choose_units`: the lowest-importance units not masked yet, so that exactly the requested number
  are masked after the event: per layer (``scope="layer"``: ``count`` in every layer) or over the whole
  model (``scope="global"``: ``count`` in all, no layer ever losing its last unit). Ties break by index
  (stable sort).
- :func:`neuron_scores` / :func:`head_scores`: importance per block from activation statistics, with the
  formulas of :mod:`gradprune.structured.metrics`.
- :func:`mask_units_`: the keep-masks of whole units written into the registry (intersected with the masks
  it has, and the masked weights zeroed): an MLP neuron is its row in every input projection (gate/up, fc1,
  c_fc; bias entry zeroed) and its column in the output projection; a head group (one key/value head with
  the query heads that read it, so grouped-query attention stays consistent) is its query rows, its key and
  value rows (bias entries zeroed) and its ``o_proj`` columns.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional

import torch
from torch import nn

from ..calibration import ChannelStats
from ..masks import MaskRegistry
from ..targets import Target
from ..validation import Problems
from . import metrics
from .units import Units, in_dim, is_conv1d, out_dim, output_rows

SCOPES = ("layer", "global")


def unit_count(fraction: float, total: int) -> int:
    """How many of ``total`` units a fraction in [0, 1] masks: ``floor(fraction * total + 0.5)``, monotone
    in ``fraction``."""
    return int(math.floor(fraction * total + 0.5))


def check_counts(problems: Problems, name: str, fraction: Optional[float], per_layer: int, layers: int, scope: str,
                 unit: str) -> None:
    """Add a problem if ``fraction`` (the final one) would mask every ``unit`` of a layer: ``per_layer``
    units in each of ``layers`` layers, counted per layer or over the model (``scope``)."""
    if fraction is None:
        return
    if scope == "layer":
        count = unit_count(fraction, per_layer)
        if count >= per_layer:
            problems.add(f"{name}={fraction!r} would mask all {per_layer} {unit} of every layer "
                         f"(floor({fraction} * {per_layer} + 0.5) = {count}); at least one must stay: use "
                         f"{name} < {(per_layer - 0.5) / per_layer:.4g}")
    else:
        total = per_layer * layers
        count = unit_count(fraction, total)
        if count > total - layers:
            problems.add(f"{name}={fraction!r} with scope='global' would mask {count} of the model's {total} {unit}, "
                         f"more than the {total - layers} that leave one in each of its {layers} layers; use a "
                         f"smaller {name}")


def choose_units(scores: Mapping[int, torch.Tensor], masked: Mapping[int, torch.Tensor], count: int,
                 scope: str = "layer") -> dict[int, torch.Tensor]:
    """The masked units after an event: bool per unit (True = masked) for every block of ``scores``.

    Args:
        scores: importance per block (1-D, higher = more important); only unmasked units' scores are read.
        masked: bool per block, the units masked already (a block not listed has none); they stay masked.
        count: units masked after the event, per block (``scope="layer"``) or in all (``scope="global"``).
            A block (the model) that has more masked already keeps them all: masks only grow.
        scope: "layer" or "global".

    The lowest-scoring unmasked units are added (stable sort: ties go to the lower index); a global choice
    never takes a layer's last unmasked unit. Raises ValueError for non-finite scores or a count that
    cannot be reached without masking every unit of a layer; nothing is returned half-done.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {list(SCOPES)}, got {scope!r}")
    current = {}
    for b, s in scores.items():
        m = masked.get(b)
        m = torch.zeros(s.shape, dtype=torch.bool) if m is None else m.to(torch.bool).cpu()
        if m.shape != s.shape:
            raise ValueError(f"block {b}: {m.numel()} masked flags for {s.numel()} scores")
        current[b] = m.clone()
    bad = [b for b, s in scores.items() if not bool(torch.isfinite(s[~current[b]]).all())]
    if bad:
        raise ValueError(f"the importance scores of blocks {bad} are not finite (non-finite activations in the "
                         "statistics window); no unit was masked")
    if scope == "layer":
        for b, s in scores.items():
            m = current[b]
            if count >= s.numel():
                raise ValueError(f"masking {count} of the {s.numel()} units of block {b} would leave none")
            need = count - int(m.sum())
            if need <= 0:
                continue
            candidates = torch.nonzero(~m).reshape(-1)
            order = torch.sort(s.cpu()[candidates].to(torch.float64), stable=True).indices
            m[candidates[order[:need]]] = True
        return current
    blocks = list(scores)
    need = count - sum(int(current[b].sum()) for b in blocks)
    if need <= 0:
        return current
    room = {b: int((~current[b]).sum()) - 1 for b in blocks}  # each block keeps one unit
    if need > sum(max(r, 0) for r in room.values()):
        raise ValueError(f"masking {count} units in all would leave some layer with none")
    flat_scores, flat_block, flat_index = [], [], []
    for b in blocks:
        candidates = torch.nonzero(~current[b]).reshape(-1)
        flat_scores.append(scores[b].cpu()[candidates].to(torch.float64))
        flat_block += [b] * len(candidates)
        flat_index.append(candidates)
    order = torch.sort(torch.cat(flat_scores), stable=True).indices.tolist()
    indices = torch.cat(flat_index).tolist()
    for i in order:
        if need == 0:
            break
        b = flat_block[i]
        if room[b] > 0:
            current[b][indices[i]] = True
            room[b] -= 1
            need -= 1
    return current


# -- importance ---------------------------------------------------------------------------------------------------
def neuron_scores(units: Units, stats: Mapping[int, ChannelStats], metric: str = "l2",
                  weights: Optional[Mapping[str, float]] = None) -> dict[int, torch.Tensor]:
    """Importance of every MLP neuron by block, from the statistics of each block's MLP output-projection
    input (:func:`gradprune.structured.metrics.neuron_importance`)."""
    return {b.index: metrics.neuron_importance(metric, stats[b.index], output_rows(b.mlp_out), weights).cpu()
            for b in units.blocks}


def head_scores(units: Units, stats: Mapping[int, ChannelStats]) -> dict[int, torch.Tensor]:
    """Importance of every head group by block: the L2 norm of its attention output (``o_proj``'s input)."""
    channels = units.group_size * units.head_dim
    return {b.index: metrics.head_group_importance(stats[b.index].sum_sq, channels).cpu() for b in units.blocks}


# -- masks ----------------------------------------------------------------------------------------------------------
def unit_masks(model: nn.Module, units: Units, mlp: Optional[Mapping[int, torch.Tensor]] = None,
               heads: Optional[Mapping[int, torch.Tensor]] = None) -> tuple[list[Target], dict[str, torch.Tensor]]:
    """(targets, keep-masks by target name) that mask the given units: ``mlp[b]`` / ``heads[b]`` are bool per
    neuron / head group of block ``b`` (True = masked). Names are relative to ``model``."""
    names = {id(m): n for n, m in model.named_modules()}
    targets, masks = [], {}

    def add(module: nn.Module, dim: int, drop: torch.Tensor) -> None:
        name = names[id(module)]
        keep = torch.ones_like(module.weight, dtype=torch.bool)
        shape = [1] * keep.dim()
        shape[dim] = -1
        keep &= ~drop.to(keep.device).view(shape)
        if name in masks:
            masks[name] &= keep
        else:
            targets.append(Target(name, module, is_conv1d(module)))
            masks[name] = keep

    for block in units.blocks:
        drop = None if mlp is None else mlp.get(block.index)
        if drop is not None and drop.any():
            for module in block.mlp_in:
                add(module, out_dim(module), drop)
            add(block.mlp_out, in_dim(block.mlp_out), drop)
        drop = None if heads is None else heads.get(block.index)
        if drop is not None and drop.any():
            if block.attention is None:
                raise ValueError(f"attention heads of {units.arch.name} cannot be masked: {units.arch.heads_why_not}")
            q, k, v, o = block.attention
            q_drop = drop.repeat_interleave(units.group_size * units.head_dim)
            kv_drop = drop.repeat_interleave(units.head_dim)
            add(q, out_dim(q), q_drop)
            add(k, out_dim(k), kv_drop)
            add(v, out_dim(v), kv_drop)
            add(o, in_dim(o), q_drop)
    return targets, masks


def mask_units_(model: nn.Module, units: Units, mlp: Optional[Mapping[int, torch.Tensor]] = None,
                heads: Optional[Mapping[int, torch.Tensor]] = None, registry: Optional[MaskRegistry] = None) -> int:
    """Mask whole units of ``model`` in place: write their keep-masks into ``registry`` (default the model's,
    :meth:`MaskRegistry.of`; masks are intersected with those it has, so they only grow, and the masked
    weights are zeroed) and zero the bias entries of their output features. Returns how many units were
    given (True entries of ``mlp`` and ``heads``)."""
    targets, masks = unit_masks(model, units, mlp, heads)
    if targets:
        (registry or MaskRegistry.of(model)).update(targets, masks)
        with torch.no_grad():
            for t in targets:
                bias = getattr(t.module, "bias", None)
                if isinstance(bias, torch.Tensor) and bias.dim() == 1:
                    dim = out_dim(t.module)
                    rows = masks[t.name].any(dim=1 - dim)  # an output feature is kept if any of its weights is
                    if rows.numel() == bias.numel():
                        bias[~rows.to(bias.device)] = 0
    return sum(int(d.sum()) for part in (mlp or {}, heads or {}) for d in part.values())
