"""One-shot pruning: any method of :mod:`gradprune.methods`, block by block or over the whole model.

The methods' maths lives in :mod:`gradprune.methods` (one module each, with an entry saying which
statistics it needs, its options and how it prunes); this module is the pipeline that reads those
entries. :func:`prune_oneshot` checks every argument once, before it touches the model, into a
:class:`Plan`; collects the method's statistics (:mod:`gradprune.calibration`), block by block by default
(:mod:`gradprune.blocks`: block ``i`` sees the outputs of the already-pruned blocks ``0..i-1``, peak
memory is the model plus one block's activations), or in one whole-model pass; and records the keep-masks
in the model's :class:`gradprune.MaskRegistry`, so any later training keeps them.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from .blocks import (
    BlockInputs, BlockStack, call_model, capture_block_inputs, find_block_stack, find_causal_lm, group_by_block, run_block,
)
from .calibration import ActivationHooks, as_batches, check_statistics_finite, count_samples, count_tokens, eval_mode
from .masks import MaskRegistry
from .methods import METHODS, Job, Method, get_method
from .methods.base import COMMON_OPTIONS, NM
from .methods.owl import check_lambda, owl_target_counts
from .report import sparsity_report
from .selection import check_existing_masks, validate_selection
from .shards import local
from .targets import Selector, Target, find_targets
from .validation import (Problems, check_choice, check_number, check_pattern, check_selector, check_sparsity,
                         check_weights_usable, is_int)

log = logging.getLogger(__name__)

# METHODS (imported above): the one-shot methods by name, a live view of the method table


# -- checking: once, before anything changes ---------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """A checked :func:`prune_oneshot` call: the job every method sees, and what the pipeline runs it on."""

    job: Job
    targets: list[Target]
    sequential: bool
    stack: Optional[BlockStack]  # the block stack of sequential mode, else None
    batches: list  # calibration batches (empty for a method without statistics)
    runner: Optional[nn.Module] = None  # what calibration batches are run through (find_causal_lm)

    @property
    def calibrated(self) -> bool:
        return self.job.method.statistics != "none"


def check_arguments(method: str, sparsity: float, pattern: str = "unstructured", sequential: bool = True,
                    **method_options: Any) -> tuple[dict, Optional[tuple[int, int]]]:
    """Check the arguments of :func:`prune_oneshot` that do not need the model or data (also used by the
    one-shot callbacks' ``__init__``). Returns (options with defaults, parsed N:M or None); raises
    ValueError/TypeError listing every problem."""
    _, options, nm = _check_arguments(Problems(), method, sparsity, pattern, sequential, method_options)
    return options, nm


def _check_arguments(problems: Problems, method: Any, sparsity: Any, pattern: Any, sequential: Any,
                     method_options: dict) -> tuple[Method, dict, NM]:
    check_choice(problems, "method", method, METHODS)
    check_sparsity(problems, "sparsity", sparsity)
    if is_pattern_int(pattern):  # YAML 1.1 reads an unquoted 2:4 as 124: say so before anything else
        check_pattern(problems, pattern, "sparsity", sparsity)
    if not isinstance(sequential, bool):
        problems.add(f"sequential must be True or False, got {sequential!r}", type_error=True)
    problems.raise_if_any()
    entry = get_method(method)
    options = entry.resolve_options(method_options, problems)
    nm = check_pattern(problems, pattern, "sparsity", sparsity, exact=True)
    entry.check(problems, options, nm, pattern)
    if options.get("allocation") != "owl":  # unused, but checked: its range needs the owl mode's sparsity
        check_number(problems, "owl_lambda", options["owl_lambda"], low=0, high=0.5)
    if options.get("allocation") == "owl":
        check_lambda(problems, options["owl_lambda"], sparsity)
        if nm is not None:
            problems.add(f"allocation='owl' gives layers different sparsities, which an N:M pattern ({pattern!r}) fixes; "
                         "use pattern='unstructured'")
    if entry.statistics != "none" and sequential and options.get("scope") == "global":
        problems.add("scope='global' compares all layers at once, so it needs sequential=False (one dense pass)")
    problems.raise_if_any()
    return entry, options, nm


def _plan(model, method, sparsity, pattern, calibration, sequential, include, exclude, method_options, lm=None,
          counts=None) -> Plan:
    """Check every argument and the model; nothing is changed."""
    problems = Problems()
    if not isinstance(model, nn.Module):
        problems.add(f"model must be a torch.nn.Module, got {type(model).__name__}", type_error=True)
    check_selector(problems, "include", include)
    check_selector(problems, "exclude", exclude)
    entry, options, nm = _check_arguments(problems, method, sparsity, pattern, sequential, method_options)
    calibrated = entry.statistics != "none"

    targets = find_targets(model, include, exclude)
    check_weights_usable(problems, model)
    problems.raise_if_any()
    runner = find_causal_lm(model, lm) if calibrated else None
    stack = None
    if calibrated and sequential:
        stack = find_block_stack(model)
        if stack is None:
            raise ValueError(
                f"sequential=True needs a stack of repeated blocks (an nn.ModuleList of one block class), and "
                f"{type(model).__name__} has none; use sequential=False (one whole-model calibration pass)"
            )
        outside = [t.name for t in targets if not stack.contains(t)]
        if outside and include is not None:
            raise ValueError(
                f"sequential=True prunes the blocks of {stack.name!r} one at a time, but include= selects layers "
                f"outside them: {outside[:5]}; exclude them or use sequential=False"
            )
        if outside:
            log.info("sequential mode: pruning the %d targets inside %r, skipping %s", len(targets) - len(outside), stack.name, outside)
            targets = [t for t in targets if stack.contains(t)]
    validate_selection(targets, sparsity, options.get("scope", "layer"), pattern)
    # pruning again: masks only grow, so the new request must be reachable on top of the current masks
    scope = "layer" if options.get("adaptive") else options.get("scope", "layer")
    existing = MaskRegistry.of(model).current(targets)
    if counts is not None:  # the counts, not the sparsity, say what each layer ends at
        _check_counts(problems, counts, targets, options, nm, existing)
    else:
        check_existing_masks(problems, targets, existing, sparsity, scope, nm, pattern)
    problems.raise_if_any()
    batches = as_batches(calibration) if calibrated else []
    if batches:
        check_token_ids(batches, model)
    if not calibrated and calibration is not None:
        log.info("%s pruning needs no calibration data; ignoring it", entry.name)
    job = Job(entry, sparsity, pattern, nm, options, MaskRegistry.of(model), options["progress"],
              counts=None if counts is None else dict(counts))
    return Plan(job, targets, sequential and calibrated, stack, batches, runner)


def _check_counts(problems: Problems, counts: Any, targets: Sequence[Target], options: dict, nm: NM,
                  existing: Mapping[str, torch.Tensor]) -> None:
    """``counts`` must give every target an int in [0, its size], replace the per-group counts only where a
    layer's count has a meaning (layer or row scope, unstructured, uniform allocation), and be reachable on
    top of the ``existing`` masks (masks only grow: no layer, or with scope "row" no row, may have pruned
    more already than its count gives it)."""
    if not isinstance(counts, Mapping):
        problems.add(f"counts must be a dict of target name -> weights to prune, got {type(counts).__name__}", type_error=True)
        return
    if nm is not None or options.get("scope", "layer") == "global" or options["allocation"] != "uniform" or options.get("adaptive"):
        problems.add("counts (per-layer prune counts) need pattern 'unstructured', scope 'layer' or 'row', allocation "
                     "'uniform' and no adaptive rule")
    missing = [t.name for t in targets if t.name not in counts]
    bad = [f"{t.name}={counts[t.name]!r}" for t in targets
           if t.name in counts and (not is_int(counts[t.name]) or not 0 <= counts[t.name] <= t.numel)]
    if missing:
        problems.add(f"counts has no entry for {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    if bad:
        problems.add(f"counts must be ints in [0, the layer's size]: {bad[:3]}")
    if missing or bad:
        return
    over = []
    for t in targets:
        if t.name not in existing:
            continue
        pruned = (~t.out_in(existing[t.name])).sum(dim=1)  # per output row
        k = counts[t.name]
        if options.get("scope", "layer") == "row":  # the count spread over the rows, one more in the first ones
            allowed = torch.full_like(pruned, k // pruned.numel())
            allowed[: k % pruned.numel()] += 1
            if bool((pruned > allowed).any()):
                row = int((pruned > allowed).nonzero()[0])
                over.append(f"{t.name} (row {row}: {int(pruned[row])} pruned, its share of {k} is {int(allowed[row])})")
        elif int(pruned.sum()) > k:
            over.append(f"{t.name} ({int(pruned.sum())} pruned, count {k})")
    if over:
        problems.add(f"counts ask for fewer pruned weights than earlier pruning already removed in "
                     f"{', '.join(over[:3])}{' ...' if len(over) > 3 else ''}; masks only grow")


def is_pattern_int(pattern: Any) -> bool:
    return isinstance(pattern, int) and not isinstance(pattern, bool)


def check_token_ids(batches: Sequence[dict], model: nn.Module) -> None:
    """Every calibration token id is in [0, vocabulary size): an id out of range would otherwise fail deep
    inside the embedding with a bare IndexError."""
    get_in = getattr(model, "get_input_embeddings", None)
    if not callable(get_in):
        inner = getattr(model, "model", None)  # a LightningModule such as PrunableLM around an HF model
        get_in = getattr(inner, "get_input_embeddings", None)
    try:
        embedding = get_in() if callable(get_in) else None
    except (NotImplementedError, AttributeError):
        embedding = None
    size = getattr(embedding, "num_embeddings", None)
    for i, batch in enumerate(batches):
        ids = batch["input_ids"]
        if ids.is_floating_point():
            raise TypeError(f"calibration item {i}: input_ids must be integer token ids, got dtype {ids.dtype}")
        if ids.numel() == 0:
            continue
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or (size is not None and high >= size):
            bad = low if low < 0 else high
            raise ValueError(f"calibration item {i} has token id {bad}, but the model's vocabulary has {size} ids "
                             f"(0..{size - 1 if size else '?'}): was it tokenised with another tokenizer?")


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
    plan = _plan(model, method, sparsity, pattern, calibration, sequential, include, exclude, method_options, lm, counts)
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
