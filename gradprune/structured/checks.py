"""The checks of structured pruning, before anything changes: the amounts to remove (fractions or counts of
MLP neurons, head groups and layers; whole grouped-query-attention groups), the importance options, and
statistics given in advance. :func:`check_arguments` needs no model (the callbacks' ``__init__`` runs it);
:func:`check_request` checks a whole :func:`~gradprune.structured.prune.prune_structured` call."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional, Union

from torch import nn

from ..validation import Problems, check_choice, check_weights_usable, is_int, is_number
from . import metrics
from .units import Units, find_units

SCOPES = ("layer", "global")
Amount = Union[float, int, None]


def _count(problems: Problems, name: str, value: Amount, total: int, unit: str) -> int:
    """How many of ``total`` units ``value`` removes (a fraction in [0, 1] or an int count)."""
    if value is None:
        return 0
    if is_int(value):
        count = int(value)
    elif is_number(value) and not math.isnan(value) and 0 <= value <= 1:
        count = int(math.floor(value * total + 0.5))
    else:
        problems.add(f"{name} must be a fraction in [0, 1] or an int count of {unit}, got {value!r}")
        return 0
    if count < 0:
        problems.add(f"{name}={value!r} is negative")
    elif count >= total:
        problems.add(f"{name}={value!r} would remove all {total} {unit}{' of a layer' if name != 'layers' else ''}; "
                     f"at least one must stay")
    return count


def _head_groups(problems: Problems, units: Units, heads: Amount) -> int:
    """Head groups to remove per layer: ``heads`` counts query heads, in whole groups (GQA)."""
    if heads is None:
        return 0
    if units.arch.attention is None:
        problems.add(f"heads={heads!r}: attention heads of {units.arch.name} cannot be removed: {units.arch.heads_why_not}. "
                     f"Heads are supported for LLaMA-style models (llama, mistral, qwen2, qwen3)")
        return 0
    q = _count(problems, "heads", heads, units.num_heads, "attention heads")
    r = units.group_size
    if q % r:
        valid = [f"{g * r} (= {g * r}/{units.num_heads})" for g in range(1, units.num_kv_heads)]
        problems.add(f"heads={heads!r} removes {q} of {units.num_heads} query heads, which breaks grouped-query attention: "
                     f"{units.num_heads} query heads share {units.num_kv_heads} key/value heads ({r} per KV head), so "
                     f"whole groups of {r} must go; valid counts: {valid}")
    return q // r


def _metric_weights(problems: Problems, weights: Optional[Mapping[str, float]]) -> Optional[dict]:
    if weights is None:
        return None
    if not isinstance(weights, Mapping):
        problems.add(f"metric_weights must be a dict of {list(metrics.COMBINED_PARTS)} to numbers, got {weights!r}")
        return None
    bad = {k: v for k, v in weights.items() if k not in metrics.COMBINED_PARTS or not is_number(v) or v < 0}
    if bad:
        problems.add(f"metric_weights: keys must be among {list(metrics.COMBINED_PARTS)} with numbers >= 0, got {bad}")
    return dict(weights)


def check_metric_options(problems: Problems, metric: str, scope: str, metric_weights: Optional[Mapping[str, float]],
                         near_zero_eps: float) -> Optional[dict]:
    """Add the problems of the importance options (shared with the gradual structured callback); returns the
    combined metric's weights as a dict (None: the default)."""
    check_choice(problems, "metric", metric, metrics.NEURON_METRICS)
    check_choice(problems, "scope", scope, SCOPES)
    weights = _metric_weights(problems, metric_weights)
    if metric_weights is not None and metric != "combined":
        problems.add(f"metric_weights is only used by metric='combined', got metric={metric!r}")
    if not is_number(near_zero_eps) or not math.isfinite(near_zero_eps) or near_zero_eps < 0:
        problems.add(f"near_zero_eps must be a finite number >= 0, got {near_zero_eps!r}")
    return weights


def _check_options(problems: Problems, mlp, heads, layers, metric, scope, metric_weights, near_zero_eps) -> Optional[dict]:
    weights = check_metric_options(problems, metric, scope, metric_weights, near_zero_eps)
    if mlp is None and heads is None and layers is None:
        problems.add("nothing to remove: give mlp, heads and/or layers (a fraction or a count)")
    for name, value in (("mlp", mlp), ("heads", heads), ("layers", layers)):
        if value is not None and not is_int(value) and not (is_number(value) and 0 <= value <= 1):
            problems.add(f"{name} must be a fraction in [0, 1] or an int count, got {value!r}")
    return weights


def check_arguments(mlp: Amount = None, heads: Amount = None, layers: Amount = None, metric: str = "l2",
                    scope: str = "layer", metric_weights: Optional[Mapping[str, float]] = None,
                    near_zero_eps: float = 1e-2) -> None:
    """The checks of :func:`prune_structured` that need no model (the callback's ``__init__`` runs them)."""
    problems = Problems()
    _check_options(problems, mlp, heads, layers, metric, scope, metric_weights, near_zero_eps)
    problems.raise_if_any()


@dataclass(frozen=True)
class UnitCounts:
    """How many units one call removes: MLP neurons per layer, head groups per layer, decoder layers."""

    neurons: int
    groups: int
    layers: int


def check_request(model, calibration, mlp, heads, layers, metric, scope, metric_weights, near_zero_eps,
                   statistics) -> tuple[Units, Optional[dict], UnitCounts]:
    """Every check of a :func:`~gradprune.structured.prune.prune_structured` call, before anything changes:
    the units found, the combined metric's weights and the counts to remove. ``statistics`` is a
    :class:`~gradprune.structured.prune.UnitStatistics` or None."""
    problems = Problems()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    units = find_units(model)
    weights = _check_options(problems, mlp, heads, layers, metric, scope, metric_weights, near_zero_eps)
    n_layers = len(units.blocks)
    drop_layers = _count(problems, "layers", layers, n_layers, "decoder layers")
    drop_neurons = _count(problems, "mlp", mlp, units.blocks[0].neurons, "MLP neurons")
    drop_groups = _head_groups(problems, units, heads)
    if statistics is not None:
        missing = [kind for kind, need, have in (("mlp", drop_neurons, statistics.mlp), ("heads", drop_groups, statistics.heads),
                                                 ("block_influence", drop_layers, statistics.block_influence)) if need and not have]
        if missing or statistics.layers != n_layers:
            problems.add(f"statistics= do not fit this call: missing {missing}, taken on a model of {statistics.layers} "
                         f"layers, this one has {n_layers}")
    elif calibration is None:
        problems.add("calibration data is required (an iterable of input_ids tensors or batch dicts), or statistics= "
                     "from gradprune.structured.unit_statistics")
    check_weights_usable(problems, model)
    problems.raise_if_any()
    return units, weights, UnitCounts(drop_neurons, drop_groups, drop_layers)
