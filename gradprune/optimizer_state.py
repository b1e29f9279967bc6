"""What the optimizer state of a pruned weight holds, and why it is not all zero.

A pruned weight has a zero value and a zero (masked) gradient, so any state an optimizer keeps for it
only has to make its update exactly zero. Momentum buffers and first moments are set to zero: they then
stay zero. Second moments, which Adam-like optimizers take the square root of, are set to a small
*normal* float instead (:func:`moment_floor`: 2^-63 in float32, whose root 2^-31.5 ~ 3e-10 is far below
the usual eps of 1e-8; float16's floor is 2^-7, see there). The update of the pruned weight is still exactly zero, because the numerator (the
first moment, or the gradient) is zero and the denominator is positive:

- Adam / AdamW: ``exp_avg / (sqrt(exp_avg_sq / bc2) + eps) = 0``; decoupled decay ``0 * (1 - lr wd) = 0``,
  coupled decay adds ``wd * 0 = 0`` to the gradient; with amsgrad the running max is floored too;
- NAdam (gradient and first moment over the denominator), RAdam (first moment times ``1 / (sqrt + eps)``),
  RMSprop (gradient over ``sqrt(square_avg - grad_avg^2) + eps``, momentum of that), Adagrad (gradient
  over ``sqrt(sum) + eps``): the same.

Why: exact zeros, and the subnormals a zero-gradient moment decays into, make the CPU's square root
several times slower than over normal floats (scripts/bench_overhead.py measures it), and with half the
weights pruned that was most of the cost of a plain torch AdamW step. A moment with zero gradient decays
by its factor d (beta2, RMSprop's alpha) every step, so the floor is written again every
:func:`refresh_interval` steps, before it can reach the subnormal range: every 21,800 steps at
d = 0.999, every 425 at d = 0.95 (one pass over the state of the targets each time). The state keeps
torch's keys, shapes and dtypes, so checkpoints load into the plain optimizer.

Which optimizers: those listed in :data:`SECOND_MOMENTS` (by exact class, since a subclass may change the
update), and any optimizer class that declares ``second_moment_keys`` itself (:class:`gradprune.MaskedAdamW`
does). Any other state tensor shaped like the weight is zeroed.

:class:`SecondMomentFloors` keeps the bookkeeping of when each optimizer's floors are due again; the mask
registry (:class:`gradprune.MaskRegistry`) holds one and calls it from its optimizer step hooks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Optional

import torch

from .bits import fill_pruned_, zero_pruned_
from .shards import local

# state key -> the per-step decay factor of that state under a parameter group's options (1: no decay)
_ADAM = {"exp_avg_sq": lambda group: float(group["betas"][1]), "max_exp_avg_sq": lambda group: 1.0}
SECOND_MOMENTS: dict[type, Mapping[str, Callable[[dict], float]]] = {
    torch.optim.Adam: _ADAM,
    torch.optim.AdamW: _ADAM,
    torch.optim.NAdam: {"exp_avg_sq": _ADAM["exp_avg_sq"]},
    torch.optim.RAdam: {"exp_avg_sq": _ADAM["exp_avg_sq"]},
    torch.optim.RMSprop: {"square_avg": lambda group: float(group["alpha"])},
    torch.optim.Adagrad: {"sum": lambda group: 1.0},
}


def second_moment_keys(optimizer: torch.optim.Optimizer) -> Mapping[str, Callable[[dict], float]]:
    """The state keys of ``optimizer`` that its update divides by the square root of, with their decay
    factors; empty for optimizers not known to do so."""
    declared = getattr(type(optimizer), "second_moment_keys", None)
    if declared is not None:
        return declared
    return SECOND_MOMENTS.get(type(optimizer), {})


def moment_floor(dtype: torch.dtype) -> float:
    """The value a pruned weight's second moment is given: the power of two nearest below the square root
    of ``dtype``'s smallest normal (2^-63 for float32 and bfloat16, 2^-7 for float16, 2^-511 for float64),
    so it is normal and stays normal for many steps of decay. Its square root is far below any usual eps in
    float32, bfloat16 and float64; in float16 it is 2^-3.5 ~ 0.09, which is harmless all the same: the update
    of a pruned weight is exactly zero because its numerator (first moment or gradient) is zero."""
    tiny = torch.finfo(dtype).tiny
    return 2.0 ** math.floor(math.log2(tiny) / 2)


def refresh_interval(decay: float, dtype: torch.dtype) -> Optional[int]:
    """Steps after which a moment set to :func:`moment_floor` and decaying by ``decay`` per step is written
    again: half the steps it takes to fall below ``dtype``'s smallest normal. None: it never needs it
    (decay >= 1); 0: it cannot be kept normal (decay <= 0: the state is the squared gradient itself)."""
    if decay >= 1:
        return None
    if decay <= 0:
        return 0
    lifetime = math.log(moment_floor(dtype) / torch.finfo(dtype).tiny) / -math.log(decay)
    return max(1, int(lifetime // 2))


@torch.no_grad()
def reset_pruned_state_(optimizer: torch.optim.Optimizer, weight_masks: Iterable[tuple[torch.Tensor, torch.Tensor]],
                        floor_second_moments: bool = True) -> Optional[int]:
    """Make ``optimizer``'s state of each (weight, keep-mask) pair give the pruned entries (``keep`` False)
    an update of exactly zero: second moments (:func:`second_moment_keys`) at :func:`moment_floor`, every
    other state tensor shaped like the weight at zero (with ``floor_second_moments=False`` those too).
    Weights without state yet are skipped.

    Returns the number of steps after which the floors must be written again (:func:`refresh_interval`,
    the smallest over all of them), or None when none needs it."""
    moments = second_moment_keys(optimizer) if floor_second_moments else {}
    groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    interval: Optional[int] = None
    for weight, keep in weight_masks:
        state = optimizer.state.get(weight)
        for key, value in (state or {}).items():
            if not isinstance(value, torch.Tensor):
                continue
            value = local(value)  # a sharded weight's state is sharded like it, and so is its mask
            if value.shape != keep.shape:
                continue
            decay = moments.get(key)
            group = groups.get(id(weight))
            every = refresh_interval(decay(group), value.dtype) if decay is not None and group is not None else 0
            if every == 0 or not value.is_floating_point():
                zero_pruned_(value, keep)
                continue
            fill_pruned_(value, keep, moment_floor(value.dtype))
            if every is not None:
                interval = every if interval is None else min(interval, every)
    return interval


@dataclass
class _Due:
    """When the second-moment floors of one optimizer are due again."""
    interval: Optional[int] = None  # steps between writes (None: none needed so far)
    since: int = 0  # steps since the last write of all of them
    first_step: bool = True  # the state may not exist before the first step


class SecondMomentFloors:
    """The optimizers whose pruned second moments are kept at :func:`moment_floor`, and when each one's
    floors must be written again (before they decay into the subnormal range)."""

    def __init__(self) -> None:
        self._due: dict[int, _Due] = {}

    def track(self, optimizer: torch.optim.Optimizer) -> bool:
        """Keep ``optimizer``'s pruned second moments at the floor from now on, if it has any
        (:func:`second_moment_keys`); returns whether it does."""
        if not second_moment_keys(optimizer):
            return False
        self._due[id(optimizer)] = _Due()
        return True

    def reset_(self, optimizer: torch.optim.Optimizer, weight_masks: Iterable[tuple[torch.Tensor, torch.Tensor]],
               every_mask: bool) -> None:
        """:func:`reset_pruned_state_` of these (weight, keep-mask) pairs, second moments floored if
        ``optimizer`` is tracked; ``every_mask``: the pairs are all the masks, so the count starts afresh."""
        due = self._due.get(id(optimizer))
        interval = reset_pruned_state_(optimizer, weight_masks, floor_second_moments=due is not None)
        if due is not None and interval is not None:
            if every_mask:  # every floor written now: count afresh
                due.interval, due.since = interval, 0
            elif due.interval is None or interval < due.interval:
                due.interval = interval

    def step_done(self, optimizer: torch.optim.Optimizer) -> bool:
        """Count one step of ``optimizer``; whether all its floors are due now: after the first step (an
        optimizer tracked before it has state creates the state zeroed there), then every interval."""
        due = self._due[id(optimizer)]
        due.since += 1
        if due.first_step or (due.interval is not None and due.since >= due.interval):
            due.first_step = False
            return True
        return False

    def clear(self) -> None:
        self._due.clear()
