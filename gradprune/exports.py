"""Exports of a pruned model, and loading them back.

``export(model, out_dir, format=...)`` writes one of these formats (``FORMATS``), each a directory with
``config.json``, the tokenizer when one is known, and ``gradprune.json`` (the format, the sparsity report,
the recipe that produced the model when known, the gradprune version):

- ``dense``: the masks baked in (pruned weights exactly zero) and Hugging Face ``save_pretrained``
  (``model.safetensors``). Any Hugging Face loader reads it; ``AutoModelForCausalLM.from_pretrained``
  gives identical logits.
- ``compressed``: one ``model.compressed.safetensors`` file. Each pruned tensor ``W`` is stored as two
  entries, ``W::bitmask`` (uint8, the positions of its nonzero elements in row-major order bit-packed
  by :func:`gradprune.pack_mask`: 8 per byte, first element in the high bit, the last byte's unused
  low bits zero) and ``W::values`` (its nonzero elements in that order, in the tensor's own dtype);
  every other tensor is stored as is under its own name. The file's metadata holds ``gradprune.layout``
  (``"bitmask/1"``), ``gradprune.shapes`` (JSON: the shape of each bitmask-stored tensor) and
  ``gradprune.tied`` (JSON: tensor names stored once for a tied pair, mapped to the stored name), and the
  content hashes ``gradprune.sha256`` (every state-dict name -> :func:`tensor_sha256`) and
  ``gradprune.digest`` (of the other entries), which :func:`load` verifies.
  :func:`load` rebuilds the dense model bit-exactly.
- ``structured``: the physically smaller model: every MLP neuron, attention head group and decoder layer
  that is all zero (structured pruning masked it) removed from a copy by
  :func:`gradprune.remove_zeroed_units`, the config updated, then saved as ``dense``. It reloads with
  ``AutoModelForCausalLM.from_pretrained`` as an ordinary model of the smaller shape, with the same logits.

"Nonzero" is judged on the bits: -0.0 and NaN are values like any other, so the round trip is exact
for every tensor. A tensor is stored as a bitmask when it is a pruning target (the default targets of
:func:`gradprune.find_targets`, and whatever the model's mask registry holds) and that is smaller
than storing it dense (:func:`bitmask_nbytes`): in bf16 above 1/16 = 6.25% zeros, in fp32 above 1/32.
Embeddings, norms and biases are never targets and stay dense.
"""
from __future__ import annotations

import base64
import contextlib
import copy
import hashlib
import json
import logging
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

import numpy as np
import torch
from torch import nn

from .bits import SAME_WIDTH_INT, pack_mask, unpack_mask
from .masks import MaskRegistry
from .report import sparsity_report
from .shards import is_sharded
from .structured import remove_zeroed_units
from .structured.units import find_units
from .targets import Target, find_targets
from .validation import Problems
from .version import __version__

log = logging.getLogger(__name__)

REPORT_FILE = "gradprune.json"
COMPRESSED_FILE = "model.compressed.safetensors"
LAYOUT = "bitmask/1"
BITMASK_SUFFIX = "::bitmask"
VALUES_SUFFIX = "::values"
# The weight files a dense export may hold (the loader looks for the first three).
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", COMPRESSED_FILE)


class ExportError(ValueError):
    """An export directory that cannot be loaded: a file or tensor missing or corrupted."""


# -- the size of a bitmask-stored tensor (pure) -------------------------------------------------------
def bitmask_nbytes(numel: int, nonzeros: int, element_size: int) -> int:
    """Bytes of a tensor stored as a bitmask plus its nonzero values: ceil(numel / 8) + nonzeros * size."""
    return -(-numel // 8) + nonzeros * element_size


def ideal_nbytes(numel: int, nonzeros: int, element_size: int) -> float:
    """The ideal the compressed layout is held to: the values plus exactly one bit per element."""
    return numel / 8 + nonzeros * element_size


# -- one tensor to bitmask + values and back (pure) ---------------------------------------------------
def _as_numpy_bits(tensor: torch.Tensor) -> np.ndarray:
    """A CPU tensor's elements as a numpy array of integers of the same width (numpy has no bfloat16);
    shares memory with the tensor."""
    width = tensor.element_size()
    if tensor.is_floating_point() and width in SAME_WIDTH_INT:
        tensor = tensor.view(SAME_WIDTH_INT[width])
    return tensor.numpy()


def compress_tensor(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(bit-packed uint8 mask of the nonzero elements, the nonzero elements in row-major order, same
    dtype). Nonzero is judged on the bits, so -0.0 and NaN are kept as values."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    bits = _as_numpy_bits(flat)
    keep = bits != 0
    values = torch.from_numpy(bits[keep]).view(flat.dtype)
    return pack_mask(torch.from_numpy(keep)), values


def decompress_tensor(bitmask: torch.Tensor, values: torch.Tensor, shape, name: str = "tensor") -> torch.Tensor:
    """Inverse of :func:`compress_tensor`. Raises :class:`ExportError` naming ``name`` when the bitmask's
    length does not fit ``shape``, its unused bits are set, or it marks another number of elements than
    there are values."""
    shape = [int(d) for d in shape]
    numel = math.prod(shape)
    if bitmask.dtype != torch.uint8 or bitmask.dim() != 1 or bitmask.numel() != -(-numel // 8):
        raise ExportError(
            f"tensor {name!r} is corrupted: its bitmask should be {-(-numel // 8)} uint8 bytes for shape "
            f"{shape}, got {bitmask.numel()} {bitmask.dtype} in shape {list(bitmask.shape)}"
        )
    pad = (-numel) % 8
    if pad and int(bitmask[-1]) & ((1 << pad) - 1):
        raise ExportError(f"tensor {name!r} is corrupted: the unused last {pad} bits of its bitmask are set")
    keep = unpack_mask(bitmask, (numel,)).numpy()
    count = int(np.count_nonzero(keep))
    if values.dim() != 1 or values.numel() != count:
        raise ExportError(
            f"tensor {name!r} is corrupted: its bitmask marks {count} nonzero elements but {values.numel()} "
            f"values are stored (shape {list(values.shape)})"
        )
    source = _as_numpy_bits(values.contiguous())
    dense = np.zeros(numel, dtype=source.dtype)
    if count:
        np.place(dense, keep, source)
    return torch.from_numpy(dense).view(values.dtype).view(shape)


# -- content hashes (pure) -----------------------------------------------------------------------------
HASHES_KEY = "gradprune.sha256"  # JSON: every state-dict name -> tensor_sha256 of its dense tensor
DIGEST_KEY = "gradprune.digest"  # sha256 of the other gradprune.* metadata entries


def tensor_sha256(tensor: torch.Tensor) -> str:
    """The first 128 bits of the sha256 of a tensor's dtype, shape and bytes (row-major), base64 (22
    characters: plenty against accidental change, and a small header)."""
    digest = hashlib.sha256(f"{tensor.dtype}|{list(tensor.shape)}|".encode())
    digest.update(_as_numpy_bits(tensor.detach().cpu().contiguous().reshape(-1)).data)
    return base64.b64encode(digest.digest()[:16]).decode().rstrip("=")


def _metadata_digest(metadata: Mapping[str, str]) -> str:
    entries = {k: v for k, v in metadata.items() if k.startswith("gradprune.") and k != DIGEST_KEY}
    return hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()


def _verify_hashes(path: Path, metadata: Mapping[str, str], state: Mapping[str, torch.Tensor]) -> None:
    """Every tensor of ``state`` against the file's content hashes, then the metadata against its digest;
    raises ExportError naming the first tensor (or entry) that differs."""
    try:
        hashes = json.loads(metadata[HASHES_KEY])
    except (KeyError, json.JSONDecodeError) as exc:
        raise ExportError(f"{path} has corrupted metadata ({HASHES_KEY}): {exc}") from exc
    for name in sorted(set(state) | set(hashes)):
        if name not in hashes:
            raise ExportError(f"tensor {name!r} in {path} has no content hash: an entry was added after export")
        if name not in state:
            raise ExportError(f"tensor {name!r} is missing from {path} (its content hash is stored)")
        found = tensor_sha256(state[name])
        if found != hashes[name]:
            raise ExportError(f"tensor {name!r} in {path} does not match its content hash (stored {hashes[name]}, "
                              f"found {found}): the file was changed or corrupted after export")
    if metadata.get(DIGEST_KEY) != _metadata_digest(metadata):
        raise ExportError(f"{path}: the gradprune metadata does not match its digest ({DIGEST_KEY}): it was changed after export")


# -- finding what to export ---------------------------------------------------------------------------
def find_hf_model(model_or_module: nn.Module) -> nn.Module:
    """The Hugging Face model to export: ``model_or_module`` itself when it has ``save_pretrained`` and a
    ``config``, else its outermost submodule that has them (e.g. ``PrunableLM.model``)."""
    for _, module in model_or_module.named_modules():
        if callable(getattr(module, "save_pretrained", None)) and getattr(module, "config", None) is not None:
            return module
    raise TypeError(
        f"export needs a Hugging Face model (a module with save_pretrained and a config), and "
        f"{type(model_or_module).__name__} neither is one nor holds one"
    )


def _registries(*modules: nn.Module) -> list[MaskRegistry]:
    found = []
    for module in modules:
        registry = MaskRegistry.existing(module)
        if registry is not None and all(registry is not r for r in found):
            found.append(registry)
    return found


def pruned_tensor_names(model: nn.Module, registries=()) -> set[str]:
    """State-dict names (in ``model``) of the weights that count as pruned tensors: the default targets
    of :func:`find_targets` and every weight a mask registry holds a mask for."""
    weights = {id(t.weight) for r in registries for t in r.targets.values()}
    try:
        weights |= {id(t.weight) for t in find_targets(model)}
    except ValueError:  # a model with no default targets: only the registries' count
        pass
    return {name for name, p in model.named_parameters(remove_duplicate=False) if id(p) in weights}


def _report_targets(model: nn.Module, registries) -> list[Target]:
    try:
        targets = find_targets(model)
    except ValueError:
        targets = []
    ids = {id(t.weight) for t in targets}
    modules = {id(m): name for name, m in model.named_modules()}
    for registry in registries:  # weights pruned beyond the default targets, named inside ``model``
        for t in registry.targets.values():
            if id(t.weight) not in ids and id(t.module) in modules:
                targets.append(Target(modules[id(t.module)], t.module, t.transposed))
                ids.add(id(t.weight))
    return targets


# -- writing ------------------------------------------------------------------------------------------
def _write_dense(model: nn.Module, out: Path, registries) -> dict:
    model.save_pretrained(out, safe_serialization=True)
    return {}


def _write_compressed(model: nn.Module, out: Path, registries) -> dict:
    from safetensors.torch import save_file

    pruned = pruned_tensor_names(model, registries)
    tensors: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    stats = {"tensors": 0, "numel": 0, "nonzeros": 0, "bytes": 0, "ideal_bytes": 0.0}
    for name, tensor in model.state_dict(keep_vars=False).items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride(),
               tensor.dtype)
        if tensor.numel() and key in seen:  # a tied tensor (lm_head = embedding): stored once
            tied[name] = seen[key]
            continue
        seen[key] = name
        if name in pruned and tensor.is_floating_point():
            bitmask, values = compress_tensor(tensor)
            size = tensor.element_size()
            nbytes = bitmask_nbytes(tensor.numel(), values.numel(), size)
            if nbytes < tensor.numel() * size:
                tensors[name + BITMASK_SUFFIX] = bitmask
                tensors[name + VALUES_SUFFIX] = values
                shapes[name] = list(tensor.shape)
                stats["tensors"] += 1
                stats["numel"] += tensor.numel()
                stats["nonzeros"] += values.numel()
                stats["bytes"] += nbytes
                stats["ideal_bytes"] += ideal_nbytes(tensor.numel(), values.numel(), size)
                continue
        tensors[name] = tensor.detach().contiguous().cpu()
    metadata = {"format": "pt", "gradprune.layout": LAYOUT, "gradprune.shapes": json.dumps(shapes),
                "gradprune.tied": json.dumps(tied)}
    # content hashes: of every tensor as loaded back (tied names too), and of the metadata with them
    state = model.state_dict(keep_vars=False)
    metadata[HASHES_KEY] = json.dumps({name: tensor_sha256(state[name]) for name in sorted(state)})
    metadata[DIGEST_KEY] = _metadata_digest(metadata)
    save_file(tensors, str(out / COMPRESSED_FILE), metadata=metadata)
    _save_config(model, out)
    return {"compressed": {"file": COMPRESSED_FILE, "layout": LAYOUT, "tied": tied, **stats}}


def _save_config(model: nn.Module, out: Path) -> None:
    """config.json (and generation_config.json) as save_pretrained writes them (from a copy of the config:
    the model being exported keeps its own)."""
    config = copy.deepcopy(model.config)
    config.dtype = str(next(model.parameters()).dtype).split(".")[1]
    config.architectures = [type(model).__name__]
    config.save_pretrained(out)
    can_generate = getattr(model, "can_generate", None)
    if callable(can_generate) and can_generate() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)


def _write_structured(model: nn.Module, out: Path, registries) -> dict:
    """The physically smaller model: a copy of ``model`` without its all-zero MLP neurons, head groups and
    decoder layers (:func:`gradprune.remove_zeroed_units`, the uniform rule per layer), saved like ``dense``.
    The model itself is left as it is; the copy costs one more model in memory while it is written."""
    smaller = copy.deepcopy(model)
    removed = remove_zeroed_units(smaller)
    smaller.save_pretrained(out, safe_serialization=True)
    return {"structured": _jsonable(removed), "sparsity": sparsity_report(smaller)}


# The writers by format name. A format is one entry: a function (hf_model, directory, registries) that
# writes the weights and config and returns extra entries for gradprune.json.
WRITERS: dict[str, Callable[[nn.Module, Path, list], dict]] = {
    "dense": _write_dense,
    "compressed": _write_compressed,
    "structured": _write_structured,
}
FORMATS = tuple(WRITERS)


def check_format(problems: Problems, format: Any) -> None:
    if not isinstance(format, str) or format not in WRITERS:
        problems.add(f"format must be one of {list(FORMATS)}, got {format!r}")


def _jsonable(value: Any) -> Any:
    """``value`` with anything JSON cannot hold turned into its repr (recipes hold arbitrary objects)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return repr(value)


def _is_export(directory: Path) -> bool:
    """Whether ``directory`` holds a gradprune export (its gradprune.json names a format)."""
    try:
        return isinstance(json.loads((directory / REPORT_FILE).read_text()).get("format"), str)
    except (OSError, ValueError, AttributeError):
        return False


def check_destination(problems: Problems, out_dir: Any, overwrite: Any = False, name: str = "out_dir") -> None:
    """``out_dir`` may be new, an empty directory, an earlier gradprune export, or (``overwrite=True``)
    any directory; never a file. ``name``: what the caller calls the argument."""
    if not isinstance(overwrite, bool):
        problems.add(f"overwrite must be True or False, got {overwrite!r}", type_error=True)
        overwrite = False
    if not isinstance(out_dir, (str, os.PathLike)):
        problems.add(f"{name} must be a directory path (str or os.PathLike), got {out_dir!r}", type_error=True)
        return
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        problems.add(f"{name}={str(out_dir)!r} is a file, not a directory")
    elif out.is_dir() and not overwrite and not _is_export(out):
        held = sorted(p.name for p in out.iterdir())
        if held:
            hf = " (a Hugging Face model)" if "config.json" in held else ""
            problems.add(f"{name}={str(out_dir)!r} holds files that are not a gradprune export{hf}: "
                         f"{held[:5]}{' ...' if len(held) > 5 else ''}; allowed: a new or empty directory or an earlier "
                         "gradprune export (it is replaced whole), or overwrite=True to replace the directory and "
                         "everything in it")


def _swap_in(new: Path, out: Path) -> None:
    """Put the complete directory ``new`` at ``out`` (both in the same parent directory): ``out``'s old
    contents are moved aside, ``new`` renamed in, then the old contents deleted. A failure before the
    second rename puts the old directory back."""
    if not out.exists():
        os.rename(new, out)
        return
    old = out.parent / f".{out.name}.gradprune-old-{uuid.uuid4().hex[:8]}"
    os.rename(out, old)
    try:
        os.rename(new, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def export(
    model_or_module: nn.Module,
    out_dir: Union[str, os.PathLike],
    format: str = "dense",
    tokenizer: Any = None,
    recipe: Optional[Mapping[str, Any]] = None,
    overwrite: bool = False,
) -> Path:
    """Write the (pruned) model to ``out_dir`` in ``format`` (see the module docstring) and return the path.

    Args:
        model_or_module: a Hugging Face model, or a module holding one (a LightningModule such as
            :class:`gradprune.PrunableLM`). A module with an ``export_parts()`` method returns
            ``(hf_model, tokenizer, recipe)`` itself (PrunableLM: its data module's tokenizer, its
            hyperparameters and pruning callbacks).
        out_dir: the directory: new, empty, or an earlier gradprune export (replaced whole, so it never
            holds two models). A directory holding anything else (such as an unrelated Hugging Face model) is
            refused unless ``overwrite=True``, which replaces it and everything in it.
        format: one of ``FORMATS``.
        tokenizer: saved with the model (anything with ``save_pretrained``); default the one the module knows.
        recipe: what produced the model (a dict), stored in gradprune.json; default the one the module knows.
        overwrite: replace a directory that is not a gradprune export.

    Every argument is checked first. The export is written into a new directory beside ``out_dir`` and
    swapped in only when complete: when anything fails (a bad argument, a full disk, an interrupt),
    ``out_dir`` keeps what it held, and a reader never sees a mix of two exports.

    The masks of the model's mask registry (and of the wrapping module's) are applied first: pruned
    weights are zeroed in place (a no-op while the masks were enforced).
    """
    problems = Problems()
    check_format(problems, format)
    check_destination(problems, out_dir, overwrite)
    if tokenizer is not None and not callable(getattr(tokenizer, "save_pretrained", None)):
        problems.add(f"tokenizer must be None or a tokenizer with save_pretrained (e.g. from transformers' "
                     f"AutoTokenizer), got {tokenizer!r} ({type(tokenizer).__name__})", type_error=True)
    if recipe is not None and not isinstance(recipe, Mapping):
        problems.add(f"recipe must be None or a dict, got {recipe!r} ({type(recipe).__name__})", type_error=True)
    if isinstance(model_or_module, torch.nn.Module):
        sharded = [n for n, p in model_or_module.named_parameters() if is_sharded(p)]
        if sharded:
            problems.add(f"export needs whole weights, but {len(sharded)} are sharded across ranks (FSDP2 DTensors, e.g. "
                         f"{sharded[0]!r}): gather them into an unsharded copy first (torch.distributed.checkpoint."
                         "state_dict.get_model_state_dict with full_state_dict=True) and export that on one rank")
    problems.raise_if_any()
    known_tokenizer, known_recipe = None, None
    parts = getattr(model_or_module, "export_parts", None)
    if callable(parts):
        model, known_tokenizer, known_recipe = parts()
    else:
        model = find_hf_model(model_or_module)
        hparams = getattr(model_or_module, "hparams", None)
        if model is not model_or_module and isinstance(hparams, Mapping):
            known_recipe = {"hparams": dict(hparams)}
    tokenizer = tokenizer if tokenizer is not None else known_tokenizer
    recipe = recipe if recipe is not None else known_recipe
    if tokenizer is not None and not callable(getattr(tokenizer, "save_pretrained", None)):
        raise TypeError(f"the tokenizer {type(model_or_module).__name__} knows has no save_pretrained: "
                        f"{type(tokenizer).__name__}; pass tokenizer= explicitly")
    out = Path(out_dir)
    if format == "structured":  # an architecture it cannot shrink fails here, before anything is changed or deleted
        find_units(model)

    registries = _registries(model_or_module, model)
    for registry in registries:
        registry.apply_()
    report = sparsity_report(model, _report_targets(model, registries))
    info = {"format": format, "gradprune_version": __version__, "sparsity": report}
    place = out.resolve() if out.is_symlink() else out.absolute()  # a link to a directory: its target is replaced
    created = [p for p in [place.parent, *place.parent.parents] if not p.exists()]  # parents made here, removed on failure
    place.parent.mkdir(parents=True, exist_ok=True)
    staging = place.parent / f".{place.name}.gradprune-new-{uuid.uuid4().hex[:8]}"
    try:
        staging.mkdir()
        extra = WRITERS[format](model, staging, registries)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        else:  # a plain HF model knows no tokenizer: say so, or the directory looks complete and is not
            log.warning("export to %s writes no tokenizer: %s knows none; pass tokenizer= (e.g. "
                        "gradprune.models.load_tokenizer(<source>)) or save it there yourself before from_pretrained",
                        out, type(model_or_module).__name__)
        info.update(extra)
        if "sparsity" in extra:  # the writer reported on what it wrote (structured: the smaller model)
            info["sparsity_before_removal"] = report
        if recipe is not None:
            info["recipe"] = _jsonable(recipe)
        (staging / REPORT_FILE).write_text(json.dumps(info, indent=1))
        _swap_in(staging, place)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for parent in created:  # innermost first
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise
    log.info("exported the model to %s as %s (global sparsity %.4f)", out, format, report["global"]["sparsity"])
    return out


# -- loading ------------------------------------------------------------------------------------------
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


def read_compressed(path: Union[str, os.PathLike]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The dense state dict stored in a compressed file (tied names included) and the tied names.

    Raises :class:`ExportError` naming the file or the tensor when the file cannot be read, a tensor
    misses its bitmask or values, or a bitmask does not fit its shape or its values."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path} is missing: a compressed export keeps its weights there")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            stored = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise ExportError(f"cannot read {path}: {exc}") from exc
    if metadata.get("gradprune.layout") != LAYOUT:
        raise ExportError(f"{path} is not a gradprune compressed file of layout {LAYOUT!r} "
                          f"(metadata gradprune.layout={metadata.get('gradprune.layout')!r})")
    try:
        shapes = json.loads(metadata["gradprune.shapes"])
        tied = json.loads(metadata.get("gradprune.tied", "{}"))
    except (KeyError, json.JSONDecodeError) as exc:
        raise ExportError(f"{path} has corrupted metadata (gradprune.shapes / gradprune.tied): {exc}") from exc
    state: dict[str, torch.Tensor] = {}
    for key, tensor in stored.items():
        for suffix in (BITMASK_SUFFIX, VALUES_SUFFIX):
            if key.endswith(suffix) and key[: -len(suffix)] not in shapes:
                raise ExportError(f"{path}: entry {key!r} belongs to no tensor listed in gradprune.shapes")
        if not key.endswith((BITMASK_SUFFIX, VALUES_SUFFIX)):
            state[key] = tensor
    for name, shape in shapes.items():
        missing = [name + s for s in (BITMASK_SUFFIX, VALUES_SUFFIX) if name + s not in stored]
        if missing:
            raise ExportError(f"tensor {name!r} is missing from {path}: no entry {' or '.join(map(repr, missing))}")
        state[name] = decompress_tensor(stored[name + BITMASK_SUFFIX], stored[name + VALUES_SUFFIX], shape, name)
    for alias, source in tied.items():
        if source not in state:
            raise ExportError(f"tensor {alias!r} is tied to {source!r}, which is missing from {path}")
        state[alias] = state[source]
    if HASHES_KEY in metadata or DIGEST_KEY in metadata:  # files written before content hashes existed have none
        _verify_hashes(path, metadata, state)
    return state, tied


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
