#!/usr/bin/env python
"""SparseGPT's pruning step alone on the layer shapes of one SmolLM2-135M block (q 576x576, k and v 192x576,
o 576x576, gate and up 1536x576, down 576x1536), with Hessians of random tokens: unstructured 50%, 2:4 and 4:8
per layer shape (the column loop alone, its inverse prepared beforehand) and for a whole block (the seven layers,
one inverse per shared input, as prune_oneshot does), and the damped inverse by the reference's three steps
(Cholesky, cholesky_inverse, Cholesky) against gradprune's one Cholesky and one triangular inverse.

Repetitions are interleaved in one process; the tables give the median seconds and, for N:M, the median over
the repetitions of each repetition's N:M / unstructured ratio (a ratio of runs a few seconds apart, so a load
that changes slowly cancels). ``--against REV`` also times ``gradprune/methods/sparsegpt.py`` as it was at
git revision REV, interleaved with the current one, for a before/after comparison in one process.

    nice -n 19 python scripts/bench_sparsegpt_layers.py --threads 1 --reps 7 --against <rev>
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gradprune.methods import sparsegpt as current  # noqa: E402
from gradprune.methods.sparsegpt import inverse_hessian_factor  # noqa: E402

LAYERS = [("q", 576, 576, "attn"), ("k", 192, 576, "attn"), ("v", 192, 576, "attn"), ("o", 576, 576, "o"),
          ("gate", 1536, 576, "mlp"), ("up", 1536, 576, "mlp"), ("down", 576, 1536, "down")]
SHAPES = [("q, o", 576, 576, "o"), ("k, v", 192, 576, "attn"), ("gate, up", 1536, 576, "mlp"),
          ("down", 576, 1536, "down")]
PATTERNS = [("unstructured", None), ("2:4", (2, 4)), ("4:8", (4, 8))]


def three_step(h: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    h = h + percdamp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


def module_at(rev: str):
    """gradprune/methods/sparsegpt.py as it was at git revision ``rev``, imported beside the current one (it
    imports the rest of the package as it is now)."""
    source = subprocess.run(["git", "show", f"{rev}:gradprune/methods/sparsegpt.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "sparsegpt_at_rev.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("gradprune.methods._sparsegpt_at_rev", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# over 60 lines: one benchmark read top to bottom (inputs, interleaved cases, timings, tables) sharing args
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--against", metavar="REV", default=None,
                   help="also time sparsegpt.py at this git revision, interleaved (labelled 'before')")
    p.add_argument("--no-inverse", action="store_true", help="skip the inverse timings")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)

    def hessian(n: int) -> torch.Tensor:
        x = torch.randn(args.tokens, n, generator=g)
        return (2 / args.tokens * x.t() @ x).double()

    hessians = {"attn": hessian(576), "o": hessian(576), "mlp": hessian(576), "down": hessian(1536)}
    weights = [torch.randn(rows, cols, generator=g) for _, rows, cols, _ in LAYERS]
    shape_weights = {name: torch.randn(rows, cols, generator=g) for name, rows, cols, _ in SHAPES}
    prepared = {key: current.prepare_hessian(h, 0.01) for key, h in hessians.items()}
    versions = {"now": current}
    if args.against:
        versions["before"] = module_at(args.against)

    def layer(mod, name, key, nm):
        return lambda: mod.sparsegpt_prune(shape_weights[name], hessians[key], nm[0] / nm[1] if nm else 0.5, nm,
                                           prepared=prepared[key])

    def block(mod, nm):
        def run():
            last = None
            for w, (_, _, _, key) in zip(weights, LAYERS):
                if last is None or last[0] != key:
                    last = (key, mod.prepare_hessian(hessians[key], 0.01))
                mod.sparsegpt_prune(w, hessians[key], 0.5, nm, prepared=last[1])
        return run

    # step by step, the versions and patterns of a step next to each other: the runs a ratio compares are
    # seconds apart
    cases = {}
    steps = [(f"{name} ({rows}x{cols})", name, key) for name, rows, cols, key in SHAPES]
    steps.append(("one block (7 layers, 4 inverses)", None, None))
    for step, name, key in steps:
        for version, mod in versions.items():
            for label, nm in PATTERNS:
                cases[(version, step, label)] = layer(mod, name, key, nm) if name else block(mod, nm)
    if not args.no_inverse:
        cases[("now", "inverse 1536 x 1536, three steps", "-")] = lambda: three_step(hessians["down"])
        cases[("now", "inverse 1536 x 1536, one Cholesky", "-")] = (
            lambda: inverse_hessian_factor(hessians["down"], 0.01))
        cases[("now", "inverse 576 x 576, three steps", "-")] = lambda: three_step(hessians["o"])
        cases[("now", "inverse 576 x 576, one Cholesky", "-")] = lambda: inverse_hessian_factor(hessians["o"], 0.01)
    for fn in cases.values():  # warm-up: first-call allocations and library loading stay out of the timings
        fn()
    times: dict = {case: [] for case in cases}
    for _ in range(args.reps):
        for case, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[case].append(time.perf_counter() - start)

    print(f"torch {torch.__version__}, threads: {torch.get_num_threads()}, {args.reps} interleaved repetitions"
          + (f", 'before' = sparsegpt.py at {args.against}" if args.against else ""))
    print()
    print("| code | step | unstructured (s) | 2:4 (s) | 4:8 (s) | 2:4 / unstructured | 4:8 / unstructured |")
    print("|---|---|---|---|---|---|---|")
    for step, _, _ in steps:
        for version in versions:
            ts = {label: times[(version, step, label)] for label, _ in PATTERNS}
            ratios = [statistics.median(a / u for a, u in zip(ts[label], ts["unstructured"]))
                      for label in ("2:4", "4:8")]
            print(f"| {version} | {step} | " + " | ".join(f"{statistics.median(t):.4f}" for t in ts.values())
                  + " | " + " | ".join(f"{r:.2f}" for r in ratios) + " |")
    if not args.no_inverse:
        print()
        print("| step | median (s) | min..max (s) |")
        print("|---|---|---|")
        for (version, step, label), ts in times.items():
            if label == "-":
                print(f"| {step} | {statistics.median(ts):.3f} | {min(ts):.3f}..{max(ts):.3f} |")


if __name__ == "__main__":
    main()
