"""Next-token top-1 accuracy as a torchmetrics metric: ``val/acc`` of :class:`gradprune.PrunableLM`, next to
``val/ppl``, counted over the same targets (the non-padding next tokens)."""
from __future__ import annotations

from typing import Any

import torch
from torchmetrics import Metric

from .losses import IGNORE_INDEX


class TokenAccuracy(Metric):
    """Next-token top-1 accuracy: the fraction of target tokens (not ``ignore_index``, i.e. not padding) that
    are the logits' argmax. Sums of hits and counted tokens, summed across DDP ranks, so the value over a
    validation set is exact (the same targets as ``val/ppl``'s Perplexity)."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, ignore_index: int = IGNORE_INDEX, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ignore_index = ignore_index
        self.add_state("correct", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """``logits`` [..., V] and ``targets`` [...] (the token each position predicts)."""
        keep = targets != self.ignore_index
        hits = (logits.argmax(dim=-1) == targets) & keep
        self.correct += hits.sum()
        self.total += keep.sum()

    def compute(self) -> torch.Tensor:
        return self.correct.float() / self.total.clamp(min=1).float()
