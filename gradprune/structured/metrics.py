"""Importance of structural units, as pure functions of calibration statistics. Higher = more important.

MLP neuron ``j`` is judged by its activation ``a_j``, the input of the MLP output projection (``down_proj``,
``fc2``, ``c_proj``) at channel ``j``, over the ``n`` calibration tokens (:class:`gradprune.calibration.ChannelStats`):

    l2         ||a_j||_2 = sqrt(sum_t a_tj^2)
    mean_abs   (1/n) sum_t |a_tj|
    variance   (1/n) sum_t a_tj^2 - ((1/n) sum_t a_tj)^2
    near_zero  1 - (fraction of tokens with |a_tj| <= eps): a neuron that is rarely near zero matters
    combined   sum_k w_k * m_k(j) / mean_j' m_k(j') over the metrics above (each made scale-free by its
               mean over the layer's neurons), weights ``w_k`` configurable (default all 1)
    wanda      sum_i |W_out[i, j]| * ||a_j||_2: Wanda's |W| x activation-norm score summed over the neuron's
               weights in the output projection

Attention head group ``g`` (a KV head with its query heads): the L2 norm over tokens of the heads' attention
output, the input of ``o_proj`` restricted to the group's channels: sqrt(sum over its channels of sum_t x_tc^2).

Decoder layer ``l``: block influence (ShortGPT, Men et al. 2024), the mean over tokens of
``1 - cos(h_in, h_out)`` between the block's input and output hidden states; a layer that barely turns its
input matters little.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch

from ..calibration import ChannelStats

NEURON_METRICS = ("l2", "mean_abs", "variance", "near_zero", "combined", "wanda")
COMBINED_PARTS = ("l2", "mean_abs", "variance", "near_zero")


def l2(stats: ChannelStats) -> torch.Tensor:
    return stats.sum_sq.sqrt()


def mean_abs(stats: ChannelStats) -> torch.Tensor:
    return stats.mean_abs


def variance(stats: ChannelStats) -> torch.Tensor:
    return stats.variance


def near_zero(stats: ChannelStats) -> torch.Tensor:
    return 1.0 - stats.near_zero_fraction


def combined(stats: ChannelStats, weights: Optional[Mapping[str, float]] = None) -> torch.Tensor:
    weights = dict.fromkeys(COMBINED_PARTS, 1.0) if weights is None else weights
    total = torch.zeros_like(stats.sum_sq)
    for name, w in weights.items():
        if w:
            m = _SIMPLE[name](stats)
            total += w * m / m.mean().clamp(min=torch.finfo(m.dtype).tiny)
    return total


def wanda(stats: ChannelStats, out_in_weight: torch.Tensor) -> torch.Tensor:
    """``out_in_weight``: the output projection's weight as (out_features, neurons)."""
    return out_in_weight.detach().abs().to(torch.float64).sum(dim=0) * l2(stats)


_SIMPLE = {"l2": l2, "mean_abs": mean_abs, "variance": variance, "near_zero": near_zero}


def neuron_importance(metric: str, stats: ChannelStats, out_in_weight: torch.Tensor,
                      weights: Optional[Mapping[str, float]] = None) -> torch.Tensor:
    """Importance of every neuron of one layer by ``metric`` (one of :data:`NEURON_METRICS`)."""
    if metric == "combined":
        return combined(stats, weights)
    if metric == "wanda":
        return wanda(stats, out_in_weight)
    return _SIMPLE[metric](stats)


def head_group_importance(sum_sq: torch.Tensor, group_channels: int) -> torch.Tensor:
    """L2 norm of each head group's attention output: ``sum_sq`` (per o_proj input channel, sum over tokens
    of x^2) summed over each group's ``group_channels`` consecutive channels, then the square root."""
    return sum_sq.reshape(-1, group_channels).sum(dim=1).sqrt()


def block_influence_terms(h_in: torch.Tensor, h_out: torch.Tensor, tokens: Optional[torch.Tensor] = None) -> tuple[float, int]:
    """(sum over tokens of 1 - cos(h_in, h_out), number of tokens) of one batch; ``tokens`` (bool, the
    batch's shape without the hidden dimension) leaves out padding. Block influence = the ratio of the sums."""
    a, b = h_in.to(torch.float64), h_out.to(torch.float64)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-12)
    one_minus = 1.0 - cos
    if tokens is not None:
        one_minus = one_minus[tokens.to(one_minus.device)]
    return float(one_minus.sum()), int(one_minus.numel())


def block_influence(h_in: torch.Tensor, h_out: torch.Tensor, tokens: Optional[torch.Tensor] = None) -> float:
    """Mean over tokens of 1 - cos(h_in, h_out)."""
    total, count = block_influence_terms(h_in, h_out, tokens)
    return total / max(count, 1)
