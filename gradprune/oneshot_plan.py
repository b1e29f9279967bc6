"""A checked :func:`gradprune.prune_oneshot` call: :class:`Plan`, and the checks that build it.

Every argument of a one-shot call, the model and the calibration data are checked once, all problems
raised together, before the pipeline (:mod:`gradprune.oneshot`) touches anything; the result is a
:class:`Plan` holding the method's job, the targets, the block stack of sequential mode and the batches.
:func:`check_arguments` is the part that needs no model (the one-shot callbacks' ``__init__`` runs it).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from .blocks import BlockStack, find_block_stack, find_causal_lm
from .calibration import as_batches
from .masks import MaskRegistry
from .methods import METHODS, Job, Method, get_method
from .methods.base import NM
from .methods.owl import check_lambda
from .selection import check_existing_masks, validate_selection
from .targets import Target, find_targets
from .validation import (Problems, check_choice, check_number, check_pattern, check_selector, check_sparsity,
                         check_weights_usable, is_int)

log = logging.getLogger(__name__)


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


def plan_oneshot(model, method, sparsity, pattern, calibration, sequential, include, exclude, method_options, lm=None,
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
