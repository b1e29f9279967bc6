"""LoRA recovery that keeps sparsity: PEFT adapters on a pruned model, and a merge that leaves every pruned
weight exactly zero.

Plain LoRA loses the sparsity it trains on: the adapters' product ``B @ A`` is dense, so PEFT's
``merge_and_unload`` (``W + s * B @ A``) fills every pruned weight in (the Wanda repository's issues #10 and
#83: "40% sparse became 32.7% after LoRA"). Here, for a layer whose frozen base weight ``W`` has exact zeros:

- the forward pass computes ``W x + (M * s * B @ A) x``, where the keep-mask ``M`` is ``W != 0``: the
  adapters never act through a pruned weight, so the model that trains is the model the merge produces;
- :func:`merge_lora` writes ``W + M * s * B @ A`` into the base weight and removes the adapters: the merged
  model has exactly the zeros of the base, the same :func:`gradprune.sparsity_report`.

The keep-mask is the base weight's zero pattern, not the mask registry's: every pruned weight is zero (the
registry keeps it so, and LoRA freezes the base), a model loaded already pruned (an export) has no
registry yet has its zeros, and zeros are what a sparsity report counts. It is recomputed only when the
base weight changes (a pruning callback zeroing more of it). A layer without a zero weight runs PEFT's
own low-rank forward at no extra cost.

The cost of the masked forward, per adapted layer that has zeros: the dense ``out x in`` product, one
matmul as large as the layer's own, and that product kept for the backward (one extra tensor the size of
the weight, in the adapters' dtype).
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, List, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .targets import find_targets
from .validation import Problems, check_number, check_selector, options_dataclass

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install gradprune[lora]"


@dataclass
class LoRA:
    """Low-rank adapters to train on a (pruned) model, its base weights frozen.

    Args:
        r: rank of the adapters (an int >= 1).
        alpha: LoRA's alpha; the adapters' product is scaled by alpha / r.
        dropout: dropout on the adapters' input, in [0, 1).
        target_modules: which layers get adapters, the same forms as the pruning callbacks' ``include``
            (a regex, or a list of names / ``.suffix`` es); default: every prunable layer (every Linear /
            Conv1D but the output head), the weights a pruning callback would prune.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: Union[str, List[str], None] = None

    def __post_init__(self) -> None:
        problems = Problems()
        check_number(problems, "lora.r", self.r, low=1, integer=True)
        check_number(problems, "lora.alpha", self.alpha, low=0, low_open=True)
        check_number(problems, "lora.dropout", self.dropout, low=0, high=1, high_open=True)
        check_selector(problems, "lora.target_modules", self.target_modules)
        problems.raise_if_any()


def require_peft():
    """The peft module, or ImportError saying how to install it."""
    try:
        import peft
    except ImportError as exc:
        raise ImportError(f"LoRA needs the peft package, an optional extra of gradprune: {INSTALL_HINT}") from exc
    return peft


def lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every PEFT LoRA layer in ``model`` (a ``base_layer`` with ``lora_A`` / ``lora_B``)."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(getattr(m, "lora_A", None), nn.ModuleDict) and isinstance(getattr(m, "base_layer", None), nn.Module)]


def add_lora(model: nn.Module, options: LoRA) -> nn.Module:
    """Wrap ``model`` in a PEFT model with LoRA adapters on ``options.target_modules`` (default: its
    prunable layers), the base weights frozen and the adapters' product masked by the base's zeros.

    Returns the PEFT model. ``model`` itself is changed in place (PEFT swaps its layers for wrappers).
    Raises ImportError without peft; ValueError when ``model`` already has LoRA layers or no layer fits
    (``model`` unchanged), or when PEFT cannot wrap it.
    """
    peft = require_peft()
    if not isinstance(options, LoRA):
        raise TypeError(f"lora must be a gradprune.lora.LoRA, got {type(options).__name__}")
    if lora_layers(model):
        raise ValueError(f"the {type(model).__name__} already has LoRA layers: give PrunableLM the model without adapters")
    try:
        targets = find_targets(model, options.target_modules)
    except ValueError as exc:
        raise ValueError(f"lora.target_modules: {exc}") from exc
    config = peft.LoraConfig(r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout, bias="none",
                             target_modules=[t.name for t in targets],
                             fan_in_fan_out=all(t.transposed for t in targets))  # GPT-2's Conv1D stores (in, out)
    try:
        wrapped = peft.get_peft_model(model, config)
    except (ValueError, TypeError, AttributeError, NotImplementedError) as exc:
        raise ValueError(f"PEFT cannot add LoRA adapters to this {type(model).__name__}: {exc}") from exc
    for _, layer in lora_layers(wrapped):
        if not hasattr(layer, "get_delta_weight"):  # a kind of layer whose product we do not mask
            raise ValueError(f"LoRA layer {type(layer).__name__} has no get_delta_weight: not supported")
        layer.forward = functools.partial(_masked_forward, layer)  # a partial pickles (ddp_spawn), a bound method not
    log.info("LoRA (r=%d, alpha=%g) on %d layers; %d trainable parameters", options.r, options.alpha, len(targets),
             sum(p.numel() for p in wrapped.parameters() if p.requires_grad))
    return wrapped


def keep_mask(layer: nn.Module) -> Optional[torch.Tensor]:
    """Where ``layer``'s base weight is not exactly zero (bool, the stored weight's layout), or None when it
    has no zero. Cached on the layer until the weight is replaced or changed in place."""
    weight = layer.get_base_layer().weight
    key = (weight.data_ptr(), weight._version, weight.device)
    cached = layer.__dict__.get("_gradprune_keep")
    if cached is None or cached[0] != key:
        with torch.no_grad():
            keep = weight != 0
            cached = (key, None if bool(keep.all()) else keep)
        layer.__dict__["_gradprune_keep"] = cached
    return cached[1]


def _masked_forward(layer: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """A LoRA layer's forward with the adapters' product masked by the base weight's zeros: W x + (M * s B A) x."""
    keep = keep_mask(layer)
    plain = type(layer).forward
    if keep is None or layer.disable_adapters or layer.merged or kwargs.get("adapter_names") is not None:
        return plain(layer, x, *args, **kwargs)
    result = layer.base_layer(x, *args, **kwargs)
    out_in = keep.t() if layer.fan_in_fan_out else keep
    for adapter in layer.active_adapters:
        if adapter not in layer.lora_A:
            continue
        a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        delta = (b @ a) * layer.scaling[adapter] * out_in
        h = layer.lora_dropout[adapter](x.to(a.dtype))
        result = result + F.linear(h, delta).to(result.dtype)
    return result


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Merge the LoRA adapters of a PEFT ``model`` into its base weights keeping every zero weight zero:
    ``W <- W + (W != 0) * s B A``; then remove the adapters. Returns the plain base model.

    ``model`` is consumed (its layers are changed in place); merge a ``copy.deepcopy`` to keep it.
    """
    if not callable(getattr(model, "unload", None)):
        raise TypeError(f"merge_lora needs the PEFT model that add_lora returned, got {type(model).__name__}")
    for name, layer in lora_layers(model):
        weight = layer.get_base_layer().weight
        keep = weight != 0
        for adapter in layer.active_adapters:
            if adapter in layer.lora_A:
                weight.add_(layer.get_delta_weight(adapter).to(weight.dtype) * keep)
        cancelled = int((keep & (weight == 0)).sum())
        if cancelled:  # a float cancellation, W + d == 0 exactly: rare, but the sparsity is then not the base's
            log.warning("merge_lora: %d kept weights of %s summed to exactly 0.0", cancelled, name)
    return model.unload()


def lora_options(value: Union[LoRA, dict, None]) -> Optional[LoRA]:
    """``lora`` as PrunableLM takes it: a :class:`LoRA`, or the dict of its fields (as saved in a
    checkpoint's hyperparameters), or None."""
    return options_dataclass("lora", LoRA, value)


__all__ = ["LoRA", "add_lora", "keep_mask", "lora_layers", "merge_lora", "require_peft"]
