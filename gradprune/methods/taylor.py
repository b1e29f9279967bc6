"""First-order Taylor saliency (Molchanov et al. 2019): the loss change from removing a weight is about
``|W * G|``; summed over the optimizer steps since the last pruning event it ranks the weights (low =
pruned first). A train-time method only: the gradients exist during training
(:class:`gradprune.statistics.SaliencyAccumulator` keeps the sum, 4 bytes per targeted weight)."""
from __future__ import annotations

from typing import Optional

import torch

from ..targets import Target
from .base import Method


def taylor_scores(target: Target, saliency: Optional[torch.Tensor]) -> torch.Tensor:
    """The accumulated ``sum |W * G|`` of a target, shaped like its stored weight, is its score as it is."""
    return saliency


TAYLOR = Method("taylor", statistics="gradient", train_score=taylor_scores)
