"""One-shot pruning: magnitude, Wanda and SparseGPT, block by block or over the whole model.

The maths, each in one place:

- :func:`wanda_scores`: ``|W_ij| * sqrt(sum over tokens of x_j^2)``; the masks come from the core rule
  (:func:`gradprune.select_masks`): per output row exactly ``int(in_features * s)`` lowest by default,
  ``N:M`` along the input dimension, or ``scope="layer"/"global"``. :func:`wanda_adaptive_pruned` is the
  paper appendix's variant (one alpha per layer found by bisection, a different count per row).
- :func:`sparsegpt_prune`: SparseGPT's OBS pruning of one weight matrix with its Hessian
  ``H = 2/n X X^T`` (damping, dead inputs, Cholesky inverse, column blocks, error compensation).
- magnitude: ``|W|`` through the core rule (scope layer/global/row, N:M); no calibration.

:func:`prune_oneshot` validates everything before it touches the model, collects statistics
(:mod:`gradprune.calibration`), block by block by default (:mod:`gradprune.blocks`: block ``i`` sees
the outputs of the already-pruned blocks ``0..i-1``, peak memory is the model plus one block's
activations), and records the masks in the model's :class:`gradprune.MaskRegistry`, so any later
training keeps them.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import replace
from typing import Any, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .blocks import BlockStack, call_model, capture_block_inputs, find_block_stack, run_block
from .calibration import ActivationHooks, as_batches, count_samples, count_tokens, eval_mode
from .masks import MaskRegistry
from .report import sparsity_report
from .selection import SCOPES, drop_lowest, drop_lowest_per_row, exact_count, magnitude_scores, select_masks, validate_selection
from .targets import Selector, Target, find_targets
from .validation import Problems, check_choice, check_pattern, check_sparsity

log = logging.getLogger(__name__)

METHODS = ("magnitude", "wanda", "sparsegpt")
_HESSIAN_DTYPES = {"float32": torch.float32, "float64": torch.float64}
# Method options and their defaults; "reduce" (a callable summing a tensor over data-parallel ranks) and
# "progress" (show progress bars: True, False, or None = only on a terminal) are accepted by every method.
DEFAULT_OPTIONS = {
    "magnitude": {"scope": "layer"},
    "wanda": {"scope": "row", "adaptive": False, "alpha_tolerance": 0.001},
    "sparsegpt": {"blocksize": 128, "percdamp": 0.01, "hessian_dtype": "float32"},
}
_COMMON_OPTIONS = {"reduce": None, "progress": None}


# -- the maths ----------------------------------------------------------------------------------------------
def wanda_scores(weight: torch.Tensor, sum_sq: torch.Tensor) -> torch.Tensor:
    """Wanda's score of an (out, in) weight: ``|W_ij| * sqrt(sum_sq_j)``, sum_sq = sum of squared inputs."""
    return weight.detach().abs().to(torch.float32) * sum_sq.sqrt().to(device=weight.device, dtype=torch.float32).unsqueeze(0)


def wanda_adaptive_pruned(scores: torch.Tensor, sparsity: float, tolerance: float = 0.001) -> torch.Tensor:
    """'pruned' mask of Wanda's adaptive variant for one (out, in) score matrix (scores >= 0).

    Per row, the scores are sorted (stable) and summed cumulatively; a row prunes its lowest scores whose
    cumulative sum stays within ``alpha`` times the row's total. One ``alpha`` per layer is found by
    bisection (start 0.4 in [0, 0.8]) until the layer's sparsity is within ``tolerance`` of the target.
    """
    ordered, order = scores.sort(dim=1, stable=True)
    cumulative = ordered.cumsum(dim=1)
    totals = scores.sum(dim=1, keepdim=True)

    def counts(alpha: float) -> torch.Tensor:
        return (cumulative <= alpha * totals).sum(dim=1)

    alpha, low, high = 0.4, 0.0, 0.8
    k = counts(alpha)
    achieved = float(k.sum()) / scores.numel()
    while abs(achieved - sparsity) > tolerance and high - low >= tolerance:
        if achieved > sparsity:
            alpha, high = (alpha + low) / 2, alpha
        else:
            alpha, low = (alpha + high) / 2, alpha
        k = counts(alpha)
        achieved = float(k.sum()) / scores.numel()
    log.debug("adaptive Wanda: alpha %.4f gives sparsity %.4f (target %.4f)", alpha, achieved, sparsity)
    ranks = torch.arange(scores.shape[1], device=scores.device).unsqueeze(0) < k.unsqueeze(1)
    return torch.zeros_like(ranks).scatter_(1, order, ranks)


def inverse_hessian_factor(hessian: torch.Tensor, percdamp: float, max_tries: int = 6) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp I)^-1`` with ``damp = percdamp * mean(diag H)`` (float64).

    If H is not positive definite (too few calibration tokens, float error), the damping grows tenfold
    per retry, with a warning."""
    h = hessian.to(torch.float64)
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    mean_diag = float(h.diagonal().mean())
    damp = percdamp * mean_diag if percdamp > 0 else 0.0
    for attempt in range(max_tries):
        try:
            lower = torch.linalg.cholesky(h + damp * eye)
            return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
        except torch.linalg.LinAlgError:
            new_damp = max(damp * 10, 1e-8 * max(mean_diag, 1.0))
            log.warning("Hessian not positive definite with damping %.3g; retrying with %.3g", damp, new_damp)
            damp = new_damp
    raise RuntimeError(f"Hessian is not positive definite even with damping {damp:.3g}")


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    nm: Optional[tuple[int, int]] = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    pruned_before: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT on one (out, in) weight with its Hessian (in, in). Returns (new float32 weight, pruned mask).

    Dead inputs (``H_jj == 0``) get ``H_jj = 1`` and ``W[:, j] = 0``. Columns are processed in blocks of
    ``blocksize``. Unstructured: at the start of each block the lowest ``w^2 / diag(H^-1)^2`` are pruned,
    as many as keep the count up to that block exact (``exact_count(s, out * columns so far)``), so the
    layer ends at exactly ``exact_count(s, out * in)``. N:M: at the start of each group of M columns the
    N lowest of every row are pruned. After each column the error is spread over the remaining columns:
    ``W[:, j:] -= (w - q) / Hinv[i, i] * Hinv[i, j:]``. ``pruned_before`` weights are pruned first.
    """
    W = weight.detach().to(torch.float32).clone(memory_format=torch.contiguous_format)
    rows, columns = W.shape
    H = hessian.to(torch.float64).clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    hinv = inverse_hessian_factor(H, percdamp).to(torch.float32)
    pruned = torch.zeros_like(W, dtype=torch.bool)
    forced = pruned_before.to(W.device) if pruned_before is not None else None

    def block_scores(w: torch.Tensor, d: torch.Tensor, cols: slice) -> torch.Tensor:
        scores = (w.square() / d.square().unsqueeze(0)).contiguous()
        if forced is not None:
            scores.masked_fill_(forced[:, cols], float("-inf"))
        return scores

    done = 0
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = hinv[i1:i2, i1:i2]
        d = Hinv1.diagonal()
        if nm is None:
            k = exact_count(sparsity, rows * i2) - done
            mask1 = ~drop_lowest(block_scores(W1, d, slice(i1, i2)), k)
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                group = slice(i, i + nm[1])
                mask1[:, group] = ~drop_lowest_per_row(block_scores(W1[:, group], d[group], slice(i1 + i, i1 + i + nm[1])), nm[0])
            w = W1[:, i]
            q = w.masked_fill(mask1[:, i], 0.0)
            err = (w - q) / d[i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Q1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ hinv[i1:i2, i2:]
        pruned[:, i1:i2] = mask1
        done += int(mask1.sum())
    return W, pruned


# -- validation ----------------------------------------------------------------------------------------------
def _options(method: str, given: dict, problems: Problems) -> dict:
    allowed = {**DEFAULT_OPTIONS.get(method, {}), **_COMMON_OPTIONS}
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        problems.add(f"unknown option(s) {unknown} for method {method!r}; allowed: {sorted(allowed)}")
    options = {**allowed, **{k: v for k, v in given.items() if k in allowed}}
    if "scope" in options:
        check_choice(problems, "scope", options["scope"], SCOPES)
    if method == "sparsegpt":
        if isinstance(options["blocksize"], bool) or not isinstance(options["blocksize"], int) or options["blocksize"] < 1:
            problems.add(f"blocksize must be a positive int, got {options['blocksize']!r}")
        if not isinstance(options["percdamp"], (int, float)) or isinstance(options["percdamp"], bool) or not (
            0 <= options["percdamp"] < math.inf
        ):
            problems.add(f"percdamp must be a number >= 0, got {options['percdamp']!r}")
        check_choice(problems, "hessian_dtype", options["hessian_dtype"], list(_HESSIAN_DTYPES))
    if method == "wanda" and not isinstance(options["adaptive"], bool):
        problems.add(f"adaptive must be True or False, got {options['adaptive']!r}")
    if options["reduce"] is not None and not callable(options["reduce"]):
        problems.add(f"reduce must be a callable (tensor -> summed tensor) or None, got {options['reduce']!r}")
    return options


def _check_pattern(problems: Problems, method: str, sparsity: Any, pattern: Any, options: dict) -> Optional[tuple[int, int]]:
    nm = check_pattern(problems, pattern, "sparsity", sparsity, exact=True)
    if nm is None:
        return nm
    n, m = nm
    if method == "wanda" and options.get("adaptive"):
        problems.add(f"adaptive=True (Wanda's adaptive variant) works only with pattern='unstructured', got {pattern!r}")
    if method == "sparsegpt" and isinstance(options.get("blocksize"), int) and options["blocksize"] % m:
        problems.add(f"blocksize {options['blocksize']} must be a multiple of M={m} for pattern {pattern!r}")
    return nm


def check_arguments(method: str, sparsity: float, pattern: str = "unstructured", sequential: bool = True,
                    **method_options: Any) -> tuple[dict, Optional[tuple[int, int]]]:
    """Check the arguments of :func:`prune_oneshot` that do not need the model or data (also used by the
    one-shot callbacks' ``__init__``). Returns (options with defaults, parsed N:M or None); raises
    ValueError/TypeError listing every problem."""
    return _check_arguments(Problems(), method, sparsity, pattern, sequential, method_options)


def _check_arguments(problems: Problems, method, sparsity, pattern, sequential, method_options):
    check_choice(problems, "method", method, METHODS)
    check_sparsity(problems, "sparsity", sparsity)
    if not isinstance(sequential, bool):
        problems.add(f"sequential must be True or False, got {sequential!r}", type_error=True)
    problems.raise_if_any()
    options = _options(method, dict(method_options), problems)
    nm = _check_pattern(problems, method, sparsity, pattern, options)
    if method == "wanda" and options.get("adaptive") and options.get("scope") != "row":
        problems.add(f"adaptive=True is a per-row rule: use scope='row', got scope={options['scope']!r}")
    calibrated = method != "magnitude"
    if calibrated and sequential and options.get("scope") == "global":
        problems.add("scope='global' compares all layers at once, so it needs sequential=False (one dense pass)")
    problems.raise_if_any()
    return options, nm


def _validate(model, method, sparsity, pattern, calibration, sequential, include, exclude, method_options) -> dict:
    """Check every argument and the model; returns the plan. Nothing is changed."""
    problems = Problems()
    if not isinstance(model, nn.Module):
        problems.add(f"model must be a torch.nn.Module, got {type(model).__name__}", type_error=True)
    options, nm = _check_arguments(problems, method, sparsity, pattern, sequential, method_options)
    calibrated = method != "magnitude"

    targets = find_targets(model, include, exclude)
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
    batches = as_batches(calibration) if calibrated else []
    if not calibrated and calibration is not None:
        log.info("magnitude pruning needs no calibration data; ignoring it")
    return {"targets": targets, "stack": stack, "nm": nm, "options": options, "batches": batches}


# -- pruning a group of targets ------------------------------------------------------------------------------
def _prune_targets(method: str, targets: Sequence[Target], sparsity: float, pattern: str, nm, options: dict,
                   hooks: Optional[ActivationHooks], registry: MaskRegistry, progress: Optional[bool]) -> None:
    current = registry.current(targets)
    if method == "magnitude":
        registry.update(targets, select_masks(targets, sparsity, magnitude_scores, options["scope"], pattern, current))
    elif method == "wanda":
        stats = hooks.stats

        def score(t: Target) -> torch.Tensor:
            return t.stored(wanda_scores(t.out_in(t.weight), stats[t.name].l2_sq))

        if options["adaptive"]:
            masks = {}
            for t in targets:
                scores = t.out_in(score(t)).clone()
                if t.name in current:
                    scores.masked_fill_(~t.out_in(current[t.name]), 0.0)
                pruned = wanda_adaptive_pruned(scores, sparsity, options["alpha_tolerance"])
                masks[t.name] = t.stored(~pruned).contiguous()
        else:
            rounding = "floor" if options["scope"] == "row" else "nearest"  # the reference's int(in * s) per row
            masks = select_masks(targets, sparsity, score, options["scope"], pattern, current, rounding=rounding)
        registry.update(targets, masks)
    else:
        for t in tqdm(targets, desc="sparsegpt layers", leave=False, disable=_disable(progress)):
            before = ~t.out_in(current[t.name]) if t.name in current else None
            new_weight, pruned = sparsegpt_prune(
                t.out_in(t.weight), hooks.hessians[t.name].hessian(), sparsity, nm,
                options["blocksize"], options["percdamp"], before,
            )
            with torch.no_grad():
                t.weight.copy_(t.stored(new_weight).to(t.weight.dtype))
            registry.update([t], {t.name: t.stored(~pruned).contiguous()})
            del hooks.hessians[t.name]  # free the Hessian as soon as it is used


def _hooks_for(method: str, targets: Sequence[Target], options: dict) -> ActivationHooks:
    sparsegpt = method == "sparsegpt"
    dtype = _HESSIAN_DTYPES[options["hessian_dtype"]] if sparsegpt else torch.float32
    return ActivationHooks(list(targets), hessian=sparsegpt, channel=not sparsegpt, hessian_dtype=dtype)


def _disable(progress: Optional[bool]) -> Optional[bool]:
    return None if progress is None else not progress


def _sequential(model, stack: BlockStack, batches, targets, method, sparsity, pattern, nm, options, registry, times) -> None:
    device = targets[0].weight.device
    progress = _disable(options["progress"])
    start = time.perf_counter()
    inputs = capture_block_inputs(model, stack, batches, device)
    times["calibration_s"] += time.perf_counter() - start
    last = len(stack.blocks) - 1
    for index, block in enumerate(tqdm(stack.blocks, desc=f"{method} blocks", disable=progress)):
        block_targets = stack.targets_of(index, targets)
        if block_targets:
            start = time.perf_counter()
            with _hooks_for(method, block_targets, options) as hooks:
                for inp in inputs:
                    hooks.tokens(inp.tokens)
                    run_block(block, inp)
            if options["reduce"] is not None:
                hooks.reduce_(options["reduce"])
            times["calibration_s"] += time.perf_counter() - start
            start = time.perf_counter()
            _prune_targets(method, block_targets, sparsity, pattern, nm, options, hooks, registry, False)
            times["pruning_s"] += time.perf_counter() - start
        if index < last:  # the next block sees the outputs of this (pruned) block
            start = time.perf_counter()
            inputs = [replace(inp, hidden=run_block(block, inp)) for inp in inputs]
            times["calibration_s"] += time.perf_counter() - start


def _whole_model(model, batches, targets, method, sparsity, pattern, nm, options, registry, times) -> None:
    device = targets[0].weight.device
    start = time.perf_counter()
    with _hooks_for(method, targets, options) as hooks:
        for batch in tqdm(batches, desc="calibration", disable=_disable(options["progress"])):
            hooks.tokens(batch["attention_mask"])
            call_model(model, batch, device)
    if options["reduce"] is not None:
        hooks.reduce_(options["reduce"])
    times["calibration_s"] += time.perf_counter() - start
    start = time.perf_counter()
    _prune_targets(method, targets, sparsity, pattern, nm, options, hooks, registry, options["progress"])
    times["pruning_s"] += time.perf_counter() - start


def prune_oneshot(
    model: nn.Module,
    method: str,
    sparsity: float,
    pattern: str = "unstructured",
    calibration: Any = None,
    sequential: bool = True,
    include: Selector = None,
    exclude: Selector = None,
    **method_options: Any,
) -> dict:
    """Prune ``model`` in place, once, with ``method`` ("magnitude", "wanda" or "sparsegpt").

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
        include, exclude: target selection, as in :func:`gradprune.find_targets`. In sequential mode the
            default targets are the layers inside the block stack.
        method_options: magnitude: ``scope`` ("layer"); wanda: ``scope`` ("row"), ``adaptive`` (False),
            ``alpha_tolerance`` (0.001); sparsegpt: ``blocksize`` (128), ``percdamp`` (0.01),
            ``hessian_dtype`` ("float32" or "float64" per-batch products; sums are float64). All methods:
            ``reduce`` (callable summing a statistics tensor over data-parallel ranks) and ``progress``.

    Returns:
        a report: :func:`gradprune.sparsity_report` entries (``global``, ``layers``, ``by_type``) plus
        ``method``, ``pattern``, ``target_sparsity``, ``sequential``, ``options``, ``calibration``
        (samples, tokens), ``time`` (``calibration_s``, ``pruning_s``, ``total_s``) and ``masks``
        (keep-masks by target name; drop them with :func:`report_json` before serialising).

    Raises ValueError/TypeError, before anything is changed, for bad arguments, empty calibration data
    or (sequential mode) a model without a block stack.
    """
    plan = _validate(model, method, sparsity, pattern, calibration, sequential, include, exclude, method_options)
    targets, options, batches = plan["targets"], plan["options"], plan["batches"]
    registry = MaskRegistry.of(model)
    times = {"calibration_s": 0.0, "pruning_s": 0.0}
    total_start = time.perf_counter()
    log.info("one-shot %s pruning of %d layers to %s (%s)", method, len(targets), sparsity, pattern)
    if method == "magnitude":
        start = time.perf_counter()
        _prune_targets(method, targets, sparsity, pattern, plan["nm"], options, None, registry, options["progress"])
        times["pruning_s"] += time.perf_counter() - start
    else:
        with eval_mode(model):
            if sequential:
                _sequential(model, plan["stack"], batches, targets, method, sparsity, pattern, plan["nm"], options, registry, times)
            else:
                _whole_model(model, batches, targets, method, sparsity, pattern, plan["nm"], options, registry, times)
    times["total_s"] = time.perf_counter() - total_start
    report = sparsity_report(model, targets)
    report.update(
        method=method,
        pattern=pattern,
        target_sparsity=sparsity,
        sequential=bool(sequential) if method != "magnitude" else None,
        options={k: v for k, v in options.items() if k not in ("reduce", "progress")},
        calibration={"samples": count_samples(batches), "tokens": count_tokens(batches)},
        time=times,
        masks=registry.current(targets),
    )
    log.info("one-shot %s: global sparsity %.4f, calibration %.1fs, pruning %.1fs", method,
             report["global"]["sparsity"], times["calibration_s"], times["pruning_s"])
    return report


def report_json(report: dict) -> dict:
    """The report without its mask tensors (JSON-serialisable)."""
    return {k: v for k, v in report.items() if k != "masks"}
