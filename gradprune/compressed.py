"""The compressed export's file: one safetensors file holding each pruned tensor as a bitmask plus values.

Each pruned tensor ``W`` is stored as two entries, ``W::bitmask`` (uint8, the positions of its nonzero
elements in row-major order bit-packed by :func:`gradprune.pack_mask`: 8 per byte, first element in the
high bit, the last byte's unused low bits zero) and ``W::values`` (its nonzero elements in that order, in
the tensor's own dtype); every other tensor is stored as is under its own name. The file's metadata holds
``gradprune.layout`` (``"bitmask/1"``), ``gradprune.shapes`` (JSON: the shape of each bitmask-stored tensor)
and ``gradprune.tied`` (JSON: tensor names stored once for a tied pair, mapped to the stored name), and the
content hashes ``gradprune.sha256`` (every state-dict name -> :func:`tensor_sha256`) and ``gradprune.digest``
(of the other entries), which :func:`read_compressed` verifies.

"Nonzero" is judged on the bits: -0.0 and NaN are values like any other, so the round trip is exact for
every tensor. :func:`gradprune.export` decides which tensors are pruned ones; :func:`write_compressed` stores
one as a bitmask only where that is smaller than storing it dense (:func:`bitmask_nbytes`).
"""
from __future__ import annotations

import base64
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Mapping, Union

import numpy as np
import torch
from torch import nn

from .bits import SAME_WIDTH_INT, pack_mask, unpack_mask

COMPRESSED_FILE = "model.compressed.safetensors"
LAYOUT = "bitmask/1"
BITMASK_SUFFIX = "::bitmask"
VALUES_SUFFIX = "::values"


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


# -- the file -------------------------------------------------------------------------------------------
def write_compressed(model: nn.Module, path: Path, pruned: set[str]) -> dict:
    """Write ``model``'s state dict to the file ``path``: the tensors named in ``pruned`` as bitmask plus
    values where that is smaller, tied tensors once. Returns what was stored (``tied`` names and the
    ``tensors``, ``numel``, ``nonzeros``, ``bytes`` and ``ideal_bytes`` of the bitmask-stored ones)."""
    from safetensors.torch import save_file  # lazy: safetensors loads only when a compressed export is written

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
    save_file(tensors, str(path), metadata=metadata)
    return {"tied": tied, **stats}


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
