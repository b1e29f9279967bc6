"""Loading an export back: :func:`load` reads any format :func:`gradprune.export` writes.

``dense`` and ``structured`` exports are Hugging Face model directories (``from_pretrained`` with the
config's architecture); a ``compressed`` one is rebuilt bit-exactly from its file
(:func:`gradprune.compressed.read_compressed`). Every failure is an :class:`ExportError` naming the file or
tensor that is missing or corrupted.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Union

from torch import nn

from .compressed import COMPRESSED_FILE, ExportError, read_compressed
from .exports import REPORT_FILE

# The weight files a dense export may hold (the loader looks for the first three).
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", COMPRESSED_FILE)


def _model_class(config):
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM


def _read_config(directory: Path):
    from transformers import AutoConfig

    path = directory / "config.json"
    if not path.is_file():
        raise ExportError(f"{path} is missing: an export keeps the model's config there")
    try:
        return AutoConfig.from_pretrained(directory)
    except (OSError, ValueError, KeyError) as exc:
        raise ExportError(f"{path} cannot be read as a Hugging Face model config (JSON with a known "
                          f"model_type): {type(exc).__name__}: {exc}") from exc


def _load_dense(directory: Path):
    config = _read_config(directory)
    present = [name for name in _WEIGHT_FILES[:3] if (directory / name).is_file()]
    if not present:
        raise ExportError(f"{directory} holds no model.safetensors (nor model.safetensors.index.json or "
                          "pytorch_model.bin): the weights of a dense export are missing")
    try:
        model, info = _model_class(config).from_pretrained(directory, config=config, output_loading_info=True)
    except Exception as exc:  # safetensors, torch and transformers each raise their own kind
        if "ignore_mismatched_sizes" in str(exc) or "size mismatch" in str(exc):
            found = "weights whose shapes do not fit the config"
        else:
            found = f"{type(exc).__name__}: {exc}"
        raise ExportError(f"cannot load the weights in {directory / present[0]} into the model that "
                          f"{directory / 'config.json'} describes ({config.model_type}): {found}") from exc
    missing = [k for k in info.get("missing_keys", []) if not _tied_alias(model, k)]
    if missing or info.get("mismatched_keys"):
        raise ExportError(f"{directory / present[0]} does not fit {directory / 'config.json'}: "
                          f"missing {sorted(missing)[:5]}, shapes that differ {list(info.get('mismatched_keys', []))[:5]}")
    return model


def _tied_alias(model: nn.Module, name: str) -> bool:
    """Whether parameter ``name`` of ``model`` is the same tensor as another (a tied head: not stored)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    weight = params.get(name)
    return weight is not None and any(p is weight for n, p in params.items() if n != name)


def _load_compressed(directory: Path):
    config = _read_config(directory)
    state, _ = read_compressed(directory / COMPRESSED_FILE)
    model, info = _model_class(config).from_pretrained(None, config=config, state_dict=state, output_loading_info=True)
    problems = []
    if info.get("missing_keys"):
        problems.append(f"tensors missing from {directory / COMPRESSED_FILE}: {sorted(info['missing_keys'])}")
    if info.get("unexpected_keys"):
        problems.append(f"tensors the model ({type(model).__name__}) does not have: {sorted(info['unexpected_keys'])}")
    if info.get("mismatched_keys"):
        problems.append(f"tensors whose shape does not fit the config: {[k[0] if isinstance(k, tuple) else k for k in info['mismatched_keys']]}")
    if problems:
        raise ExportError("; ".join(problems))
    return model


LOADERS: dict[str, Callable[[Path], nn.Module]] = {"dense": _load_dense, "compressed": _load_compressed,
                                                   "structured": _load_dense}


def load(directory: Union[str, os.PathLike]):
    """Load a model exported by :func:`export` in any format (a directory without gradprune.json is read
    as a plain Hugging Face model directory). The compressed format comes back bit-exactly as exported,
    in eval mode. Raises :class:`ExportError` (a ValueError) naming the file or tensor that is missing or
    corrupted; nothing is returned half-loaded."""
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory must be an export directory path (str or os.PathLike), got {directory!r}")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ExportError(f"{str(directory)!r} is a file; an export is a directory (holding config.json, the weights "
                          "and gradprune.json)")
    if not directory.is_dir():
        raise ExportError(f"export directory {str(directory)!r} does not exist")
    report = directory / REPORT_FILE
    if report.is_file():
        try:
            format = json.loads(report.read_text()).get("format", "dense")
        except (json.JSONDecodeError, AttributeError) as exc:
            raise ExportError(f"{report} is corrupted: {exc}") from exc
    else:
        format = "compressed" if (directory / COMPRESSED_FILE).is_file() else "dense"
    if format not in LOADERS:
        raise ExportError(f"{report} names format {format!r}; this gradprune loads {list(LOADERS)}")
    return LOADERS[format](directory)
