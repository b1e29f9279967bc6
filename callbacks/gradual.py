"""GradualPruningCallback: ramp sparsity during training on a schedule of optimizer steps.

When: at every schedule event (``start_step + k * every`` and ``end_step``, counted in optimizer steps,
so gradient accumulation and max_steps / max_epochs runs behave the same). An event at step ``t`` is
applied once ``t`` optimizer steps have been taken: at the end of the batch whose optimizer step made the
global step ``t`` (or at the start of the first batch for ``t == 0``), before any checkpoint of that step is
written. What: the core picks exactly ``schedule.sparsity_at(t)`` of the targets (monotone masks) with
the chosen scorer; the shared mask registry keeps pruned weights at zero between events.

If the model is already sparse when the first event comes (a one-shot callback pruned it at fit start),
the schedule ramps from that sparsity instead of ``initial_sparsity``.

Statistics: the callback asks the scorer what it needs (:mod:`gradprune.scorers`). For activations
(``wanda``, ``ria``) forward hooks on the targets sum the squared inputs during the last ``stat_batches``
training micro-batches before each event and are removed at the event (no hooks run between windows);
for Hessians (``sparsegpt``) the same hooks sum ``X X^T``, and the event runs SparseGPT on every layer;
for gradients (``taylor``) ``|W * G|`` is summed at every optimizer step since the last event, before any
masking. Sums are all-reduced over data-parallel ranks before scoring, and the partial sums travel in the
callback's state, so a checkpoint inside a window resumes exactly: with several ranks the checkpoint holds
the window's activation sums already summed over the ranks (rank 0 writes the checkpoint), and on resume
rank 0 starts from them and the other ranks from nothing. Hooks are removed when fit ends or fails.

With ``statistics="calibration"`` the training batches are not watched at all: at every event the one-shot
method of the scorer's name (:func:`gradprune.prune_oneshot`, sequential) runs on ``nsamples`` calibration
sequences drawn at fit start, block by block, each block calibrated on the outputs of the already-pruned
blocks before it, and prunes from the model's current masks to the event's sparsity. It costs a forward of
the calibration set (and, for sparsegpt, the reconstruction) per event, and is what one-shot SparseGPT /
Wanda do, repeated along the ramp with training in between.

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
import torch
from tqdm.auto import tqdm
from lightning.pytorch.strategies import ModelParallelStrategy

from gradprune.schedules import SCHEDULE_KINDS, SparsitySchedule, nm_step
from gradprune.scorers import get_scorer, scorer_names
from gradprune.selection import exact_count, select_masks, validate_selection
from gradprune.sharding import SHARDED_SCORERS, is_sharded, placement_problem, select_sharded_masks, sharded_scores
from gradprune.blocks import find_causal_lm, group_by_block
from gradprune.methods import METHODS
from gradprune.oneshot import prune_oneshot
from gradprune.methods.owl import check_lambda, monotone_counts, owl_target_counts
from gradprune.statistics import ActivationWindow, HessianWindow, SaliencyAccumulator
from gradprune.targets import Target, find_targets
from gradprune.validation import (Problems, check_choice, check_number, check_pattern, check_selector, check_sparsity,
                                  check_weights_usable, is_int, is_number)

from .base import FSDP2_NOTE, PruningCallback, apply_event, check_event_inputs
from .events import ScheduledEvents, check_end_step, schedule_end
from .calibration import CalibrationDraw
from .mask_modes import DynamicMasks, LearnedMasks, MaskMode

log = logging.getLogger(__name__)


class GradualPruningCallback(ScheduledEvents, CalibrationDraw, PruningCallback):
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
        nsamples: calibration sequences of ``statistics="calibration"`` (the datamodule's
            ``calibration_batches``, else the first training batches; shared out over data-parallel ranks).
        seqlen: tokens per calibration sequence.
        lm: dotted name of the causal LM inside the LightningModule that calibration batches run through
            (default: found, as for the one-shot callbacks).
        mode: None (masks grow monotonically, chosen by the scorer at each event), or a strategy that lets
            training choose the masks until ``end_step``, the freeze step (:mod:`gradprune.callbacks.mask_modes`):
            :class:`LearnedMasks` (MaskLLM: learned N:M masks) or :class:`DynamicMasks` (SR-STE: masks chosen
            afresh at every event, straight-through gradients).
    """

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
        nsamples: int = 32,
        seqlen: int = 128,
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
        if (scorer in scorer_names() and get_scorer(scorer).prune is not None and statistics != "calibration"
                and (scope != "layer" or pattern != "unstructured")):
            problems.add(f"scorer {scorer!r} prunes each layer to its count from a training window and updates the kept "
                         f"weights: use scope 'layer' and pattern 'unstructured', got scope={scope!r}, pattern={pattern!r} "
                         "(statistics='calibration' runs the one-shot method, which takes N:M patterns too)")
        if allocation != "owl":  # unused options are checked too (issue 22): the range needs the owl mode
            check_number(problems, "owl_lambda", owl_lambda, low=0, high=0.5)
        if allocation == "owl":
            check_lambda(problems, owl_lambda, final_sparsity)
            if scorer in scorer_names() and get_scorer(scorer).needs not in ("activations", "hessians"):
                problems.add(f"allocation='owl' ranks blocks by the Wanda scores of the activation window: use an "
                             f"activation scorer ('ria', 'sparsegpt', 'wanda'), got scorer={scorer!r}")
            if scope == "global" or pattern != "unstructured":
                problems.add(f"allocation='owl' gives each layer its own budget: use scope 'layer' or 'row' and "
                             f"pattern 'unstructured', got scope={scope!r}, pattern={pattern!r}")
        check_choice(problems, "statistics", statistics, ("window", "calibration"))
        if mode is not None and not isinstance(mode, MaskMode):
            problems.add(f"mode must be None, LearnedMasks(...) or DynamicMasks(...), got {mode!r}", type_error=True)
        if statistics == "calibration":
            calibrated = sorted(name for name, method in METHODS.items() if method.statistics != "none")
            if scorer not in calibrated:
                problems.add(f"statistics='calibration' runs the one-shot method named by the scorer on calibration data "
                             f"at every event: use scorer {calibrated}, got scorer={scorer!r}")
            if allocation != "uniform":
                problems.add(f"statistics='calibration' supports allocation 'uniform' only, got allocation={allocation!r}")
            if scope == "global":  # block by block, so the whole model is never ranked at once
                problems.add("statistics='calibration' prunes block by block: use scope 'layer' or 'row', got scope='global'")
            if nm is not None and is_number(final_sparsity) and abs(final_sparsity - nm[0] / nm[1]) > 1e-9:
                # the one-shot methods prune N:M patterns exactly, so the events step through 1:M, 2:M, ... N:M
                problems.add(f"statistics='calibration' with pattern {pattern!r} ends at exactly N/M: final_sparsity "
                             f"must be {nm[0] / nm[1]:g}, got final_sparsity={final_sparsity!r}")
        self.check_calibration_arguments(problems, nsamples, seqlen, lm)  # used or not
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
        self.lm = lm
        self.mode = mode
        self._calibration: Optional[list] = None  # statistics="calibration": this rank's batches, drawn at fit start
        self._combine = None  # how calibration statistics are summed over ranks (set by CalibrationDraw)
        # resumable state
        self.resolved_end_step: Optional[int] = None
        self.base_sparsity: Optional[float] = None  # the schedule's effective initial sparsity
        self.last_event_step: Optional[int] = None
        self._targets: Optional[list[Target]] = None
        self._statistics: Union[ActivationWindow, SaliencyAccumulator, None] = None
        self._pending_statistics: Optional[dict] = None
        self._sharded = False  # some target is a DTensor (FSDP2): selection goes through gradprune.sharding
        self._trainer: Optional[pl.Trainer] = None
        self._statistics_summed = False  # the pending statistics are sums over all ranks

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
            self._check_sharded_options("strategy ModelParallelStrategy (FSDP2)")
        if stage == "fit" and isinstance(self.mode, LearnedMasks):  # before the optimizer and DDP see the weights
            self.mode.setup(find_targets(pl_module, self.include, self.exclude))

    def _check_sharded_options(self, where: str) -> None:
        """What sharded weights cannot do, in one error (before anything is pruned)."""
        problems = Problems()
        if self.scorer not in SHARDED_SCORERS:
            why = {"taylor": "its |W * G| sums would be kept per weight shard and are not implemented sharded",
                   "sparsegpt": "its Hessian updates of the kept weights are not implemented on weight shards"}.get(
                       self.scorer, "it is not known to work on weight shards")
            problems.add(f"scorer {self.scorer!r} under {where}: {why}; use one of {list(SHARDED_SCORERS)}, or "
                         "strategy='ddp' for this scorer")
        if self.allocation == "owl":
            problems.add(f"allocation='owl' under {where}: OWL's per-block budgets are not implemented on weight "
                         "shards; use allocation='uniform', or strategy='ddp' for OWL")
        if self.mode is not None:
            problems.add(f"mode {type(self.mode).__name__} under {where}: learned and dynamic masks compute the masked "
                         "weight from whole weights; use mode=None, or strategy='ddp'")
        if self.statistics == "calibration":
            problems.add(f"statistics='calibration' under {where}: the one-shot pipeline it runs at each event works on "
                         "whole weights; use statistics='window', or strategy='ddp'")
        if problems.value_errors:
            problems.add(FSDP2_NOTE + ", with the scorers and allocation above")
        problems.raise_if_any()

    def _check_sharded_fit(self, trainer: pl.Trainer, targets: list[Target]) -> None:
        """Sharded weights: options, placements, Conv1D targets and MaskedAdamW are checked together."""
        where = f"sharded weights (strategy {type(trainer.strategy).__name__})"
        self._check_sharded_options(where)
        problems = Problems()
        placements = [p for p in (placement_problem(t.name, t.weight) for t in targets) if p]
        if placements:
            problems.add(f"{len(placements)} targets are not sharded by rows only (tensor parallelism is not supported; "
                         f"use fully_shard alone, or strategy='ddp'): {placements[:2]}")
        conv1d = [t.name for t in targets if t.transposed]
        if conv1d:
            problems.add(f"targets stored (in, out) (GPT-2 Conv1D) cannot be pruned sharded: FSDP2 splits their input "
                         f"features, not their rows: {conv1d[:3]}; exclude them, or use strategy='ddp'")
        masked = [type(o).__name__ for o in trainer.optimizers if hasattr(o, "use_masks_of")]
        if masked:
            problems.add(f"optimizer {masked[0]} (gradprune.MaskedAdamW) under {where}: its masked update is not "
                         "implemented on weight shards; use torch.optim.AdamW (the masks are enforced on its "
                         "gradients), or strategy='ddp'")
        problems.raise_if_any()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        targets = find_targets(pl_module, self.include, self.exclude)
        validate_selection(targets, self.final_sparsity, self.scope, self.pattern)
        sharded = any(is_sharded(t.weight) for t in targets)
        if sharded:
            self._check_sharded_fit(trainer, targets)
        problems = Problems()
        check_weights_usable(problems, pl_module)  # meta or NaN weights: say so before the first event
        problems.raise_if_any()
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
        end_step = self._resolve_end_step(trainer)  # a resumed run keeps the end step it started with
        if self.statistics == "calibration" or (self.mode is not None and self.mode.needs_calibration):
            find_causal_lm(pl_module, self.lm)  # nothing to run the batches through: fail before reading data
            self._calibration = self.calibration(trainer)
        # all checks passed: only now does the callback's state change
        self._targets, self.resolved_end_step, self._sharded = targets, end_step, sharded
        if self.mode is not None:
            self.mode.start(self, trainer, pl_module)
        self._trainer = trainer
        self._statistics = _statistics_for(needs, targets) if self.statistics == "window" else None
        self._load_pending_statistics(trainer)
        super().on_fit_start(trainer, pl_module)

    def _load_pending_statistics(self, trainer: pl.Trainer) -> None:
        pending, self._pending_statistics = self._pending_statistics, None
        if self._statistics is None or not pending:
            return
        if self._statistics_summed and trainer.global_rank != 0:
            return  # rank 0 holds every rank's share of the window so far
        try:
            self._statistics.load_state_dict(pending)
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:  # saved for another scorer: a fresh window
            self._statistics.reset()
            log.warning("the checkpoint's statistics window does not fit scorer %r (%s: %s): the window starts afresh",
                        self.scorer, type(exc).__name__, exc)

    def _final_target(self) -> str:
        return f"final_sparsity {self.final_sparsity}"

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)  # masks restored after on_fit_start (ModelParallelStrategy)
        self._load_pending_statistics(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._maybe_prune(trainer, pl_module)
        if isinstance(self._statistics, ActivationWindow):
            remaining = self._micro_batches_to_event(trainer, batch_idx)
            if remaining is not None and remaining <= self.stat_batches:
                self._statistics.open()
                self._statistics.tokens(batch)
            else:
                self._statistics.close()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.mode is not None:
            self.mode.before_optimizer_step(trainer)
        if isinstance(self._statistics, SaliencyAccumulator) and self._next_event(trainer.global_step + 1) is not None:
            self._statistics.add()  # before any masking (and pruned weights score |0 * G| = 0 anyway)
        super().on_before_optimizer_step(trainer, pl_module, optimizer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._maybe_prune(trainer, pl_module)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._close_window()  # validation batches are not training data; the next training batch reopens it

    def on_fit_end(self, trainer, pl_module) -> None:
        self._close_window()
        if self.mode is not None:
            self.mode.stop()  # the targets' own forward back (a resumed run installs the mode's again)
        super().on_fit_end(trainer, pl_module)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._close_window()
        if self.mode is not None:
            self.mode.stop()

    def teardown(self, trainer, pl_module, stage) -> None:
        self._close_window()
        if self.mode is not None and stage == "fit":
            self.mode.stop()

    def _close_window(self) -> None:
        if isinstance(self._statistics, ActivationWindow):
            self._statistics.close()

    # -- pruning --------------------------------------------------------------------------------------
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
        target = schedule.sparsity_at(step)
        if self.mode is not None and not self.mode.follows_schedule:
            target = self.final_sparsity
        started = time.perf_counter()
        masks = registry.current(self._targets)
        current = registry.sparsity(self._targets)
        scorer = get_scorer(self.scorer)
        weights = None
        if self.mode is not None and target <= 0 and self.mode.sparsity() is None:
            new = None  # a ramp from 0: the mode has nothing to prune (and no statistics before step 0) yet
        elif self.mode is not None:
            self._ready_statistics(trainer)
            self.mode.event(self, trainer, pl_module, step, target)
            new = None
        elif target <= current and (self.scope == "global" or self.allocation == "owl"
                                  or _every_layer_at(masks, target, self._targets, self.scope)):
            new = None  # the model is already at the target (a one-shot callback pruned it): nothing to score
        else:
            self._ready_statistics(trainer)
            check_event_inputs(step, self._targets, self._statistics, trainer)
            counts = self._owl_counts(pl_module, target, masks) if self.allocation == "owl" else None
            if self.statistics == "calibration":
                self._prune_on_calibration(trainer, pl_module, target, masks)
                new = None  # the one-shot pipeline recorded its masks (and new weights) already
            elif self._sharded:
                new = select_sharded_masks(self._targets, target, self._sharded_score_fn(), self.scope, self.pattern, masks)
            elif scorer.prune is not None:
                weights, new = self._reconstruct(trainer, target, masks, counts)
            else:
                new = select_masks(self._targets, target, self._score_fn(), self.scope, self.pattern, masks, counts=counts)
        if self._statistics is not None:
            self._statistics.reset()
        apply_event(registry, self._targets, weights, new)
        self.last_event_step = step
        achieved = registry.sparsity(self._targets)
        if self.mode is not None and self.mode.sparsity() is not None:
            achieved = self.mode.sparsity()  # the masks the mode holds until the freeze step
        if trainer.is_global_zero:  # the same on every rank
            log.info("step %d: pruned to %.4f sparsity (target %.4f) in %.1fs", step, achieved, target,
                     time.perf_counter() - started)
        pl_module.log("sparsity/target", target, on_step=True, on_epoch=False, sync_dist=False)
        pl_module.log("sparsity/achieved", achieved, on_step=True, on_epoch=False, sync_dist=False)

    def _prune_on_calibration(self, trainer: pl.Trainer, pl_module: pl.LightningModule, target: float,
                              masks: dict) -> None:
        """``statistics="calibration"``: the one-shot method of the scorer's name, sequential, on the
        calibration batches, from the current masks to exactly ``target`` in every comparison group."""
        options = {"scope": self.scope} if "scope" in METHODS[self.scorer].options else {}
        if self._combine is not None:
            options["reduce"] = self._combine
        pattern = self.pattern
        if self.pattern == "unstructured":  # every layer at exactly its count, as in the window mode; a layer
            # that earlier pruning (a one-shot callback of another scope) took past it keeps its masks, and the
            # others prune that much less, so the total stays exact
            options["counts"] = monotone_counts({t.name: _layer_count(t, target, self.scope) for t in self._targets},
                                                _pruned_counts(masks))
        else:  # the one-shot methods prune an N:M pattern exactly, so the ramp steps through k:M, k = 1 .. N
            pattern, target = nm_step(self.pattern, target)
            if pattern is None or _every_layer_at(masks, target, self._targets, "layer"):
                return  # this event's target is below the next step: nothing to prune yet
        prune_oneshot(pl_module, self.scorer, target, pattern, self._calibration, sequential=True,
                      include=[t.name for t in self._targets], lm=self.lm,
                      progress=None if trainer.is_global_zero else False, **options)

    def _owl_counts(self, pl_module: pl.LightningModule, target: float, masks: dict) -> dict:
        """Per-target prune counts from OWL's budgets at this event's target (statistics of the window),
        raised where a layer has already pruned more (masks only grow), exact in total."""
        window = self._statistics
        sum_sq = {t.name: window.sum_sq(t.name) for t in self._targets}
        lam = min(self.owl_lambda, target, 1.0 - target)
        desired, budgets = owl_target_counts(group_by_block(pl_module, self._targets), sum_sq, target, lam)
        log.info("OWL budgets at sparsity %.4f: %s", target, [round(b, 4) for b in budgets])
        return monotone_counts(desired, _pruned_counts(masks))

    def _ready_statistics(self, trainer: pl.Trainer) -> None:
        """Close the window, check every target has statistics, and sum them over data-parallel ranks."""
        scorer = get_scorer(self.scorer)
        statistics = self._statistics
        if statistics is None:
            return
        self._close_window()
        missing = statistics.missing()
        if missing:
            what = "got no gradient" if scorer.needs == "gradients" else "saw no input in forward"
            raise RuntimeError(
                f"scorer {self.scorer!r} needs {scorer.needs}, but these targets {what} since the last event: "
                f"{missing[:5]}{' ...' if len(missing) > 5 else ''}; exclude them (exclude=...) or use scorer='magnitude'"
            )
        if isinstance(statistics, ActivationWindow) and trainer.world_size > 1:
            statistics.reduce_(lambda t: trainer.strategy.reduce(t, reduce_op="sum"))

    def _score_fn(self):
        """``score(target)`` for select_masks, from the scorer and the statistics it asked for."""
        scorer = get_scorer(self.scorer)
        statistics = self._statistics
        if statistics is None:
            return lambda t: scorer.score(t, None)
        if isinstance(statistics, ActivationWindow):
            return lambda t: scorer.score(t, statistics.sum_sq(t.name))
        return lambda t: scorer.score(t, statistics.saliency(t.name))

    def _sharded_score_fn(self):
        """Scores of each target's local rows (:func:`gradprune.sharding.sharded_scores`)."""
        statistics = self._statistics
        if isinstance(statistics, ActivationWindow):
            return lambda t: sharded_scores(self.scorer, t, statistics.sum_sq(t.name))
        return lambda t: sharded_scores(self.scorer, t)

    def _reconstruct(self, trainer: pl.Trainer, target: float, masks: dict, counts: Optional[dict]) -> tuple[dict, dict]:
        """New weights and keep-masks of every target from the scorer's ``prune`` (SparseGPT): each layer
        to exactly its count, from the window's Hessians. Nothing is applied here, so an error leaves the
        model as it was."""
        prune, window = get_scorer(self.scorer).prune, self._statistics
        weights, keeps = {}, {}
        for t in tqdm(self._targets, desc=f"{self.scorer} to {target:.4f}", leave=False,
                      disable=not trainer.is_global_zero):
            count = counts[t.name] if counts is not None else exact_count(target, t.numel)
            weight, keep = prune(t, window.hessian(t.name), count, masks.get(t.name))
            if not bool(torch.isfinite(weight).all()):
                raise ValueError(f"scorer {self.scorer!r} produced non-finite weights for {t.name!r} (from non-finite "
                                 "activations in the statistics window); no layer was changed")
            weights[t.name], keeps[t.name] = weight, keep
        return weights, keeps

    # -- state ----------------------------------------------------------------------------------------
    def extra_state(self) -> dict:
        statistics, summed = self._pending_statistics, self._statistics_summed
        if self._statistics is not None:
            statistics, summed = self._statistics.state_dict(), False
            trainer = self._trainer
            if isinstance(self._statistics, ActivationWindow) and trainer is not None and trainer.world_size > 1:
                # every rank saves (Lightning calls this on all of them): the window's sums over all ranks
                # reduced on the strategy's device (NCCL reduces only GPU tensors), saved on the CPU
                device = trainer.strategy.root_device
                statistics = {name: {key: trainer.strategy.reduce(value.to(device, copy=True), reduce_op="sum").cpu()
                                     for key, value in entry.items()} for name, entry in statistics.items()}
                summed = True
        return {
            "resolved_end_step": self.resolved_end_step,
            "base_sparsity": self.base_sparsity,
            "last_event_step": self.last_event_step,
            "statistics": statistics,
            "statistics_summed": summed,  # over the ranks: on resume only rank 0 loads them
            "mode": self.mode.state_dict() if self.mode is not None else {},
        }

    def load_extra_state(self, state: dict) -> None:
        self.resolved_end_step = state.get("resolved_end_step")
        self.base_sparsity = state.get("base_sparsity")
        self.last_event_step = state.get("last_event_step")
        self._pending_statistics = state.get("statistics")
        self._statistics_summed = bool(state.get("statistics_summed", False))
        if self.mode is not None:
            self.mode.load_state_dict(state.get("mode") or {})


def _statistics_for(needs: str, targets: list[Target]) -> Union[ActivationWindow, SaliencyAccumulator, None]:
    """What a scorer's ``needs`` asks the callback to gather: input sums over a window, |W * G| sums, or nothing."""
    if needs == "activations":
        return ActivationWindow(targets)
    if needs == "hessians":
        return HessianWindow(targets)
    if needs == "gradients":
        return SaliencyAccumulator(targets)
    return None


def _layer_count(target: Target, sparsity: float, scope: str) -> int:
    """Weights a target prunes at ``sparsity``: its exact count, or with scope "row" every row's."""
    if scope == "row":
        rows = target.out_in(target.weight).shape[0]
        return rows * exact_count(sparsity, target.numel // rows)
    return exact_count(sparsity, target.numel)


def _every_layer_at(masks: dict, target: float, targets: list[Target], scope: str) -> bool:
    """Whether every target already prunes at least its exact count at sparsity ``target``."""
    pruned = _pruned_counts(masks)
    return all(pruned.get(t.name, 0) >= _layer_count(t, target, scope) for t in targets)


def _pruned_counts(masks: dict) -> dict:
    """Target name -> weights its keep-mask prunes already."""
    return {name: int(mask.numel() - mask.sum()) for name, mask in masks.items()}
