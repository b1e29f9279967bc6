"""The statistics GradualPruningCallback's scorer reads, gathered from the training batches before each event.

What the scorer needs (:mod:`gradprune.scorers`) decides what is gathered: for activations (``wanda``,
``ria``) forward hooks on the targets sum the squared inputs during the last ``stat_batches`` training
micro-batches before each event; for Hessians (``sparsegpt``) the same hooks sum ``X X^T``; for gradients
(``taylor``) ``|W * G|`` is summed at every optimizer step since the last event, before any masking;
``magnitude`` needs nothing. The hooks exist only while a window is open (:mod:`gradprune.statistics`).

Sums are all-reduced over data-parallel ranks before scoring (:meth:`StatisticsWindow.ready`), and the
partial sums travel in the callback's state, so a checkpoint inside a window resumes exactly: with several
ranks the checkpoint holds the window's activation sums already summed over the ranks (rank 0 writes the
checkpoint), and on resume rank 0 starts from them and the other ranks from nothing.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Union

import lightning.pytorch as pl
import torch

from gradprune.scorers import get_scorer
from gradprune.sharding import sharded_scores
from gradprune.statistics import ActivationWindow, HessianWindow, SaliencyAccumulator
from gradprune.targets import Target

log = logging.getLogger(__name__)

Sums = Union[ActivationWindow, SaliencyAccumulator]


class StatisticsWindow:
    """The training statistics of one scorer: what its ``needs`` asks for, resumable and summed over ranks.

    The callback decides when (:meth:`batch` before each training micro-batch, :meth:`optimizer_step` at each
    optimizer step, :meth:`close` wherever training batches stop); the strategies read the sums through
    :meth:`score_fn` / :meth:`sharded_score_fn` / :attr:`sums` once :meth:`ready` has checked and reduced them.
    """

    def __init__(self, scorer: str) -> None:
        self.scorer = scorer
        #: the sums of this fit (None before fit start, for a scorer that needs nothing, or with
        #: statistics="calibration", where nothing is gathered from training)
        self.sums: Optional[Sums] = None
        self._trainer: Optional[pl.Trainer] = None
        self._pending: Optional[dict] = None  # a checkpoint's sums, loaded at fit start / train start
        self._pending_summed = False  # the pending sums are over all ranks: only rank 0 loads them

    # -- the fit --------------------------------------------------------------------------------------
    def start(self, targets: list[Target], trainer: pl.Trainer, gather: bool) -> None:
        """At fit start: empty sums of what the scorer needs (nothing unless ``gather``), then a checkpoint's."""
        self.sums = statistics_for(get_scorer(self.scorer).needs, targets) if gather else None
        self._trainer = trainer
        self.load_pending(trainer)

    def load_pending(self, trainer: pl.Trainer) -> None:
        """Load the checkpoint's sums, if any came (at fit start, or at train start for strategies that
        restore callbacks after fit start)."""
        pending, self._pending = self._pending, None
        if self.sums is None or not pending:
            return
        if self._pending_summed and trainer.global_rank != 0:
            return  # rank 0 holds every rank's share of the window so far
        try:
            self.sums.load_state_dict(pending)
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:  # saved for another scorer: a fresh window
            self.sums.reset()
            log.warning("the checkpoint's statistics window does not fit scorer %r (%s: %s): the window starts afresh",
                        self.scorer, type(exc).__name__, exc)

    def batch(self, batch: Any, in_window: bool) -> None:
        """Before a training micro-batch: activation hooks on for the batches ``in_window``, off otherwise."""
        if isinstance(self.sums, ActivationWindow):
            if in_window:
                self.sums.open()
                self.sums.tokens(batch)
            else:
                self.sums.close()

    def optimizer_step(self) -> None:
        """Before an optimizer step that an event will follow: add ``|W * G|`` (gradient scorers)."""
        if isinstance(self.sums, SaliencyAccumulator):
            self.sums.add()  # before any masking (and pruned weights score |0 * G| = 0 anyway)

    def close(self) -> None:
        """Remove the activation hooks (the sums stay until :meth:`reset`)."""
        if isinstance(self.sums, ActivationWindow):
            self.sums.close()

    def reset(self) -> None:
        """After an event: forget the sums."""
        if self.sums is not None:
            self.sums.reset()

    # -- at an event ----------------------------------------------------------------------------------
    def ready(self, trainer: pl.Trainer) -> None:
        """Close the window, check every target has statistics, and sum them over data-parallel ranks."""
        sums = self.sums
        if sums is None:
            return
        self.close()
        missing = sums.missing()
        if missing:
            needs = get_scorer(self.scorer).needs
            what = "got no gradient" if needs == "gradients" else "saw no input in forward"
            raise RuntimeError(
                f"scorer {self.scorer!r} needs {needs}, but these targets {what} since the last event: "
                f"{missing[:5]}{' ...' if len(missing) > 5 else ''}; exclude them (exclude=...) or use scorer='magnitude'"
            )
        if isinstance(sums, ActivationWindow) and trainer.world_size > 1:
            sums.reduce_(lambda t: trainer.strategy.reduce(t, reduce_op="sum"))

    def score_fn(self) -> Callable[[Target], torch.Tensor]:
        """``score(target)`` for select_masks, from the scorer and the statistics it asked for."""
        scorer = get_scorer(self.scorer)
        sums = self.sums
        if sums is None:
            return lambda t: scorer.score(t, None)
        if isinstance(sums, ActivationWindow):
            return lambda t: scorer.score(t, sums.sum_sq(t.name))
        return lambda t: scorer.score(t, sums.saliency(t.name))

    def sharded_score_fn(self) -> Callable[[Target], torch.Tensor]:
        """Scores of each target's local rows (:func:`gradprune.sharding.sharded_scores`)."""
        sums = self.sums
        if isinstance(sums, ActivationWindow):
            return lambda t: sharded_scores(self.scorer, t, sums.sum_sq(t.name))
        return lambda t: sharded_scores(self.scorer, t)

    # -- state ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The callback's ``statistics`` and ``statistics_summed`` entries."""
        statistics, summed = self._pending, self._pending_summed
        if self.sums is not None:
            statistics, summed = self.sums.state_dict(), False
            trainer = self._trainer
            if isinstance(self.sums, ActivationWindow) and trainer is not None and trainer.world_size > 1:
                # every rank saves (Lightning calls this on all of them): the window's sums over all ranks
                # reduced on the strategy's device (NCCL reduces only GPU tensors), saved on the CPU
                device = trainer.strategy.root_device
                statistics = {name: {key: trainer.strategy.reduce(value.to(device, copy=True), reduce_op="sum").cpu()
                                     for key, value in entry.items()} for name, entry in statistics.items()}
                summed = True
        return {"statistics": statistics, "statistics_summed": summed}  # summed over the ranks: only rank 0 loads them

    def load_state_dict(self, state: dict) -> None:
        self._pending = state.get("statistics")
        self._pending_summed = bool(state.get("statistics_summed", False))


def statistics_for(needs: str, targets: list[Target]) -> Optional[Sums]:
    """What a scorer's ``needs`` asks the callback to gather: input sums over a window, |W * G| sums, or nothing."""
    if needs == "activations":
        return ActivationWindow(targets)
    if needs == "hessians":
        return HessianWindow(targets)
    if needs == "gradients":
        return SaliencyAccumulator(targets)
    return None
