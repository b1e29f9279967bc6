"""GradualPruningCallback: ramp sparsity during training on a schedule of optimizer steps.

When: at every schedule event (``start_step + k * every`` and ``end_step``, counted in optimizer steps,
so gradient accumulation and max_steps / max_epochs runs behave the same). An event at step ``t`` is
applied once ``t`` optimizer steps have been taken: at the end of the batch whose optimizer step made the
global step ``t`` (or at the start of the first batch for ``t == 0``), before any checkpoint of that step is
written. What: the core picks exactly ``schedule.sparsity_at(t)`` of the targets (monotone masks) with
the chosen scorer; the shared mask registry keeps pruned weights at zero between events.

If the model is already sparse when the first event comes (a one-shot callback pruned it at fit start),
the schedule ramps from that sparsity instead of ``initial_sparsity``.

How the masks are chosen at an event is a strategy object (:mod:`gradprune.callbacks.strategies`): scores
from a statistics window of the last training batches, SparseGPT's reconstruction, OWL's budgets, sharded
selection, or, with ``mode=``, masks that training chooses (:mod:`gradprune.callbacks.mask_modes`). The
callback keeps the schedule, the events and the state, and installs the statistics window's hooks
(:mod:`gradprune.callbacks.window`): for activations (``wanda``, ``ria``) and Hessians (``sparsegpt``) during
the last ``stat_batches`` training micro-batches before each event, removed at the event (no hooks run
between windows), and when fit ends or fails; for gradients (``taylor``) ``|W * G|`` at every optimizer step
since the last event. Sums are all-reduced over data-parallel ranks before scoring and travel in the
callback's state, so a checkpoint inside a window resumes exactly.

With ``statistics="calibration"`` no statistics are gathered from training: at every event the one-shot
method of the scorer's name (:func:`gradprune.prune_oneshot`, sequential) runs on ``nsamples`` calibration
sequences drawn at fit start, block by block, each block calibrated on the outputs of the already-pruned
blocks before it, and prunes from the model's current masks to the event's sparsity. It costs a forward of
the calibration set (and, for sparsegpt, the reconstruction) per event, and is what one-shot SparseGPT /
Wanda do, repeated along the ramp with training in between. With ``stream_windows`` the calibration of each
event also holds the latest training sequences seen before it, run through the current model at the event
like the others (each rank its own, summed with the rest).

Sharded weights (FSDP2: Lightning's ModelParallelStrategy, ``fully_shard`` in ``configure_model``, no tensor
parallelism): each rank scores and masks the rows it holds, and :func:`gradprune.sharding.select_sharded_masks`
makes the masks exactly those of one process holding the whole model (scope "row" without communication,
"layer" and "global" from histograms summed over the ranks). Scorers ``magnitude``, ``wanda`` and ``ria``
(activation sums all-reduced as under DDP; RIA's column sums too); ``taylor``, ``sparsegpt``,
``allocation="owl"``, :class:`gradprune.MaskedAdamW` and GPT-2 Conv1D targets are refused at setup / fit
start, before anything is pruned.
"""
from __future__ import annotations

import logging
import time
from typing import List, Literal, Optional, Union

import lightning.pytorch as pl
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities.model_helpers import is_overridden

from gradprune.blocks import find_causal_lm
from gradprune.calibration import as_batches
from gradprune.schedules import SCHEDULE_KINDS, SparsitySchedule
from gradprune.scorers import get_scorer, scorer_names
from gradprune.sharding import is_sharded
from gradprune.targets import Target, find_targets
from gradprune.validation import (Problems, check_choice, check_pattern, check_selector, check_sparsity,
                                  check_weights_usable, is_int)
from gradprune.selection import validate_selection

from .base import PruningCallback
from .calibration import CalibrationDraw, from_rank_zero
from .events import ScheduledEvents, WindowLifecycle, check_end_step, schedule_end
from .strategies import (MaskMode, ShardedScores, check_allocation, check_calibrated, check_reconstruction,
                         check_sharded_fit, check_sharded_options, default_strategy)
from .window import StatisticsWindow

log = logging.getLogger(__name__)


def rank_share(streams: list[list[dict]], rank: int, world: int) -> list[dict]:
    """A rank's kept training sequences from a checkpoint's per-rank lists: its own when the run has as many
    ranks as the one that saved them, otherwise all of them on rank 0 and none elsewhere (statistics are summed
    over ranks, so the sum is the same)."""
    if len(streams) == world:
        return list(streams[rank])
    return [batch for stream in streams for batch in stream] if rank == 0 else []


def latest_sequences(kept: list[dict], batch, seqlen: int, limit: int) -> list[dict]:
    """``kept`` (calibration batches, oldest first) with this training batch's sequences added, cut to
    ``seqlen`` tokens and held on the CPU, dropping the oldest sequences beyond ``limit``."""
    seen = as_batches([batch])[0]
    mask = seen["attention_mask"]
    kept = kept + [{"input_ids": seen["input_ids"][:, :seqlen].detach().to("cpu", copy=True),
                    "attention_mask": None if mask is None else mask[:, :seqlen].detach().to("cpu", copy=True)}]
    extra = sum(b["input_ids"].shape[0] for b in kept) - limit
    while extra > 0:
        first = kept[0]
        if first["input_ids"].shape[0] <= extra:
            kept, extra = kept[1:], extra - first["input_ids"].shape[0]
        else:
            mask = first["attention_mask"]
            kept = [{"input_ids": first["input_ids"][extra:],
                     "attention_mask": None if mask is None else mask[extra:]}] + kept[1:]
            extra = 0
    return kept


class GradualPruningCallback(WindowLifecycle, ScheduledEvents, CalibrationDraw, PruningCallback):
    """Prune gradually during fit, to exactly the schedule's sparsity at every event.

    Runs on a single device, under DDP, and under FSDP2 (ModelParallelStrategy with ``fully_shard``; scorers
    magnitude / wanda / ria, uniform allocation, any torch optimizer but MaskedAdamW).

    Args:
        final_sparsity: sparsity of the targeted weights at ``end_step``, in [0, 1).
        schedule: "cubic" (Zhu & Gupta), "linear", "exponential" or "constant".
        initial_sparsity: sparsity at ``start_step`` (raised to the model's current sparsity if it is
            already sparser at the first event).
        start_step: optimizer step of the first pruning event.
        end_step: optimizer step of the last event, or a float in (0, 1] = that fraction of the run's
            total optimizer steps (resolved at fit start).
        every: optimizer steps between pruning events.
        scope: "layer" (each weight matrix at the target), "global" (all targets ranked together) or
            "row" (each output row at the target, Wanda's comparison group).
        pattern: "unstructured" or "N:M" (e.g. "2:4"; final_sparsity must then be at most N/M).
        include: which modules to prune: regex, or list of names / ``.suffix`` es (default: all Linear /
            Conv1D except embeddings and the output head).
        exclude: modules not to prune, same forms as ``include``.
        scorer: how weights are ranked: "magnitude" (|W|), "wanda" (|W| * input norm), "ria" (relative
            importance and activations), "taylor" (sum of |W * G| since the last event), "sparsegpt"
            (SparseGPT at every event from the window's input Hessians: prunes each layer to its count and
            updates the kept weights; scope "layer", unstructured), or a name added with
            ``gradprune.scorers.register_scorer``. The default, magnitude, suits a model trained from
            scratch; on a pretrained LLM it wrecks the model (README): name "wanda" or "sparsegpt" there.
        exponent: power of the cubic schedule, rate of the exponential one.
        stat_batches: for activation and Hessian scorers, how many training micro-batches before each
            event the input statistics are collected over.
        allocation: "uniform" (every layer, row or the whole model at the schedule's sparsity), or "owl":
            at every event OWL's outlier-weighted budgets per decoder block, within
            [s - owl_lambda, s + owl_lambda] of the event's target s (lambda shrinks to min(s, 1 - s) early
            in the ramp), exact in total, never un-pruning; needs an activation scorer and scope layer/row.
        owl_lambda: half-width of OWL's budget range at the final sparsity, in [0, min(s, 1 - s)].
        statistics: where activation and Hessian scorers get their inputs: "window" (the last
            ``stat_batches`` training micro-batches before each event) or "calibration" (at each event the
            one-shot method of the scorer's name, "wanda", "ria" or "sparsegpt", runs sequentially, block by
            block, on ``nsamples`` calibration sequences drawn at fit start; uniform allocation only; with an
            N:M pattern, final_sparsity must be N/M and the events step through 1:M, 2:M, ... N:M, each to
            the largest k:M at or below the schedule's target).
        nsamples: calibration sequences of ``statistics="calibration"`` and of a mode's prior (the
            datamodule's ``calibration_batches``, else the first training batches; shared out over data-parallel
            ranks). 128 of ``seqlen`` 512 tokens by default, as for the one-shot callbacks, so that a ramp and the
            one-shot run it is compared with see the same calibration (in the recovery benchmark at 2:4, 128
            windows instead of 32 ended 5.6% lower after the same fine-tune). Each calibration event runs one
            sequential pass over them: fewer or shorter sequences make the events cheaper and the masks worse.
        seqlen: tokens per calibration sequence.
        stream_windows: with ``statistics="calibration"`` each event (with a learned mode, its prior and its
            SparseGPT update at the freeze step) also calibrates on up to this many of the latest training
            sequences seen before it, cut to ``seqlen`` tokens: a ramp's later events see more data than one-shot
            pruning at fit start can. 0 (default): the calibration sequences only. Each rank keeps its own (the
            statistics are summed over ranks; with fewer calibration windows than ranks every rank runs them all);
            every rank's travel in the checkpoint (8 bytes per token), and a resume on as many ranks gives each
            its own back (on another number, rank 0 takes them all: the summed statistics are the same).
        lm: dotted name of the causal LM inside the LightningModule that calibration batches run through
            (default: found, as for the one-shot callbacks).
        mode: None (masks grow monotonically, chosen by the scorer at each event), or a strategy that lets
            training choose the masks until ``end_step``, the freeze step (:mod:`gradprune.callbacks.mask_modes`):
            :class:`LearnedMasks` (MaskLLM: learned N:M masks) or :class:`DynamicMasks` (SR-STE: masks chosen
            afresh at every event, straight-through gradients).
    """

    # Over 60 lines on purpose: every argument is checked in one pass, so one error lists every problem
    # before anything is stored (the checks are most of the body).
    def __init__(
        self,
        final_sparsity: float,
        schedule: Literal["cubic", "linear", "exponential", "constant"] = "cubic",
        initial_sparsity: float = 0.0,
        start_step: int = 0,
        end_step: Union[int, float] = 1.0,
        every: int = 100,
        scope: Literal["layer", "global", "row"] = "layer",
        pattern: str = "unstructured",
        include: Union[str, List[str], None] = None,
        exclude: Union[str, List[str], None] = None,
        scorer: str = "magnitude",
        exponent: float = 3.0,
        stat_batches: int = 8,
        allocation: Literal["uniform", "owl"] = "uniform",
        owl_lambda: float = 0.08,
        statistics: Literal["window", "calibration"] = "window",
        nsamples: int = 128,
        seqlen: int = 512,
        stream_windows: int = 0,
        lm: Optional[str] = None,
        mode: Optional[MaskMode] = None,
    ) -> None:
        super().__init__()
        problems = Problems()
        check_sparsity(problems, "final_sparsity", final_sparsity)
        check_sparsity(problems, "initial_sparsity", initial_sparsity)
        check_choice(problems, "schedule", schedule, SCHEDULE_KINDS)
        check_choice(problems, "scope", scope, ("layer", "global", "row"))
        check_choice(problems, "scorer", scorer, scorer_names())
        if not is_int(stat_batches) or stat_batches < 1:
            problems.add(f"stat_batches must be an int >= 1 (training micro-batches per statistics window), got {stat_batches!r}")
        check_end_step(problems, end_step)
        check_selector(problems, "include", include)
        check_selector(problems, "exclude", exclude)
        nm = check_pattern(problems, pattern, "final_sparsity", final_sparsity)
        check_choice(problems, "allocation", allocation, ("uniform", "owl"))
        check_reconstruction(problems, scorer, scope, pattern, statistics)
        check_allocation(problems, allocation, owl_lambda, final_sparsity, scorer, scope, pattern)
        check_choice(problems, "statistics", statistics, ("window", "calibration"))
        if mode is not None and not isinstance(mode, MaskMode):
            problems.add(f"mode must be None, LearnedMasks(...) or DynamicMasks(...), got {mode!r}", type_error=True)
        if statistics == "calibration":
            check_calibrated(problems, scorer, allocation, scope, nm, final_sparsity)
        self.check_calibration_arguments(problems, nsamples, seqlen, lm)  # used or not
        if not is_int(stream_windows) or stream_windows < 0:
            problems.add(f"stream_windows must be an int >= 0 (training sequences added to each event's calibration), "
                         f"got {stream_windows!r}")
        elif stream_windows and statistics != "calibration" and not getattr(mode, "needs_calibration", False):
            problems.add(f"stream_windows adds training sequences to the calibration batches, which only "
                         f"statistics='calibration' and a mode with a calibrated prior use; got statistics={statistics!r}"
                         f" and mode={mode!r}")
        self.pattern, self.final_sparsity, self.allocation, self.scorer, self.statistics = (
            pattern, final_sparsity, allocation, scorer, statistics)
        if isinstance(mode, MaskMode):
            mode.check(problems, self)
        problems.raise_if_any()
        # Check the remaining schedule arguments now (end_step may still be a fraction of the run).
        SparsitySchedule(
            schedule, final_sparsity, initial_sparsity, start_step,
            schedule_end(start_step, end_step), every, exponent,
        )
        self.final_sparsity = final_sparsity
        self.schedule_kind = schedule
        self.initial_sparsity = initial_sparsity
        self.start_step = start_step
        self.end_step = int(end_step) if is_int(end_step) else float(end_step)
        self.every = every
        self.scope = scope
        self.pattern = pattern
        self.include = include
        self.exclude = exclude
        self.scorer = scorer
        self.exponent = exponent
        self.stat_batches = stat_batches
        self.allocation = allocation
        self.owl_lambda = owl_lambda
        self.statistics = statistics
        self.nsamples = nsamples
        self.seqlen = seqlen
        self.stream_windows = stream_windows
        self.lm = lm
        self.mode = mode
        #: how masks are chosen at an event: the mode, or mode=None's strategy (sharded at fit start if need be)
        self.strategy: MaskMode = mode if mode is not None else default_strategy(scorer, statistics, allocation,
                                                                                 owl_lambda)
        #: the training statistics the scorer reads (nothing is gathered with statistics="calibration")
        self.window = StatisticsWindow(scorer)
        self._calibration: Optional[list] = None  # this rank's calibration batches, drawn at fit start if needed
        self._combine = None  # how calibration statistics are summed over ranks (set by CalibrationDraw)
        self._stream: list[dict] = []  # the latest training sequences (stream_windows of them at most), resumable
        self._pending_stream: Optional[list[list[dict]]] = None  # every rank's, from a checkpoint
        self._world: tuple[int, int] = (0, 1)  # (rank, world size) of the run, for the checkpoint
        # resumable state
        self.resolved_end_step: Optional[int] = None
        self.base_sparsity: Optional[float] = None  # the schedule's effective initial sparsity
        self.last_event_step: Optional[int] = None
        self._targets: Optional[list[Target]] = None

    supports_fsdp2 = True

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            final_sparsity=self.final_sparsity, schedule=self.schedule_kind, start_step=self.start_step,
            end_step=self.end_step, scope=self.scope, pattern=self.pattern, include=self.include,
        )

    @property
    def targets(self) -> Optional[list[Target]]:
        """The weights this callback prunes, chosen at fit start (None before)."""
        return self._targets

    @property
    def schedule(self) -> SparsitySchedule:
        if self.resolved_end_step is None:
            raise RuntimeError("the schedule is resolved at fit start")
        initial = self.initial_sparsity if self.base_sparsity is None else self.base_sparsity
        return SparsitySchedule(
            self.schedule_kind, max(self.final_sparsity, initial), initial, self.start_step,
            self.resolved_end_step, self.every, self.exponent,
        )

    # -- Lightning hooks ------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and isinstance(trainer.strategy, ModelParallelStrategy):
            check_sharded_options(self, "strategy ModelParallelStrategy (FSDP2)")
        if stage == "fit" and is_overridden("setup", self.strategy, MaskMode):  # before the optimizer and DDP exist
            self.strategy.setup(find_targets(pl_module, self.include, self.exclude))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        targets = find_targets(pl_module, self.include, self.exclude)
        validate_selection(targets, self.final_sparsity, self.scope, self.pattern)
        sharded = any(is_sharded(t.weight) for t in targets)
        if sharded:
            check_sharded_fit(self, trainer, targets)
        problems = Problems()
        check_weights_usable(problems, pl_module)  # meta or NaN weights: say so before the first event
        problems.raise_if_any()
        self._check_window_inputs(targets)
        end_step = self._resolve_end_step(trainer)  # a resumed run keeps the end step it started with
        if self.statistics == "calibration" or self.strategy.needs_calibration:  # asked for: drawn even where a mode reads none
            find_causal_lm(pl_module, self.lm)  # nothing to run the batches through: fail before reading data
            self._calibration = self.calibration(trainer)
        # all checks passed: only now does the callback's state change
        self._targets, self.resolved_end_step = targets, end_step
        if self.mode is None:  # sharded weights (only mode=None's window scores pass check_sharded_fit) or whole
            self.strategy = ShardedScores() if sharded else default_strategy(self.scorer, self.statistics,
                                                                             self.allocation, self.owl_lambda)
        self._world = (trainer.global_rank, trainer.world_size)
        if self._pending_stream is not None:
            self._stream, self._pending_stream = rank_share(self._pending_stream, *self._world), None
        self.strategy.start(self, trainer, pl_module)
        self.window.start(targets, trainer, gather=self.statistics == "window")
        super().on_fit_start(trainer, pl_module)

    def _check_window_inputs(self, targets: list[Target]) -> None:
        """What the scorer's statistics need from the run: a batch before the first event, trainable targets."""
        needs = get_scorer(self.scorer).needs
        if (needs != "weights" and self.statistics == "window" and self.start_step == 0 and self.initial_sparsity > 0
                and self.last_event_step is None):
            raise ValueError(
                f"scorer {self.scorer!r} ranks by {needs} seen in training, but initial_sparsity "
                f"{self.initial_sparsity} is due at step 0, before any batch: set start_step >= 1"
            )
        frozen = [t.name for t in targets if not t.weight.requires_grad]
        if needs == "gradients" and frozen:
            raise ValueError(
                f"scorer {self.scorer!r} ranks by the gradients of the weights, but {len(frozen)} targets are frozen "
                f"(requires_grad=False, e.g. the base weights under PrunableLM(lora=...)): {frozen[:3]}; use an "
                "activation scorer ('wanda', 'ria') or 'magnitude', or exclude them"
            )

    def _final_target(self) -> str:
        return f"final_sparsity {self.final_sparsity}"

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)  # masks restored after on_fit_start (ModelParallelStrategy)
        self.window.load_pending(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._maybe_prune(trainer, pl_module)
        remaining = self._micro_batches_to_event(trainer, batch_idx)
        self.window.batch(batch, in_window=remaining is not None and remaining <= self.stat_batches)
        if self.stream_windows:
            self._stream = latest_sequences(self._stream, batch, self.seqlen, self.stream_windows)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.strategy.before_optimizer_step(trainer)
        if self._next_event(trainer.global_step + 1) is not None:
            self.window.optimizer_step()
        super().on_before_optimizer_step(trainer, pl_module, optimizer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._maybe_prune(trainer, pl_module)

    def event_calibration(self) -> list:
        """This rank's calibration batches for an event: those drawn at fit start, then the latest training
        sequences (``stream_windows``). With fewer calibration windows than ranks every rank runs the same
        batches and rank 0's statistics are used, so every rank then takes every rank's sequences, in rank order."""
        stream = self._stream
        if self.stream_windows and self._combine is from_rank_zero:
            gathered: list = [None] * self._world[1]
            dist.all_gather_object(gathered, self._stream)
            stream = [batch for part in gathered for batch in part]
        return self._calibration + stream

    def _close_window(self) -> None:
        self.window.close()

    def on_fit_end(self, trainer, pl_module) -> None:
        self.strategy.stop()  # the targets' own forward back (a resumed run installs the mode's again)
        super().on_fit_end(trainer, pl_module)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.strategy.stop()
        super().on_exception(trainer, pl_module, exception)

    def teardown(self, trainer, pl_module, stage) -> None:
        if stage == "fit":
            self.strategy.stop()
        super().teardown(trainer, pl_module, stage)

    # -- events ---------------------------------------------------------------------------------------
    def _maybe_prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if self.last_event_step is not None and step <= self.last_event_step:
            return
        if self.base_sparsity is None and step < self.start_step:
            return
        registry = self.registry(pl_module)
        if self.base_sparsity is None:
            current = registry.sparsity(self._targets)
            self.base_sparsity = max(self.initial_sparsity, current)
            if current > self.final_sparsity:
                log.warning(
                    "the model is already at %.4f sparsity, above final_sparsity %.4f: this callback will not prune",
                    current, self.final_sparsity,
                )
        schedule = self.schedule
        if not schedule.is_event(step):
            return
        target = schedule.sparsity_at(step) if self.strategy.follows_schedule else self.final_sparsity
        started = time.perf_counter()
        if self.mode is not None and target <= 0 and self.mode.sparsity() is None:
            pass  # a ramp from 0: the mode has nothing to prune (and no statistics before step 0) yet
        else:
            self.strategy.ready(self, trainer)
            self.strategy.event(self, trainer, pl_module, step, target)
        self.window.reset()
        self.last_event_step = step
        achieved = self.strategy.sparsity()  # the masks a mode holds until the freeze step
        if achieved is None:
            achieved = registry.sparsity(self._targets)
        if trainer.is_global_zero:  # the same on every rank
            log.info("step %d: pruned to %.4f sparsity (target %.4f) in %.1fs", step, achieved, target,
                     time.perf_counter() - started)
        pl_module.log("sparsity/target", target, on_step=True, on_epoch=False, sync_dist=False)
        pl_module.log("sparsity/achieved", achieved, on_step=True, on_epoch=False, sync_dist=False)

    # -- state ----------------------------------------------------------------------------------------
    def extra_state(self) -> dict:
        return {
            "resolved_end_step": self.resolved_end_step,
            "base_sparsity": self.base_sparsity,
            "last_event_step": self.last_event_step,
            **self.window.state_dict(),  # "statistics", "statistics_summed"
            "mode": self.strategy.state_dict(),
            "stream": self._every_ranks_stream(),
        }

    def _every_ranks_stream(self) -> list[list[dict]]:
        """The kept training sequences of every rank, by rank (Lightning asks every rank for its state; rank 0's
        is written), so that a resumed run gets each rank's back."""
        rank, world = self._world
        if world == 1 or not self.stream_windows:
            return [self._stream]
        gathered: list = [None] * world
        dist.all_gather_object(gathered, self._stream)
        return gathered

    def load_extra_state(self, state: dict) -> None:
        self.resolved_end_step = state.get("resolved_end_step")
        self.base_sparsity = state.get("base_sparsity")
        self.last_event_step = state.get("last_event_step")
        self.window.load_state_dict(state)
        self.strategy.load_state_dict(state.get("mode") or {})
        self._pending_stream = state.get("stream") or None
