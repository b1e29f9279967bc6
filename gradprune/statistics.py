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
    """Sums of squared inputs of ``targets`` over the micro-batches seen while the window is open.

    The subclasses keep other sums from the same hooks; each says where its per-target sums live
    (:meth:`_sums`), which of their fields are sums (``_FIELDS``: reduced over ranks, saved in checkpoints)
    and how an empty one is made (:meth:`_empty`)."""

    _FIELDS: tuple[str, ...] = ("sum_sq", "count")

    def __init__(self, targets: Sequence[Target]) -> None:
        self.targets = list(targets)
        self._hooks = ActivationHooks(self.targets, l2_only=True)
        self._open = False

    def _sums(self) -> dict:
        """Target name -> its sums (what the hooks fill)."""
        return self._hooks.stats

    def _empty(self, target: Target) -> Any:
        return ChannelStats.empty(target.in_features, target.weight.device, l2_only=True)

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
        counts = [int(s.count) for s in self._sums().values()]
        return min(counts) if counts else 0

    def missing(self) -> list[str]:
        """Targets that saw no input while the window was open (they never ran in forward)."""
        sums = self._sums()
        return [t.name for t in self.targets if t.name not in sums or float(sums[t.name].count) == 0]

    def sum_sq(self, name: str) -> torch.Tensor:
        return self._hooks.stats[name].sum_sq

    def reduce_(self, fn: Reduce) -> None:
        """Replace every sum by ``fn(sum)`` (e.g. a sum over data-parallel ranks), in ``_FIELDS`` order."""
        for stats in self._sums().values():
            for key in self._FIELDS:
                if getattr(stats, key) is not None:
                    setattr(stats, key, fn(getattr(stats, key)))

    def reset(self) -> None:
        """Close the window and forget the sums (after an event)."""
        self.close()
        self._sums().clear()

    def non_finite(self) -> list[str]:
        """``"layer (sum)"`` for every sum of the window that holds NaN or inf."""
        return [f"{name} ({key})" for name, s in self._sums().items() for key in self._FIELDS
                if getattr(s, key) is not None and not bool(torch.isfinite(getattr(s, key)).all())]

    def state_dict(self) -> dict:
        return {name: {k: getattr(s, k).cpu() for k in self._FIELDS if getattr(s, k) is not None}
                for name, s in self._sums().items()}

    def load_state_dict(self, state: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        self.reset()
        by_name = {t.name: t for t in self.targets}
        for name, saved in state.items():
            stats = self._empty(by_name[name])
            for key in self._FIELDS:
                if getattr(stats, key) is not None and key in saved:
                    getattr(stats, key).copy_(saved[key])
            self._sums()[name] = stats


class ChannelWindow(ActivationWindow):
    """The full per-channel statistics of the inputs of ``targets`` while the window is open: sums of x^2, x,
    |x| and near-zero counts (|x| <= ``near_zero_eps``) with the token count (:class:`ChannelStats`), what
    the structured importance metrics read; ``l2_only`` keeps only the sums of x^2 and the counts."""

    _FIELDS = ("sum_sq", "sum", "near_zero", "count", "sum_abs")

    def __init__(self, targets: Sequence[Target], near_zero_eps: float = 1e-2, l2_only: bool = False) -> None:
        self.targets = list(targets)
        self.near_zero_eps, self.l2_only = near_zero_eps, l2_only
        self._hooks = ActivationHooks(self.targets, near_zero_eps=near_zero_eps, l2_only=l2_only)
        self._open = False

    def _empty(self, target: Target) -> ChannelStats:
        return ChannelStats.empty(target.in_features, target.weight.device, self.near_zero_eps, self.l2_only)

    def stats(self, name: str) -> ChannelStats:
        return self._hooks.stats[name]


class HessianWindow(ActivationWindow):
    """Sums ``X X^T`` (and token counts) of the inputs of ``targets`` while the window is open."""

    _FIELDS = ("xtx", "count")

    def __init__(self, targets: Sequence[Target]) -> None:
        self.targets = list(targets)
        self._hooks = ActivationHooks(self.targets, hessian=True, channel=False)
        self._open = False

    def _sums(self) -> dict:
        return self._hooks.hessians

    def _empty(self, target: Target) -> HessianStats:
        return HessianStats.empty(target.in_features, target.weight.device)

    def hessian(self, name: str) -> torch.Tensor:
        """SparseGPT's ``2/n X X^T`` of the target's inputs in the window (float64)."""
        return self._hooks.hessians[name].hessian()

    def sum_sq(self, name: str) -> torch.Tensor:
        """Per input channel ``sum x^2``: the diagonal of ``X X^T`` (what OWL's Wanda scores need)."""
        return self._hooks.hessians[name].xtx.diagonal().clone()


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

    def non_finite(self) -> list[str]:
        """``"layer (saliency)"`` for every sum that holds NaN or inf."""
        return [f"{name} (saliency)" for name, s in self.sums.items() if not bool(torch.isfinite(s).all())]

    def state_dict(self) -> dict:
        return {"steps": self.steps, "sums": {name: s.cpu() for name, s in self.sums.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        by_name = {t.name: t for t in self.targets}
        self.steps = int(state.get("steps", 0))
        self.sums = {name: s.to(by_name[name].weight.device) for name, s in state.get("sums", {}).items()}
