"""Language-model losses as pure functions of logits (the distillation loss joins them later).

Token ``t`` predicts token ``t + 1``; positions whose target is padding (``attention_mask == 0``) are
ignored, and the mean runs over the remaining target tokens.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def shifted_targets(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Targets for next-token prediction, shape [B, T-1], with padding set to IGNORE_INDEX."""
    targets = input_ids[:, 1:].clone()
    if attention_mask is not None:
        targets[attention_mask[:, 1:] == 0] = IGNORE_INDEX
    return targets


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean cross entropy of next-token prediction over non-padding targets (float32 maths)."""
    targets = shifted_targets(input_ids, attention_mask)
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )
