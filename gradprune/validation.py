"""Argument checking shared by the core: collect every problem, then raise once.

Messages name the argument, the value given and what is allowed, so a user can fix a YAML file or a
call without reading the source.
"""
from __future__ import annotations

import math
from typing import Iterable


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
    """An integer and not a bool (``True`` is an ``int`` to Python, never a count or a step to us)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_sparsity(problems: Problems, name: str, value: object) -> None:
    """A sparsity is a real number in [0, 1): 1.0 would remove every weight."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
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
    try:
        nm = parse_pattern(pattern)
    except ValueError as exc:
        problems.add(str(exc))
        return None
    if nm is None or isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        return nm
    n, m = nm
    if exact and abs(sparsity - n / m) > 1e-9:
        problems.add(f"{sparsity_name} {sparsity!r} does not match pattern {pattern!r}: an N:M pattern prunes "
                     f"exactly N/M = {n / m:g}")
    elif not exact and sparsity > n / m + 1e-9:
        problems.add(f"{sparsity_name} {sparsity} is above what pattern {pattern!r} allows ({n}/{m} = {n / m:g})")
    return nm
