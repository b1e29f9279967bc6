"""Magnitude pruning: the score ``|W|``, no calibration data; masks by the core rule (scope layer by
default, global or row; N:M). The gradual scorer "magnitude" is this score too."""
from __future__ import annotations

from typing import Any

import torch

from ..selection import magnitude_scores
from ..targets import Target
from .base import Method

__all__ = ["MAGNITUDE", "magnitude_scores"]


def _score(target: Target, stats: Any) -> torch.Tensor:
    return magnitude_scores(target)


MAGNITUDE = Method("magnitude", statistics="none", options={"scope": "layer"}, score=_score)
