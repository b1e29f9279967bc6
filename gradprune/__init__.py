"""gradprune: train-time pruning for PyTorch and Hugging Face models with Lightning.

The core (targets, schedules, mask selection, the mask registry, reports, the pruning methods) needs only
torch; the pipelines around it also use transformers (finding and rebuilding models) and safetensors
(exports). The Lightning pieces live in :mod:`gradprune.callbacks` and the LightningModule / DataModule
modules.

Every name below is imported on first use (PEP 562), so ``import gradprune`` costs nothing until a name is
used, and the ``gradprune`` command starts without torch for ``--help`` (gradprune/cli.py).
"""
import importlib

from .version import __version__  # a leaf module: it imports nothing

# public name -> the module defining it
_LAZY = {
    "FORMATS": ".exports", "export": ".exports", "load": ".loading",
    "MaskRegistry": ".masks", "pack_mask": ".bits", "unpack_mask": ".bits",
    "magnitude_scores": ".methods.magnitude",
    "prune_oneshot": ".oneshot",
    "MaskedAdamW": ".optim",
    "sparsity_report": ".report",
    "SparsitySchedule": ".schedules",
    "exact_count": ".selection", "select_masks": ".selection",
    "accelerate_2of4": ".semistructured",
    "prune_structured": ".structured", "remove_zeroed_units": ".structured",
    "Target": ".targets", "find_targets": ".targets",
    "evaluate_tasks": ".task_eval",
    "PrunableLM": ".lightning_module", "TextDataModule": ".data", "byte_tokenizer": ".tokenizer",
}


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    else:  # a submodule: gradprune.calibration, gradprune.masks, ...
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module 'gradprune' has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


def prune(model, sparsity, scope="layer", pattern="unstructured", include=None, exclude=None, score_fn=None):
    """Prune ``model`` in place to exactly ``sparsity`` (monotone with any earlier masks) and return the
    keep-masks. A thin convenience over find_targets -> select_masks -> MaskRegistry.update; ``score_fn``
    defaults to :func:`gradprune.magnitude_scores`."""
    from .masks import MaskRegistry  # these imports are lazy so that `import gradprune` stays light
    from .methods.magnitude import magnitude_scores  # (lazy, as above)
    from .selection import check_existing_masks, select_masks, validate_selection  # (lazy, as above)
    from .targets import find_targets  # (lazy, as above)
    from .validation import Problems, check_weights_usable  # (lazy, as above)

    score_fn = magnitude_scores if score_fn is None else score_fn
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
    "evaluate_tasks",
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
