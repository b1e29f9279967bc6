"""Masks that training chooses: learned N:M masks (MaskLLM) and dynamic straight-through masks (SR-STE).

Pure torch, no Lightning. The callback strategies in ``gradprune.callbacks.mask_modes`` decide when these run.

**Learned N:M masks** (Fang et al., MaskLLM, NeurIPS 2024). Every group of ``m`` consecutive input weights of an
output row has one logit per candidate keep-pattern: the ``C(m, m - n)`` ways of keeping ``m - n`` of the ``m``
weights (this library's "N:M" prunes ``n`` of every ``m``; 6 candidates for 2:4, 70 for 4:8). A training forward
samples each group's candidate with Gumbel-softmax::

    y = softmax((scale * logits + g) / temperature),  g ~ Gumbel(0, 1)
    mask = y @ candidates                  (soft), or the one-hot argmax of y with y's gradient (hard)

so the loss gradient reaches the logits, and the masked weight ``W * mask`` is what the layer computes with.
A layer's logits are stored candidate-first, ``(C, out, in // m)``: the softmax and the argmax over the
candidates then run over the outer axis, several times faster on CPU than over a last axis of 6 entries.
Logits start from a prior keep-mask: candidate ``c`` gets ``strength * overlap(c, prior)``, where ``overlap`` is
the fraction of the prior's kept weights in the group that ``c`` keeps too (1 for the prior's own pattern).
An infinite strength never leaves the prior. The final mask is the argmax candidate of every group
(:func:`hard_mask`): exactly N:M. Memory while learning: ``C / m`` float32 logits per weight (1.5 for 2:4,
8.75 for 4:8) plus the gradient and two Adam moments of each: 24 bytes per weight for 2:4.

**Dynamic masks** (Zhou et al., SR-STE, ICLR 2021). Dense weights are kept; the forward uses ``W * M`` while the
gradient reaches every weight straight through (:func:`straight_through`), and pruned weights get an extra decay
``decay * (1 - M) * W`` (:func:`sr_decay_`). The mask is chosen again every few steps by the callback (any
pattern and scope of :func:`gradprune.select_masks`); memory: the bool mask, one byte per weight.

:class:`MaskedForward` makes a Linear (or a GPT-2 Conv1D) compute with a masked weight that a function returns,
without re-parametrising the module: state dict keys, the optimizer's parameters and exports are untouched.
"""
from __future__ import annotations

import itertools
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .targets import Target


def nm_candidates(n: int, m: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """Every keep-pattern of an N:M group that prunes ``n`` of ``m`` weights: bool ``(C(m, n), m)``, rows in
    lexicographic order of the kept positions."""
    if not 0 < n < m:
        raise ValueError(f"an N:M pattern needs 0 < N < M, got N={n}, M={m}")
    rows = [[i in kept for i in range(m)] for kept in itertools.combinations(range(m), m - n)]
    return torch.tensor(rows, dtype=torch.bool, device=device)


def groups(target: Target, tensor: torch.Tensor, m: int) -> torch.Tensor:
    """A tensor shaped like ``target``'s stored weight as ``(out, in // m, m)`` groups of consecutive inputs."""
    view = target.out_in(tensor)
    return view.reshape(view.shape[0], view.shape[1] // m, m)


def ungroup(target: Target, grouped: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`groups`: back to the stored weight's layout."""
    return target.stored(grouped.reshape(grouped.shape[0], -1))


def prior_logits(keep: torch.Tensor, candidates: torch.Tensor, strength: float) -> torch.Tensor:
    """Logits ``(C, ...)`` from grouped prior keep-masks ``(..., m)``: ``strength`` times the fraction of the
    prior's kept weights in the group that each candidate keeps (the prior's own pattern gets ``strength``)."""
    kept = keep.float()
    overlap = kept @ candidates.float().t()  # (..., C): kept weights shared with each candidate
    share = strength * overlap / kept.sum(dim=-1, keepdim=True).clamp(min=1.0)
    return share.movedim(-1, 0).contiguous()


def best_candidate(logits: torch.Tensor) -> torch.Tensor:
    """Index (int32) of every group's highest logit over the candidate axis (dim 0), the first one on ties:
    what ``logits.argmax(dim=0)`` gives, in a few elementwise passes (an argmax over the outer axis is many
    times slower on CPU)."""
    best = logits.amax(dim=0)
    index = torch.full(logits.shape[1:], logits.shape[0] - 1, dtype=torch.int32, device=logits.device)
    hit = torch.empty(logits.shape[1:], dtype=torch.bool, device=logits.device)
    for c in range(logits.shape[0] - 2, -1, -1):  # downwards, so that the first of tied candidates is written last
        index.masked_fill_(torch.eq(logits[c], best, out=hit), c)
    return index


def pick(candidates: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The candidate rows that ``index`` names: ``(*index.shape, m)``."""
    return candidates.index_select(0, index.reshape(-1)).reshape(*index.shape, candidates.shape[1])


def hard_mask(logits: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Grouped bool keep-masks ``(..., m)`` from logits ``(C, ...)``: every group's highest-logit candidate (the
    first one on ties)."""
    return pick(candidates, best_candidate(logits))


def minus_gumbel_noise(shape: torch.Size, generator: Optional[torch.Generator], device: torch.device,
                       dtype: torch.dtype) -> torch.Tensor:
    """Minus standard Gumbel noise, ``log(-log u)`` for ``u ~ U(0, 1)``, in four passes over the tensor. A draw
    of ``u = 0`` (about once in 2**24 in float32) gives ``+inf``: that candidate's ``z`` is ``-inf``, it cannot
    win the group and gets no softmax weight, as a Gumbel draw of ``-inf`` would."""
    noise = torch.rand(shape, generator=generator, device=device, dtype=dtype)
    return noise.log_().neg_().log_()


class _HardGumbel(torch.autograd.Function):
    """Every group's sampled candidate as its exact mask, with the soft sample's gradient (straight through).

    Forward: ``z = (scale * logits + g) / temperature`` (in the memory of ``minus_g``, which it consumes),
    ``y = softmax(z)`` over the candidates, the mask is the candidate of ``argmax z``. Backward: the mask's
    gradient reaches ``y`` through the candidate table (as if the mask were ``y @ candidates``), then the
    softmax: ``dz = y * (dy - <y, dy>)``, with ``scale / temperature`` folded into the table. Only ``y`` is held
    for the backward: C floats per group.
    """

    @staticmethod
    def forward(ctx, logits, minus_g, candidates, scale, temperature):
        z = minus_g.sub_(logits, alpha=scale).div_(-temperature)
        y = torch.softmax(z, dim=0)
        ctx.save_for_backward(y, candidates)
        ctx.factor = scale / temperature
        return pick(candidates, best_candidate(z))

    @staticmethod
    def backward(ctx, grad_mask):
        y, candidates = ctx.saved_tensors
        m = candidates.shape[1]
        grad_z = ((candidates * ctx.factor) @ grad_mask.reshape(-1, m).t()).reshape(y.shape)  # factor * dy: (C, groups)
        inner = (y * grad_z).sum(dim=0, keepdim=True)
        return grad_z.sub_(inner).mul_(y), None, None, None, None  # factor * y * (dy - <y, dy>)


def sample_mask(logits: torch.Tensor, candidates: torch.Tensor, temperature: float, scale: float, hard: bool,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One Gumbel-softmax draw of grouped float masks ``(..., m)`` from logits ``(C, ...)``, differentiable in the
    logits. ``hard``: every group's mask is its sampled candidate exactly (straight-through gradient); else the
    soft mask ``softmax(z) @ candidates``."""
    minus_g = minus_gumbel_noise(logits.shape, generator, logits.device, logits.dtype)
    table = candidates.to(logits.dtype)
    if hard:
        return _HardGumbel.apply(logits, minus_g, table, float(scale), float(temperature))
    y = torch.softmax((scale * logits - minus_g) / temperature, dim=0)
    return (y.reshape(y.shape[0], -1).t() @ table).reshape(*logits.shape[1:], table.shape[1])


def straight_through(weight: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``weight * keep`` in the forward, with the identity as gradient to every weight (SR-STE's estimator)."""
    return weight - (weight * ~keep).detach()


def sr_decay_(weight: torch.Tensor, keep: torch.Tensor, decay: float) -> None:
    """Add SR-STE's decay of the pruned weights to their gradient in place: ``grad += decay * (1 - M) * W``."""
    if weight.grad is not None and decay:
        weight.grad.add_(weight.detach() * ~keep, alpha=decay)


def linear_anneal(start: float, end: float, progress: float) -> float:
    """``start`` at progress 0 to ``end`` at progress 1, linearly (progress clipped to [0, 1])."""
    progress = min(max(progress, 0.0), 1.0)
    return start + (end - start) * progress


def flip_fraction(old: torch.Tensor, new: torch.Tensor) -> float:
    """Fraction of mask positions that differ between two bool masks."""
    return float((old != new).sum()) / max(old.numel(), 1)


class MaskedForward:
    """Make target modules compute with ``masked(target)`` in place of their weight, until :meth:`remove`.

    The module's ``forward`` is replaced on the instance (a Linear, or a GPT-2 Conv1D: ``x @ W + b``); the
    parameter stays where it is, so the optimizer, DDP, state dicts and exports see the dense weight.
    """

    def __init__(self, targets: list[Target], masked: Callable[[Target], torch.Tensor]) -> None:
        self._patched: list[nn.Module] = []
        for t in targets:
            module = t.module
            if isinstance(module, nn.Linear):
                module.forward = _linear_forward(module, t, masked)
            elif hasattr(module, "nf") and module.weight.dim() == 2:  # transformers' Conv1D
                module.forward = _conv1d_forward(module, t, masked)
            else:
                self.remove()
                raise TypeError(f"learned and dynamic masks need Linear or Conv1D targets, {t.name!r} is "
                                f"{type(module).__name__}")
            self._patched.append(module)

    def remove(self) -> None:
        for module in self._patched:
            module.__dict__.pop("forward", None)
        self._patched = []

    @property
    def active(self) -> bool:
        return bool(self._patched)


def _linear_forward(module: nn.Linear, target: Target, masked: Callable[[Target], torch.Tensor]):
    def forward(x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, masked(target), module.bias)
    return forward


def _conv1d_forward(module: nn.Module, target: Target, masked: Callable[[Target], torch.Tensor]):
    def forward(x: torch.Tensor) -> torch.Tensor:
        out = torch.addmm(module.bias, x.reshape(-1, x.shape[-1]), masked(target))
        return out.reshape(*x.shape[:-1], module.nf)
    return forward


def logits_bytes_per_weight(n: int, m: int) -> float:
    """Learned-mask memory per targeted weight while learning: float32 logits, their gradient and two Adam
    moments (4 x 4 bytes per logit, ``C(m, n) / m`` logits per weight)."""
    return 16.0 * math.comb(m, n) / m
