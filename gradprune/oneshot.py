"""One-shot pruning: any method of :mod:`gradprune.methods`, block by block or over the whole model.

The methods' maths lives in :mod:`gradprune.methods` (one module each, with an entry saying which
statistics it needs, its options and how it prunes); this module is the pipeline that reads those
entries. :func:`prune_oneshot` checks every argument once, before it touches the model, into a plan
(:mod:`gradprune.oneshot_plan`); collects the method's statistics (:mod:`gradprune.calibration`), block by
block by default (:mod:`gradprune.blocks`: block ``i`` sees the outputs of the already-pruned blocks
``0..i-1``, peak memory is the model plus one block's activations), or in one whole-model pass; and records
the keep-masks in the model's :class:`gradprune.MaskRegistry`, so any later training keeps them.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import time
from dataclasses import replace
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from .blocks import BlockInputs, call_model, capture_block_inputs, group_by_block, run_block
from .calibration import ActivationHooks, check_statistics_finite, count_samples, count_tokens, eval_mode
from .masks import MaskRegistry
from .methods import METHODS, Job
from .methods.base import COMMON_OPTIONS
from .methods.owl import owl_target_counts
from .oneshot_plan import Plan, plan_oneshot
from .report import sparsity_report
from .shards import local
from .targets import Selector, Target

log = logging.getLogger(__name__)

# METHODS (imported above): the one-shot methods by name, a live view of the method table; the checks of a
# call and its Plan are gradprune.oneshot_plan


# -- running a plan ------------------------------------------------------------------------------------------
class Timer:
    """Seconds spent per phase ("calibration", "pruning"), for the report."""

    def __init__(self) -> None:
        self.seconds = {"calibration_s": 0.0, "pruning_s": 0.0}

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds[f"{phase}_s"] += time.perf_counter() - start


#: seconds between the progress lines logged where no bar can be drawn
PROGRESS_LOG_SECONDS = 30.0


def progress(items: Sequence, desc: str, show: Optional[bool]) -> Iterator:
    """``items`` with progress: ``show=True`` a tqdm bar, ``False`` nothing, ``None`` a bar on a terminal and
    elsewhere (a log file, a job's output, where tqdm's bar is hidden) an INFO line every
    :data:`PROGRESS_LOG_SECONDS` and one at the end with the elapsed time, so long work is never silent."""
    if show is not None or sys.stderr.isatty():
        yield from tqdm(items, desc=desc, disable=show is False)
        return
    start = last = time.perf_counter()
    total = len(items)
    for done, item in enumerate(items, 1):
        yield item
        now = time.perf_counter()
        if done == total or now - last >= PROGRESS_LOG_SECONDS:
            log.info("%s: %d/%d in %.1fs", desc, done, total, now - start)
            last = now


class Undo:
    """Puts weights and masks back when the block it guards fails: the registry's masks and the weights its
    updates zeroed (:meth:`gradprune.MaskRegistry.transaction`: CPU copies of the newly pruned values), and,
    for a method that rewrites kept weights (SparseGPT), a CPU copy of each target's weights taken by
    :meth:`save` just before they change, kept until the block ends."""

    def __init__(self, registry: MaskRegistry, changes_weights: bool) -> None:
        self.registry, self.changes_weights = registry, changes_weights
        self.weights: dict[str, tuple[Target, torch.Tensor]] = {}

    def save(self, targets: Sequence[Target]) -> None:
        if not self.changes_weights:
            return
        for t in targets:
            if t.name not in self.weights:
                self.weights[t.name] = (t, local(t.weight).detach().to("cpu", copy=True))

    def __enter__(self) -> "Undo":
        self._transaction = self.registry.transaction()
        self._transaction.__enter__()
        return self

    def __exit__(self, kind, exc, tb) -> None:
        try:
            self._transaction.__exit__(kind, exc, tb)  # on failure: masks and zeroed weights back (first)
            if kind is not None:
                with torch.no_grad():
                    for t, saved in self.weights.values():  # then the weights as they were before any change
                        local(t.weight).copy_(saved)
                log.info("one-shot pruning failed; the masks and weights were put back")
        finally:
            self.weights.clear()


def _calibrate_and_prune(job: Job, targets: Sequence[Target], feed: Callable[[ActivationHooks], None], timer: Timer,
                         undo: "Undo") -> None:
    """Collect the method's statistics of ``targets`` while ``feed(hooks)`` runs forwards, sum them over
    ranks (option ``reduce``), check them finite, then save the targets' weights in ``undo`` and prune them."""
    method = job.method
    with timer("calibration"):
        with method.hooks(targets, job.options) as hooks:
            feed(hooks)
        if job.options["reduce"] is not None:
            hooks.reduce_(job.options["reduce"])
    stats = method.statistics_of(hooks)
    check_statistics_finite(stats, f"{method.name} calibration")  # before this group changes
    with timer("pruning"):
        undo.save(targets)
        method.run(job, targets, stats)


def _block_feed(block: nn.Module, inputs: Sequence[BlockInputs]) -> Callable[[ActivationHooks], None]:
    def feed(hooks: ActivationHooks) -> None:
        for inp in inputs:
            hooks.tokens(inp.tokens)
            run_block(block, inp)

    return feed


def _sequential(model: nn.Module, plan: Plan, timer: Timer, undo: "Undo") -> None:
    """Block by block: each block is calibrated on the outputs of the already-pruned blocks before it."""
    stack, job = plan.stack, replace(plan.job, progress=False)  # the blocks' bar is the progress shown
    with timer("calibration"):
        inputs = capture_block_inputs(plan.runner, stack, plan.batches, plan.targets[0].weight.device)
    last = len(stack.blocks) - 1
    for index, block in enumerate(progress(stack.blocks, f"{job.method.name} blocks", plan.job.progress)):
        block_targets = stack.targets_of(index, plan.targets)
        if block_targets:
            _calibrate_and_prune(job, block_targets, _block_feed(block, inputs), timer, undo)
        if index < last:  # the next block sees the outputs of this (pruned) block
            with timer("calibration"):
                inputs = [replace(inp, hidden=run_block(block, inp)) for inp in inputs]


def _owl_counts(model: nn.Module, plan: Plan, timer: Timer) -> tuple[dict, list]:
    """OWL's per-target prune counts, from Wanda scores over one dense pass of the calibration data."""
    device = plan.targets[0].weight.device
    with timer("calibration"):
        with ActivationHooks(plan.targets, l2_only=True) as hooks:
            for batch in progress(plan.batches, "OWL outlier ratios", plan.job.progress):
                hooks.tokens(batch["attention_mask"])
                call_model(plan.runner, batch, device)
        if plan.job.options["reduce"] is not None:
            hooks.reduce_(plan.job.options["reduce"])
    check_statistics_finite(hooks.stats, "OWL calibration")
    options = plan.job.options
    sum_sq = {name: stats.l2_sq for name, stats in hooks.stats.items()}
    return owl_target_counts(group_by_block(model, plan.targets), sum_sq, plan.job.sparsity, options["owl_lambda"],
                             options["owl_m"])


def _whole_model(model: nn.Module, plan: Plan, timer: Timer, undo: "Undo") -> None:
    """One dense pass over the whole model, then every target is pruned (any architecture)."""
    device = plan.targets[0].weight.device

    def feed(hooks: ActivationHooks) -> None:
        for batch in progress(plan.batches, "calibration", plan.job.progress):
            hooks.tokens(batch["attention_mask"])
            call_model(plan.runner, batch, device)

    _calibrate_and_prune(plan.job, plan.targets, feed, timer, undo)


def prune_oneshot(
    model: nn.Module,
    method: str,
    sparsity: float,
    pattern: str = "unstructured",
    calibration: Any = None,
    sequential: bool = True,
    include: Selector = None,
    exclude: Selector = None,
    lm: Union[str, nn.Module, None] = None,
    counts: Optional[Mapping[str, int]] = None,
    **method_options: Any,
) -> dict:
    """Prune ``model`` in place, once, with ``method`` ("magnitude", "wanda", "sparsegpt" or "ria": the names in
    :data:`gradprune.methods.METHODS`).

    Args:
        model: any nn.Module (an HF model, or a LightningModule wrapping one: target names are relative
            to ``model`` and the masks go to ``MaskRegistry.of(model)``).
        sparsity: fraction of each comparison group to prune; for an N:M pattern it must be N/M.
        pattern: "unstructured" or "N:M" ("2:4", "4:8") along the input dimension.
        calibration: iterable of token-id tensors or batch dicts (``input_ids``, optional
            ``attention_mask``); needed by wanda and sparsegpt, ignored by magnitude.
        sequential: calibrate and prune one block at a time, each block seeing the outputs of the
            already-pruned blocks (the Wanda/SparseGPT reference protocol); False: one dense pass over the
            whole model, then prune everything (any architecture).
        include: target selection, as in :func:`gradprune.find_targets`. In sequential mode the
            default targets are the layers inside the block stack.
        exclude: targets left out, as in :func:`gradprune.find_targets`.
        lm: what calibration batches are run through: None = ``model`` when its forward takes
            ``input_ids``, else the causal LM found inside it (:func:`gradprune.blocks.find_causal_lm`: the
            module owning the decoder blocks, or the one child with such a forward); or its dotted name
            inside ``model`` (``"model"``). Target names and masks stay relative to ``model``.
        counts: per-target prune counts (target name -> weights pruned in that layer, existing masks
            included) instead of ``sparsity``'s count per comparison group; with scope "row" a layer's count is
            spread over its rows (one more in the first ones). A count below what earlier masks already prune
            in that layer (or row) is refused, as masks only grow. Unstructured, uniform allocation only; the
            gradual callback's ``statistics="calibration"`` uses it to keep every event's count exact.
        method_options: magnitude: ``scope`` ("layer"); wanda: ``scope`` ("row"), ``adaptive`` (False),
            ``alpha_tolerance`` (0.001); sparsegpt: ``blocksize`` (128), ``percdamp`` (0.01),
            ``hessian_dtype`` ("float32" or "float64" per-batch products; sums are float64); ria: ``scope``
            ("row"), ``a`` (0.5). All methods: ``reduce`` (callable summing a statistics tensor over
            data-parallel ranks) and ``progress``. Calibrated methods: ``allocation`` ("uniform", or
            "owl": per-block budgets from OWL's outlier ratios, within [s - owl_lambda, s + owl_lambda],
            exact total, one extra dense calibration pass), ``owl_lambda`` (0.08), ``owl_m`` (5).

    Returns:
        a report: :func:`gradprune.sparsity_report` entries (``global``, ``layers``, ``by_type``) plus
        ``method``, ``pattern``, ``target_sparsity``, ``sequential``, ``options``, ``calibration``
        (samples, tokens), ``time`` (``calibration_s``, ``pruning_s``, ``total_s``) and ``masks``
        (keep-masks by target name; drop them with :func:`report_json` before serialising).

    Raises ValueError/TypeError, before anything is changed, for bad arguments, empty calibration data
    or (sequential mode) a model without a block stack, or (calibrated methods) a model without a
    forward(input_ids) and no causal LM found inside it.
    """
    plan = plan_oneshot(model, method, sparsity, pattern, calibration, sequential, include, exclude, method_options, lm, counts)
    job, targets = plan.job, plan.targets
    timer = Timer()
    total_start = time.perf_counter()
    log.info("one-shot %s pruning of %d layers to %s (%s)", method, len(targets), sparsity, pattern)
    with Undo(job.registry, job.method.changes_weights) as undo:  # a failure below puts weights and masks back
        if not plan.calibrated:
            with timer("pruning"):
                undo.save(targets)
                job.method.run(job, targets, {})
        else:
            with eval_mode(model):
                if job.options["allocation"] == "owl":
                    counts, budgets = _owl_counts(model, plan, timer)
                    plan = replace(plan, job=replace(job, counts=counts))
                (_sequential if plan.sequential else _whole_model)(model, plan, timer, undo)
    times = timer.seconds
    times["total_s"] = time.perf_counter() - total_start
    report = sparsity_report(model, targets)
    report.update(
        method=method,
        pattern=pattern,
        target_sparsity=sparsity,
        sequential=bool(sequential) if plan.calibrated else None,
        options={k: v for k, v in job.options.items() if k not in COMMON_OPTIONS},
        calibration={"samples": count_samples(plan.batches), "tokens": count_tokens(plan.batches)},
        time=times,
        masks=job.registry.current(targets),
    )
    report["allocation"] = job.options["allocation"]
    if job.options["allocation"] == "owl":
        report["owl_budgets"] = budgets  # per block (group_by_block order)
    log.info("one-shot %s: global sparsity %.4f, calibration %.1fs, pruning %.1fs", method,
             report["global"]["sparsity"], times["calibration_s"], times["pruning_s"])
    return report


def report_json(report: dict) -> dict:
    """The report without its mask tensors (JSON-serialisable)."""
    return {k: v for k, v in report.items() if k != "masks"}
