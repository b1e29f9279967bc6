"""Argument checking shared by the core: collect every problem, then raise once.

Messages name the argument, the value given and what is allowed, so a user can fix a YAML file or a
call without reading the source.
"""
from __future__ import annotations

import difflib
import math
import numbers
import os
import re
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch

from .shards import local


class Problems:
    """Collects argument problems and raises them together (ValueError unless all are type errors)."""

    def __init__(self) -> None:
        self.value_errors: list[str] = []
        self.type_errors: list[str] = []

    def add(self, message: str, *, type_error: bool = False) -> None:
        (self.type_errors if type_error else self.value_errors).append(message)

    def raise_if_any(self) -> None:
        messages = self.type_errors + self.value_errors
        if not messages:
            return
        text = messages[0] if len(messages) == 1 else "invalid arguments:\n  - " + "\n  - ".join(messages)
        if self.type_errors and not self.value_errors:
            raise TypeError(text)
        raise ValueError(text)


def is_int(value: object) -> bool:
    """An integer and not a bool (``True`` is an ``int`` to Python, never a count or a step to us); numpy
    integer scalars count."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and type(value).__name__ != "bool_"


def check_sparsity(problems: Problems, name: str, value: object) -> None:
    """A sparsity is a real number in [0, 1): 1.0 would remove every weight."""
    if not is_number(value):
        problems.add(f"{name} must be a number in [0, 1), got {value!r} ({type(value).__name__})", type_error=True)
    elif math.isnan(value) or not 0.0 <= value < 1.0:
        problems.add(f"{name} must be in [0, 1), got {value!r}")


def check_choice(problems: Problems, name: str, value: object, allowed: Iterable[str]) -> None:
    allowed = list(allowed)
    if value not in allowed:
        problems.add(f"{name} must be one of {allowed}, got {value!r}")


def parse_pattern(pattern: object) -> tuple[int, int] | None:
    """'unstructured' -> None; 'N:M' -> (N, M). Raises ValueError naming the pattern otherwise."""
    if pattern == "unstructured":
        return None
    if isinstance(pattern, str) and pattern.count(":") == 1:
        left, right = pattern.split(":")
        try:
            n, m = int(left), int(right)
        except ValueError:
            n = m = None
        if n is not None:
            if m <= 0 or n <= 0 or n >= m:
                raise ValueError(
                    f"pattern {pattern!r} is not a valid N:M pattern: need 0 < N < M "
                    f"(N zeros in every M consecutive weights), e.g. '2:4' or '4:8'"
                )
            return n, m
    raise ValueError(f"pattern must be 'unstructured' or 'N:M' such as '2:4' or '4:8', got {pattern!r}")


def check_pattern(problems: Problems, pattern: object, sparsity_name: str, sparsity: object,
                  exact: bool = False) -> tuple[int, int] | None:
    """Parse ``pattern`` and check the N:M limit on a sparsity: the one home of that rule.

    An N:M pattern prunes at most N of every M consecutive weights, so the sparsity may be at most N/M
    (a gradual ramp passes below it); with ``exact`` (one-shot pruning to the pattern) it must be N/M.
    Problems go to ``problems``; returns the parsed (N, M), or None for 'unstructured' or a bad pattern.
    A sparsity that is not a number is left to :func:`check_sparsity`.
    """
    if is_int(pattern) and pattern >= 60:
        n, m = divmod(int(pattern), 60)
        problems.add(f"pattern={pattern!r} is a number: YAML 1.1 reads an unquoted N:M such as {n}:{m} as the base-60 "
                     f"integer {pattern}; quote it (pattern: '{n}:{m}') or pass a string")
        return None
    try:
        nm = parse_pattern(pattern)
    except ValueError as exc:
        problems.add(str(exc))
        return None
    if nm is None or not is_number(sparsity):
        return nm
    n, m = nm
    if exact and abs(sparsity - n / m) > 1e-9:
        problems.add(f"{sparsity_name} {sparsity!r} does not match pattern {pattern!r}: an N:M pattern prunes "
                     f"exactly N/M = {n / m:g}")
    elif not exact and sparsity > n / m + 1e-9:
        problems.add(f"{sparsity_name} {sparsity} is above what pattern {pattern!r} allows ({n}/{m} = {n / m:g})")
    return nm


# -- numbers, selectors, model sources, and the weights a call would act on ----------------------------------
def is_number(value: object) -> bool:
    """A real number and not a bool (numpy scalars count)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and type(value).__name__ != "bool_"


def check_number(problems: Problems, name: str, value: object, *, low: Optional[float] = None,
                 high: Optional[float] = None, low_open: bool = False, high_open: bool = False,
                 integer: bool = False) -> bool:
    """A finite real number (an int if ``integer``) within [low, high] (open ends with ``low_open`` /
    ``high_open``). Problems go to ``problems``; returns whether the value passed."""
    kind = "an integer" if integer else "a finite number"
    lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
    hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
    allowed = kind + (" " + " and ".join(x for x in (lo, hi) if x) if lo or hi else "")
    if not (is_int(value) if integer else is_number(value)):
        problems.add(f"{name} must be {allowed}, got {value!r} ({type(value).__name__})", type_error=True)
        return False
    if not math.isfinite(value):
        problems.add(f"{name} must be {allowed}, got {value!r}")
        return False
    if low is not None and (value <= low if low_open else value < low) or \
            high is not None and (value >= high if high_open else value > high):
        problems.add(f"{name} must be {allowed}, got {value!r}")
        return False
    return True


def options_dataclass(name: str, cls: type, value: object) -> object:
    """An options argument given as an instance of the dataclass ``cls``, the dict of its fields (as saved in
    a checkpoint's hyperparameters, so ``load_from_checkpoint`` rebuilds it), or None; returned as an instance
    or None. ValueError for unknown keys, TypeError for anything else (each names ``name``)."""
    if value is None or isinstance(value, cls):
        return value
    fields = sorted(cls.__dataclass_fields__)
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(fields))
        if unknown:
            raise ValueError(f"{name} has unknown keys {unknown}; allowed: {fields}")
        return cls(**value)
    raise TypeError(f"{name} must be a {cls.__module__}.{cls.__qualname__} or a dict of its fields, "
                    f"got {type(value).__name__}")


def check_bool(problems: Problems, name: str, value: object) -> None:
    if not isinstance(value, bool):
        problems.add(f"{name} must be True or False, got {value!r} ({type(value).__name__})", type_error=True)


def check_selector(problems: Problems, name: str, value: object) -> None:
    """``include`` / ``exclude``: None, a regex string, or a non-empty list of module names / suffixes.
    What can only be checked against a model (a selector matching nothing) is left to find_targets."""
    if value is None:
        return
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as exc:
            problems.add(f"{name}={value!r} is not a valid regular expression: {exc}")
        return
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        problems.add(f"{name} must be None, a regex string or a list of module names, got {value!r}", type_error=True)
    elif not value:
        problems.add(f"{name} must not be an empty list (use None for the default)")


def close_matches(word: str, choices: Iterable[str]) -> str:
    """' (did you mean ...?)' for the nearest of ``choices``, or ''."""
    near = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {near[0]!r}?)" if near else ""


MODEL_SOURCE_FORMS = ("a local Hugging Face model directory", "a .gguf file", "'smollm2'",
                      "a hub id such as 'org/name' (needs network)", "a config dict with a 'model_type'")


def offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def looks_like_path(source: str) -> bool:
    """Whether a model / tokenizer source string is meant as a local path rather than a hub id: it starts
    like a path, ends in a file suffix, or has more or fewer than one '/' (a hub id is 'org/name' or a bare
    name)."""
    if source.startswith(("/", "./", "../", "~", ".\\")) or "\\" in source or os.path.isabs(source):
        return True
    if Path(source).suffix in (".gguf", ".bin", ".safetensors", ".json", ".pt", ".pth"):
        return True
    return source.count("/") > 1


TOKENIZER_SOURCE_FORMS = ("'bytes' (built in)",) + MODEL_SOURCE_FORMS[:4]


def check_model_source(problems: Problems, name: str, source: object, special: Sequence[str] = ("smollm2",),
                       allowed: Sequence[str] = MODEL_SOURCE_FORMS) -> None:
    """A model or tokenizer source string must be a special name, an existing local path, or (when online
    and not looking like a path) a hub id. A missing local path is reported at once instead of going to
    the hub (which would fail after retries, or with a confusing "Repo id" message)."""
    if not isinstance(source, str) or source in special:
        return
    if not source:
        problems.add(f"{name} must not be empty; allowed: {', '.join(allowed)}")
        return
    if os.path.exists(os.path.expanduser(source)):
        if source.endswith(".gguf") and not os.path.isfile(os.path.expanduser(source)):
            problems.add(f"{name}={source!r} is not a file")
        return
    if looks_like_path(source):
        problems.add(f"{name}={source!r}: no such local directory or file; allowed: {', '.join(allowed)}")
    elif offline():
        problems.add(f"{name}={source!r}: no such local directory or file, and the hub is offline (HF_HUB_OFFLINE); "
                     f"allowed: {', '.join(allowed)}")


def check_weights_usable(problems: Problems, model: Any, what: str = "model") -> None:
    """Every parameter of ``model`` is materialised (not on the meta device) and finite: pruning scores,
    statistics and SparseGPT updates would otherwise fail half-way or spread NaN."""
    meta, bad = [], []
    for pname, param in model.named_parameters():
        if param.device.type == "meta":
            meta.append(pname)
        elif param.is_floating_point() and not bool(torch.isfinite(local(param.detach())).all()):  # a shard: its rows
            bad.append(pname)
    if meta:
        problems.add(f"{what} has weights on the meta device (not loaded): {meta[:3]}{' ...' if len(meta) > 3 else ''}; "
                     "load or materialise them (e.g. to_empty() then load_state_dict) before pruning")
    if bad:
        problems.add(f"{what} has non-finite (NaN or inf) weights in {bad[:5]}{' ...' if len(bad) > 5 else ''}; "
                     "pruning needs finite weights (nothing was changed)")
