"""Checks of a checkpoint that fit is to resume, before Lightning loads it: checkpoint problems named with their file.

- :func:`check_checkpoint_file`: the file is readable and a Lightning checkpoint (the ``gradprune`` command
  calls it before fit; Lightning reads the file before any hook of a module or callback could).
- :func:`check_checkpoint_fits`: every weight has the module's name and shape (torch's ``load_state_dict``
  copies the tensors that fit before it raises about the others).
- :func:`warn_masks_without_pruning`: pruning masks resumed without a pruning callback would train back.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Iterable, Mapping

import torch
from torch import nn

log = logging.getLogger(__name__)


def check_checkpoint_file(path: Any) -> None:
    """Read a checkpoint that fit is to resume from (memory-mapped: the tensors are not loaded) and raise
    ValueError naming it when it is truncated or not a Lightning checkpoint, instead of an error from deep
    inside torch or Lightning that names no file. The ``gradprune`` command calls it before fit; Lightning
    reads the file before any hook of a module or callback could."""
    if not path or not os.path.isfile(path):
        return
    try:
        try:
            checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        except RuntimeError as exc:  # not a zip file: the legacy format, or a truncated one, read whole
            if "mmap can only be used with files saved with" not in str(exc):
                raise
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch's zip reader, pickle and the filesystem raise their own kinds
        raise ValueError(f"checkpoint {str(path)!r} cannot be read as a torch checkpoint (truncated, or not one): "
                         f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(checkpoint, Mapping) or "state_dict" not in checkpoint:
        found = sorted(map(str, checkpoint))[:8] if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise ValueError(f"checkpoint {str(path)!r} is not a Lightning checkpoint (a dict with 'state_dict'); found "
                         f"{found}. Pass a .ckpt saved by a Trainer (ModelCheckpoint)")


def check_checkpoint_fits(module: nn.Module, checkpoint: dict, path: Any) -> None:
    """Every weight of the checkpoint has ``module``'s name and shape, checked before Lightning loads any: a
    checkpoint of another width or depth, or not of this module's class, is refused naming the file ``path``."""
    state = checkpoint.get("state_dict")
    if not isinstance(state, Mapping):
        raise ValueError(f"checkpoint {path!r} holds no 'state_dict' (found keys {sorted(checkpoint)[:8]}): "
                         "it is not a Lightning checkpoint of this module; nothing was loaded")
    own = module.state_dict()
    shapes = [f"{k} (checkpoint {list(v.shape)}, model {list(own[k].shape)})" for k, v in state.items()
              if k in own and hasattr(v, "shape") and tuple(v.shape) != tuple(own[k].shape)]
    strict = getattr(module, "strict_loading", True)
    missing = [k for k in own if k not in state] if strict else []
    unexpected = [k for k in state if k not in own] if strict else []
    if shapes or missing or unexpected:
        found = "; ".join(f"{what}: {items[:3]}{' ...' if len(items) > 3 else ''} ({len(items)})"
                          for what, items in (("shapes that differ", shapes), ("weights the checkpoint lacks", missing),
                                              ("weights this model lacks", unexpected)) if items)
        raise ValueError(f"checkpoint {path!r} does not fit this model ({type(getattr(module, 'model', module)).__name__}, "
                         f"{sum(1 for _ in own)} tensors): {found}. Resume with the model configuration the "
                         "checkpoint was trained with (width, depth); nothing was loaded")


def warn_masks_without_pruning(checkpoint: dict, callbacks: Iterable[Any]) -> None:
    """A checkpoint with pruning masks resumed without a pruning callback would train the pruned weights
    back: say so specifically (Lightning's own warning names no consequence)."""
    saved_states = checkpoint.get("callbacks") or {}
    saved = [key for key, state in saved_states.items() if isinstance(state, dict) and state.get("masks")]
    if not saved:
        return
    has_pruning = any(hasattr(cb, "registry") and hasattr(cb, "extra_state") for cb in callbacks)
    if not has_pruning:
        layers = len(saved_states[saved[0]]["masks"])
        log.warning(
            "the checkpoint holds pruning masks for %d layers (saved by %s), but this run has no pruning "
            "callback: the masks are not restored or enforced and the pruned weights will train back to "
            "non-zero values. Add the same pruning callback to resume the pruned run", layers, saved[0].split("{")[0],
        )
