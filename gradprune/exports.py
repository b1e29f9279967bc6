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
  content hashes ``gradprune.sha256`` (every state-dict name -> :func:`gradprune.compressed.tensor_sha256`) and
  ``gradprune.digest`` (of the other entries), which :func:`gradprune.load` verifies.
  :func:`gradprune.load` rebuilds the dense model bit-exactly.
- ``structured``: the physically smaller model: every MLP neuron, attention head group and decoder layer
  that is all zero (structured pruning masked it) removed from a copy by
  :func:`gradprune.remove_zeroed_units`, the config updated, then saved as ``dense``. It reloads with
  ``AutoModelForCausalLM.from_pretrained`` as an ordinary model of the smaller shape, with the same logits.

"Nonzero" is judged on the bits: -0.0 and NaN are values like any other, so the round trip is exact
for every tensor. A tensor is stored as a bitmask when it is a pruning target (the default targets of
:func:`gradprune.find_targets`, and whatever the model's mask registry holds) and that is smaller
than storing it dense (:func:`gradprune.compressed.bitmask_nbytes`): in bf16 above 1/16 = 6.25% zeros, in fp32 above 1/32.
Embeddings, norms and biases are never targets and stay dense.

Here: :func:`export` and its writers. The compressed file itself (its layout, hashes, writing and reading
it) is :mod:`gradprune.compressed`; loading any export back is :mod:`gradprune.loading`.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

import torch
from torch import nn

from .compressed import COMPRESSED_FILE, LAYOUT, write_compressed
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
    stored = write_compressed(model, out / COMPRESSED_FILE, pruned_tensor_names(model, registries))
    _save_config(model, out)
    return {"compressed": {"file": COMPRESSED_FILE, "layout": LAYOUT, **stored}}


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


# Over 60 lines on purpose: every check, then one write into a staging folder that is swapped in whole or
# removed; split up, the one transaction and its rollback would be spread over several functions.
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

