"""Sparsity reports: what fraction of the targeted weights is exactly zero, overall, per layer and per
layer type (the last part of the module name, e.g. ``q_proj``). Plain dicts, JSON-serialisable."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from .shards import count_zeros
from .targets import Target, find_targets


def sparsity_report(model: nn.Module, targets: Optional[Sequence[Target]] = None) -> dict:
    """Count zero weights of ``targets`` (default: :func:`find_targets` of the model).

    Returns ``{"global": {...}, "layers": {name: {...}}, "by_type": {type: {...}}}`` where each entry has
    ``zeros``, ``numel`` and ``sparsity``. Weights sharded across ranks (FSDP2) count as whole tensors,
    their zeros summed over the shards: then it is a collective, every rank calls it and gets the report.
    """
    if targets is None:
        targets = find_targets(model)
    layers, by_type = {}, {}
    total_zeros = total = 0
    all_zeros = count_zeros([t.weight for t in targets])
    with torch.no_grad():
        for t, zeros in zip(targets, all_zeros):
            numel = t.numel
            layers[t.name] = {"zeros": zeros, "numel": numel, "sparsity": zeros / numel}
            kind = by_type.setdefault(t.name.rsplit(".", 1)[-1], {"zeros": 0, "numel": 0})
            kind["zeros"] += zeros
            kind["numel"] += numel
            total_zeros += zeros
            total += numel
    for kind in by_type.values():
        kind["sparsity"] = kind["zeros"] / kind["numel"]
    return {
        "global": {"zeros": total_zeros, "numel": total, "sparsity": total_zeros / total if total else 0.0},
        "layers": layers,
        "by_type": by_type,
    }
