"""Exact k-selection: keep-masks that drop exactly the ``k`` lowest of some float32 scores, ties broken by
position. The one home of the radix selection that :mod:`gradprune.selection` (one process) and
:mod:`gradprune.sharding` (row-sharded weights) build their mask rules on. No other gradprune module is
imported here.

The k-th smallest score is found by radix selection over float32's ordered bit patterns
(:func:`order_keys`): two counting passes of 16 bits each, then a third pass marks the dropped elements,
each pass reading the scores in chunks of :data:`CHUNK` elements. No sort, no ``torch.quantile`` size
limit, linear time, and temporaries of about a MB however large the tensors.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch

# Elements per chunk of the radix passes: their temporaries (about 9 bytes per element, 1.2 MB) stay small
# next to any weight worth pruning, and chunks are large enough that the per-chunk overhead is negligible.
CHUNK = 1 << 17


def order_keys(scores: torch.Tensor) -> torch.Tensor:
    """int32 keys whose integer order is the float order of ``scores`` (float32, no NaN): the bits of
    non-negative floats as they are, those of negative floats with all but the sign bit flipped."""
    bits = scores.view(torch.int32)
    return ((bits >> 31) & 0x7FFFFFFF).bitwise_xor_(bits)


def chunks_of(scores) -> Iterator[torch.Tensor]:
    """Flat views of :data:`CHUNK` elements of a tensor, in order; or, for a score source that prepares
    its scores lazily (an object with ``shape``, ``device`` and a ``chunks()`` method, such as
    :class:`gradprune.selection.ChunkedScores`), what its ``chunks()`` yields."""
    if not isinstance(scores, torch.Tensor):
        yield from scores.chunks()
        return
    flat = scores.reshape(-1)
    for start in range(0, flat.numel(), CHUNK):
        yield flat[start:start + CHUNK]


def drop_lowest_over(score_tensors: Callable[[], Iterator[torch.Tensor]], k: int) -> list[torch.Tensor]:
    """Keep-masks (bool) that drop exactly the k lowest elements over all tensors yielded by
    ``score_tensors()`` (called up to three times, so a caller may prepare the scores afresh each pass
    instead of holding them); ties go to the earlier tensor and lower flat index. Each tensor (or lazy
    score source, see :func:`chunks_of`) is read in chunks of :data:`CHUNK` elements, so the temporaries
    do not grow with it."""
    if k <= 0:
        return [torch.ones(s.shape, dtype=torch.bool, device=s.device) for s in score_tensors()]
    # Passes 1 and 2: histograms of the high, then (within the chosen bucket) the low 16 bits of the keys
    # locate the k-th smallest key exactly.
    high_counts = None
    for scores in score_tensors():
        for chunk in chunks_of(scores):
            high = order_keys(chunk).bitwise_right_shift_(16).add_(32768)
            counts = torch.bincount(high, minlength=65536)
            high_counts = counts if high_counts is None else high_counts.add_(counts.to(high_counts.device))
        del scores
    cum = high_counts.cumsum(0)
    high_bucket = int(torch.searchsorted(cum, torch.tensor(k, device=cum.device)))
    below = int(cum[high_bucket - 1]) if high_bucket > 0 else 0
    low_counts = None
    for scores in score_tensors():
        for chunk in chunks_of(scores):
            keys = order_keys(chunk)
            low = keys[(keys >> 16) == high_bucket - 32768].bitwise_and_(0xFFFF)
            counts = torch.bincount(low, minlength=65536)
            low_counts = counts if low_counts is None else low_counts.add_(counts.to(low_counts.device))
        del scores
    cum = low_counts.cumsum(0)
    low_bucket = int(torch.searchsorted(cum, torch.tensor(k - below, device=cum.device)))
    below += int(cum[low_bucket - 1]) if low_bucket > 0 else 0
    threshold = (high_bucket - 32768) * 65536 + low_bucket
    # Pass 3: drop everything below the k-th key, and the first `ties` elements equal to it.
    ties = k - below
    keeps = []
    for scores in score_tensors():
        keep = torch.empty(scores.shape, dtype=torch.bool, device=scores.device)
        for chunk, kept in zip(chunks_of(scores), chunks_of(keep)):
            keys = order_keys(chunk)
            torch.gt(keys, threshold, out=kept)
            equal = keys == threshold
            if ties > 0:
                positions = equal.nonzero().flatten()
                kept[positions[ties:]] = True
                ties -= min(ties, positions.numel())
            else:
                kept |= equal
        keeps.append(keep)
        del scores
    return keeps


def drop_lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask dropping exactly the ``k`` lowest elements of one float32 tensor (ties to the lower flat
    index): the layer rule, for callers that select inside their own groups (SparseGPT's column blocks)."""
    return drop_lowest_over(lambda: iter([scores]), k)[0]


def drop_lowest_per_row(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask dropping exactly the ``k`` lowest of every row (ties to the lower column): the row rule."""
    if k <= 0:
        return torch.ones_like(scores, dtype=torch.bool)
    kth = scores.kthvalue(k, dim=1, keepdim=True).values
    pruned = scores < kth
    equal = scores == kth
    missing = k - pruned.sum(dim=1, keepdim=True)
    pruned |= equal & (equal.cumsum(dim=1) <= missing)
    return pruned.logical_not_()
