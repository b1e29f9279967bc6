"""One-shot structured pruning: score MLP neurons, head groups and decoder layers on one calibration pass,
then remove the least important ones physically (:func:`prune_structured`).

The order (one function each) is: check every argument against the model (nothing changes on an error); one whole-model
calibration pass with forward hooks (inputs of the MLP output projections and of ``o_proj``, and every
block's input and output hidden states; padding excluded); scores (:mod:`gradprune.structured.metrics`);
choice of the units; removal (:mod:`gradprune.structured.remove`). Layers are ranked on the dense model,
and neurons and heads of the layers that stay are chosen from the same pass.

Counts: a fraction ``f`` of ``n`` units removes ``floor(f * n + 0.5)`` of them; an int removes that many.
With ``scope="layer"`` every layer loses the same number of neurons (head groups), its least important ones.
With ``scope="global"`` the least important units of the whole model are chosen together, so layers lose
different numbers; Hugging Face configs hold one size for all layers, so each layer is physically shrunk by
the smallest per-layer count, and the rest of the chosen units are zeroed and kept zero by masks in the
model's :class:`gradprune.MaskRegistry` (training keeps them at zero; :func:`remove_zeroed_units` removes them
later when the counts allow). The report says how many of each.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from ..blocks import call_model, find_causal_lm
from ..calibration import ActivationHooks, as_batches, count_tokens, eval_mode, non_finite_statistics
from ..masks import MaskRegistry
from ..targets import Target
from . import metrics
from .checks import Amount, UnitCounts, check_arguments, check_metric_options, check_request  # noqa: F401 (re-exported)
from .masking import mask_units_
from .remove import Removal, apply_removal, check_removal, sizes
from .units import Units, find_units, is_conv1d, output_rows

log = logging.getLogger(__name__)

@dataclass
class UnitStatistics:
    """What one calibration pass collected, by block index of the unpruned model: the MLP output projections'
    input statistics (``mlp``), ``o_proj``'s input statistics (``heads``), the block influence of every layer
    (``block_influence``) and the number of calibration tokens. Reusable: several :func:`prune_structured`
    calls on copies of the same model can share one pass (``statistics=``)."""

    mlp: dict
    heads: dict
    block_influence: list
    tokens: int
    layers: int  # blocks of the model the statistics were taken on


def unit_statistics(model: nn.Module, calibration: Any, mlp: bool = True, heads: bool = True, layers: bool = True,
                    near_zero_eps: float = 1e-2, lm: Union[str, nn.Module, None] = None,
                    reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                    progress: Optional[bool] = None) -> UnitStatistics:
    """One whole-model calibration pass collecting what :func:`prune_structured` scores units by."""
    units = find_units(model)
    batches = as_batches(calibration)
    runner = find_causal_lm(model, lm)
    heads = heads and units.arch.attention is not None
    mlp_stats, head_stats, bi = _calibrate(model, units, batches, mlp, heads, layers, near_zero_eps, progress, runner, reduce)
    return UnitStatistics(mlp_stats, head_stats, bi, count_tokens(batches), len(units.blocks))


# -- calibration ---------------------------------------------------------------------------------------------------
def _calibrate(model: nn.Module, units: Units, batches: list, want_mlp: bool, want_heads: bool, want_layers: bool,
               near_zero_eps: float, progress: Optional[bool], runner: nn.Module,
               reduce: Optional[Callable[[torch.Tensor], torch.Tensor]]) -> tuple[dict, dict, list]:
    names = {id(m): n for n, m in model.named_modules()}
    targets = []
    if want_mlp:
        targets += [Target(names[id(b.mlp_out)], b.mlp_out, is_conv1d(b.mlp_out)) for b in units.blocks]
    if want_heads:
        targets += [Target(names[id(b.attention[3])], b.attention[3], False) for b in units.blocks]
    influence = [[0.0, 0] for _ in units.blocks]
    current: dict[str, Optional[torch.Tensor]] = {"tokens": None}
    handles = []

    def block_hook(index: int):
        def hook(module, args, kwargs, output):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, (tuple, list)) else output
            total, count = metrics.block_influence_terms(h_in.detach(), h_out.detach(), current["tokens"])
            influence[index][0] += total
            influence[index][1] += count

        return hook

    device = units.blocks[0].mlp_out.weight.device
    try:
        if want_layers:
            for b in units.blocks:
                handles.append(b.module.register_forward_hook(block_hook(b.index), with_kwargs=True))
        with eval_mode(model), ActivationHooks(targets, near_zero_eps=near_zero_eps) as hooks:
            for batch in tqdm(batches, desc="structured calibration", disable=progress is False):
                mask = batch["attention_mask"]
                current["tokens"] = None if mask is None else mask.bool()
                hooks.tokens(mask)
                call_model(runner, batch, device)
    finally:
        for handle in handles:
            handle.remove()
    if reduce is not None:  # sums over data-parallel ranks, so every rank removes the same units
        hooks.reduce_(reduce)
        sums = reduce(torch.tensor(influence, dtype=torch.float64, device=device).reshape(-1, 2))
        influence = sums.cpu().tolist()
    stats = hooks.stats
    mlp_stats = {b.index: stats[names[id(b.mlp_out)]] for b in units.blocks} if want_mlp else {}
    head_stats = {b.index: stats[names[id(b.attention[3])]] for b in units.blocks} if want_heads else {}
    bi = [total / max(count, 1) for total, count in influence] if want_layers else []
    return mlp_stats, head_stats, bi


# -- choosing units ------------------------------------------------------------------------------------------------
def _lowest(scores: dict[int, torch.Tensor], count: int, scope: str) -> dict[int, torch.Tensor]:
    """Bool masks (True = chosen for removal) per block: ``count`` per block (layer scope) or ``count`` times the
    number of blocks over all blocks together (global scope). Ties break by index (stable sort)."""
    chosen = {}
    if scope == "layer":
        for b, s in scores.items():
            order = torch.sort(s, stable=True).indices[:count]
            mask = torch.zeros_like(s, dtype=torch.bool)
            mask[order] = True
            chosen[b] = mask
        return chosen
    blocks = list(scores)
    flat = torch.cat([scores[b] for b in blocks])
    order = torch.sort(flat, stable=True).indices[: count * len(blocks)]
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[order] = True
    for b, part in zip(blocks, torch.split(mask, [len(scores[b]) for b in blocks])):
        chosen[b] = part
    return chosen


def _split_uniform(chosen: dict[int, torch.Tensor], scores: dict[int, torch.Tensor]) -> tuple[dict, dict]:
    """(kept indices per block after removing the uniform count, extra chosen units per block to mask)."""
    if not chosen:
        return {}, {}
    uniform = min(int(c.sum()) for c in chosen.values())
    keep, extra = {}, {}
    for b, c in chosen.items():
        idx = torch.nonzero(c).reshape(-1)
        order = idx[torch.sort(scores[b][idx], stable=True).indices]  # least important first
        drop, rest = order[:uniform], order[uniform:]
        k = torch.ones_like(c)
        k[drop] = False
        keep[b] = torch.nonzero(k).reshape(-1)
        extra_mask = torch.zeros_like(c)
        extra_mask[rest] = True
        extra[b] = extra_mask[keep[b]]  # in the kept block's new numbering
    return keep, extra


def _mask_extra(model: nn.Module, units: Units, mlp_extra: dict, head_extra: dict) -> int:
    """Zero (and mask in the registry) the chosen units that the uniform rule left in place."""
    return mask_units_(model, units, mlp_extra, head_extra)


class _Undo:
    """Puts a model back as it was on entry when the block it guards fails: every module's parameters,
    submodules, buffers and plain attributes (the sizes), the config's attributes and the mask registry.
    Replaced weights stay referenced until the block ends; with ``copy_values`` (weights zeroed in place) a
    CPU copy of every parameter is kept too."""

    _PLAIN = (int, float, str, bool, type(None), tuple)

    def __init__(self, model: nn.Module, copy_values: bool = False) -> None:
        self.model, self.copy_values = model, copy_values

    def __enter__(self) -> "_Undo":
        self.modules = [(m, dict(m._parameters), dict(m._modules), dict(m._buffers),
                         {k: v for k, v in vars(m).items() if not k.startswith("_") and isinstance(v, self._PLAIN)})
                        for m in self.model.modules()]
        configs = {id(c): c for m in self.model.modules() if (c := getattr(m, "config", None)) is not None and hasattr(c, "__dict__")}
        self.configs = [(c, dict(vars(c))) for c in configs.values()]
        self.registry = MaskRegistry.existing(self.model)
        self.masks = None if self.registry is None else (dict(self.registry.masks), dict(self.registry.targets))
        self.values = ([(p, p.detach().to("cpu", copy=True)) for p in self.model.parameters()] if self.copy_values else [])
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if kind is not None:
            for module, params, children, buffers, plain in self.modules:
                for held, saved in ((module._parameters, params), (module._modules, children), (module._buffers, buffers)):
                    held.clear()
                    held.update(saved)
                module.__dict__.update(plain)
            for config, attributes in self.configs:
                config.__dict__.clear()
                config.__dict__.update(attributes)
            if self.masks is not None:
                self.registry.masks, self.registry.targets = self.masks
                self.registry.version += 1
            with torch.no_grad():
                for param, saved in self.values:
                    param.copy_(saved)
            log.info("structured pruning failed; the model was put back as it was")
        self.modules = self.configs = self.values = []


def parameter_count(model: nn.Module) -> int:
    """Parameters of ``model``, tied tensors counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def prune_structured(
    model: nn.Module,
    calibration: Any = None,
    mlp: Amount = None,
    heads: Amount = None,
    layers: Amount = None,
    metric: str = "l2",
    scope: str = "layer",
    metric_weights: Optional[Mapping[str, float]] = None,
    near_zero_eps: float = 1e-2,
    lm: Union[str, nn.Module, None] = None,
    reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    statistics: Optional[UnitStatistics] = None,
    progress: Optional[bool] = None,
) -> dict:
    """Remove MLP neurons, attention heads and decoder layers of ``model`` in place, by activation importance.

    Args:
        model: a Hugging Face causal LM of a supported architecture
            (:data:`gradprune.structured.ARCHITECTURES`), or a module holding one (PrunableLM).
        calibration: token-id tensors or batch dicts (``input_ids``, optional ``attention_mask``), as for
            :func:`gradprune.prune_oneshot`.
        mlp: MLP intermediate neurons to remove per layer: a fraction in [0, 1] or an int count.
        heads: query heads to remove per layer (fraction or count), in whole GQA groups: with 9 query and 3
            key/value heads, ``heads=3`` (or 1/3) removes one KV head and its 3 query heads (9q/3kv -> 6q/2kv).
        layers: decoder layers to remove (fraction or count), those of lowest block influence.
        metric: MLP neuron importance: "l2", "mean_abs", "variance", "near_zero", "combined" or "wanda"
            (:mod:`gradprune.structured.metrics`). Heads are ranked by their output's L2 norm, layers by
            block influence.
        scope: "layer" (each layer loses its least important units, the same number in every layer) or
            "global" (the least important units of the whole model; see the module notes for the uniform rule).
        metric_weights: weights of the "combined" metric, e.g. ``{"l2": 1, "near_zero": 0.5}`` (default all 1).
        near_zero_eps: |activation| at or below this counts as near zero (the "near_zero" metric).
        lm: what calibration batches run through (see :func:`gradprune.prune_oneshot`).
        reduce: callable summing a statistics tensor over data-parallel ranks (the callback passes it).
        statistics: a :class:`UnitStatistics` from :func:`unit_statistics` on this model (or an identical copy)
            instead of a calibration pass; ``calibration`` is then not needed.
        progress: show a progress bar (None: tqdm's default).

    Returns a report: ``removed`` (``mlp_per_layer``, ``mlp_masked``, ``head_groups_per_layer``,
    ``query_heads_per_layer``, ``heads_masked``, ``layers``: indices in the original model), ``sizes_before`` /
    ``sizes_after`` (config sizes), ``parameters_before`` / ``parameters_after``, ``block_influence`` (per original
    layer, when layers were scored), ``metric``, ``scope``, ``calibration`` (tokens) and ``time``.

    Raises ValueError/TypeError before anything changes for: an unknown architecture (naming the supported
    ones), amounts that would remove every neuron / head of a layer or every layer, a head count that breaks
    grouped-query attention, bad metric / scope / weights, missing calibration data.
    """
    start = time.perf_counter()
    units, weights, counts = check_request(model, calibration, mlp, heads, layers, metric, scope, metric_weights,
                                            near_zero_eps, statistics)
    before_sizes, before_params = sizes(model), parameter_count(model)

    t0 = time.perf_counter()
    if statistics is None:
        statistics = unit_statistics(model, calibration, counts.neurons > 0, counts.groups > 0, counts.layers > 0,
                                     near_zero_eps, lm, reduce, progress)
    calibration_s = time.perf_counter() - t0
    _check_finite(statistics)

    plan = plan_removal(units, statistics, counts, metric, scope, weights, mlp, heads)
    with _Undo(model, copy_values=bool(plan.mlp_extra or plan.head_extra)):  # any failure below puts the model back
        t0 = time.perf_counter()
        masked = apply_plan(model, units, plan)
        removal_s = time.perf_counter() - t0
        report = removal_report(model, plan, counts, statistics, masked, before_sizes, before_params, metric, scope)
    report["time"] = {"calibration_s": calibration_s, "removal_s": removal_s, "total_s": time.perf_counter() - start}
    log.info("structured pruning: %s -> %s, parameters %d -> %d", before_sizes, report["sizes_after"], before_params,
             report["parameters_after"])
    return report


def _check_finite(statistics: UnitStatistics) -> None:
    """ValueError naming the layers whose calibration statistics hold NaN or inf: units would be chosen by NaN
    scores (nothing has changed yet)."""
    bad = [f"layer {i} {kind}: {entry}" for kind, per_layer in (("mlp", statistics.mlp), ("heads", statistics.heads))
           for i, stats in per_layer.items() for entry in non_finite_statistics({"input": stats})]
    bad += [f"layer {i}: block influence {v}" for i, v in enumerate(statistics.block_influence) if not math.isfinite(v)]
    if bad:
        raise ValueError(f"prune_structured: non-finite (NaN or inf) calibration statistics in {bad[:5]}"
                         f"{' ...' if len(bad) > 5 else ''}: the activations overflowed or hold NaN (check the weights and "
                         "the calibration data); units would be chosen by NaN scores, so nothing was removed")


@dataclass
class RemovalPlan:
    """What :func:`apply_plan` does: the units to remove (a :class:`Removal`), the blocks that stay (original
    indices) and, with scope "global", the units masked in place beyond the uniform count of every layer."""

    removal: Removal
    kept: list[int]
    mlp_extra: dict = field(default_factory=dict)
    head_extra: dict = field(default_factory=dict)


def plan_removal(units: Units, statistics: UnitStatistics, counts: UnitCounts, metric: str, scope: str,
                 weights: Optional[dict], mlp: Amount = None, heads: Amount = None) -> RemovalPlan:
    """The units to remove, from the statistics: the decoder layers of lowest block influence, then in the
    layers that stay the least important MLP neurons (by ``metric``) and head groups (by output L2 norm), per
    layer or over the model (``scope``). Checked (:func:`check_removal`) but not applied; ValueError if
    scope "global" would empty a layer (``mlp`` / ``heads`` name the request in the message)."""
    removal = Removal()
    if counts.layers:
        order = torch.sort(torch.tensor(statistics.block_influence), stable=True).indices
        removal.layers = sorted(order[:counts.layers].tolist())
    kept = [b for b in units.blocks if b.index not in set(removal.layers)]
    mlp_extra = head_extra = {}
    if counts.neurons:
        scores = {b.index: metrics.neuron_importance(metric, statistics.mlp[b.index], output_rows(b.mlp_out), weights).cpu()
                  for b in kept}
        removal.mlp_keep, mlp_extra = _split_uniform(_lowest(scores, counts.neurons, scope), scores)
    if counts.groups:
        channels = units.group_size * units.head_dim
        scores = {b.index: metrics.head_group_importance(statistics.heads[b.index].sum_sq, channels).cpu() for b in kept}
        chosen = _lowest(scores, counts.groups, scope)
        if any(bool(c.all()) for c in chosen.values()):
            raise ValueError(f"scope='global' with heads={heads!r} would remove every head of a layer; use scope='layer' "
                             f"or fewer heads")
        removal.heads_keep, head_extra = _split_uniform(chosen, scores)
    if counts.neurons and scope == "global":
        full = [b for b in removal.mlp_keep if len(removal.mlp_keep[b]) == int(mlp_extra[b].sum())]
        if full:
            raise ValueError(f"scope='global' with mlp={mlp!r} would remove every MLP neuron of layers {full}; use "
                             f"scope='layer' or a smaller amount")
    check_removal(units, removal)
    return RemovalPlan(removal, [b.index for b in kept], mlp_extra, head_extra)


def apply_plan(model: nn.Module, units: Units, plan: RemovalPlan) -> dict[str, int]:
    """Remove the planned units from ``model`` in place and mask the extra ones (renumbered to the blocks
    that stay); returns how many were masked: ``{"mlp": MLP neurons, "heads": head groups}``."""
    apply_removal(model, plan.removal, units)
    masked_units = find_units(model) if (plan.mlp_extra or plan.head_extra) else None
    renumber = {old: new for new, old in enumerate(plan.kept)}
    masked = {"mlp": int(sum(int(e.sum()) for e in plan.mlp_extra.values())),
              "heads": int(sum(int(e.sum()) for e in plan.head_extra.values()))}
    if masked_units is not None:
        _mask_extra(model, masked_units, {renumber[b]: e for b, e in plan.mlp_extra.items()},
                    {renumber[b]: e for b, e in plan.head_extra.items()})
    return masked


def removal_report(model: nn.Module, plan: RemovalPlan, counts: UnitCounts, statistics: UnitStatistics,
                   masked: dict[str, int], before_sizes: dict, before_params: int, metric: str, scope: str) -> dict:
    """The report of :func:`prune_structured` (all but ``time``) on the model after :func:`apply_plan`."""
    after = sizes(model)
    return {
        "removed": {
            "mlp_per_layer": before_sizes["intermediate_size"] - after["intermediate_size"] if counts.neurons else 0,
            "mlp_masked": masked["mlp"],
            "head_groups_per_layer": (before_sizes["num_key_value_heads"] or 0) - (after["num_key_value_heads"] or 0)
            if counts.groups else 0,
            "query_heads_per_layer": before_sizes["num_attention_heads"] - after["num_attention_heads"] if counts.groups else 0,
            "heads_masked": masked["heads"],
            "layers": list(plan.removal.layers),
        },
        "sizes_before": before_sizes,
        "sizes_after": after,
        "parameters_before": before_params,
        "parameters_after": parameter_count(model),
        "block_influence": list(statistics.block_influence),
        "metric": metric,
        "scope": scope,
        "calibration": {"tokens": statistics.tokens},
    }
