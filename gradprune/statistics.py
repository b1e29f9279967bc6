"""Statistics gathered during training for the gradual scorers: sums and counts, resumable and reducible.

- :class:`ActivationWindow`: per input channel the sum over tokens of ``x^2`` of each target's inputs (and
  the token count), from forward hooks that exist only while a window is open (the callback opens it
  ``stat_batches`` micro-batches before an event and closes it at the event, or when fit ends or fails).
- :class:`ChannelWindow`: the same window with every per-channel sum of :class:`ChannelStats` (x^2, x, |x|,
  near-zero counts), what the structured importance metrics of gradual structured pruning read.
- :class:`HessianWindow`: the same window, keeping SparseGPT's ``sum X X^T`` of each target's inputs
  (float64, ``8 * in_features^2`` bytes per target while a window's sums exist; targets that read one input,
  such as q/k/v, share one product per forward).
- :class:`SaliencyAccumulator`: ``sum over optimizer steps of |W * G|`` per weight (first-order Taylor
  saliency), float32, shaped like each stored weight: 4 bytes per targeted weight.

All keep plain sums, so ``reduce_(fn)`` (e.g. a sum over data-parallel ranks) and ``state_dict()`` /
``load_state_dict()`` (a checkpoint inside a window) make a resumed or distributed run exact.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from .calibration import ActivationHooks, ChannelStats, HessianStats
from .targets import Target

Reduce = Callable[[torch.Tensor], torch.Tensor]


class ActivationWindow:
    """Sums of squared inputs of ``targets`` over the micro-batches seen while the window is open."""

    def __init__(self, targets: Sequence[Target]) -> None:
        self.targets = list(targets)
        self._hooks = ActivationHooks(self.targets, l2_only=True)
        self._open = False

    @property
    def is_open(self) -> bool:
        return self._open

    def open(self) -> None:
        if not self._open:
            self._hooks.__enter__()
            self._open = True

    def close(self) -> None:
        """Remove the hooks; the sums stay until :meth:`reset`."""
        if self._open:
            self._hooks.remove()
            self._open = False

    def tokens(self, batch: Any) -> None:
        """Leave out padding of the next forward: the batch's ``attention_mask`` if it has one."""
        mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
        self._hooks.tokens(mask if isinstance(mask, torch.Tensor) else None)

    def tokens_seen(self) -> int:
        counts = [int(s.count) for s in self._hooks.stats.values()]
        return min(counts) if counts else 0

    def missing(self) -> list[str]:
        """Targets that saw no input while the window was open (they never ran in forward)."""
        return [t.name for t in self.targets if t.name not in self._hooks.stats or float(self._hooks.stats[t.name].count) == 0]

    def sum_sq(self, name: str) -> torch.Tensor:
        return self._hooks.stats[name].sum_sq

    def reduce_(self, fn: Reduce) -> None:
        for stats in self._hooks.stats.values():
            stats.sum_sq, stats.count = fn(stats.sum_sq), fn(stats.count)

    def reset(self) -> None:
        """Close the window and forget the sums (after an event)."""
        self.close()
        self._hooks.stats.clear()

    def state_dict(self) -> dict:
        return {name: {"sum_sq": s.sum_sq.cpu(), "count": s.count.cpu()} for name, s in self._hooks.stats.items()}

    def load_state_dict(self, state: Mapping[str, Mapping[str, torch.Tensor]]) -> None:

        self.reset()
        by_name = {t.name: t for t in self.targets}
        for name, saved in state.items():
            target = by_name[name]
            stats = ChannelStats.empty(target.in_features, target.weight.device, l2_only=True)
            stats.sum_sq.copy_(saved["sum_sq"])
            stats.count.copy_(saved["count"])
            self._hooks.stats[name] = stats


class ChannelWindow(ActivationWindow):
    """The full per-channel statistics of the inputs of ``targets`` while the window is open: sums of x^2, x,
    |x| and near-zero counts (|x| <= ``near_zero_eps``) with the token count (:class:`ChannelStats`), what
    the structured importance metrics read; ``l2_only`` keeps only the sums of x^2 and the counts."""

    def __init__(self, targets: Sequence[Target], near_zero_eps: float = 1e-2, l2_only: bool = False) -> None:
        self.targets = list(targets)
        self.near_zero_eps, self.l2_only = near_zero_eps, l2_only
        self._hooks = ActivationHooks(self.targets, near_zero_eps=near_zero_eps, l2_only=l2_only)
        self._open = False

    def stats(self, name: str) -> ChannelStats:
        return self._hooks.stats[name]

    def reduce_(self, fn: Reduce) -> None:
        for stats in self._hooks.stats.values():
            stats.reduce_(fn)

    _FIELDS = ("sum_sq", "sum", "near_zero", "count", "sum_abs")

    def state_dict(self) -> dict:
        return {name: {k: getattr(s, k).cpu() for k in self._FIELDS if getattr(s, k) is not None}
                for name, s in self._hooks.stats.items()}

    def load_state_dict(self, state: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        self.reset()
        by_name = {t.name: t for t in self.targets}
        for name, saved in state.items():
            target = by_name[name]
            stats = ChannelStats.empty(target.in_features, target.weight.device, self.near_zero_eps, self.l2_only)
            for key in self._FIELDS:
                if getattr(stats, key) is not None and key in saved:
                    getattr(stats, key).copy_(saved[key])
            self._hooks.stats[name] = stats


class HessianWindow(ActivationWindow):
    """Sums ``X X^T`` (and token counts) of the inputs of ``targets`` while the window is open."""

    def __init__(self, targets: Sequence[Target]) -> None:
        self.targets = list(targets)
        self._hooks = ActivationHooks(self.targets, hessian=True, channel=False)
        self._open = False

    def tokens_seen(self) -> int:
        counts = [int(s.count) for s in self._hooks.hessians.values()]
        return min(counts) if counts else 0

    def missing(self) -> list[str]:
        stats = self._hooks.hessians
        return [t.name for t in self.targets if t.name not in stats or float(stats[t.name].count) == 0]

    def hessian(self, name: str) -> torch.Tensor:
        """SparseGPT's ``2/n X X^T`` of the target's inputs in the window (float64)."""
        return self._hooks.hessians[name].hessian()

    def sum_sq(self, name: str) -> torch.Tensor:
        """Per input channel ``sum x^2``: the diagonal of ``X X^T`` (what OWL's Wanda scores need)."""
        return self._hooks.hessians[name].xtx.diagonal().clone()

    def reduce_(self, fn: Reduce) -> None:
        for stats in self._hooks.hessians.values():
            stats.xtx, stats.count = fn(stats.xtx), fn(stats.count)

    def reset(self) -> None:
        self.close()
        self._hooks.hessians.clear()

    def state_dict(self) -> dict:
        return {name: {"xtx": s.xtx.cpu(), "count": s.count.cpu()} for name, s in self._hooks.hessians.items()}

    def load_state_dict(self, state: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        self.reset()
        by_name = {t.name: t for t in self.targets}
        for name, saved in state.items():
            target = by_name[name]
            stats = HessianStats.empty(target.in_features, target.weight.device)
            stats.xtx.copy_(saved["xtx"])
            stats.count.copy_(saved["count"])
            self._hooks.hessians[name] = stats


class SaliencyAccumulator:
    """``sum |W * G|`` per weight of each target since the last :meth:`reset` (float32)."""

    def __init__(self, targets: Sequence[Target]) -> None:
        self.targets = list(targets)
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0

    def add(self) -> None:
        """Accumulate the current gradients (call once per optimizer step, before any masking)."""
        with torch.no_grad():
            for t in self.targets:
                grad = t.weight.grad
                if grad is None:
                    continue
                product = t.weight.detach().float() * grad.float()
                product.abs_()
                if t.name in self.sums:
                    self.sums[t.name] += product
                else:
                    self.sums[t.name] = product
        self.steps += 1

    def saliency(self, name: str) -> Optional[torch.Tensor]:
        return self.sums.get(name)

    def missing(self) -> list[str]:
        return [t.name for t in self.targets if t.name not in self.sums]

    def reset(self) -> None:
        self.sums.clear()
        self.steps = 0

    def state_dict(self) -> dict:
        return {"steps": self.steps, "sums": {name: s.cpu() for name, s in self.sums.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        by_name = {t.name: t for t in self.targets}
        self.steps = int(state.get("steps", 0))
        self.sums = {name: s.to(by_name[name].weight.device) for name, s in state.get("sums", {}).items()}
