"""Which weights are prunable.

A *target* is one weight matrix of an ``nn.Linear`` or of a GPT-2 style ``Conv1D`` (which stores its weight
transposed: ``(in_features, out_features)``). All maths in gradprune works on the ``(out, in)`` view given
by :meth:`Target.out_in`, so row groups and N:M groups always run along the input dimension.

Defaults fit transformers: every Linear / Conv1D in the model except the output head (``lm_head`` or any
module whose weight is tied to the input embeddings). Embeddings, norms and biases are never targets.
``include`` / ``exclude`` follow PEFT's ``target_modules`` convention: a regex string is matched against the
full module name (``re.fullmatch``); a list matches a name exactly or as a ``.suffix``.

Adapter wrappers (PEFT's tuner layers, such as LoRA's ``lora.Linear`` around a ``base_layer``): the wrapper is
the target, under the layer's own name (``...q_proj``, not ``...q_proj.base_layer``), and its ``weight`` is the
wrapped layer's; the adapters' own Linear layers inside it (``lora_A``, ``lora_B``) are never targets.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Sequence, Union

import torch
from torch import nn

from .validation import Problems, check_selector

try:  # transformers is a dependency, but the core must stay importable without it
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = None

Selector = Union[str, Sequence[str], None]

log = logging.getLogger(__name__)

DEFAULT_HEAD_NAMES = ("lm_head", "output", "embed_out", "classifier", "score")


@dataclass(frozen=True)
class Target:
    """One prunable weight: its module name, the module, and whether the weight is stored (in, out)."""

    name: str
    module: nn.Module
    transposed: bool = False

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    def out_in(self, tensor: torch.Tensor) -> torch.Tensor:
        """View a tensor shaped like the stored weight as (out_features, in_features)."""
        return tensor.t() if self.transposed else tensor

    def stored(self, tensor: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`out_in`: an (out, in) tensor back in the stored weight's layout."""
        return tensor.t() if self.transposed else tensor

    @property
    def in_features(self) -> int:
        return self.out_in(self.weight).shape[1]

    @property
    def out_features(self) -> int:
        return self.out_in(self.weight).shape[0]

    @property
    def numel(self) -> int:
        return self.weight.numel()


def wrapped_layer(module: nn.Module) -> "nn.Module | None":
    """The layer an adapter wrapper holds (PEFT's tuner layers: a ``base_layer`` and ``get_base_layer()``,
    innermost first when wrappers nest), or None when ``module`` is not such a wrapper."""
    get_base = getattr(module, "get_base_layer", None)
    if callable(get_base) and isinstance(getattr(module, "base_layer", None), nn.Module):
        return get_base()
    return None


def _is_conv1d(module: nn.Module) -> bool:
    return Conv1D is not None and isinstance(module, Conv1D)


def is_prunable(module: nn.Module) -> bool:
    """Whether ``module`` is a kind of layer gradprune prunes: ``nn.Linear``, GPT-2's ``Conv1D``, or an
    adapter wrapper (:func:`wrapped_layer`) around one."""
    module = wrapped_layer(module) or module
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def _head_names(model: nn.Module) -> set[str]:
    """Module names of output heads, also when the HF model is wrapped (e.g. inside a LightningModule):
    modules named ``lm_head`` / ``embed_out`` anywhere, what any submodule's ``get_output_embeddings()``
    returns, modules whose weight is tied to an ``nn.Embedding``, and conventional head names at the top."""
    name_of = {id(module): name for name, module in model.named_modules()}
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    heads = set()
    for name, module in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        if last in ("lm_head", "embed_out") or (last in DEFAULT_HEAD_NAMES and "." not in name):
            heads.add(name)
        if id(getattr(module, "weight", None)) in embedding_weights and not isinstance(module, nn.Embedding):
            heads.add(name)
        get_out = getattr(module, "get_output_embeddings", None)
        if callable(get_out):
            try:
                out = get_out()
            except (NotImplementedError, AttributeError):
                out = None
            if out is not None and id(out) in name_of:
                heads.add(name_of[id(out)])
    return heads


def _matches(name: str, selector: Selector) -> bool:
    if isinstance(selector, str):
        return re.fullmatch(selector, name) is not None
    return any(name == key or name.endswith("." + key) for key in selector)


def find_targets(model: nn.Module, include: Selector = None, exclude: Selector = None) -> list[Target]:
    """Return the prunable weights of ``model`` in module order.

    Raises ValueError if ``include`` or ``exclude`` matches no module, or if nothing is left to prune, with a
    sample of the module names that exist; TypeError if a chosen weight is not floating point.
    """
    problems = Problems()
    check_selector(problems, "include", include)
    check_selector(problems, "exclude", exclude)
    problems.raise_if_any()
    names = [name for name, _ in model.named_modules() if name]
    sample = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
    for argument, selector in (("include", include), ("exclude", exclude)):
        if selector is not None and not any(_matches(n, selector) for n in names):
            raise ValueError(f"{argument}={selector!r} matches no module of the model; module names are: {sample}")

    heads = _head_names(model)
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    targets, tied, wrappers = [], [], []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in wrappers):
            continue  # inside an adapter wrapper: its base layer and the adapters' own layers
        if wrapped_layer(module) is not None:
            wrappers.append(name + ".")
        if not name or not is_prunable(module):
            continue
        if include is not None:
            if not _matches(name, include):
                continue
            if id(getattr(module, "weight", None)) in embedding_weights:  # an embedding is never a target
                tied.append(name)
                continue
        elif name in heads:
            continue
        if exclude is not None and _matches(name, exclude):
            continue
        transposed = _is_conv1d(wrapped_layer(module) or module)
        targets.append(Target(name, module, transposed))

    if tied:
        log.warning("include=%r selects %s, whose weight is tied to the input embedding: embeddings are never "
                    "pruned, so %s left out", include, tied, "it is" if len(tied) == 1 else "they are")
    if not targets:
        if tied:
            raise ValueError(
                f"include={include!r} selects only {tied}, whose weight is the input embedding's (tied "
                f"embeddings); embeddings are never targets. Untie them (tie_word_embeddings=False) or choose other modules"
            )
        raise ValueError(
            f"no prunable Linear/Conv1D weights found (include={include!r}, exclude={exclude!r}); "
            f"module names are: {sample}"
        )
    bad = [f"{t.name} ({t.weight.dtype})" for t in targets if not t.weight.dtype.is_floating_point]
    if bad:
        raise TypeError(f"only floating-point weights can be pruned; integer or boolean weights found: {bad[:5]}")
    return targets
