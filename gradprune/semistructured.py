"""2:4 semi-structured sparsity on NVIDIA GPUs: ``accelerate_2of4`` swaps Linear weights for
``torch.sparse.to_sparse_semi_structured`` tensors, after checking torch's rules for them.

The rules (torch.sparse.semi_structured in torch 2.13, checked here before anything changes so that the
error names the layer):

- a CUDA tensor, on a GPU with sparse tensor cores (compute capability 8.0 and up: A100, H100, RTX 30xx+);
- 2-D, with the 2:4 pattern along the input dimension: at most 2 nonzeros in every 4 consecutive weights
  of a row (``gradprune.prune(model, 0.5, pattern="2:4")`` gives it);
- a dtype and shape its backend takes: with cuSPARSELt (torch's default) float16 / bfloat16 with both
  dimensions multiples of 16 (int8 and float8_e4m3fn: 32); with CUTLASS
  (``SparseSemiStructuredTensor._FORCE_CUTLASS = True``) float16 / bfloat16 with out_features a multiple
  of 32 and in_features a multiple of 64, float32 32 x 32, int8 16 x 128. The limits are read from torch
  when it has them (:func:`shape_rules`).

The input activations need no particular shape: torch pads them. The swapped weights are for inference:
they have no gradient and the mask registry no longer enforces anything on them.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn

from .validation import Problems

log = logging.getLogger(__name__)

# (min rows, min cols) = (out_features, in_features) multiples per dtype, as torch 2.13 has them; used when
# torch does not expose its own table.
_CUSPARSELT_RULES = {torch.float16: (16, 16), torch.bfloat16: (16, 16), torch.int8: (32, 32)}
_CUTLASS_RULES = {torch.float16: (32, 64), torch.bfloat16: (32, 64), torch.float32: (32, 32), torch.int8: (16, 128)}
MIN_CAPABILITY = (8, 0)


def shape_rules() -> tuple[str, dict[torch.dtype, tuple[int, int]]]:
    """(backend name, {dtype: (row multiple, column multiple)}) of the backend that
    ``to_sparse_semi_structured`` uses now."""
    from torch.sparse import semi_structured as ss

    cutlass = bool(getattr(ss.SparseSemiStructuredTensor, "_FORCE_CUTLASS", False))
    cls = getattr(ss, "SparseSemiStructuredTensorCUTLASS" if cutlass else "SparseSemiStructuredTensorCUSPARSELT", None)
    table = getattr(cls, "_DTYPE_SHAPE_CONSTRAINTS", None)
    if table:
        rules = {dtype: (int(c.sparse_min_rows), int(c.sparse_min_cols)) for dtype, c in table.items()}
    else:
        rules = dict(_CUTLASS_RULES if cutlass else _CUSPARSELT_RULES)
    return ("CUTLASS" if cutlass else "cuSPARSELt"), rules


def satisfies_2of4(weight: torch.Tensor) -> bool:
    """Whether a 2-D (out, in) weight has at most 2 nonzeros in every 4 consecutive inputs of each row."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    nonzeros = (weight.detach() != 0).reshape(weight.shape[0], -1, 4).sum(dim=-1)
    return bool((nonzeros <= 2).all())


def layer_problems(name: str, weight: torch.Tensor, rules: dict, backend: str,
                   capability: Optional[tuple[int, int]] = None) -> list[str]:
    """Why ``weight`` (of layer ``name``) cannot become a semi-structured tensor; empty if it can.
    ``capability`` is the compute capability of the weight's CUDA device (None: look it up)."""
    problems = []
    if weight.device.type != "cuda":
        return [f"layer {name!r} is on {weight.device}: 2:4 sparse matmuls need a CUDA GPU with compute "
                f"capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}+ (move the model with .to('cuda') first)"]
    if capability is None:
        capability = torch.cuda.get_device_capability(weight.device)
    if tuple(capability) < MIN_CAPABILITY:
        problems.append(f"layer {name!r} is on {weight.device} with compute capability {capability[0]}.{capability[1]}: "
                        f"2:4 sparse tensor cores need {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}+ (A100, H100, RTX 30xx or newer)")
    if weight.dtype not in rules:
        problems.append(f"layer {name!r} has dtype {weight.dtype}; {backend} takes {sorted(str(d) for d in rules)} "
                        f"(convert with model.half() or .to(torch.bfloat16))")
        return problems
    rows, cols = rules[weight.dtype]
    out_features, in_features = weight.shape
    if out_features % rows or in_features % cols:
        problems.append(f"layer {name!r} has shape {tuple(weight.shape)} (out, in); {backend} needs out_features "
                        f"a multiple of {rows} and in_features a multiple of {cols} for {weight.dtype}")
    return problems


def accelerate_2of4(model: nn.Module) -> list[str]:
    """Replace the weight of every ``nn.Linear`` in ``model`` that satisfies 2:4 with a
    ``torch.sparse.to_sparse_semi_structured`` tensor (in place) and return those layers' names.

    Linear layers that do not satisfy 2:4 stay dense. Raises ValueError, with the model unchanged, when
    no Linear satisfies 2:4, or when any that does breaks the rules in the module docstring (each such
    layer is named: on CPU, an old GPU, an unsupported dtype or shape). For inference: the new weights
    take no gradient.
    """
    shared = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            shared[id(param)] = shared.get(id(param), 0) + 1
    chosen = [(name, module) for name, module in model.named_modules()
              if isinstance(module, nn.Linear) and shared.get(id(module.weight), 0) == 1
              and satisfies_2of4(module.weight)]
    if not chosen:
        raise ValueError(f"no nn.Linear of the {type(model).__name__} satisfies 2:4 (at most 2 nonzeros in every 4 "
                         "consecutive inputs): prune it first, e.g. gradprune.prune(model, 0.5, pattern='2:4')")
    backend, rules = shape_rules()
    problems = Problems()
    for name, module in chosen:
        for problem in layer_problems(name, module.weight, rules, backend):
            problems.add(problem)
    if len(problems.value_errors) > 8:  # a whole model on CPU: one line per kind is enough
        first = problems.value_errors[:4]
        problems.value_errors = first + [f"... and {len(problems.value_errors) - 4} more problems of "
                                         f"{len(chosen)} 2:4 layers"]
    problems.raise_if_any()

    from torch.sparse import to_sparse_semi_structured

    replaced: list[tuple[nn.Linear, nn.Parameter]] = []
    try:
        for name, module in chosen:
            original = module.weight
            sparse = to_sparse_semi_structured(original.detach().contiguous())
            module.weight = nn.Parameter(sparse, requires_grad=False)
            replaced.append((module, original))
    except Exception:  # leave nothing half-changed
        for module, original in replaced:
            module.weight = original
        raise
    log.info("2:4 semi-structured weights (%s) in %d Linear layers", backend, len(chosen))
    return [name for name, _ in chosen]
