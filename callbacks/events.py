"""When a scheduled pruning callback acts: event steps in optimizer steps, shared by the gradual callbacks.

:class:`ScheduledEvents` holds the timing that :class:`~gradprune.callbacks.GradualPruningCallback` and
:class:`~gradprune.callbacks.GradualStructuredPruningCallback` have in common, so it exists once:

- events at ``start_step + k * every`` and at ``end_step`` (optimizer steps; :meth:`_next_event`);
- how many training micro-batches, the current one included, run before the next event is applied
  (:meth:`_micro_batches_to_event`, for the statistics windows; gradient accumulation counted);
- ``end_step`` as an int (an optimizer step) or a float in (0, 1] (that fraction of the run's optimizer steps,
  resolved at fit start against ``trainer.estimated_stepping_batches``; a resumed run keeps the value it
  started with), with the staged-run warning when the run ends before ``end_step``
  (:meth:`_resolve_end_step`);
- the resumable position: ``resolved_end_step`` and ``last_event_step``.

:class:`WindowLifecycle` holds the other thing they share: a statistics window (forward hooks on the
targets) is closed at validation, when fit ends or fails, and at teardown.

The class using it sets ``start_step``, ``every``, ``end_step``, ``resolved_end_step`` and ``last_event_step``
and may override :meth:`_final_target` and ``_ramp_goal`` (the words the warnings use for the end of the ramp).
"""
from __future__ import annotations

import logging
from typing import Optional, Union

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn

from gradprune.validation import Problems, is_int, is_number

log = logging.getLogger(__name__)


class WindowLifecycle:
    """Closes a callback's statistics window wherever training batches stop: at validation (its batches are
    not training data; the next training batch reopens the window), when fit ends, on any exception and at
    teardown, so no forward hook outlives a window. The class using it defines ``_close_window()`` (a no-op
    when no window is open) and opens the window itself, in ``on_train_batch_start``."""

    def _close_window(self) -> None:
        raise NotImplementedError

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close_window()
        super().on_validation_start(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close_window()
        super().on_fit_end(trainer, pl_module)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close_window()
        super().on_exception(trainer, pl_module, exception)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close_window()
        super().teardown(trainer, pl_module, stage)


def check_end_step(problems: Problems, end_step: object) -> None:
    """``end_step`` is an int (optimizer step) or a float in (0, 1] (fraction of the run)."""
    if not is_number(end_step):
        problems.add(f"end_step must be an int (optimizer step) or a float in (0, 1] (fraction of the run), got "
                     f"{end_step!r} ({type(end_step).__name__})", type_error=True)
    elif not is_int(end_step) and not 0.0 < end_step <= 1.0:
        problems.add(f"end_step as a float is a fraction of the run and must be in (0, 1], got {end_step!r}")


def schedule_end(start_step: object, end_step: Union[int, float]) -> int:
    """An int end step to check the other schedule arguments with before ``end_step`` is resolved."""
    return int(end_step) if is_int(end_step) else (start_step + 1 if is_int(start_step) else 1)


class ScheduledEvents:
    """Schedule timing of a gradual pruning callback (see the module notes)."""

    start_step: int
    every: int
    end_step: Union[int, float]
    resolved_end_step: Optional[int] = None
    last_event_step: Optional[int] = None
    _ramp_goal = "final_sparsity"  # what the ramp reaches, in the short-ramp warning

    def _final_target(self) -> str:
        """How the staged-run warning names what the run falls short of."""
        return "the schedule's final target"

    def _resolve_end_step(self, trainer: pl.Trainer) -> int:
        """The schedule's last step: from the checkpoint when resuming, else resolved against this run.

        A run shorter than the schedule is allowed with a warning: a staged run (stop after some epochs,
        resume from the last checkpoint with a larger max_epochs / max_steps) continues the schedule where
        it stopped, and the warning comes again while the budget still ends before end_step."""
        total = trainer.estimated_stepping_batches
        if self.resolved_end_step is not None:
            end = self.resolved_end_step
        elif isinstance(self.end_step, float):
            if total == float("inf"):
                raise ValueError("end_step given as a fraction needs a finite run: set max_steps or max_epochs")
            end = max(self.start_step + 1, round(self.end_step * total))
        else:
            end = self.end_step
        if total != float("inf") and end > total:
            total = int(total)
            reached = "no pruning event" if total < self.start_step else (
                f"the event at step {self.start_step + (total - self.start_step) // self.every * self.every} as the "
                f"last one, short of {self._final_target()}")
            rank_zero_warn(
                f"end_step ({end}) is beyond this run's total optimizer steps ({total}): this run will apply "
                f"{reached}. To run in stages, resume from this run's last checkpoint with a larger max_epochs / "
                "max_steps and the schedule continues where it stopped; otherwise lower end_step or train longer",
                category=UserWarning,
            )
        if end <= self.start_step:
            raise ValueError(f"end_step ({end}) must be greater than start_step ({self.start_step})")
        if self.resolved_end_step is None:  # once, when the run that resolves the schedule starts
            self._warn_collapsed_ramp(end, total)
        if not isinstance(self.end_step, float) and total != float("inf") and (end - self.start_step) * 100 < total:
            log.warning(
                "end_step=%d is an optimizer step (an int), and the ramp from start_step=%d is under 1%% of this run's "
                "%d steps: the model jumps to %s almost at once. For a fraction of the run give a float "
                "(end_step=%.1f means %d%%)", end, self.start_step, int(total), self._ramp_goal, min(1.0, float(end)),
                100 * min(1.0, float(end)),
            )
        return end

    def ramp_events(self, end: int) -> list[int]:
        """The events after ``start_step`` up to ``end``: the steps at which the ramp moves."""
        return sorted({*range(self.start_step + self.every, end, self.every), end} - {self.start_step})

    def _warn_collapsed_ramp(self, end: int, total: float) -> None:
        """Warn when the ramp moves at fewer than two events: the model jumps to the final target at once."""
        if getattr(self, "schedule_kind", None) == "constant" or end <= self.start_step:
            return  # a constant schedule is one jump by design; a bad end_step is refused next
        moves = self.ramp_events(end)
        if len(moves) >= 2:
            return
        given = (f"end_step={self.end_step} of this run's {int(total)} optimizer steps = step {end}"
                 if isinstance(self.end_step, float) else f"end_step={end}")
        fix = (f"every <= {(end - self.start_step) // 2}" if end - self.start_step >= 2 else
               f"end_step >= {self.start_step + 2} (every=1) or {self.start_step + 2 * self.every} (every={self.every})")
        rank_zero_warn(
            f"the pruning ramp collapses into one event: start_step={self.start_step}, {given}, every={self.every} "
            f"give events at steps {[self.start_step] + moves}, so the model jumps to {self._ramp_goal} at step "
            f"{moves[0]} instead of ramping. For a ramp of at least two events set {fix}"
            f"{' or train longer (max_steps / max_epochs)' if isinstance(self.end_step, float) else ''}",
            category=UserWarning,
        )

    def _next_event(self, step: int) -> Optional[int]:
        """The first event at or after optimizer step ``step`` (None when the schedule is done)."""
        if self.resolved_end_step is None:
            return None
        start = self.start_step
        if step <= start:
            return start
        if step > self.resolved_end_step:
            return None
        return min(start + -(-(step - start) // self.every) * self.every, self.resolved_end_step)

    def _micro_batches_to_event(self, trainer: pl.Trainer, batch_idx: int) -> Optional[int]:
        """How many micro-batches, this one included, run before the next event is applied."""
        step = trainer.global_step
        event = self._next_event(step + 1)
        if event is None:
            return None
        accumulate = trainer.accumulate_grad_batches
        return (event - step - 1) * accumulate + (accumulate - batch_idx % accumulate)

    def _event_due(self, step: int) -> bool:
        """Whether optimizer step ``step`` is an event not applied yet."""
        if self.resolved_end_step is None or step < self.start_step or step > self.resolved_end_step:
            return False
        if self.last_event_step is not None and step <= self.last_event_step:
            return False
        return step == self.resolved_end_step or (step - self.start_step) % self.every == 0
