"""SparseGPT (Frantar & Alistarh 2023): OBS pruning of one weight matrix with its Hessian
``H = 2/n X X^T`` (damping, dead inputs, Cholesky inverse, column blocks, error compensation). It changes
the kept weights, so it gives ``prune`` rather than a score."""
from __future__ import annotations

import logging
import math
from typing import Any, Mapping, MutableMapping, Optional, Sequence

import torch
from tqdm.auto import tqdm

from ..calibration import HessianStats
from ..kselect import drop_lowest, drop_lowest_per_row
from ..selection import exact_count
from ..targets import Target
from ..validation import Problems, check_choice, is_int
from .base import HESSIAN_DTYPES, NM, Job, Method

log = logging.getLogger(__name__)


def inverse_hessian_factor(hessian: torch.Tensor, percdamp: float, max_tries: int = 6) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + damp I)^-1`` (``(H + damp I)^-1 = U^T U``) with
    ``damp = percdamp * mean(diag H)``, in float64.

    One Cholesky factorisation and one triangular inverse, where the reference takes three factorisation-sized
    steps (Cholesky, ``cholesky_inverse``, Cholesky of the inverse): with ``J`` the reversal of the index order,
    ``J (H + damp I) J = L L^T`` gives ``(H + damp I)^-1 = (J L^-T J)(J L^-1 J)``, and ``J L^-1 J`` is upper
    triangular with a positive diagonal, so it is ``U``: the same factor to float64 rounding, in two steps instead
    of three (about 14% faster at 1536 x 1536 on one CPU thread).

    If H is not positive definite (too few calibration tokens, float error), the damping grows tenfold
    per retry, with a warning."""
    h = hessian.to(torch.float64).flip(0, 1)
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    mean_diag = float(h.diagonal().mean())
    damp = percdamp * mean_diag if percdamp > 0 else 0.0
    for attempt in range(max_tries):
        lower, info = torch.linalg.cholesky_ex(h + damp * eye)
        if int(info) == 0:
            return torch.linalg.solve_triangular(lower, eye, upper=False).flip(0, 1)
        new_damp = max(damp * 10, 1e-8 * max(mean_diag, 1.0))
        log.warning("Hessian not positive definite with damping %.3g; retrying with %.3g", damp, new_damp)
        damp = new_damp
    raise RuntimeError(f"Hessian is not positive definite even with damping {damp:.3g}")


def prepare_hessian(hessian: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """What SparseGPT needs of a layer's Hessian: (dead inputs ``H_jj == 0``, float32 upper factor of the
    damped inverse with ``H_jj = 1`` at the dead inputs). Layers that read one input (q/k/v, gate/up) have one
    Hessian, so one preparation serves them all (:func:`prune_sparsegpt`)."""
    H = hessian.to(torch.float64).clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    return dead, inverse_hessian_factor(H, percdamp).to(torch.float32)


def block_count(share: int, pruned_before: int, room: int) -> int:
    """How many weights one column block prunes: its ``share`` of the layer's count so far, but never
    fewer than the block had pruned before (masks only grow) and never so many that the later blocks could
    not keep theirs (``room`` = the layer's count minus what is done and what later blocks had pruned). With
    ``room >= pruned_before`` (true while earlier blocks obey the same rule) the layer ends exactly at its count."""
    return max(pruned_before, min(share, room))


def nm_selector(n: int, m: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, base)`` that turn the pairwise comparisons of a group's ``m`` scores into ``n - rank``: with
    ``le[j, k] = [s_k <= s_j]`` (flattened to ``m * m`` rows, one column per weight row),
    ``base + A @ le`` is ``n`` minus each score's rank in the order of a stable sort (ties to the lower column).

    The rank of ``s_j`` is the number of scores before it: ``s_k <= s_j`` for ``k < j`` and ``s_k < s_j`` for
    ``k > j``, which is ``1 - le[k, j]`` (no NaN; NaN weights give a non-finite layer, which
    :func:`prune_sparsegpt` refuses). So ``rank_j = sum_{k<j} le[j, k] - sum_{k>j} le[k, j] + (m - 1 - j)``, a fixed
    linear map of ``le``: exact in float32, since every term is a small integer."""
    a = torch.zeros(m, m, m)
    for j in range(m):
        a[j, j, :j] = -1.0  # -le[j, k], k < j
        a[j, j + 1:, j] = 1.0  # +le[k, j], k > j
    base = n - (m - 1) + torch.arange(m, dtype=torch.float32)
    return a.reshape(m, m * m).to(device), base.unsqueeze(1).to(device)


class NMWorkspace:
    """The buffers of :func:`nm_block`, allocated once per layer (every block reuses them) and sized for the
    widest block, and the rank maps of :func:`nm_selector`, built once per group width."""

    def __init__(self, nm: tuple[int, int], blocksize: int, rows: int, like: torch.Tensor):
        self.n, self.m = nm
        empty = dict(dtype=like.dtype, device=like.device)
        self.chosen = torch.empty(blocksize, rows, **empty)  # 1.0 where pruned, 0.0 where kept
        self.scale = torch.empty(blocksize, rows, **empty)  # chosen / d: each column's error per pruned weight
        self.scores = torch.empty(self.m, rows, **empty)
        self.pairs = torch.empty(self.m * self.m * rows, **empty)
        self.passing = torch.empty(self.m, rows, **empty)
        self.selectors: dict = {}  # group width -> nm_selector's pair

    def selector(self, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        if m not in self.selectors:
            self.selectors[m] = nm_selector(self.n, m, self.chosen.device)
        return self.selectors[m]


def nm_block(W1: torch.Tensor, Hinv1: torch.Tensor, Err1: torch.Tensor, keep1_before: Optional[torch.Tensor],
             work: NMWorkspace) -> torch.Tensor:
    """The N:M column loop of one block, in the transposed layout (``W1[i]`` is column ``i``), one group of M
    columns at a time. Fills ``Err1`` (each column's pruned weights over ``Hinv1[i, i]``), leaves ``W1`` with the
    block's updated weights (pruned ones not yet zeroed) and returns the block's pruned mask, transposed.

    The same arithmetic as the column-by-column loop, in a few operations per group instead of a few per column
    plus a sort per group:

    - the group's mask is chosen from ``w^2 / d^2`` of its columns as the earlier groups have updated them, each
      row's N lowest with ties to the lower column, by ranking the scores with their pairwise comparisons
      (:func:`nm_selector`: one comparison, one matrix product);
    - the errors of the group's columns, which the column loop gets one column at a time
      (``e_j = s_j (w_j - sum_{k<j} Hinv1[k, j] e_k)`` with ``s_j = pruned / d_j``), are that recursion run on the
      whole group at once: only pruned columns have an error, a row has N of them in a group, so N passes of
      ``e = s (w - U^T e)`` (``U`` the group's strictly upper part of ``Hinv1``) reach the column loop's values;
    - the group's errors update its own and the block's later columns in one rank-M product, as the column loop's
      M rank-1 updates do.

    Only the order of float roundings in the sums differs from the column loop."""
    width, rows = W1.shape
    n, m_full = work.n, work.m
    d = Hinv1.diagonal().unsqueeze(1)
    inv_d2 = d.square().reciprocal()
    inv_d = d.reciprocal()  # chosen * inv_d is chosen / d exactly: its values are 0 and 1
    strict_t = Hinv1.triu(1).t() if n > 1 else None  # strict_t[j, k] = Hinv1[k, j], k < j: earlier columns' effect
    for a in range(0, width, m_full):
        b = min(a + m_full, width)
        m = b - a
        select, base = work.selector(m)
        w, chosen, scale, err = W1[a:b], work.chosen[a:b], work.scale[a:b], Err1[a:b]
        s = torch.square(w, out=work.scores[:m]).mul_(inv_d2[a:b])
        if keep1_before is not None:
            s.masked_fill_(~keep1_before[a:b], float("-inf"))  # weights an earlier mask pruned go first
        le = torch.le(s.unsqueeze(0), s.unsqueeze(1), out=work.pairs[:m * m * rows].view(m, m, rows))  # [s_k <= s_j]
        # n - rank, clamped to 0..1: 1 for the n lowest of each row
        torch.addmm(base, select, le.view(m * m, rows), out=chosen).clamp_(0.0, 1.0)
        torch.mul(chosen, inv_d[a:b], out=scale)
        torch.mul(w, scale, out=err)
        if n > 1:
            passing, lower = work.passing[:m], strict_t[a:b, a:b]
            for _ in range(min(n, m) - 1):
                torch.mul(torch.addmm(w, lower, err, alpha=-1, out=passing), scale, out=err)
        W1[a:].addmm_(Hinv1[a:b, a:].t(), err, alpha=-1)  # W1[:, a:] -= err Hinv1[a:b, a:], in the transposed layout
    return work.chosen[:width] != 0


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    nm: Optional[tuple[int, int]] = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    keep: Optional[torch.Tensor] = None,
    prepared: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT on one (out, in) weight with its Hessian (in, in). Returns (new float32 weight, keep-mask).

    Dead inputs (``H_jj == 0``) get ``H_jj = 1`` and ``W[:, j] = 0``. Columns are processed in blocks of
    ``blocksize``. Unstructured: at the start of each block the lowest ``w^2 / diag(H^-1)^2`` are pruned,
    as many as keep the count up to that block exact (``exact_count(s, out * columns so far)``), so the
    layer ends at exactly ``exact_count(s, out * in)``. N:M: at the start of each group of M columns the
    N lowest of every row are pruned. Weights outside ``keep`` (the current keep-mask, if any) are pruned
    first, and a block never prunes fewer than it had (:func:`block_count`), so masks only grow and the
    count stays exact even when the earlier mask is spread unevenly over the blocks. After each column the
    error is spread over the remaining columns: ``W[:, j:] -= (w - q) / Hinv[i, i] * Hinv[i, j:]``.
    ``prepared`` is :func:`prepare_hessian` of ``hessian`` if the caller has it already.

    Every N:M pattern takes the same path, the reference's: a group's mask is chosen when the loop reaches
    the group's first column, on the weights as the errors of the earlier columns have updated them
    (:func:`nm_block` does that a group at a time, with the column loop's results).
    """
    W = weight.detach().to(torch.float32).clone(memory_format=torch.contiguous_format)
    rows, columns = W.shape
    dead, hinv = prepared if prepared is not None else prepare_hessian(hessian, percdamp)
    W[:, dead] = 0.0
    kept = torch.ones_like(W, dtype=torch.bool)
    keep_before = keep.to(W.device) if keep is not None else None

    def block_scores(w: torch.Tensor, d: torch.Tensor, cols: slice) -> torch.Tensor:
        scores = (w.square() / d.square().unsqueeze(0)).contiguous()
        if keep_before is not None:
            scores.masked_fill_(~keep_before[:, cols], float("-inf"))
        return scores

    done, total = 0, exact_count(sparsity, rows * columns)
    work = NMWorkspace(nm, min(blocksize, columns), rows, W) if nm is not None else None
    # pruned before, per column block: each block prunes at least these, so masks only grow
    before = ([0] * -(-columns // blocksize) if keep_before is None else
              [int((~keep_before[:, i:i + blocksize]).sum()) for i in range(0, columns, blocksize)])
    for b, i1 in enumerate(range(0, columns, blocksize)):
        i2 = min(i1 + blocksize, columns)
        # the block transposed, so that column i is the contiguous row W1[i] and the update of the columns after
        # it is one contiguous rank-1 update (unstructured: two operations per column; N:M: see nm_block)
        W1 = W[:, i1:i2].t().contiguous()
        Err1 = torch.empty_like(W1)  # Err1[i]: column i's pruned weights over Hinv1[i, i], 0 where kept
        Hinv1 = hinv[i1:i2, i1:i2]
        d = Hinv1.diagonal()
        if nm is None:
            k = block_count(exact_count(sparsity, rows * i2) - done, before[b], total - done - sum(before[b + 1:]))
            pruned1 = ~drop_lowest(block_scores(W1.t(), d, slice(i1, i2)), k).t()
            scale = pruned1 / d.unsqueeze(1)
            for i in range(i2 - i1):
                err = torch.mul(W1[i], scale[i], out=Err1[i])
                W1[i:].addr_(Hinv1[i, i:], err, alpha=-1)  # W1[:, i:] -= err Hinv1[i, i:], in the transposed layout
        else:
            keep1_before = None if keep_before is None else keep_before[:, i1:i2].t()
            pruned1 = nm_block(W1, Hinv1, Err1, keep1_before, work)
        keep1 = ~pruned1.t()
        W[:, i1:i2] = W1.t().masked_fill(~keep1, 0.0)
        W[:, i2:].addmm_(Err1.t(), hinv[i1:i2, i2:], alpha=-1)
        kept[:, i1:i2] = keep1
        done += keep1.numel() - int(keep1.count_nonzero())
    return W, kept


def prune_sparsegpt(job: Job, targets: Sequence[Target], stats: MutableMapping[str, HessianStats]) -> None:
    """:func:`sparsegpt_prune` each target in turn: new weights, keep-masks into the registry; each
    Hessian is freed as soon as it is used."""
    current = job.registry.current(targets)
    last: Optional[tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = None  # (Hessian, its preparation)
    for t in tqdm(targets, desc="sparsegpt layers", leave=False, disable=job.hide_progress):
        # a layer budget k gives sparsity k / numel, which exact_count turns back into exactly k
        sparsity = job.sparsity if job.counts is None else job.counts[t.name] / t.numel
        hessian = stats[t.name].hessian()
        if last is None or last[0].shape != hessian.shape or not torch.equal(last[0], hessian):
            last = (hessian, prepare_hessian(hessian, job.options["percdamp"]))  # q/k/v (gate/up) share one
        new_weight, keep = sparsegpt_prune(
            t.out_in(t.weight), hessian, sparsity, job.nm, job.options["blocksize"],
            job.options["percdamp"], t.out_in(current[t.name]) if t.name in current else None, prepared=last[1],
        )
        if not bool(torch.isfinite(new_weight).all()):  # checked before this layer changes: NaN must not spread
            raise ValueError(
                f"SparseGPT produced non-finite weights for {t.name!r} (from non-finite calibration activations or "
                f"Hessian); this layer was left unchanged. Check the model's weights and the calibration data"
            )
        with torch.no_grad():
            t.weight.copy_(t.stored(new_weight).to(t.weight.dtype))
        job.registry.update([t], {t.name: t.stored(keep).contiguous()})
        del stats[t.name]


def _check(problems: Problems, options: Mapping[str, Any], nm: NM, pattern: str) -> None:
    blocksize, percdamp = options["blocksize"], options["percdamp"]
    blocksize_ok = is_int(blocksize) and blocksize >= 1
    if not blocksize_ok:
        problems.add(f"blocksize must be a positive int, got {blocksize!r}")
    if not isinstance(percdamp, (int, float)) or isinstance(percdamp, bool) or not 0 <= percdamp < math.inf:
        problems.add(f"percdamp must be a number >= 0, got {percdamp!r}")
    check_choice(problems, "hessian_dtype", options["hessian_dtype"], list(HESSIAN_DTYPES))
    if nm is not None and isinstance(blocksize, int) and blocksize % nm[1]:
        problems.add(f"blocksize {blocksize} must be a multiple of M={nm[1]} for pattern {pattern!r}")


def sparsegpt_train_prune(target: Target, hessian: torch.Tensor, count: int, keep: Optional[torch.Tensor]) -> tuple:
    """The train-time rule: :func:`sparsegpt_prune` of one target to exactly ``count`` pruned weights
    (monotone with ``keep``), from a training window's Hessian; (new weight, keep-mask), stored layout."""
    # a count k is sparsity k / numel, which the exact rounding turns back into exactly k
    weight, kept = sparsegpt_prune(target.out_in(target.weight), hessian, count / target.numel,
                                   keep=None if keep is None else target.out_in(keep))
    return target.stored(weight), target.stored(kept).contiguous()


SPARSEGPT = Method(
    "sparsegpt", statistics="hessian", options={"blocksize": 128, "percdamp": 0.01, "hessian_dtype": "float32"},
    prune=prune_sparsegpt, check=_check, changes_weights=True, train_prune=sparsegpt_train_prune,
)
