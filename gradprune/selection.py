"""Mask selection: which weights to prune, given scores and a target sparsity.

The rule, in one place:

- In every comparison group exactly ``exact_count(sparsity, group_size) = floor(sparsity * size + 0.5)``
  (at most ``size - 1``: rounding never empties a group) elements are pruned: the lowest scores, ties broken by position (lower index first, and for the
  ``global`` scope earlier targets first). The group is each weight tensor (``layer``), all targets
  together (``global``) or each output row (``row``, Wanda's group).
- Masks are monotone: weights pruned by an earlier mask are pruned again first (their score is treated as
  -inf), so moving from s_prev to s removes (s - s_prev) / (1 - s_prev) of what remains and the cumulative
  count is still exact.
- ``N:M`` patterns allow at most N pruned weights in every M consecutive weights along the input
  dimension: only the N lowest of each group of M are candidates. At sparsity N/M every group has exactly
  N pruned; below it (a gradual ramp) the count is still exact and no group exceeds N.

Scores are float32 copies made one target at a time. The global scope never concatenates scores: it finds
the k-th smallest score by radix selection over float32's ordered bit patterns (two counting passes of
16 bits each), then marks the pruned weights in a third pass, each pass reading a target's scores as the
score function returned them, in chunks of 2^17 elements prepared one at a time (no float32 copy of a
whole tensor), so its extra memory is the masks plus the largest target's scores and about a MB, with no sort and no torch.quantile size
limit; the time is linear in the number of weights (scripts/bench_scale.py). The k-selection itself is
:mod:`gradprune.kselect`.

Also here: the default score ``|W|`` (:func:`magnitude_scores`) and the rule for pruning on top of
earlier masks (:func:`check_existing_masks`).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Literal, Mapping, Optional, Sequence

import torch

from . import kselect
from .bits import fill_pruned_
from .kselect import drop_lowest, drop_lowest_over, drop_lowest_per_row
from .targets import Target
from .validation import Problems, check_choice, check_pattern, check_sparsity

Scope = Literal["layer", "global", "row"]
SCOPES = ("layer", "global", "row")
ScoreFn = Callable[[Target], torch.Tensor]


Rounding = Literal["nearest", "floor"]
ROUNDINGS = ("nearest", "floor")


def magnitude_scores(target: Target) -> torch.Tensor:
    """|W|, shaped like the stored weight: the default score of every selection, and the magnitude
    method's (:mod:`gradprune.methods.magnitude`)."""
    return target.weight.detach().abs()


def exact_count(sparsity: float, size: int, rounding: Rounding = "nearest") -> int:
    """How many of ``size`` elements a group at ``sparsity`` prunes: round half up, or with
    ``rounding="floor"`` ``int(sparsity * size)`` (the Wanda reference's per-row count)."""
    if rounding == "floor":
        count = int(sparsity * size)
    else:
        count = int(math.floor(sparsity * size + 0.5))
    # rounding never removes a whole group unless 100% was asked for (a 1-weight row at 0.5, say)
    return min(count, size - 1) if sparsity < 1 and size > 0 else count


def validate_selection(targets: Sequence[Target], sparsity: float, scope: str, pattern: str,
                       rounding: str = "nearest") -> Optional[tuple[int, int]]:
    """Check selection arguments against the targets; return the parsed N:M pattern (or None).

    Callers that select many times with the same arguments (block by block) check once here and then
    call :func:`select_masks_unchecked`."""
    problems = Problems()
    check_sparsity(problems, "sparsity", sparsity)
    check_choice(problems, "scope", scope, SCOPES)
    check_choice(problems, "rounding", rounding, ROUNDINGS)
    problems.raise_if_any()
    nm = check_pattern(problems, pattern, "sparsity", sparsity)
    problems.raise_if_any()
    if nm is not None:
        for t in targets:
            if t.in_features % nm[1]:
                raise ValueError(
                    f"pattern {pattern!r}: layer {t.name!r} has in_features={t.in_features}, not divisible by M={nm[1]}"
                )
    return nm


def _prepared_scores(target: Target, score_fn: ScoreFn, keep: Optional[torch.Tensor], nm) -> torch.Tensor:
    """Float32 (out, in) scores of one target with already-pruned weights at -inf and, for N:M, the
    weights that may not be pruned at +inf. Always a fresh tensor."""
    raw = score_fn(target)
    if raw.shape != target.weight.shape:
        raise ValueError(f"scores for {target.name!r} have shape {tuple(raw.shape)}, expected {tuple(target.weight.shape)}")
    return prepare_scores(target.name, target.out_in(raw), None if keep is None else target.out_in(keep), nm)


def prepare_scores(name: str, view: torch.Tensor, keep: Optional[torch.Tensor], nm) -> torch.Tensor:
    """A fresh float32 copy of the (out, in) scores ``view`` with -0.0 as +0.0, NaN refused, the weights
    pruned by the (out, in) ``keep`` at -inf and, for N:M, the weights that may not be pruned at +inf
    (the preparation of every scope; :mod:`gradprune.sharding` calls it on a shard's rows)."""
    scores = torch.empty(view.shape, dtype=torch.float32, device=view.device)
    scores.copy_(view)
    del view
    scores += 0.0  # -0.0 -> +0.0 so that equal scores compare equal bit for bit
    if scores.isnan().any():
        raise ValueError(f"scores for {name!r} contain NaN")
    if keep is not None:
        fill_pruned_(scores, keep, float("-inf"))
    if nm is not None:
        n, m = nm
        grouped = scores.view(scores.shape[0], -1, m)
        order = grouped.argsort(dim=-1, stable=True)
        candidate = torch.zeros_like(grouped, dtype=torch.bool)
        candidate.scatter_(-1, order[..., :n], True)
        candidate |= grouped == float("-inf")
        grouped.masked_fill_(~candidate, float("inf"))
    return scores


class ChunkedScores:
    """A target's raw scores (as the score function returned them, stored (out, in)) prepared chunk by
    chunk as :func:`_prepared_scores` prepares a whole tensor: float32, -0.0 as +0.0, NaN refused, pruned
    weights at -inf. The global scope's way to avoid a float32 copy of each target's scores (a lazy score
    source for :func:`gradprune.kselect.drop_lowest_over`)."""

    def __init__(self, target: Target, score_fn: ScoreFn, keep: Optional[torch.Tensor]) -> None:
        raw = score_fn(target)
        if raw.shape != target.weight.shape:
            raise ValueError(f"scores for {target.name!r} have shape {tuple(raw.shape)}, expected {tuple(target.weight.shape)}")
        self.name, self.raw, self.keep = target.name, raw.reshape(-1), keep
        self.shape, self.device = raw.shape, raw.device

    def chunks(self) -> Iterator[torch.Tensor]:
        keep = self.keep.reshape(-1) if self.keep is not None else None
        for start in range(0, self.raw.numel(), kselect.CHUNK):
            chunk = self.raw[start:start + kselect.CHUNK].to(torch.float32, copy=True)
            chunk += 0.0  # -0.0 -> +0.0 so that equal scores compare equal bit for bit
            if chunk.isnan().any():
                raise ValueError(f"scores for {self.name!r} contain NaN")
            if keep is not None:
                fill_pruned_(chunk, keep[start:start + kselect.CHUNK], float("-inf"))
            yield chunk


def _drop_count(scores: torch.Tensor, k: int, scope: Scope) -> torch.Tensor:
    """Keep-mask of one (out, in) score matrix dropping exactly ``k``: the lowest of the layer, or spread
    over the rows (``k // out`` each, one more in the first ``k % out`` rows)."""
    if scope != "row":
        return drop_lowest(scores, k)
    per_row, extra = divmod(k, scores.shape[0])
    if extra == 0:
        return drop_lowest_per_row(scores, per_row)
    return torch.cat([drop_lowest_per_row(scores[:extra], per_row + 1), drop_lowest_per_row(scores[extra:], per_row)])


def select_masks(
    targets: Sequence[Target],
    sparsity: float,
    score_fn: Optional[ScoreFn] = None,
    scope: Scope = "layer",
    pattern: str = "unstructured",
    masks: Optional[Mapping[str, torch.Tensor]] = None,
    rounding: Rounding = "nearest",
    counts: Optional[Mapping[str, int]] = None,
) -> dict[str, torch.Tensor]:
    """Keep-masks (bool, True = kept, shaped like each stored weight) at exactly ``sparsity``.

    Args:
        targets: from :func:`gradprune.find_targets`.
        sparsity: fraction of each comparison group to prune, in [0, 1).
        score_fn: maps a target to scores shaped like its stored weight; low scores are pruned first.
            Default: ``|W|`` (:func:`magnitude_scores`).
        scope: comparison group: "layer", "global" or "row".
        pattern: "unstructured" or "N:M" (e.g. "2:4").
        masks: current keep-masks by target name; the result only ever removes more weights.
        rounding: how a group's count is rounded: "nearest" (half up, the default) or "floor"
            (``int(sparsity * size)``, as the Wanda reference does per row).
        counts: per-target numbers of weights to prune (layer budgets such as OWL's), instead of
            ``sparsity``; scope "layer" or "row", unstructured only.

    Nothing is modified: the caller applies the masks (see :class:`gradprune.MaskRegistry`).
    """
    nm = validate_selection(targets, sparsity, scope, pattern, rounding)
    return select_masks_unchecked(targets, sparsity, score_fn or magnitude_scores, scope, nm, masks, rounding, counts)


def select_masks_unchecked(
    targets: Sequence[Target],
    sparsity: float,
    score_fn: ScoreFn,
    scope: Scope,
    nm: Optional[tuple[int, int]],
    masks: Optional[Mapping[str, torch.Tensor]] = None,
    rounding: Rounding = "nearest",
    counts: Optional[Mapping[str, int]] = None,
) -> dict[str, torch.Tensor]:
    """:func:`select_masks` for arguments already checked by :func:`validate_selection` (``nm`` is what
    it returned, None for unstructured): the one-shot pipeline checks once and then selects per block.

    ``counts`` (per-target budgets such as OWL's) replaces ``sparsity``: target ``t`` prunes exactly
    ``counts[t.name]`` weights (already-pruned ones included): its lowest scores with scope "layer", or with
    scope "row" ``k // out`` per row and one more in the first ``k % out`` rows. Not with "global" or N:M."""
    masks = masks or {}
    if counts is not None and (scope == "global" or nm is not None):
        raise ValueError(f"per-target counts (layer budgets) work with scope 'layer' or 'row' and unstructured "
                         f"patterns, got scope={scope!r}, pattern N:M={nm}")

    def prepared(t: Target) -> torch.Tensor:
        return _prepared_scores(t, score_fn, masks.get(t.name), nm)

    def drop_layer(t: Target, k: int) -> torch.Tensor:
        return drop_lowest(prepared(t), k)

    def drop_global(k: int) -> list[torch.Tensor]:
        def scores(t: Target):  # unstructured, stored (out, in): prepared chunk by chunk, no float32 copy
            if nm is None and not t.transposed:
                return ChunkedScores(t, score_fn, masks.get(t.name))
            return prepared(t)

        return drop_lowest_over(lambda: (scores(t) for t in targets), k)

    return keep_masks_by_scope(targets, sparsity, scope, rounding, masks, prepared, drop_layer, drop_global, counts)


def keep_masks_by_scope(
    targets: Sequence[Target],
    sparsity: float,
    scope: Scope,
    rounding: Rounding,
    masks: Mapping[str, torch.Tensor],
    prepared: Callable[[Target], torch.Tensor],
    drop_layer: Callable[[Target, int], torch.Tensor],
    drop_global: Callable[[int], list[torch.Tensor]],
    counts: Optional[Mapping[str, int]] = None,
) -> dict[str, torch.Tensor]:
    """The scope dispatch and monotone tail shared by :func:`select_masks_unchecked` and
    :func:`gradprune.sharding.select_sharded_masks`: the exact count of each comparison group, dropped by
    ``drop_layer(target, k)`` (one target's (out, in) keep-mask), ``drop_global(k)`` (all targets' keep-masks,
    in order) or the row rule on ``prepared(target)`` (its (out, in) float32 scores); with ``counts``, each
    target's own count (:func:`_drop_count`). The keep-masks are returned in each target's stored layout,
    intersected with its current mask in ``masks``."""
    keep_by_name: dict[str, torch.Tensor] = {}
    if scope == "global":
        k = exact_count(sparsity, sum(t.numel for t in targets), rounding)
        keep_by_name = {t.name: keep for t, keep in zip(targets, drop_global(k))}
    else:
        for t in targets:
            if counts is not None:
                keep_by_name[t.name] = _drop_count(prepared(t), counts[t.name], scope)
            elif scope == "row":
                keep_by_name[t.name] = drop_lowest_per_row(prepared(t), exact_count(sparsity, t.in_features, rounding))
            else:
                keep_by_name[t.name] = drop_layer(t, exact_count(sparsity, t.numel, rounding))

    result = {}
    for t in targets:
        keep = t.stored(keep_by_name.pop(t.name)).contiguous()
        if t.name in masks:
            keep &= masks[t.name].to(keep.device)
        result[t.name] = keep
    return result


def check_existing_masks(problems: Problems, targets: Sequence[Any], masks: Mapping[str, Any], sparsity: float,
                         scope: str, nm: Optional[tuple[int, int]], pattern: str, rounding: str = "nearest") -> None:
    """The rule for pruning a model that already has masks: pruning is monotone (earlier masks are kept),
    so the new request must still be satisfiable on top of them. Refused when the current masks already
    prune more than ``sparsity`` in some comparison group (layer, row, or all targets for 'global') or
    break the N:M pattern (more than N pruned in a group of M)."""
    masked = [t for t in targets if t.name in masks]
    if not masked:
        return
    over, broken_nm = [], []
    if scope == "global":
        pruned = sum(int(masks[t.name].numel() - masks[t.name].count_nonzero()) for t in masked)
        total = sum(t.numel for t in targets)
        if pruned > exact_count(sparsity, total, rounding):
            over.append(f"all targets ({pruned / total:.4f})")
    for t in masked:
        keep = t.out_in(masks[t.name])
        pruned_rows = (~keep).sum(dim=1)
        if scope == "layer" and int(pruned_rows.sum()) > exact_count(sparsity, keep.numel(), rounding):
            over.append(f"{t.name} ({int(pruned_rows.sum()) / keep.numel():.4f})")
        elif scope == "row" and int(pruned_rows.max()) > exact_count(sparsity, keep.shape[1], rounding):
            over.append(f"{t.name} (a row at {int(pruned_rows.max()) / keep.shape[1]:.4f})")
        if nm is not None and keep.shape[1] % nm[1] == 0:
            groups = (~keep).reshape(keep.shape[0], -1, nm[1]).sum(dim=-1)
            broken = int((groups > nm[0]).sum())
            if broken:
                broken_nm.append(f"{t.name} ({broken} groups)")
    if broken_nm:
        problems.add(f"pattern={pattern!r}: earlier pruning left groups of {nm[1]} with more than {nm[0]} pruned weights "
                     f"in {', '.join(broken_nm[:3])}{' ...' if len(broken_nm) > 3 else ''}; masks only grow, so they "
                     f"cannot satisfy {pattern!r}. Prune a fresh copy of the model instead")
    if over:
        problems.add(f"sparsity={sparsity} (scope={scope!r}) is below what earlier pruning already removed in "
                     f"{', '.join(over[:5])}{' ...' if len(over) > 5 else ''}; masks only grow, so the result would not "
                     "be at the requested sparsity. Ask for at least the current sparsity, or prune a fresh copy")
