"""Sparsity schedules: the target sparsity as a pure function of the optimizer step.

``step`` counts optimizer steps (not micro-batches). With ``p = clip((step - start_step) / (end_step -
start_step), 0, 1)`` and ``d = final_sparsity - initial_sparsity``:

- ``cubic``       s = s_f - d * (1 - p) ** exponent      (Zhu & Gupta 2017; tfmot PolynomialDecay)
- ``linear``      s = s_i + d * p
- ``exponential`` s = s_i + d * (1 - exp(-exponent * p)) / (1 - exp(-exponent))   fast early, slow late,
                  normalised so it is exactly s_i at start_step and exactly s_f at end_step
- ``constant``    s = s_f from start_step on (s_i before)

Every kind is monotone non-decreasing in the step. Pruning events happen at ``start_step + k * every``
(for k = 0, 1, ...) up to ``end_step``, and always at ``end_step``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

from .validation import Problems, check_choice, check_sparsity, is_int, is_number, parse_pattern

ScheduleKind = Literal["cubic", "linear", "exponential", "constant"]
SCHEDULE_KINDS = ("cubic", "linear", "exponential", "constant")


@dataclass(frozen=True)
class SparsitySchedule:
    """Target sparsity over optimizer steps.

    Args:
        kind: "cubic", "linear", "exponential" or "constant".
        final_sparsity: sparsity reached at ``end_step``, in [0, 1).
        initial_sparsity: sparsity at ``start_step``, in [0, final_sparsity].
        start_step: first pruning event (optimizer steps).
        end_step: last pruning event; must be > start_step (optional for "constant").
        every: optimizer steps between pruning events.
        exponent: the power of the cubic kind (3 = Zhu & Gupta) or the rate of the exponential kind.
    """

    kind: ScheduleKind
    final_sparsity: float
    initial_sparsity: float = 0.0
    start_step: int = 0
    end_step: Optional[int] = None
    every: int = 1
    exponent: float = 3.0

    def __post_init__(self) -> None:
        problems = Problems()
        check_choice(problems, "kind", self.kind, SCHEDULE_KINDS)
        check_sparsity(problems, "final_sparsity", self.final_sparsity)
        check_sparsity(problems, "initial_sparsity", self.initial_sparsity)
        if not problems.value_errors and not problems.type_errors and self.initial_sparsity > self.final_sparsity:
            problems.add(
                f"initial_sparsity ({self.initial_sparsity}) must not exceed final_sparsity ({self.final_sparsity}): "
                "sparsity never decreases"
            )
        if not is_int(self.start_step) or self.start_step < 0:
            problems.add(f"start_step must be an integer >= 0, got {self.start_step!r}")
        if self.end_step is None:
            if self.kind != "constant":
                problems.add(f"end_step is required for kind={self.kind!r}")
        elif not is_int(self.end_step):
            problems.add(f"end_step must be an integer number of optimizer steps, got {self.end_step!r}")
        elif is_int(self.start_step) and self.end_step <= self.start_step:
            problems.add(f"end_step ({self.end_step}) must be greater than start_step ({self.start_step})")
        if not is_int(self.every) or self.every <= 0:
            problems.add(f"every must be an integer > 0, got {self.every!r}")
        if not is_number(self.exponent) or not 0 < self.exponent < math.inf:
            problems.add(f"exponent must be a finite number > 0, got {self.exponent!r}")
        problems.raise_if_any()

    @property
    def last_step(self) -> int:
        """The step of the last pruning event."""
        return self.start_step if self.end_step is None else self.end_step

    def progress(self, step: int) -> float:
        if self.end_step is None:
            return 0.0 if step < self.start_step else 1.0
        return min(max((step - self.start_step) / (self.end_step - self.start_step), 0.0), 1.0)

    def sparsity_at(self, step: int) -> float:
        """Target sparsity after pruning at optimizer step ``step``."""
        s_i, s_f = self.initial_sparsity, self.final_sparsity
        if step < self.start_step:
            return s_i
        p = self.progress(step)
        if self.kind == "cubic":
            value = s_f + (s_i - s_f) * (1.0 - p) ** self.exponent
        elif self.kind == "linear":
            value = s_i + (s_f - s_i) * p
        elif self.kind == "exponential":
            value = s_i + (s_f - s_i) * (-math.expm1(-self.exponent * p)) / (-math.expm1(-self.exponent))
        else:  # constant
            value = s_f
        if p >= 1.0:  # exact at the end, whatever the rounding of the formula
            value = s_f
        return min(max(value, s_i), s_f)

    def is_event(self, step: int) -> bool:
        """Whether the masks are updated at optimizer step ``step``."""
        if step < self.start_step or step > self.last_step:
            return False
        return step == self.last_step or (step - self.start_step) % self.every == 0

    def events(self) -> list[int]:
        """All pruning event steps, in order."""
        steps = list(range(self.start_step, self.last_step + 1, self.every))
        if steps[-1] != self.last_step:
            steps.append(self.last_step)
        return steps


def nm_step(pattern: str, target: float) -> tuple[Optional[str], float]:
    """The step of an N:M ramp at a schedule's ``target``: the pattern ``k:M`` with the largest ``k <= N`` whose
    sparsity ``k / M`` is at most ``target``, and that sparsity; ``(None, 0.0)`` below ``1 / M``.

    A one-shot method prunes an N:M pattern exactly (N of every M), so a ramp to N:M that re-runs it at every
    event steps through 1:M, 2:M, ... N:M, and an event between two steps prunes nothing new."""
    n, m = parse_pattern(pattern)
    k = min(n, math.floor(target * m + 1e-9))
    return (f"{k}:{m}", k / m) if k >= 1 else (None, 0.0)
