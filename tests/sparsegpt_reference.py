"""SparseGPT's reference algorithm (Frantar & Alistarh 2023, Algorithm 1, and the authors' ``fasterprune``),
transcribed for the tests: one layer, given its Hessian.

The reference, step by step:

- the Hessian is the running mean ``H = 2/n X X^T`` (``add_batch`` rescales the float32 sum by
  ``n_old / n_new`` before adding each batch, so ``n`` counts batch items, not tokens: a constant factor,
  which the relative damping cancels);
- dead inputs (``H_jj == 0``) get ``H_jj = 1`` and their weight column is zeroed;
- ``damp = percdamp * mean(diag H)`` is added to the diagonal; ``Hinv`` is the upper Cholesky factor of
  ``(H + damp I)^-1`` (Cholesky, ``cholesky_inverse``, Cholesky again, upper);
- the columns are processed in blocks of ``blocksize``. Unstructured: at the start of each block the mask
  of the whole block is chosen from ``w^2 / diag(Hinv1)^2`` (the reference prunes every score ``<=`` the
  order statistic of index ``int(numel * s)``, i.e. ``int(numel * s) + 1`` weights per block). N:M: at
  column ``i`` with ``i % M == 0`` the N lowest scores of each row among columns ``i..i+M-1`` are chosen,
  on the weights *as updated by the errors of the earlier columns of the block*;
- column ``i``: ``q = w`` with the masked entries zeroed, ``err = (w - q) / Hinv[i, i]``, and
  ``W1[:, i:] -= err Hinv1[i, i:]``; at the end of a block the block's errors update every later column,
  ``W[:, i2:] -= Err1 Hinv[i1:i2, i2:]``.

Two knobs, both off by default:

- ``exact_count``: gradprune prunes exactly the layer's count (cumulative over the blocks, rounded half up)
  instead of the reference's one extra weight per block; with a block count ``numel * s`` that is an integer
  the reference's rule with ``exact_count`` prunes the same number in each block as gradprune.
- ``inverse_dtype``: the reference inverts in the Hessian's dtype (float32); gradprune inverts in float64
  and runs the column loop in float32. Pass float64 to take the same inverse as gradprune.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

import torch


def reference_hessian(batches: Iterable[torch.Tensor]) -> torch.Tensor:
    """The reference's float32 running mean ``2/n X X^T`` over batches of (batch, tokens, in) inputs."""
    H, nsamples = None, 0
    for inp in batches:
        if inp.dim() == 2:
            inp = inp.unsqueeze(0)
        added = inp.shape[0]
        x = inp.reshape(-1, inp.shape[-1]).t().float()
        if H is None:
            H = torch.zeros(x.shape[0], x.shape[0])
        H *= nsamples / (nsamples + added)
        nsamples += added
        x = math.sqrt(2 / nsamples) * x
        H += x @ x.t()
    return H


def reference_inverse_factor(H: torch.Tensor, percdamp: float, dtype: torch.dtype) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + percdamp * mean(diag H) I)^-1``, computed in ``dtype``."""
    H = H.to(dtype).clone()
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(H.shape[0])
    H[diag, diag] += damp
    L = torch.linalg.cholesky(H)
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)


def reference_sparsegpt(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, prunen: int = 0, prunem: int = 0,
                        blocksize: int = 128, percdamp: float = 0.01, exact_count: bool = False,
                        inverse_dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer by the reference algorithm. Returns (float32 updated weight, keep-mask: True = kept)."""
    W = weight.detach().float().clone()
    rows, columns = W.shape
    H = hessian.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    Hinv = reference_inverse_factor(H, percdamp, inverse_dtype or H.dtype).float()
    pruned = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        if prunen == 0:
            tmp = W1 ** 2 / d.reshape(1, -1) ** 2
            k = int(tmp.numel() * sparsity)
            thresh = torch.sort(tmp.flatten())[0][k - 1 if exact_count else k]
            mask1 = tmp <= thresh
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            w = W1[:, i]
            if prunen != 0 and i % prunem == 0:
                tmp = W1[:, i:i + prunem] ** 2 / d[i:i + prunem].reshape(1, -1) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err1.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        pruned[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W, ~pruned
