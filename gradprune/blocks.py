"""The decoder-block stack of a transformer, found generically, and running it one block at a time.

:func:`find_block_stack` looks for the ``nn.ModuleList`` of repeated blocks (``model.layers`` in LLaMA,
``transformer.h`` in GPT-2, ``encoder.layer`` in BERT, also inside a LightningModule wrapper): among all
ModuleLists whose children are all of one class and contain prunable weights, the one holding the most
parameters. Nothing is hard-coded.

:func:`capture_block_inputs` runs the model on each calibration batch until the first block is called,
and records that call's positional inputs and *every* keyword argument (the attention mask in whatever
form the model built, ``position_ids``, rotary ``position_embeddings`` in current transformers, ...).
The KV cache is switched off: ``use_cache=False`` and no ``past_key_values`` (a cache shared by repeated
block calls would corrupt the outputs). :func:`run_block` then calls any block with those arguments and
the hidden states of the previous block.

:func:`find_causal_lm` says what calibration batches are run through: the model itself when its forward
takes ``input_ids``, otherwise (a LightningModule that only holds the LM, with ``training_step`` calling
``self.model(...)``) the outermost submodule on the path to the block stack whose forward takes
``input_ids``, or the one child that has such a forward.
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from .targets import Target, is_prunable

log = logging.getLogger(__name__)

_CACHE_KWARGS = ("past_key_values", "past_key_value", "layer_past")
_HIDDEN = "hidden_states"
_FRAMEWORKS = ("lightning", "pytorch_lightning")  # whose base-class forward is a stub


@dataclass
class BlockStack:
    """The repeated blocks: ``name`` is the ModuleList's module name relative to the model."""

    name: str
    blocks: nn.ModuleList

    def block_name(self, index: int) -> str:
        return f"{self.name}.{index}" if self.name else str(index)

    def targets_of(self, index: int, targets: Sequence[Target]) -> list[Target]:
        prefix = self.block_name(index) + "."
        return [t for t in targets if t.name.startswith(prefix)]

    def contains(self, target: Target) -> bool:
        prefix = (self.name + ".") if self.name else ""
        rest = target.name[len(prefix):] if target.name.startswith(prefix) else None
        return rest is not None and rest.split(".", 1)[0].isdigit() and int(rest.split(".", 1)[0]) < len(self.blocks)


def find_block_stack(model: nn.Module) -> Optional[BlockStack]:
    """The model's stack of repeated blocks, or None if it has none."""
    best, best_params = None, -1
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        kinds = {type(child) for child in module}
        if len(kinds) != 1 or is_prunable(module[0]):
            continue
        if not all(any(is_prunable(m) for m in child.modules()) for child in module):
            continue
        params = sum(p.numel() for p in module.parameters())
        if params > best_params:
            best, best_params = BlockStack(name, module), params
    return best


class _Captured(Exception):
    """Raised by the first block's pre-hook to stop the forward once its inputs are recorded."""


def _accepts(fn: Any, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def takes_input_ids(module: nn.Module) -> bool:
    """Whether ``module(input_ids=...)`` can be called: its forward names ``input_ids`` or takes ``**kwargs``
    (``nn.Module``'s unimplemented forward does neither; a LightningModule's inherited ``forward(*args,
    **kwargs)`` only raises, so it does not count)."""
    own = module.__dict__.get("forward")  # an instance attribute counts as the module's own forward, unless it
    # is the class's forward bound again (Lightning's DDP forward redirection leaves that behind after a step)
    if own is None or getattr(own, "__func__", None) in [c.__dict__.get("forward") for c in type(module).__mro__]:
        owner = next((c for c in type(module).__mro__ if "forward" in c.__dict__), nn.Module)
        if owner is nn.Module or owner.__module__.split(".")[0] in _FRAMEWORKS:
            return False
    return _accepts(module.forward, "input_ids")


def find_causal_lm(model: nn.Module, lm: Union[str, nn.Module, None] = None) -> nn.Module:
    """The module to run calibration batches through (``module(input_ids=..., attention_mask=...)``).

    Args:
        model: the model being pruned, e.g. a LightningModule holding a Hugging Face causal LM.
        lm: None to find it; or the LM's dotted attribute name inside ``model`` (``"model"``), or the
            submodule itself.

    Found as: ``model`` itself when its forward takes ``input_ids``; else the outermost module on the path
    to the decoder-block stack (:func:`find_block_stack`) whose forward takes ``input_ids`` (the causal LM
    that owns the blocks); else the only child of ``model`` with such a forward. Raises ValueError saying
    what to define when nothing fits, or when ``lm`` names no suitable submodule.
    """
    owner = type(model).__name__
    if lm is not None:
        if isinstance(lm, nn.Module):
            if not any(m is lm for m in model.modules()):
                raise ValueError(f"lm must be a submodule of the {owner} being pruned, got a {type(lm).__name__} outside it")
            found, label = lm, type(lm).__name__
        elif isinstance(lm, str) and lm:
            try:
                found = model.get_submodule(lm)
            except AttributeError:
                children = [name for name, _ in model.named_children()]
                raise ValueError(f"lm={lm!r}: {owner} has no submodule of that name; its children are {children}") from None
            label = f"{lm!r}"
        else:
            raise TypeError(f"lm must be the dotted name of a submodule (e.g. 'model') or an nn.Module, got {lm!r}")
        if not takes_input_ids(found):
            raise ValueError(f"lm={label}: its forward does not take input_ids; name the causal LM itself "
                             f"(the module whose forward(input_ids, attention_mask) returns logits)")
        return found
    if takes_input_ids(model):
        return model
    stack = find_block_stack(model)
    if stack is not None and stack.name:
        parts = stack.name.split(".")
        for depth in range(1, len(parts)):
            candidate = model.get_submodule(".".join(parts[:depth]))
            if takes_input_ids(candidate):
                return candidate
    children = [child for _, child in model.named_children() if takes_input_ids(child)]
    if len(children) == 1:
        return children[0]
    found = [name for name, child in model.named_children() if takes_input_ids(child)]
    raise ValueError(
        f"cannot find the causal LM inside {owner}: it has no forward(input_ids, attention_mask=None), "
        + (f"and several children could be it: {found}; " if found else "no submodule that owns a stack of decoder "
           "blocks and takes input_ids, and no child whose forward takes input_ids; ")
        + "define forward(self, input_ids, attention_mask=None) returning the logits, or name the model with lm='model' "
        "(the attribute that holds it)"
    )


def call_model(model: nn.Module, batch: dict, device: torch.device) -> Any:
    """``model(input_ids=..., attention_mask=...)`` on ``device``, with ``use_cache=False`` if the
    model's forward takes it (an HF model does; a LightningModule wrapper may not)."""
    kwargs = {"input_ids": batch["input_ids"].to(device)}
    if batch.get("attention_mask") is not None:
        kwargs["attention_mask"] = batch["attention_mask"].to(device)
    if _accepts(model.forward, "use_cache"):
        kwargs["use_cache"] = False
    return model(**kwargs)


def _without_cache(kwargs: dict) -> dict:
    kwargs = dict(kwargs)
    for key in _CACHE_KWARGS:
        if key in kwargs:
            kwargs[key] = None
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return kwargs


@dataclass
class BlockInputs:
    """One calibration batch at the entry of a block: hidden states, the other arguments, the token mask."""

    hidden: torch.Tensor
    args: tuple
    kwargs: dict
    tokens: Optional[torch.Tensor]


def capture_block_inputs(model: nn.Module, stack: BlockStack, batches: Sequence[dict], device: torch.device) -> list[BlockInputs]:
    """The first block's inputs for every batch (the model runs only up to that block)."""
    captured: list[tuple[tuple, dict]] = []

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append((args, kwargs))
        raise _Captured

    handle = stack.blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True)
    inputs = []
    try:
        for batch in batches:
            try:
                call_model(model, batch, device)
            except _Captured:
                pass
            else:
                raise RuntimeError(f"the model's forward never called its first block {stack.block_name(0)!r}")
            args, kwargs = captured.pop()
            kwargs = _without_cache(kwargs)
            if args:
                hidden, args = args[0], tuple(args[1:])
            elif _HIDDEN in kwargs:
                hidden = kwargs.pop(_HIDDEN)
            else:
                raise RuntimeError(f"cannot tell the hidden states among the first block's arguments: {sorted(kwargs)}")
            mask = batch.get("attention_mask")
            inputs.append(BlockInputs(hidden, args, kwargs, None if mask is None else mask.to(device).bool()))
    finally:
        handle.remove()
    return inputs


def run_block(block: nn.Module, inp: BlockInputs) -> torch.Tensor:
    """The block's output hidden states for one batch (first element if the block returns a tuple)."""
    out = block(inp.hidden, *inp.args, **inp.kwargs)
    if isinstance(out, (tuple, list)):
        out = out[0]
    elif not isinstance(out, torch.Tensor) and hasattr(out, "__getitem__"):
        out = out[0]
    return out


def group_by_block(model: nn.Module, targets: Sequence[Target]) -> list[list[Target]]:
    """The targets grouped by decoder block (in block order); a target outside the block stack, or every
    target of a model without one, is a group of its own. OWL's layer budgets are per group."""
    stack = find_block_stack(model)
    if stack is None:
        return [[t] for t in targets]
    groups = [stack.targets_of(i, targets) for i in range(len(stack.blocks))]
    inside = {t.name for group in groups for t in group}
    return [g for g in groups if g] + [[t] for t in targets if t.name not in inside]
