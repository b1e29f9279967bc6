"""Gradual structured pruning in Lightning: :class:`GradualStructuredPruningCallback` masks whole MLP neurons and
attention head groups along a schedule during training (a structured export removes them at the end). It only
decides when; the core (:mod:`gradprune.structured.masking`) decides what.

Units are masked in the model's mask registry, never removed during fit, so shapes, optimizers and the teacher
stay as they are and a run resumes from any checkpoint; the schedule timing is
:class:`~gradprune.callbacks.events.ScheduledEvents`, shared with :class:`~gradprune.callbacks.GradualPruningCallback`.
One-shot removal at fit start is :class:`~gradprune.callbacks.StructuredPruningCallback`
(:mod:`gradprune.callbacks.structured`).
"""
from __future__ import annotations

import logging
from typing import Literal, Optional, Union

import lightning.pytorch as pl
import torch

from gradprune.schedules import SparsitySchedule
from gradprune.statistics import ChannelWindow
from gradprune.structured import masking
from gradprune.structured.prune import check_metric_options
from gradprune.structured.units import Units, find_units, is_conv1d
from gradprune.targets import Target
from gradprune.validation import Problems, check_choice, check_sparsity, check_weights_usable, is_int

from .base import PruningCallback
from .events import ScheduledEvents, WindowLifecycle, check_end_step, schedule_end

log = logging.getLogger(__name__)


GRADUAL_SCHEDULES = ("cubic", "linear", "exponential")


class GradualStructuredPruningCallback(WindowLifecycle, ScheduledEvents, PruningCallback):
    """Mask whole MLP neurons and attention head groups along a schedule during fit, by activation importance;
    a structured export (``gradprune.export(..., format="structured")``, ``PrunableLM(export_format=
    "structured")``) then removes them physically.

    When: at every schedule event (``start_step + k * every`` and ``end_step``, in optimizer steps, as for
    :class:`GradualPruningCallback`). What: at an event at step ``t`` the fraction of each kind is
    ``schedule(t)`` ramping from 0 at ``start_step`` to ``mlp`` / ``heads`` at ``end_step``, and exactly
    ``floor(fraction * n + 0.5)`` units are masked after the event (:func:`gradprune.structured.masking.unit_count`;
    ``n`` = a layer's units with ``scope="layer"``, the model's with ``scope="global"``): the least important
    ones not masked yet are added, so masks only grow. Masks live in the model's :class:`gradprune.MaskRegistry`,
    which keeps masked weights at zero between events (whole rows of gate/up and columns of down for a neuron;
    q/k/v rows and o_proj columns of a whole KV group for heads, so grouped-query attention stays consistent).

    Importance: from the activations of the last ``stat_batches`` training micro-batches before each event
    (forward hooks on every block's MLP output projection and ``o_proj``, present only during that window and
    removed at the event, when fit ends or fails, and during validation); MLP neurons by ``metric``
    (:mod:`gradprune.structured.metrics`), head groups by the L2 norm of their attention output. Statistics are
    sums, all-reduced over data-parallel ranks before scoring (every rank masks the same units) and saved in
    the callback's state with the masked units, so a resume, even inside a window, continues exactly.

    The uniform rule at export: Hugging Face configs hold one size for all layers, so with ``scope="global"``
    (layers lose different numbers) each layer is shrunk by the smallest per-layer count and the other masked
    units stay in place as zeros; ``scope="layer"`` masks the same number everywhere, all removed.

    Args:
        mlp: fraction of MLP neurons masked at ``end_step``, in [0, 1) (None: neurons are not pruned).
        heads: fraction of attention heads masked at ``end_step``, in [0, 1), counted in whole head groups (one
            key/value head with its query heads; with 9q/3kv, 1/3 masks one group of 3 query heads per layer).
            LLaMA-style models only (None: heads are not pruned).
        schedule: "cubic" (Zhu & Gupta), "linear" or "exponential" (see :class:`gradprune.SparsitySchedule`).
        start_step: optimizer step of the first event (the fraction there is 0).
        end_step: optimizer step of the last event, or a float in (0, 1] = that fraction of the run's total
            optimizer steps (resolved at fit start).
        every: optimizer steps between events.
        metric: MLP neuron importance: "l2", "mean_abs", "variance", "near_zero", "combined" or "wanda".
        scope: "layer" (every layer masks its own least important units, the same number everywhere) or
            "global" (the least important units of the whole model; no layer loses all of them).
        metric_weights: weights of the "combined" metric, e.g. {"l2": 1.0, "near_zero": 0.5}.
        near_zero_eps: |activation| at or below this counts as near zero (the "near_zero" metric).
        stat_batches: training micro-batches before each event whose activations score the units.
        exponent: power of the cubic schedule, rate of the exponential one.
    """

    _ramp_goal = "its final fractions"

    def __init__(
        self,
        mlp: Optional[float] = None,
        heads: Optional[float] = None,
        schedule: Literal["cubic", "linear", "exponential"] = "cubic",
        start_step: int = 0,
        end_step: Union[int, float] = 1.0,
        every: int = 100,
        metric: Literal["l2", "mean_abs", "variance", "near_zero", "combined", "wanda"] = "l2",
        scope: Literal["layer", "global"] = "layer",
        metric_weights: Optional[dict[str, float]] = None,
        near_zero_eps: float = 1e-2,
        stat_batches: int = 8,
        exponent: float = 3.0,
    ) -> None:
        super().__init__()
        problems = Problems()
        if mlp is None and heads is None:
            problems.add("nothing to prune: give mlp and/or heads (the fraction of each layer's MLP neurons / attention "
                         "heads masked at end_step, in [0, 1))")
        for name, value in (("mlp", mlp), ("heads", heads)):
            if value is not None:
                check_sparsity(problems, name, value)
        check_choice(problems, "schedule", schedule, GRADUAL_SCHEDULES)
        check_metric_options(problems, metric, scope, metric_weights, near_zero_eps)
        if not is_int(stat_batches) or stat_batches < 1:
            problems.add(f"stat_batches must be an int >= 1 (training micro-batches per statistics window), got {stat_batches!r}")
        check_end_step(problems, end_step)
        if schedule in GRADUAL_SCHEDULES:  # the remaining schedule arguments (end_step may still be a fraction)
            try:
                SparsitySchedule(schedule, 0.5, 0.0, start_step, schedule_end(start_step, end_step), every, exponent)
            except (TypeError, ValueError) as error:
                problems.add(str(error).removeprefix("invalid arguments:\n  - ").replace("\n  - ", "; "))
        problems.raise_if_any()
        self.mlp, self.heads = mlp, heads
        self.schedule_kind = schedule
        self.start_step, self.every, self.exponent = start_step, every, exponent
        self.end_step = int(end_step) if is_int(end_step) else float(end_step)
        self.metric, self.scope = metric, scope
        self.metric_weights = dict(metric_weights) if metric_weights is not None else None
        self.near_zero_eps, self.stat_batches = near_zero_eps, stat_batches
        # resumable state
        self.resolved_end_step: Optional[int] = None
        self.last_event_step: Optional[int] = None
        self._masked: dict[str, dict[int, torch.Tensor]] = {}  # kind -> block -> bool per unit (True = masked)
        self._pending_masked: Optional[dict] = None
        self._pending_statistics: Optional[dict] = None
        self._units: Optional[Units] = None
        self._window: Optional[ChannelWindow] = None
        self._names: dict[str, dict[int, str]] = {}  # kind -> block -> name of the hooked module

    @property
    def state_key(self) -> str:
        return self._generate_state_key(mlp=self.mlp, heads=self.heads, schedule=self.schedule_kind,
                                        start_step=self.start_step, end_step=self.end_step, scope=self.scope,
                                        metric=self.metric)

    # -- the plan -------------------------------------------------------------------------------------------
    @property
    def kinds(self) -> list[str]:
        """The unit kinds this callback prunes: "mlp" and / or "heads"."""
        return [kind for kind in ("mlp", "heads") if getattr(self, kind) is not None]

    def fraction_at(self, kind: str, step: int) -> float:
        """The schedule's fraction of ``kind`` ("mlp" or "heads") at optimizer step ``step`` (after fit start)."""
        if self.resolved_end_step is None:
            raise RuntimeError("the schedule is resolved at fit start")
        return SparsitySchedule(self.schedule_kind, getattr(self, kind), 0.0, self.start_step, self.resolved_end_step,
                                self.every, self.exponent).sparsity_at(step)

    def unit_count_at(self, kind: str, step: int) -> int:
        """Units of ``kind`` masked after the event at ``step``: per layer (scope "layer") or in all ("global")."""
        per_layer, layers = self._sizes(kind)
        total = per_layer if self.scope == "layer" else per_layer * layers
        return masking.unit_count(self.fraction_at(kind, step), total)

    @property
    def masked_units(self) -> dict[str, dict[int, torch.Tensor]]:
        """The masked units by kind ("mlp", "heads") and block index: bool per unit, True = masked."""
        return {kind: {b: m.clone() for b, m in by_block.items()} for kind, by_block in self._masked.items()}

    def _sizes(self, kind: str, units: Optional[Units] = None) -> tuple[int, int]:
        units = units or self._units
        per_layer = units.blocks[0].neurons if kind == "mlp" else units.num_kv_heads
        return per_layer, len(units.blocks)

    def _behind(self, kind: str, count: int) -> bool:
        """Whether fewer units of ``kind`` than ``count`` are masked (in some layer, or in all)."""
        masked = [int(m.sum()) for m in self._masked[kind].values()]
        return (min(masked) if self.scope == "layer" else sum(masked)) < count

    def _needs_statistics(self, event: int) -> bool:
        return any(self._behind(kind, self.unit_count_at(kind, event)) for kind in self.kinds)

    # -- Lightning hooks ------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        units = find_units(pl_module)
        problems = Problems()
        check_weights_usable(problems, pl_module)
        if self.heads is not None and units.arch.attention is None:
            problems.add(f"heads={self.heads!r}: attention heads of {units.arch.name} cannot be masked: "
                         f"{units.arch.heads_why_not}. Heads are supported for LLaMA-style models (llama, mistral, "
                         "qwen2, qwen3)")
        for kind, unit in (("mlp", "MLP neurons"), ("heads", "head groups")):
            if getattr(self, kind) is not None and (kind == "mlp" or units.arch.attention is not None):
                per_layer, layers = self._sizes(kind, units)
                masking.check_counts(problems, kind, getattr(self, kind), per_layer, layers, self.scope, unit)
                saved = (self._pending_masked or {}).get(kind)
                if saved is not None and (len(saved) != layers or any(len(m) != per_layer for m in saved.values())):
                    problems.add(f"the checkpoint's masked {unit} ({len(saved)} layers) do not fit this model "
                                 f"({layers} layers of {per_layer})")
        problems.raise_if_any()
        end_step = self._resolve_end_step(trainer)
        # all checks passed: only now does the callback's state change
        names = {id(m): n for n, m in pl_module.named_modules()}
        modules = {"mlp": lambda b: b.mlp_out, "heads": lambda b: b.attention[3]}
        self._names = {kind: {b.index: names[id(modules[kind](b))] for b in units.blocks} for kind in self.kinds}
        targets = [Target(self._names[kind][b.index], modules[kind](b), is_conv1d(modules[kind](b)))
                   for kind in self.kinds for b in units.blocks]
        l2_only = self.mlp is None or self.metric in ("l2", "wanda")
        self._units, self.resolved_end_step = units, end_step
        self._window = ChannelWindow(targets, self.near_zero_eps, l2_only=l2_only)
        if self._pending_statistics:
            self._window.load_state_dict(self._pending_statistics)
        self._pending_statistics = None
        saved = self._pending_masked or {}
        self._masked = {}
        for kind in self.kinds:
            per_layer, _ = self._sizes(kind)
            self._masked[kind] = {b.index: saved[kind][b.index].clone().to(torch.bool) if kind in saved
                                  else torch.zeros(per_layer, dtype=torch.bool) for b in units.blocks}
        self._pending_masked = None
        super().on_fit_start(trainer, pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._maybe_prune(trainer, pl_module)
        if self._window is None:
            return
        remaining = self._micro_batches_to_event(trainer, batch_idx)
        if remaining is not None and remaining <= self.stat_batches and \
                self._needs_statistics(self._next_event(trainer.global_step + 1)):
            self._window.open()
            self._window.tokens(batch)
        else:
            self._window.close()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._maybe_prune(trainer, pl_module)

    def _close_window(self) -> None:  # at validation, fit end, on an exception, at teardown (WindowLifecycle)
        if self._window is not None:
            self._window.close()

    # -- pruning --------------------------------------------------------------------------------------------
    def _maybe_prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if not self._event_due(step):
            return
        counts = {kind: self.unit_count_at(kind, step) for kind in self.kinds}
        todo = [kind for kind in self.kinds if self._behind(kind, counts[kind])]
        if todo:
            stats = self._ready_statistics(trainer, todo)
            new = {}
            for kind in todo:
                if kind == "mlp":
                    scores = masking.neuron_scores(self._units, stats["mlp"], self.metric, self.metric_weights)
                else:
                    scores = masking.head_scores(self._units, stats["heads"])
                new[kind] = masking.choose_units(scores, self._masked[kind], counts[kind], self.scope)
            masking.mask_units_(pl_module, self._units, new.get("mlp"), new.get("heads"), self.registry(pl_module))
            self._masked.update(new)
        self._window.reset()
        self.last_event_step = step
        for kind in self.kinds:
            per_layer, layers = self._sizes(kind)
            achieved = sum(int(m.sum()) for m in self._masked[kind].values()) / (per_layer * layers)
            if trainer.is_global_zero:
                log.info("step %d: %.4f of the %s masked (target %.4f)", step, achieved,
                         "MLP neurons" if kind == "mlp" else "head groups", self.fraction_at(kind, step))
            pl_module.log(f"structured/{kind}_target", self.fraction_at(kind, step), on_step=True, on_epoch=False,
                          sync_dist=False)
            pl_module.log(f"structured/{kind}_masked", achieved, on_step=True, on_epoch=False, sync_dist=False)

    def _ready_statistics(self, trainer: pl.Trainer, kinds: list[str]) -> dict[str, dict]:
        """Close the window, check every hooked module saw input, sum over data-parallel ranks; the statistics
        by kind and block."""
        window = self._window
        window.close()
        missing = window.missing()
        if missing:
            raise RuntimeError(
                f"{type(self).__name__} scores units by the activations of the {self.stat_batches} training "
                f"micro-batches before each event, but these modules saw no input since the last event: "
                f"{missing[:5]}{' ...' if len(missing) > 5 else ''}"
            )
        if trainer.world_size > 1:
            window.reduce_(lambda t: trainer.strategy.reduce(t, reduce_op="sum"))
        return {kind: {b: window.stats(name) for b, name in self._names[kind].items()} for kind in kinds}

    # -- state ----------------------------------------------------------------------------------------------
    def extra_state(self) -> dict:
        masked = self._masked if self._units is not None else (self._pending_masked or {})
        return {
            "resolved_end_step": self.resolved_end_step,
            "last_event_step": self.last_event_step,
            "masked": {kind: {b: m.clone() for b, m in by_block.items()} for kind, by_block in masked.items()},
            "statistics": self._window.state_dict() if self._window is not None else self._pending_statistics,
        }

    def load_extra_state(self, state: dict) -> None:
        self.resolved_end_step = state.get("resolved_end_step")
        self.last_event_step = state.get("last_event_step")
        self._pending_masked = state.get("masked") or None
        self._pending_statistics = state.get("statistics")


__all__ = ["GradualStructuredPruningCallback", "StructuredPruningCallback"]
