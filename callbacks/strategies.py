"""How GradualPruningCallback chooses masks at its events: one interface, :class:`MaskMode`, one object per way.

The callback keeps the schedule, the events and its state; at fit start it sets up its strategy, and at every
event it asks the strategy to bring the targets to the event's sparsity. With ``mode=None`` (the default) the
masks grow monotonically, to exactly the target in every comparison group, and the strategy follows from the
callback's arguments:

- :class:`WindowScores`: the scorer's scores (``magnitude``, ``wanda``, ``ria``, ``taylor``), from the training
  statistics window (:mod:`gradprune.callbacks.window`), through :func:`gradprune.select_masks`;
- :class:`Reconstruction`: a scorer that also changes the kept weights (``sparsegpt``): each layer pruned to
  its count from the window's Hessians, the kept weights updated;
- :class:`ShardedScores`: row-sharded weights (FSDP2), through :func:`gradprune.sharding.select_sharded_masks`
  (chosen at fit start, when the targets turn out to be DTensors);
- :class:`CalibratedOneShot`: ``statistics="calibration"``, the one-shot method of the scorer's name on the
  calibration batches drawn at fit start (:func:`gradprune.prune_oneshot`, sequential) at every event;
- :class:`OwlBudgets`: ``allocation="owl"``, per-layer counts from OWL's budgets for the first two.

A mode passed as ``mode=`` (:mod:`gradprune.callbacks.mask_modes`: :class:`~gradprune.callbacks.LearnedMasks`,
:class:`~gradprune.callbacks.DynamicMasks`) is a strategy too, one that lets training choose the masks until
the freeze step. The ``check_*`` functions hold the argument checks of each way, which the callback runs
whatever the mode, so every problem of a combination is named at once.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Optional

import lightning.pytorch as pl
import torch
from tqdm.auto import tqdm

from gradprune.blocks import group_by_block
from gradprune.methods import METHODS
from gradprune.methods.owl import check_lambda, monotone_counts, owl_target_counts
from gradprune.oneshot import prune_oneshot
from gradprune.schedules import nm_step
from gradprune.scorers import get_scorer, scorer_names
from gradprune.selection import exact_count, select_masks
from gradprune.sharding import SHARDED_SCORERS, placement_problem, select_sharded_masks
from gradprune.targets import Target
from gradprune.validation import Problems, check_number, is_number

from .base import FSDP2_NOTE, apply_event, check_event_inputs

if TYPE_CHECKING:
    from .gradual import GradualPruningCallback

log = logging.getLogger(__name__)


class MaskMode:
    """The interface between GradualPruningCallback and a way of choosing masks: every strategy answers
    these calls from the callback."""

    #: the callback draws calibration batches at fit start for this mode
    needs_calibration = False
    #: the masks are at the schedule's sparsity at every event (else at final_sparsity from the first one)
    follows_schedule = True

    def check(self, problems: Problems, callback: "GradualPruningCallback") -> None:
        """Add what does not fit the callback's other arguments to ``problems`` (at construction)."""

    def setup(self, targets: list[Target]) -> None:
        """When fit sets up, before the optimizer and DDP see the weights (called only where a mode
        overrides it: the targets are found here, before ``configure_model`` may have made them)."""

    def start(self, callback: "GradualPruningCallback", trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """At fit start, after the callback's checks: refuse what this run cannot do; resume a saved phase."""

    def ready(self, callback: "GradualPruningCallback", trainer: pl.Trainer) -> None:
        """Before every event: the training statistics closed, checked and summed over ranks."""
        callback.window.ready(trainer)

    def event(self, callback: "GradualPruningCallback", trainer: pl.Trainer, pl_module: pl.LightningModule,
              step: int, target: float) -> None:
        """A schedule event at optimizer step ``step`` with target sparsity ``target``."""

    def before_optimizer_step(self, trainer: pl.Trainer) -> None:
        """After the backward pass of an optimizer step, before the model's optimizer steps."""

    def stop(self) -> None:
        """Restore the targets' own forward (fit ended or failed)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def sparsity(self) -> Optional[float]:
        """The pruned fraction of the targets under the mode's current masks (None once they are frozen
        into the registry, or before the first event, or when the registry holds them all along)."""
        return None


# -- mode=None: monotone masks ------------------------------------------------------------------------
class MonotoneMasks(MaskMode):
    """``mode=None``: the targets' masks only grow, at every event to exactly its target. A subclass says
    how the new masks are chosen (:meth:`choose`); this class skips an event the model already meets and
    applies the new masks and weights all or nothing."""

    def ready(self, callback, trainer) -> None:
        pass  # in event(), only when there is something to score

    def event(self, callback, trainer, pl_module, step, target) -> None:
        registry, targets = callback.registry(pl_module), callback.targets
        masks = registry.current(targets)
        if target <= registry.sparsity(targets) and self.at_target(callback, masks, target):
            return  # the model is already at the target (a one-shot callback pruned it): nothing to score
        callback.window.ready(trainer)
        check_event_inputs(step, targets, callback.window.sums, trainer)
        weights, new = self.choose(callback, trainer, pl_module, target, masks)
        apply_event(registry, targets, weights, new)

    def at_target(self, callback: "GradualPruningCallback", masks: dict, target: float) -> bool:
        """Whether no comparison group needs pruning at ``target``, given the model is at it overall."""
        return callback.scope == "global" or every_layer_at(masks, target, callback.targets, callback.scope)

    def choose(self, callback: "GradualPruningCallback", trainer: pl.Trainer, pl_module: pl.LightningModule,
               target: float, masks: dict) -> tuple[Optional[dict], Optional[dict]]:
        """(new weights by target name or None, new keep-masks or None when already recorded)."""
        raise NotImplementedError


class OwlBudgets:
    """``allocation="owl"``: per-target prune counts from OWL's budgets per decoder block at each event's
    target s, within [s - lambda, s + lambda] (lambda shrinks to min(s, 1 - s) early in the ramp), from the
    window's activation sums; raised where a layer has already pruned more (masks only grow), exact in total."""

    def __init__(self, owl_lambda: float) -> None:
        self.owl_lambda = owl_lambda

    def counts(self, callback: "GradualPruningCallback", pl_module: pl.LightningModule, target: float,
               masks: dict) -> dict:
        window = callback.window.sums
        sum_sq = {t.name: window.sum_sq(t.name) for t in callback.targets}
        lam = min(self.owl_lambda, target, 1.0 - target)
        desired, budgets = owl_target_counts(group_by_block(pl_module, callback.targets), sum_sq, target, lam)
        log.info("OWL budgets at sparsity %.4f: %s", target, [round(b, 4) for b in budgets])
        return monotone_counts(desired, pruned_counts(masks))


class WindowScores(MonotoneMasks):
    """Masks from the scorer's scores of each weight (from the statistics window where the scorer needs it),
    lowest first, exact per layer / row / the whole model, unstructured or N:M; OWL's counts if given."""

    def __init__(self, allocation: Optional[OwlBudgets] = None) -> None:
        self.allocation = allocation

    def at_target(self, callback, masks, target) -> bool:
        return self.allocation is not None or super().at_target(callback, masks, target)

    def choose(self, callback, trainer, pl_module, target, masks):
        counts = self.allocation.counts(callback, pl_module, target, masks) if self.allocation is not None else None
        return None, select_masks(callback.targets, target, callback.window.score_fn(), callback.scope,
                                  callback.pattern, masks, counts=counts)


class Reconstruction(WindowScores):
    """New weights and keep-masks of every target from the scorer's ``prune`` (SparseGPT): each layer to
    exactly its count (OWL's if given), from the window's Hessians. Nothing is applied until every layer is
    done, so an error leaves the model as it was."""

    def choose(self, callback, trainer, pl_module, target, masks):
        counts = self.allocation.counts(callback, pl_module, target, masks) if self.allocation is not None else None
        prune, window = get_scorer(callback.scorer).prune, callback.window.sums
        weights, keeps = {}, {}
        for t in tqdm(callback.targets, desc=f"{callback.scorer} to {target:.4f}", leave=False,
                      disable=not trainer.is_global_zero):
            count = counts[t.name] if counts is not None else exact_count(target, t.numel)
            weight, keep = prune(t, window.hessian(t.name), count, masks.get(t.name))
            if not bool(torch.isfinite(weight).all()):
                raise ValueError(f"scorer {callback.scorer!r} produced non-finite weights for {t.name!r} (from "
                                 "non-finite activations in the statistics window); no layer was changed")
            weights[t.name], keeps[t.name] = weight, keep
        return weights, keeps


class ShardedScores(MonotoneMasks):
    """Row-sharded weights (FSDP2): each rank scores and masks the rows it holds, and the masks are exactly
    those of one process holding the whole model (:func:`gradprune.sharding.select_sharded_masks`)."""

    def choose(self, callback, trainer, pl_module, target, masks):
        return None, select_sharded_masks(callback.targets, target, callback.window.sharded_score_fn(), callback.scope,
                                          callback.pattern, masks)


class CalibratedOneShot(MonotoneMasks):
    """``statistics="calibration"``: the one-shot method of the scorer's name, sequential, on the
    calibration batches, from the current masks to exactly the target in every comparison group; with an N:M
    pattern the events step through 1:M, 2:M, ... N:M, each to the largest k:M at or below the target."""

    needs_calibration = True

    def choose(self, callback, trainer, pl_module, target, masks):
        options = {"scope": callback.scope} if "scope" in METHODS[callback.scorer].options else {}
        if callback._combine is not None:
            options["reduce"] = callback._combine
        pattern = callback.pattern
        if pattern == "unstructured":  # every layer at exactly its count, as in the window mode; a layer that
            # earlier pruning (a one-shot callback of another scope) took past it keeps its masks, and the
            # others prune that much less, so the total stays exact
            options["counts"] = monotone_counts({t.name: layer_count(t, target, callback.scope)
                                                 for t in callback.targets}, pruned_counts(masks))
        else:  # the one-shot methods prune an N:M pattern exactly, so the ramp steps through k:M, k = 1 .. N
            pattern, target = nm_step(callback.pattern, target)
            if pattern is None or every_layer_at(masks, target, callback.targets, "layer"):
                return None, None  # this event's target is below the next step: nothing to prune yet
        prune_oneshot(pl_module, callback.scorer, target, pattern, callback.event_calibration(), sequential=True,
                      include=[t.name for t in callback.targets], lm=callback.lm,
                      progress=None if trainer.is_global_zero else False, **options)
        return None, None  # the one-shot pipeline recorded its masks (and new weights) already


def default_strategy(scorer: str, statistics: str, allocation: str, owl_lambda: float) -> MonotoneMasks:
    """The strategy of ``mode=None`` for weights held whole (checked arguments)."""
    if statistics == "calibration":
        return CalibratedOneShot()
    owl = OwlBudgets(owl_lambda) if allocation == "owl" else None
    return Reconstruction(owl) if get_scorer(scorer).prune is not None else WindowScores(owl)


# -- argument checks of each way -----------------------------------------------------------------------
def check_reconstruction(problems: Problems, scorer: str, scope: str, pattern: str, statistics: str) -> None:
    if (scorer in scorer_names() and get_scorer(scorer).prune is not None and statistics != "calibration"
            and (scope != "layer" or pattern != "unstructured")):
        problems.add(f"scorer {scorer!r} prunes each layer to its count from a training window and updates the kept "
                     f"weights: use scope 'layer' and pattern 'unstructured', got scope={scope!r}, pattern={pattern!r} "
                     "(statistics='calibration' runs the one-shot method, which takes N:M patterns too)")


def check_allocation(problems: Problems, allocation: str, owl_lambda: object, final_sparsity: object, scorer: str,
                     scope: str, pattern: str) -> None:
    if allocation != "owl":  # unused options are checked too: the range needs the owl mode
        check_number(problems, "owl_lambda", owl_lambda, low=0, high=0.5)
        return
    check_lambda(problems, owl_lambda, final_sparsity)
    if scorer in scorer_names() and get_scorer(scorer).needs not in ("activations", "hessians"):
        problems.add(f"allocation='owl' ranks blocks by the Wanda scores of the activation window: use an "
                     f"activation scorer ('ria', 'sparsegpt', 'wanda'), got scorer={scorer!r}")
    if scope == "global" or pattern != "unstructured":
        problems.add(f"allocation='owl' gives each layer its own budget: use scope 'layer' or 'row' and "
                     f"pattern 'unstructured', got scope={scope!r}, pattern={pattern!r}")


def check_calibrated(problems: Problems, scorer: str, allocation: str, scope: str, nm: Optional[tuple[int, int]],
                     final_sparsity: object) -> None:
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
        problems.add(f"statistics='calibration' with pattern '{nm[0]}:{nm[1]}' ends at exactly N/M: final_sparsity "
                     f"must be {nm[0] / nm[1]:g}, got final_sparsity={final_sparsity!r}")


def check_sharded_options(callback: "GradualPruningCallback", where: str) -> None:
    """What sharded weights cannot do, in one error (before anything is pruned)."""
    problems = Problems()
    if callback.scorer not in SHARDED_SCORERS:
        why = {"taylor": "its |W * G| sums would be kept per weight shard and are not implemented sharded",
               "sparsegpt": "its Hessian updates of the kept weights are not implemented on weight shards"}.get(
                   callback.scorer, "it is not known to work on weight shards")
        problems.add(f"scorer {callback.scorer!r} under {where}: {why}; use one of {list(SHARDED_SCORERS)}, or "
                     "strategy='ddp' for this scorer")
    if callback.allocation == "owl":
        problems.add(f"allocation='owl' under {where}: OWL's per-block budgets are not implemented on weight "
                     "shards; use allocation='uniform', or strategy='ddp' for OWL")
    if callback.mode is not None:
        problems.add(f"mode {type(callback.mode).__name__} under {where}: learned and dynamic masks compute the masked "
                     "weight from whole weights; use mode=None, or strategy='ddp'")
    if callback.statistics == "calibration":
        problems.add(f"statistics='calibration' under {where}: the one-shot pipeline it runs at each event works on "
                     "whole weights; use statistics='window', or strategy='ddp'")
    if problems.value_errors:
        problems.add(FSDP2_NOTE + ", with the scorers and allocation above")
    problems.raise_if_any()


def check_sharded_fit(callback: "GradualPruningCallback", trainer: pl.Trainer, targets: list[Target]) -> None:
    """Sharded weights: options, placements, Conv1D targets and MaskedAdamW are checked together."""
    where = f"sharded weights (strategy {type(trainer.strategy).__name__})"
    check_sharded_options(callback, where)
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


# -- counts ---------------------------------------------------------------------------------------------
def layer_count(target: Target, sparsity: float, scope: str) -> int:
    """Weights a target prunes at ``sparsity``: its exact count, or with scope "row" every row's."""
    if scope == "row":
        rows = target.out_in(target.weight).shape[0]
        return rows * exact_count(sparsity, target.numel // rows)
    return exact_count(sparsity, target.numel)


def every_layer_at(masks: dict, target: float, targets: list[Target], scope: str) -> bool:
    """Whether every target already prunes at least its exact count at sparsity ``target``."""
    pruned = pruned_counts(masks)
    return all(pruned.get(t.name, 0) >= layer_count(t, target, scope) for t in targets)


def pruned_counts(masks: dict) -> dict:
    """Target name -> weights its keep-mask prunes already."""
    return {name: int(mask.numel() - mask.sum()) for name, mask in masks.items()}
