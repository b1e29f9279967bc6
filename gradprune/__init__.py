"""gradprune: train-time pruning for PyTorch and Hugging Face models with Lightning.

The core (targets, schedules, mask selection, the mask registry, reports) is pure torch; the Lightning
pieces live in :mod:`gradprune.callbacks` and the LightningModule / DataModule modules.
"""
from . import calibration
from .exports import FORMATS, export, load
from .masks import MaskRegistry, pack_mask, unpack_mask
from .methods.magnitude import magnitude_scores
from .oneshot import prune_oneshot
from .optim import MaskedAdamW
from .report import sparsity_report
from .schedules import SparsitySchedule
from .selection import exact_count, select_masks
from .semistructured import accelerate_2of4
from .structured import prune_structured, remove_zeroed_units
from .targets import Target, find_targets

__version__ = "0.1.0"

# The Lightning pieces are imported on first use, so `import gradprune` stays a pure-torch import.
_LAZY = {"PrunableLM": ".lightning_module", "TextDataModule": ".data", "byte_tokenizer": ".tokenizer"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'gradprune' has no attribute {name!r}")


def prune(model, sparsity, scope="layer", pattern="unstructured", include=None, exclude=None, score_fn=magnitude_scores):
    """Prune ``model`` in place to exactly ``sparsity`` (monotone with any earlier masks) and return the
    keep-masks. A thin convenience over find_targets -> select_masks -> MaskRegistry.update."""
    from .selection import validate_selection
    from .validation import Problems, check_existing_masks, check_weights_usable

    targets = find_targets(model, include, exclude)
    registry = MaskRegistry.of(model)
    nm = validate_selection(targets, sparsity, scope, pattern)
    problems = Problems()  # nothing changes unless the model and the earlier masks allow the request
    check_weights_usable(problems, model)
    check_existing_masks(problems, targets, registry.current(targets), sparsity, scope, nm, pattern)
    problems.raise_if_any()
    masks = select_masks(targets, sparsity, score_fn, scope, pattern, registry.current(targets))
    registry.update(targets, masks)
    return masks


__all__ = [
    "accelerate_2of4",
    "MaskRegistry",
    "MaskedAdamW",
    "PrunableLM",
    "SparsitySchedule",
    "Target",
    "TextDataModule",
    "byte_tokenizer",
    "exact_count",
    "export",
    "FORMATS",
    "load",
    "find_targets",
    "magnitude_scores",
    "pack_mask",
    "prune",
    "prune_oneshot",
    "prune_structured",
    "remove_zeroed_units",
    "calibration",
    "select_masks",
    "sparsity_report",
    "unpack_mask",
]
