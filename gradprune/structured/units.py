"""The structural units of a transformer that structured pruning removes, found per architecture.

Three kinds of unit, each inside one decoder block of the model's block stack
(:func:`gradprune.blocks.find_block_stack`):

- **MLP neuron** ``j``: output row ``j`` of every MLP input projection (``gate_proj`` and ``up_proj`` in a
  gated LLaMA-style MLP, ``fc1`` in OPT, GPT-2's ``c_fc``) and input column ``j`` of the output projection
  (``down_proj``, ``fc2``, GPT-2's ``c_proj``).
- **Attention head group** ``g``: with grouped-query attention (``num_key_value_heads`` < ``num_attention_heads``)
  one key/value head and the ``r = num_attention_heads / num_key_value_heads`` query heads that read it,
  so that removing whole groups keeps the query-per-KV ratio valid; without GQA, one head. Its rows in
  q/k/v (``head_dim`` rows per head) and its columns in ``o_proj``.
- **Decoder layer**: one block of the stack.

Hugging Face configs hold one ``intermediate_size`` and one head count for every layer, so a smaller model
reloads with ``from_pretrained`` only if every layer keeps the same number of neurons and heads: the
*uniform rule* that :mod:`gradprune.structured.remove` enforces.

Supported architectures are listed in :data:`ARCHITECTURES` (by ``config.model_type``). Heads are removable
only where the attention takes ``head_dim`` from the config (LLaMA-style); GPT-2 and OPT compute it as
``hidden_size // num_heads``, so a model with fewer heads is not expressible in their configs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..blocks import BlockStack, find_block_stack

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = None


@dataclass(frozen=True)
class Architecture:
    """Where the units of one architecture live (module names relative to a decoder block) and which
    config fields hold their counts."""

    name: str
    mlp_in: tuple[str, ...]  # projections whose output rows are the neurons
    mlp_out: str  # the projection whose input columns are the neurons
    mlp_key: str  # config field of the number of neurons per layer
    layers_key: str = "num_hidden_layers"
    attention: Optional[tuple[str, str, str, str]] = None  # q, k, v, o (None: heads cannot be removed)
    heads_why_not: str = ""  # why heads cannot be removed, if they cannot


_LLAMA_ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_LLAMA = dict(mlp_in=("mlp.gate_proj", "mlp.up_proj"), mlp_out="mlp.down_proj", mlp_key="intermediate_size",
              attention=_LLAMA_ATTENTION)
_FIXED_HEAD_DIM = "its attention derives head_dim from hidden_size // num_heads, so fewer heads cannot be expressed in its config"

#: The architectures structured pruning knows, by ``config.model_type``.
ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("llama", **_LLAMA),
    "mistral": Architecture("mistral", **_LLAMA),
    "qwen2": Architecture("qwen2", **_LLAMA),
    "qwen3": Architecture("qwen3", **_LLAMA),
    "gpt2": Architecture("gpt2", mlp_in=("mlp.c_fc",), mlp_out="mlp.c_proj", mlp_key="n_inner", layers_key="n_layer",
                         heads_why_not=_FIXED_HEAD_DIM),
    "opt": Architecture("opt", mlp_in=("fc1",), mlp_out="fc2", mlp_key="ffn_dim", heads_why_not=_FIXED_HEAD_DIM),
}


# -- Linear / Conv1D layout ---------------------------------------------------------------------------------
def is_conv1d(module: nn.Module) -> bool:
    return Conv1D is not None and isinstance(module, Conv1D)


def out_dim(module: nn.Module) -> int:
    """The weight dimension that indexes output features: 0 for nn.Linear, 1 for GPT-2's Conv1D (in, out)."""
    return 1 if is_conv1d(module) else 0


def in_dim(module: nn.Module) -> int:
    return 0 if is_conv1d(module) else 1


def output_rows(module: nn.Module) -> torch.Tensor:
    """The weight as (out_features, in_features), whatever the layout."""
    return module.weight.t() if is_conv1d(module) else module.weight


# -- finding the model, its config and its units --------------------------------------------------------------
def find_hf_model(model: nn.Module) -> nn.Module:
    """The outermost module of ``model`` (itself, or e.g. PrunableLM's ``model``) with a Hugging Face config."""
    for _, module in model.named_modules():
        config = getattr(module, "config", None)
        if isinstance(getattr(config, "model_type", None), str) and config.model_type:
            return module
    raise ValueError(f"structured pruning needs a Hugging Face model (a module with a config that has a model_type); "
                     f"{type(model).__name__} holds none. Supported model types: {sorted(ARCHITECTURES)}")


def architecture_of(model: nn.Module) -> Architecture:
    """The :class:`Architecture` of the HF model inside ``model``; ValueError naming the supported ones."""
    model_type = find_hf_model(model).config.model_type
    if model_type not in ARCHITECTURES:
        raise ValueError(f"structured pruning does not know the architecture {model_type!r}; supported model types: "
                         f"{sorted(ARCHITECTURES)} (LLaMA-style gate/up/down with q/k/v/o, GPT-2 c_fc/c_proj, OPT fc1/fc2)")
    return ARCHITECTURES[model_type]


@dataclass
class Block:
    """One decoder block and its unit-bearing modules."""

    index: int
    name: str  # module name relative to the model being pruned
    module: nn.Module
    mlp_in: list[nn.Module]
    mlp_out: nn.Module
    attention: Optional[tuple[nn.Module, nn.Module, nn.Module, nn.Module]]

    @property
    def neurons(self) -> int:
        return output_rows(self.mlp_out).shape[1]


@dataclass
class Units:
    """Everything structured pruning needs to know about a model: its architecture, config, blocks and
    the attention geometry."""

    arch: Architecture
    hf_model: nn.Module
    stack: BlockStack
    blocks: list[Block]

    @property
    def config(self):
        return self.hf_model.config

    @property
    def num_heads(self) -> int:
        return int(self.config.num_attention_heads)

    @property
    def num_kv_heads(self) -> int:
        return int(getattr(self.config, "num_key_value_heads", None) or self.num_heads)

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1 without GQA)."""
        return self.num_heads // self.num_kv_heads

    @property
    def head_dim(self) -> int:
        return int(getattr(self.config, "head_dim", None) or self.config.hidden_size // self.num_heads)


def find_units(model: nn.Module) -> Units:
    """The blocks and unit modules of ``model`` (an HF model of a supported architecture, or a module that
    holds one). Raises ValueError naming what is missing."""
    arch = architecture_of(model)
    hf_model = find_hf_model(model)
    stack = find_block_stack(model)
    if stack is None:
        raise ValueError(f"{type(model).__name__} has no stack of decoder blocks (an nn.ModuleList of one block class)")
    blocks = []
    for index, block in enumerate(stack.blocks):
        def get(name: str) -> nn.Module:
            try:
                return block.get_submodule(name)
            except AttributeError:
                raise ValueError(f"block {stack.block_name(index)!r} of the {arch.name} model has no {name!r}; the "
                                 f"{arch.name} layout expects {list(arch.mlp_in) + [arch.mlp_out]}") from None

        attention = tuple(get(n) for n in arch.attention) if arch.attention else None
        blocks.append(Block(index, stack.block_name(index), block, [get(n) for n in arch.mlp_in], get(arch.mlp_out), attention))
    return Units(arch, hf_model, stack, blocks)
