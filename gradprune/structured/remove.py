"""Physical removal of structural units: smaller Linear/Conv1D weights, fewer blocks, an updated config.

:class:`Removal` says what goes (kept MLP neurons and kept head groups per block, removed blocks);
:func:`check_removal` lists every problem before anything changes; :func:`apply_removal` then slices the
weights (and biases, and any pruning masks in the model's :class:`gradprune.MaskRegistry`), drops blocks,
renumbers ``layer_idx`` (what Hugging Face KV caches index by) and writes the new sizes into the config,
so ``save_pretrained`` / ``from_pretrained`` give the smaller model.

The uniform rule: HF configs hold one ``intermediate_size`` and one pair of head counts for all layers, so
every kept block must keep the same number of neurons and of head groups.

:func:`remove_zeroed_units` finds units that already contribute nothing (weights zeroed by masks or by
gradual structured pruning) and removes them: the model's outputs do not change. It is what a structured
export calls.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ..masks import MaskRegistry
from ..targets import Target
from ..validation import Problems
from .units import Block, Units, find_units, in_dim, is_conv1d, out_dim, output_rows

log = logging.getLogger(__name__)


@dataclass
class Removal:
    """What to remove: ``mlp_keep[b]`` / ``heads_keep[b]`` are the sorted indices of the neurons / head groups
    block ``b`` keeps (a block not listed keeps all); ``layers`` are the indices of blocks to drop."""

    mlp_keep: dict[int, torch.Tensor] = field(default_factory=dict)
    heads_keep: dict[int, torch.Tensor] = field(default_factory=dict)
    layers: list[int] = field(default_factory=list)


# -- checking -------------------------------------------------------------------------------------------------
def check_removal(units: Units, removal: Removal) -> None:
    """Raise ValueError listing every reason ``removal`` cannot be applied; nothing is changed."""
    problems = Problems()
    n = len(units.blocks)
    bad = [i for i in removal.layers if not 0 <= i < n]
    if bad:
        problems.add(f"layers to remove {bad} do not exist: the model has {n} decoder layers (0..{n - 1})")
    kept_blocks = [b for b in range(n) if b not in set(removal.layers)]
    if not kept_blocks:
        problems.add(f"removing all {n} decoder layers would leave no model; keep at least one")
    if removal.layers and units.arch.name == "gpt2" and getattr(units.config, "scale_attn_by_inverse_layer_idx", False):
        problems.add("this GPT-2 scales attention by 1/(layer_idx + 1) (scale_attn_by_inverse_layer_idx), so renumbering "
                     "layers would change the kept layers' outputs; layer removal is not supported for it")
    for kind, keep, total in (("MLP neurons", removal.mlp_keep, lambda b: units.blocks[b].neurons),
                              ("head groups", removal.heads_keep, lambda b: units.num_kv_heads)):
        if keep and kind == "head groups" and units.arch.attention is None:
            problems.add(f"attention heads of {units.arch.name} cannot be removed: {units.arch.heads_why_not}. "
                         f"Heads are supported for LLaMA-style models (llama, mistral, qwen2, qwen3)")
            continue
        counts = {}
        for b in kept_blocks:
            kept = keep.get(b)
            counts[b] = total(b) if kept is None else len(kept)
            if kept is not None and len(kept) == 0:
                problems.add(f"removing every one of the {total(b)} {kind} of layer {b} is not allowed; keep at least one")
            if kept is not None and len(kept) and (int(kept.min()) < 0 or int(kept.max()) >= total(b)):
                problems.add(f"{kind} indices of layer {b} are out of range 0..{total(b) - 1}")
        if len(set(counts.values())) > 1:
            problems.add(f"every layer must keep the same number of {kind} (Hugging Face configs hold one size for all "
                         f"layers), but the kept counts per layer are {sorted(set(counts.values()))}")
    problems.raise_if_any()


# -- slicing weights -----------------------------------------------------------------------------------------
def _new_param(old: nn.Parameter, value: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(value.contiguous(), requires_grad=old.requires_grad)


def _slice_mask(registry: Optional[MaskRegistry], name: str, dim: int, index: torch.Tensor) -> None:
    if registry is not None and name in registry.masks:
        registry.masks[name] = registry.masks[name].index_select(dim, index.to(registry.masks[name].device)).contiguous()
        registry.version += 1


def keep_outputs(module: nn.Module, index: torch.Tensor, name: str = "", registry: Optional[MaskRegistry] = None) -> None:
    """Keep only output features ``index`` of a Linear / Conv1D (weight rows and bias entries)."""
    dim = out_dim(module)
    index = index.to(module.weight.device)
    with torch.no_grad():
        module.weight = _new_param(module.weight, module.weight.index_select(dim, index))
        if getattr(module, "bias", None) is not None:
            module.bias = _new_param(module.bias, module.bias.index_select(0, index))
    if is_conv1d(module):
        module.nf = len(index)
    else:
        module.out_features = len(index)
    _slice_mask(registry, name, dim, index)


def keep_inputs(module: nn.Module, index: torch.Tensor, name: str = "", registry: Optional[MaskRegistry] = None) -> None:
    """Keep only input features ``index`` of a Linear / Conv1D (weight columns)."""
    dim = in_dim(module)
    index = index.to(module.weight.device)
    with torch.no_grad():
        module.weight = _new_param(module.weight, module.weight.index_select(dim, index))
    if is_conv1d(module):
        module.nx = len(index)
    else:
        module.in_features = len(index)
    _slice_mask(registry, name, dim, index)


def _name(model_names: dict, module: nn.Module) -> str:
    return model_names.get(id(module), "")


def _head_channels(groups: torch.Tensor, channels_per_group: int) -> torch.Tensor:
    """Channel indices of the given groups, each a run of ``channels_per_group`` consecutive channels."""
    offsets = torch.arange(channels_per_group)
    return (groups.view(-1, 1) * channels_per_group + offsets).reshape(-1)


def _shrink_mlp(block: Block, keep: torch.Tensor, names: dict, registry) -> None:
    for module in block.mlp_in:
        keep_outputs(module, keep, _name(names, module), registry)
    keep_inputs(block.mlp_out, keep, _name(names, block.mlp_out), registry)


def _shrink_heads(units: Units, block: Block, keep_groups: torch.Tensor, names: dict, registry) -> None:
    q, k, v, o = block.attention
    q_channels = _head_channels(keep_groups, units.group_size * units.head_dim)
    kv_channels = _head_channels(keep_groups, units.head_dim)
    keep_outputs(q, q_channels, _name(names, q), registry)
    keep_outputs(k, kv_channels, _name(names, k), registry)
    keep_outputs(v, kv_channels, _name(names, v), registry)
    keep_inputs(o, q_channels, _name(names, o), registry)
    attention = block.module.get_submodule(units.arch.attention[0].rsplit(".", 1)[0])
    for attr, value in (("num_heads", len(keep_groups) * units.group_size), ("num_key_value_heads", len(keep_groups)),
                        ("num_attention_heads", len(keep_groups) * units.group_size)):
        if isinstance(getattr(attention, attr, None), int):
            setattr(attention, attr, value)


def _renumber_registry(registry: Optional[MaskRegistry], prefix: str, new_index: dict[int, int], model: nn.Module) -> None:
    """Masks of dropped blocks are forgotten; masks of kept blocks move to the blocks' new names."""
    if registry is None or not registry.masks:
        return
    modules = dict(model.named_modules())
    masks, targets = {}, {}
    for name, mask in registry.masks.items():
        target = registry.targets[name]
        if name.startswith(prefix):
            head, _, rest = name[len(prefix):].partition(".")
            if head.isdigit():
                if int(head) not in new_index:
                    continue
                name = f"{prefix}{new_index[int(head)]}.{rest}"
                target = Target(name, modules[name], target.transposed)
        masks[name], targets[name] = mask, target
    registry.masks, registry.targets = masks, targets
    registry.version += 1


def _drop_layers(units: Units, removed: list[int], model: nn.Module, registry) -> None:
    gone = set(removed)
    kept = [i for i in range(len(units.blocks)) if i not in gone]
    stack = units.stack
    new_blocks = nn.ModuleList([stack.blocks[i] for i in kept])
    parent_name, _, attr = stack.name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new_blocks)
    for new, old in enumerate(kept):
        for module in new_blocks[new].modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new
    config = units.config
    setattr(config, units.arch.layers_key, len(kept))
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == len(units.blocks):
        config.layer_types = [layer_types[i] for i in kept]
    _renumber_registry(registry, stack.name + "." if stack.name else "", {old: new for new, old in enumerate(kept)}, model)


def apply_removal(model: nn.Module, removal: Removal, units: Optional[Units] = None) -> dict:
    """Remove the units of ``removal`` from ``model`` in place (checked first: on any problem nothing
    changes) and update the config. Returns the new sizes: ``{"intermediate_size", "num_attention_heads",
    "num_key_value_heads", "num_hidden_layers"}`` (None where not applicable)."""
    units = units or find_units(model)
    check_removal(units, removal)
    registry = MaskRegistry.existing(model)
    names = {id(m): n for n, m in model.named_modules()}
    config = units.config
    kept_blocks = [b for b in units.blocks if b.index not in set(removal.layers)]
    if units.arch.attention is not None and removal.heads_keep and getattr(config, "head_dim", None) is None:
        config.head_dim = units.head_dim  # fixed before the head count changes
    for block in units.blocks:
        if block.index in removal.mlp_keep and len(removal.mlp_keep[block.index]) != block.neurons:
            _shrink_mlp(block, removal.mlp_keep[block.index].cpu(), names, registry)
        if block.index in removal.heads_keep and len(removal.heads_keep[block.index]) != units.num_kv_heads:
            _shrink_heads(units, block, removal.heads_keep[block.index].cpu(), names, registry)
    if kept_blocks:
        setattr(config, units.arch.mlp_key, kept_blocks[0].neurons)
        if units.arch.attention is not None:
            kv = int(output_rows(kept_blocks[0].attention[1]).shape[0]) // units.head_dim
            group = units.group_size
            config.num_attention_heads = kv * group
            if hasattr(config, "num_key_value_heads"):
                config.num_key_value_heads = kv
    if removal.layers:
        _drop_layers(units, sorted(removal.layers), model, registry)
    return sizes(model)


def sizes(model: nn.Module) -> dict:
    """The structural sizes of ``model``: MLP neurons per layer, head counts and layers."""
    units = find_units(model)
    config = units.config
    return {
        "intermediate_size": units.blocks[0].neurons,  # GPT-2's n_inner may be None (= 4 * hidden)
        "num_attention_heads": getattr(config, "num_attention_heads", None),
        "num_key_value_heads": getattr(config, "num_key_value_heads", None),
        "num_hidden_layers": getattr(config, units.arch.layers_key, None),
    }


# -- units that are already zero ----------------------------------------------------------------------------------
def _all_zero(t: Optional[torch.Tensor], dim: Optional[int] = None) -> torch.Tensor | bool:
    if t is None:
        return True
    if dim is None:
        return not bool(t.detach().count_nonzero())
    others = [d for d in range(t.dim()) if d != dim]
    return (t.detach() != 0).sum(dim=others) == 0 if others else t.detach() == 0


def _activation_zero_at_zero(config) -> bool:
    name = getattr(config, "hidden_act", None) or getattr(config, "activation_function", None)
    try:
        from transformers.activations import ACT2FN

        return bool(ACT2FN[name](torch.zeros(1)).abs().max() == 0)
    except Exception:  # an unknown activation: only output columns count as dead
        return False


def dead_neurons(units: Units, block: Block) -> torch.Tensor:
    """Bool per neuron: it contributes nothing (its output-projection column is zero, or one of its input
    rows, with bias, is zero and the activation maps 0 to 0)."""
    dead = _all_zero(block.mlp_out.weight, in_dim(block.mlp_out))
    if _activation_zero_at_zero(units.config):
        for module in block.mlp_in:
            rows = _all_zero(module.weight, out_dim(module))
            if getattr(module, "bias", None) is not None:
                rows = rows & (module.bias.detach() == 0)
            dead = dead | rows
    return dead


def dead_head_groups(units: Units, block: Block) -> torch.Tensor:
    """Bool per head group: all its o_proj columns are zero, or its value rows (and value bias) are zero."""
    q, k, v, o = block.attention
    out_cols = _all_zero(o.weight, in_dim(o)).reshape(-1, units.group_size * units.head_dim).all(dim=1)
    v_rows = _all_zero(v.weight, out_dim(v))
    if getattr(v, "bias", None) is not None:
        v_rows = v_rows & (v.bias.detach() == 0)
    return out_cols | v_rows.reshape(-1, units.head_dim).all(dim=1)


def dead_layer(units: Units, block: Block) -> bool:
    """Whether the block is the identity: its attention and MLP outputs are zero (weights and biases)."""
    attn_out = block.attention[3] if block.attention is not None else _attention_output(block)
    mlp_out = block.mlp_out
    return all(_all_zero(m.weight) and _all_zero(getattr(m, "bias", None)) for m in (attn_out, mlp_out) if m is not None) \
        and attn_out is not None


def _attention_output(block: Block) -> Optional[nn.Module]:
    for name in ("attn.c_proj", "self_attn.out_proj"):
        try:
            return block.module.get_submodule(name)
        except AttributeError:
            continue
    return None


def _uniform(dead: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Kept indices per block after removing, in every block, the same number of its dead units: the
    smallest number of dead units of any block (the uniform rule); which dead ones: the first."""
    if not dead:
        return {}
    count = min(int(d.sum()) for d in dead.values())
    keep = {}
    for b, d in dead.items():
        drop = torch.nonzero(d).reshape(-1)[:count]
        mask = torch.ones_like(d, dtype=torch.bool)
        mask[drop] = False
        keep[b] = torch.nonzero(mask).reshape(-1)
    return keep


def find_zeroed_units(model: nn.Module, mlp: bool = True, heads: bool = True, layers: bool = True) -> Removal:
    """A :class:`Removal` of the units of ``model`` that contribute nothing, under the uniform rule."""
    units = find_units(model)
    removal = Removal()
    if layers:
        removal.layers = [b.index for b in units.blocks if dead_layer(units, b)]
        if len(removal.layers) == len(units.blocks):
            removal.layers = removal.layers[1:]  # a model of identity blocks still keeps one
    kept = [b for b in units.blocks if b.index not in set(removal.layers)]
    if mlp:
        removal.mlp_keep = _uniform({b.index: dead_neurons(units, b) for b in kept})
        for b, keep in list(removal.mlp_keep.items()):
            if len(keep) == 0:  # every neuron is dead in every layer: keep one (a zero) per layer
                removal.mlp_keep[b] = torch.tensor([0])
    if heads and units.arch.attention is not None:
        removal.heads_keep = _uniform({b.index: dead_head_groups(units, b) for b in kept})
        for b, keep in list(removal.heads_keep.items()):
            if len(keep) == 0:
                removal.heads_keep[b] = torch.tensor([0])
    return removal


def remove_zeroed_units(model: nn.Module, mlp: bool = True, heads: bool = True, layers: bool = True) -> dict:
    """Physically remove the units of ``model`` that are already zero (masked by structured pruning), in
    place; the outputs do not change. What counts as zero: an MLP neuron whose output column, or one of whose
    input rows (with bias, for activations with act(0) = 0), is all zero; a head group (a KV head with its
    query heads) whose o_proj columns or value rows are all zero; a decoder layer whose attention and MLP
    output projections (weights and biases) are all zero. The uniform rule applies: each layer loses as
    many neurons (head groups) as the layer with the fewest zeroed ones; any others stay in place as zeros.

    This is the function behind a structured export. Returns ``{"removed": {"mlp_per_layer", "head_groups_per_layer",
    "layers"}, "sizes": ...}``.
    """
    units = find_units(model)
    removal = find_zeroed_units(model, mlp, heads, layers)
    per_layer = lambda keep, total: (total - len(next(iter(keep.values())))) if keep else 0  # noqa: E731
    removed = {
        "mlp_per_layer": per_layer(removal.mlp_keep, units.blocks[0].neurons),
        "head_groups_per_layer": per_layer(removal.heads_keep, units.num_kv_heads),
        "layers": list(removal.layers),
    }
    new_sizes = apply_removal(model, removal, units)
    log.info("removed zeroed units: %s -> %s", removed, new_sizes)
    return {"removed": removed, "sizes": new_sizes}
