"""Magnitude pruning: the score ``|W|``, no calibration data; masks by the core rule (scope layer by
default, global or row; N:M). The gradual scorer "magnitude" is this score too. The score function itself
lives in :mod:`gradprune.selection`, whose default score it is."""
from __future__ import annotations

from typing import Any

import torch

from ..selection import magnitude_scores
from ..targets import Target
from .base import Method

__all__ = ["MAGNITUDE", "magnitude_scores"]


def _score(target: Target, statistic: Any) -> torch.Tensor:
    return magnitude_scores(target)


MAGNITUDE = Method("magnitude", statistics="none", options={"scope": "layer"}, score=_score, train_score=_score)
