"""Magnitude pruning: the score ``|W|``, no calibration data; masks by the core rule (scope layer by
default, global or row; N:M). The gradual scorer "magnitude" is this score too."""
from __future__ import annotations

from typing import Any

import torch

from ..targets import Target
from .base import Method


def magnitude_scores(target: Target) -> torch.Tensor:
    """|W|, shaped like the stored weight."""
    return target.weight.detach().abs()


def _score(target: Target, stats: Any) -> torch.Tensor:
    return magnitude_scores(target)


MAGNITUDE = Method("magnitude", statistics="none", options={"scope": "layer"}, score=_score)
