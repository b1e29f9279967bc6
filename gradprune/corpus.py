"""Text corpora: which documents a ``sources`` list names, and the deterministic train/validation split.

Sources (``TextDataModule``'s ``sources``):

* ``"stdlib"``: the Python standard library's own source code (``sysconfig.get_paths()["stdlib"]``):
  several MB of real code on every machine, no network needed,
* local text files, directories and glob patterns,
* JSON Lines / JSON files (read through the ``datasets`` library's ``"json"`` loader, text taken from
  ``text_field``),
* Hugging Face hub datasets by name (``"wikitext"`` with ``dataset_config="wikitext-2-raw-v1"``, ``"c4"``),
  which need network access.

Splits are deterministic and never leak: files are assigned to train or validation by file (a hash of the
path, :func:`split_files`), JSON records by record (a seeded permutation), hub datasets use their own
validation split (else a hash of the record index). Splitting by *file* (not by block) guarantees that
validation and held-out files are never trained on or used for calibration. :func:`plan_documents` turns
a ``sources`` list into a :class:`Plan`: the documents of each side, nothing read or tokenised yet.

No torch and no Lightning here: scripts can use the split without importing either.
"""
from __future__ import annotations

import glob
import hashlib
import logging
import os
import random
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

log = logging.getLogger(__name__)

STDLIB = "stdlib"
VAL_FRACTION = 0.05  # default share of files (or records) held out for validation
JSON_SUFFIXES = (".jsonl", ".json")
TEXT_SUFFIXES = (".py", ".txt", ".md")
GLOB_CHARS = "*?["
# hub names that need a config to be useful; used when dataset_config is not given
_HUB_DEFAULTS = {"c4": ("allenai/c4", "en"), "wikitext": ("wikitext", "wikitext-2-raw-v1")}
_VALIDATION_SPLITS = ("validation", "valid", "dev")


def is_glob(entry: str) -> bool:
    """Whether a path entry is a glob pattern."""
    return any(c in entry for c in GLOB_CHARS)


def hash_fraction(seed: int, key: str) -> float:
    """A deterministic, machine-independent number in [0, 1) for ``key``: the hash behind every split
    (a file or record goes to validation when it is below the validation fraction)."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def stdlib_root() -> Path:
    """The running Python's standard library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """All ``.py`` files of the running Python's standard library, sorted, without site-packages."""
    root = stdlib_root()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in {"site-packages", "dist-packages", "__pycache__"})
        files.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    return files


def expand_paths(paths: Iterable[str], suffixes: Sequence[str] = TEXT_SUFFIXES + JSON_SUFFIXES) -> list[Path]:
    """Files named by paths, directories (walked, keeping ``suffixes``) and glob patterns, sorted, unique."""
    found: list[Path] = []
    for entry in paths:
        matches = sorted(glob.glob(entry, recursive=True)) if is_glob(entry) else [entry]
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
    return hash_fraction(seed, key) < fraction


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
    """A text file's contents (undecodable bytes replaced, never an error). A file that does not look like
    UTF-8 text (NUL bytes, a UTF-16 byte-order mark, or more than 1% undecodable bytes) gets a warning
    naming it: it would otherwise train silently on replacement characters. Files of the ``stdlib`` source
    are read the same way without a warning (the user did not choose them: CPython's tests ship a few
    deliberately non-UTF-8 modules, read with replacement characters as they always were)."""
    raw = Path(path).read_bytes()
    text = raw.decode("utf-8", errors="replace")
    if raw and not Path(path).is_relative_to(stdlib_root()):
        bad = text.count("\ufffd") - raw.decode("utf-8", errors="ignore").count("\ufffd")
        if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
            log.warning("%s looks like UTF-16 text (byte-order mark); gradprune reads UTF-8: convert it "
                        "(e.g. iconv -f UTF-16 -t UTF-8) or it trains on replacement characters", path)
        elif b"\x00" in raw or bad > 0.01 * len(raw):
            log.warning("%s does not look like UTF-8 text (%s%d undecodable bytes of %d): it is probably binary "
                        "and would train on replacement characters; leave it out of sources", path,
                        "NUL bytes, " if b"\x00" in raw else "", bad, len(raw))
    return text


def is_local(entry: str) -> bool:
    """Whether a ``sources`` entry names local files (else it is taken for a hub dataset name)."""
    if entry == STDLIB:
        return False
    expanded = os.path.expanduser(entry)
    return (
        os.path.exists(expanded)
        or is_glob(entry)
        or entry.startswith(("/", ".", "~"))
        or Path(entry).suffix in TEXT_SUFFIXES + JSON_SUFFIXES
    )


def local_missing(entry: str) -> bool:
    """Whether a local ``sources`` entry matches no file or directory."""
    expanded = os.path.expanduser(entry)
    if is_glob(entry):
        return not glob.glob(expanded, recursive=True)
    return not os.path.exists(expanded)


def _split_records(texts: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic record-level split: a seeded permutation, the first ``round(n * val_fraction)``
    records (at least one when there are two or more) go to validation."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    n_val = 0
    if len(texts) > 1:
        n_val = min(len(texts) - 1, max(1, round(len(texts) * val_fraction)))
    return [texts[i] for i in order[n_val:]], [texts[i] for i in order[:n_val]]


def _json_texts(files: Sequence[Path], text_field: str) -> list[str]:
    """The ``text_field`` of every record of JSON Lines / JSON files, read with ``datasets``' json loader."""
    import datasets

    try:
        dataset = datasets.load_dataset("json", data_files=[str(f) for f in files], split="train")
    except Exception as exc:  # a malformed file: name the file and the line, not only pyarrow's message
        where = _first_bad_json_line(files)
        if where is None:
            raise
        raise ValueError(f"{where}; fix or remove that record (JSON Lines: one JSON object per line)") from exc
    if text_field not in dataset.column_names:
        raise ValueError(
            f"text_field={text_field!r} is not a field of {[str(f) for f in files]}; "
            f"the records have the fields {sorted(dataset.column_names)}"
        )
    texts = []
    for i, value in enumerate(dataset[text_field]):
        if value is None:
            continue
        if not isinstance(value, str):
            raise TypeError(f"text_field={text_field!r} must hold strings, record {i} holds a {type(value).__name__}")
        texts.append(value)
    return texts


def _first_bad_json_line(files: Sequence[Path]) -> str | None:
    """'FILE line N: what is wrong' for the first JSON Lines record that does not parse, or None."""
    import json

    for f in files:
        if Path(f).suffix != ".jsonl":
            try:
                json.loads(Path(f).read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as exc:
                return f"{f}: not valid JSON ({exc})"
            continue
        with open(f, encoding="utf-8", errors="replace") as lines:
            for number, line in enumerate(lines, 1):
                if line.strip():
                    try:
                        json.loads(line)
                    except ValueError as exc:
                        return f"{f} line {number}: not valid JSON ({exc})"
    return None


class _HubSide:
    """One side (train or validation) of a hub dataset, streamed lazily record by record."""

    def __init__(self, name: str, config: str | None, text_field: str, split: str, keep: Any = None) -> None:
        self.name, self.config, self.text_field, self.split, self.keep = name, config, text_field, split, keep

    def __iter__(self) -> Iterator[str]:
        dataset = _load_hub(self.name, self.config)[self.split]
        for i, record in enumerate(dataset):
            if self.keep is not None and not self.keep(i):
                continue
            if self.text_field not in record:
                raise ValueError(
                    f"text_field={self.text_field!r} is not a field of the hub dataset {self.name!r}; "
                    f"its records have the fields {sorted(record)}"
                )
            text = record[self.text_field]
            if text:
                yield text


def _load_hub(name: str, config: str | None):
    """``datasets.load_dataset(name, config, streaming=True)`` with an error that says what to do offline."""
    import datasets

    try:
        return datasets.load_dataset(name, config, streaming=True)
    except Exception as exc:  # datasets raises many types (ConnectionError, FileNotFoundError, ValueError...)
        raise RuntimeError(
            f"could not load {name!r} (dataset_config={config!r}) as a Hugging Face dataset: {exc}. "
            "It is not a local file, directory or glob either. Hub datasets need network access; offline, "
            "use sources='stdlib', local text files/directories/globs, or a .jsonl file with text_field."
        ) from exc


def _hub_sides(entry: str, config: str | None, text_field: str, val_fraction: float, seed: int) -> tuple[_HubSide, _HubSide]:
    name = entry
    if config is None and entry in _HUB_DEFAULTS:
        name, config = _HUB_DEFAULTS[entry]
    splits = list(_load_hub(name, config))
    if "train" not in splits:
        raise ValueError(f"the hub dataset {name!r} (dataset_config={config!r}) has no 'train' split; it has {splits}")
    for val_split in _VALIDATION_SPLITS:
        if val_split in splits:
            return _HubSide(name, config, text_field, "train"), _HubSide(name, config, text_field, val_split)
    log.info("hub dataset %s has no validation split; holding out %.1f%% of its train records", name, 100 * val_fraction)

    def is_val(i: int) -> bool:
        return hash_fraction(seed, f"record:{i}") < val_fraction

    return (
        _HubSide(name, config, text_field, "train", keep=lambda i: not is_val(i)),
        _HubSide(name, config, text_field, "train", keep=is_val),
    )


@dataclass
class Plan:
    """Which documents go to each side, before any tokenisation. Items: Path (read lazily), str, or
    an iterable of str (a hub stream)."""

    train: list[Any] = field(default_factory=list)
    val: list[Any] = field(default_factory=list)
    position_split: bool = False  # a single document: hold out the end of its token stream


def documents(items: Iterable[Any]) -> Iterator[str]:
    """The texts of a side of a :class:`Plan`, in order (files are read as they are reached)."""
    for item in items:
        if isinstance(item, Path):
            yield read_text(item)
        elif isinstance(item, str):
            yield item
        else:
            yield from item


def plan_documents(sources: Sequence[str], val_fraction: float, seed: int, text_field: str = "text",
                   dataset_config: Optional[str] = None) -> Plan:
    """Which documents of ``sources`` go to each side, in a seeded order (nothing is read but JSON
    records; hub streams are opened lazily). A single document is split by position (``position_split``)."""
    plan = Plan()
    local: list[str] = []
    for entry in sources:
        if entry == STDLIB:
            train, val = split_files(stdlib_files(), val_fraction, seed)
            plan.train.extend(train)
            plan.val.extend(val)
        elif is_local(entry):
            local.append(os.path.expanduser(entry))
        else:
            train_side, val_side = _hub_sides(entry, dataset_config, text_field, val_fraction, seed)
            plan.train.append(train_side)
            plan.val.append(val_side)
    if local:
        files = expand_paths(local, suffixes=TEXT_SUFFIXES + JSON_SUFFIXES)
        json_files = [f for f in files if f.suffix in JSON_SUFFIXES]
        text_files = [f for f in files if f.suffix not in JSON_SUFFIXES]
        train, val = split_files(text_files, val_fraction, seed)
        plan.train.extend(train)
        plan.val.extend(val)
        if json_files:
            train_texts, val_texts = _split_records(_json_texts(json_files, text_field), val_fraction, seed)
            plan.train.extend(train_texts)
            plan.val.extend(val_texts)
    # a seeded document order, so that a token cap takes a representative sample rather than the
    # alphabetically first files (hub streams keep their order)
    rng = random.Random(seed)
    rng.shuffle(plan.train)
    rng.shuffle(plan.val)
    if not plan.val:
        if not plan.train:
            raise ValueError(f"sources={list(sources)!r} contain no documents: a directory is read for files ending in "
                             f"{list(TEXT_SUFFIXES + JSON_SUFFIXES)} (JSON lines by their text field), and none was found "
                             "or all were empty")
        plan.position_split = True
        log.info("a single document: holding out the last %.1f%% of its tokens for validation", 100 * val_fraction)
    if not plan.train:
        raise ValueError(f"sources={list(sources)!r} leave no document for training")
    return plan
