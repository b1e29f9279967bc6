#!/usr/bin/env python
"""How much rounding alone moves one-shot SparseGPT: scripts/bench_oneshot.py run with a numerical variant of
the SparseGPT step, optionally saving the keep-masks of the first 210 SparseGPT layers (the first draw's first
configuration on SmolLM2-135M), and a comparison of two saved mask files block by block.

    # the reference's precision for the inverse (float32 Cholesky, cholesky_inverse, Cholesky) in gradprune's
    # pipeline; everything after --variant/--save-masks goes to bench_oneshot.py
    OMP_NUM_THREADS=1 python scripts/bench_sparsegpt_rounding.py --variant float32-inverse --save-masks f32.pt -- \\
        --methods sparsegpt --patterns 2:4 --nsamples 32 --more-samples 0 --calib-seqlen 128 --seqlen 512 \\
        --eval-windows 16 --batch-size 8 --seeds 0 1 2 --threads 1 --no-dense
    python scripts/bench_sparsegpt_rounding.py --compare a.pt b.pt   # share of mask entries that differ, per block

Variants: ``none`` (gradprune as it is, e.g. to save its masks) and ``float32-inverse``. This is a measuring
tool, not an option of the library: gradprune inverts in float64.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import gradprune.methods.sparsegpt as sparsegpt  # noqa: E402

LAYERS = 210  # SmolLM2-135M: 30 blocks of q, k, v, o, gate, up, down


def float32_inverse(hessian: torch.Tensor, percdamp: float, max_tries: int = 6) -> torch.Tensor:
    h = hessian.to(torch.float32).clone()
    h.diagonal().add_(percdamp * h.diagonal().mean())
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


def compare(a_path: str, b_path: str, per_block: int = 7) -> None:
    # a list in layer order, or a dict name -> keep-mask in module order (scripts/bench_llmcompressor.py --save-masks)
    a, b = [m if isinstance(m, list) else list(m.values()) for m in (torch.load(a_path), torch.load(b_path))]
    print("| block | mask entries that differ |")
    print("|---|---|")
    for start in range(0, min(len(a), len(b)), per_block):
        pairs = list(zip(a[start:start + per_block], b[start:start + per_block]))
        differ = sum(int((x != y).sum()) for x, y in pairs)
        total = sum(x.numel() for x, _ in pairs)
        print(f"| {start // per_block} | {100 * differ / total:.2f}% |")


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", choices=["none", "float32-inverse"], default="none")
    p.add_argument("--save-masks", default=None)
    p.add_argument("--compare", nargs=2, default=None, metavar=("A", "B"))
    args = p.parse_args(own)
    if args.compare:
        compare(*args.compare)
        return
    if args.variant == "float32-inverse":
        sparsegpt.inverse_hessian_factor = float32_inverse
    keeps: list = []
    real = sparsegpt.sparsegpt_prune

    def recording(*a, **k):
        new_weight, keep = real(*a, **k)
        if args.save_masks and len(keeps) < LAYERS:
            keeps.append(keep.clone())
            if len(keeps) == LAYERS:
                torch.save(keeps, args.save_masks)
        return new_weight, keep

    sparsegpt.sparsegpt_prune = recording
    import bench_oneshot

    bench_oneshot.main(rest)


if __name__ == "__main__":
    main()
