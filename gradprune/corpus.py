"""Text corpora as lists of files, and the deterministic file-level train/validation split.

The embedded default corpus is the Python standard library's own source code
(``sysconfig.get_paths()["stdlib"]``): several MB of real code on every machine, no network needed.
Splitting by *file* (not by block) guarantees that validation and held-out files are never trained on
or used for calibration.
"""
from __future__ import annotations

import glob
import hashlib
import os
import sysconfig
from pathlib import Path
from typing import Iterable, Sequence

STDLIB = "stdlib"


def stdlib_files() -> list[Path]:
    """All ``.py`` files of the running Python's standard library, sorted, without site-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in {"site-packages", "dist-packages", "__pycache__"})
        files.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    return files


def expand_paths(paths: Iterable[str], suffixes: Sequence[str] = (".py", ".txt", ".md", ".jsonl", ".json")) -> list[Path]:
    """Files named by paths, directories (walked, keeping ``suffixes``) and glob patterns, sorted, unique."""
    found: list[Path] = []
    for entry in paths:
        matches = sorted(glob.glob(entry, recursive=True)) if any(c in entry for c in "*?[") else [entry]
        if not matches:
            raise FileNotFoundError(f"no file matches {entry!r}")
        for match in matches:
            path = Path(match)
            if path.is_dir():
                found.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in suffixes))
            elif path.is_file():
                found.append(path)
            else:
                raise FileNotFoundError(f"no such file or directory: {match!r}")
    return sorted(set(found))


def is_validation_file(path: Path, root: Path, fraction: float, seed: int = 0) -> bool:
    """Deterministic, machine-independent assignment of a file to the validation side.

    Uses a hash of the path relative to ``root`` (so the same files are held out on every machine)."""
    try:
        key = path.relative_to(root).as_posix()
    except ValueError:
        key = path.as_posix()
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split_files(files: Sequence[Path], val_fraction: float, seed: int = 0) -> tuple[list[Path], list[Path]]:
    """(train, validation) file lists; at least one file on each side when there are two or more files."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    files = list(files)
    if not files:
        return [], []
    root = Path(os.path.commonpath([str(f.parent) for f in files]))
    val = [f for f in files if is_validation_file(f, root, val_fraction, seed)]
    if val_fraction > 0 and not val and len(files) > 1:
        val = [files[-1]]
    val_set = set(val)
    train = [f for f in files if f not in val_set]
    if not train and len(files) > 1:
        train, val = val[:1], val[1:]
    return train, val


def read_text(path: Path) -> str:
    return Path(path).read_text(encoding="utf-8", errors="replace")
