"""Held-out perplexity of a causal LM on a token stream: the one perplexity of the scripts and tests.

The protocol of the Wanda / SparseGPT papers: cut the stream into non-overlapping windows of ``seqlen``
tokens (a shorter tail is dropped), take the mean next-token cross entropy of each window, and report
``exp`` of the mean over windows. Feed it ``TextDataModule.heldout_ids()`` to score a model on files it
was never trained or calibrated on.
"""
from __future__ import annotations

import math

import torch
from torch import nn


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, seqlen: int) -> float:
    """exp of the mean next-token NLL over non-overlapping windows of ``seqlen`` tokens of the 1-D
    ``ids`` (the model in eval mode during the passes; its training flag is restored)."""
    device = next(model.parameters()).device
    ids = ids.reshape(-1)
    windows = ids[: (ids.numel() // seqlen) * seqlen].view(-1, seqlen)
    if windows.shape[0] == 0:
        raise ValueError(f"held-out data has {ids.numel()} tokens, fewer than one window of {seqlen}")
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        for window in windows:
            x = window.unsqueeze(0).to(device)
            logits = model(input_ids=x, use_cache=False).logits.float()
            total += float(torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:]))
    finally:
        model.train(was_training)
    return math.exp(total / windows.shape[0])
