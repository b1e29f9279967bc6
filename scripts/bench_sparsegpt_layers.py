#!/usr/bin/env python
"""SparseGPT's pruning step alone on the seven layer shapes of one SmolLM2-135M block (q 576x576, k and v
192x576, o 576x576, gate and up 1536x576, down 576x1536), with Hessians of random tokens: the damped inverse
by the reference's three steps (Cholesky, cholesky_inverse, Cholesky) against gradprune's one Cholesky and one
triangular inverse, and a whole block pruned unstructured, 2:4 and 4:8 (one inverse per shared input, as
prune_oneshot does). Repetitions are interleaved; the table gives the median seconds.

    OMP_NUM_THREADS=1 python scripts/bench_sparsegpt_layers.py --threads 1 --reps 5
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gradprune.methods.sparsegpt import inverse_hessian_factor, prepare_hessian, sparsegpt_prune  # noqa: E402

LAYERS = [("q", 576, 576, "attn"), ("k", 192, 576, "attn"), ("v", 192, 576, "attn"), ("o", 576, 576, "o"),
          ("gate", 1536, 576, "mlp"), ("up", 1536, 576, "mlp"), ("down", 576, 1536, "down")]


def three_step(h: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    h = h + percdamp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--tokens", type=int, default=4096)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)

    def hessian(n: int) -> torch.Tensor:
        x = torch.randn(args.tokens, n, generator=g)
        return (2 / args.tokens * x.t() @ x).double()

    hessians = {"attn": hessian(576), "o": hessian(576), "mlp": hessian(576), "down": hessian(1536)}
    weights = [torch.randn(rows, cols, generator=g) for _, rows, cols, _ in LAYERS]

    def block(nm, sparsity):
        def run():
            last = None
            for w, (_, _, _, key) in zip(weights, LAYERS):
                if last is None or last[0] != key:
                    last = (key, prepare_hessian(hessians[key], 0.01))
                sparsegpt_prune(w, hessians[key], sparsity, nm, prepared=last[1])
        return run

    cases = {
        "inverse 1536, three steps": lambda: three_step(hessians["down"]),
        "inverse 1536, one Cholesky": lambda: inverse_hessian_factor(hessians["down"], 0.01),
        "inverse 576, three steps": lambda: three_step(hessians["o"]),
        "inverse 576, one Cholesky": lambda: inverse_hessian_factor(hessians["o"], 0.01),
        "block, 50% unstructured": block(None, 0.5),
        "block, 2:4": block((2, 4), 0.5),
        "block, 4:8": block((4, 8), 0.5),
    }
    times: dict = {name: [] for name in cases}
    for _ in range(args.reps):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    print(f"torch threads: {torch.get_num_threads()}, {args.reps} interleaved repetitions")
    print("| step | median (s) | min..max (s) |")
    print("|---|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts):.3f} | {min(ts):.3f}..{max(ts):.3f} |")


if __name__ == "__main__":
    main()
