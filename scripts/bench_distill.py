"""Benchmark: recovering a pruned SmolLM2-135M with fine-tuning, with and without knowledge distillation.

Run:  python scripts/bench_distill.py [--steps 40] [--batch-size 4] [--block-size 256]

Everything uses the same data (stdlib code through TextDataModule with the SmolLM2 tokenizer, seed 0: the
same training batches in the same order, validation perplexity on held-out stdlib files that are never
trained on or used for calibration) and the same number of optimizer steps:

  (a) dense                       the pretrained model
  (b) Wanda 50%, no fine-tuning   WandaPruningCallback's masks (same calibration windows), no training
  (c) (b) + fine-tuning, CE only  WandaPruningCallback at fit start, then --steps of cross entropy
  (d) (b) + fine-tuning, KD       the same with the dense model as teacher (alpha 0.5, T 2)
  (e) gradual 60% + KD            GradualPruningCallback, cubic 0 -> 60% over the first 80% of the steps

It prints a table with the perplexities, the share of the gap (b) - (a) that (c) and (d) close, the
median time per optimizer step with and without the teacher, and the peak extra resident memory of
each fit (sampled from /proc/self/statm).
"""
from __future__ import annotations

import argparse
import copy
import statistics

import lightning.pytorch as pl

from gradprune import PrunableLM, sparsity_report
from gradprune.callbacks import GradualPruningCallback, WandaPruningCallback
from gradprune.distill import Distillation
from gradprune.models import load_causal_lm
from gradprune.oneshot import prune_oneshot

from benchtools import PeakRSS, StepTimer, quiet, recovery_data, recovery_trainer, validation_ppl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--val-tokens", type=int, default=16384)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    quiet(args.threads)

    dense = load_causal_lm("smollm2")
    dm = recovery_data(args.steps, args.batch_size, args.block_size, args.val_tokens, seed=0)

    def module(distill=None) -> PrunableLM:
        pl.seed_everything(0, verbose=False)
        return PrunableLM(model=copy.deepcopy(dense), learning_rate=args.lr, weight_decay=0.0, warmup_steps=4,
                          distill=distill)

    def wanda():
        return WandaPruningCallback(sparsity=0.5, nsamples=args.nsamples, seqlen=args.block_size)

    rows = []
    ppl_dense = validation_ppl(module(), dm)
    rows.append(("(a) dense", ppl_dense, 0.0, None, None))
    print(f"(a) dense: {ppl_dense:.3f}", flush=True)

    pruned = module()
    calibration = dm.calibration_batches(args.nsamples, args.block_size)
    prune_oneshot(pruned.model, "wanda", 0.5, calibration=calibration)
    ppl_oneshot = validation_ppl(pruned, dm)
    rows.append(("(b) Wanda 50%, no fine-tuning", ppl_oneshot, sparsity_report(pruned.model)["global"]["sparsity"], None, None))
    print(f"(b) wanda: {ppl_oneshot:.3f}", flush=True)
    del pruned

    timings = {}
    for label, distill, pruner in [
        ("(c) + fine-tuning, CE only", None, wanda),
        ("(d) + fine-tuning, KD", Distillation(alpha=0.5, temperature=2.0), wanda),
        ("(e) gradual 60% + KD", Distillation(alpha=0.5, temperature=2.0),
         lambda: GradualPruningCallback(0.6, schedule="cubic", end_step=0.8, every=4, scope="layer")),
    ]:
        m = module(distill)
        timer = StepTimer()
        with PeakRSS() as memory:
            recovery_trainer(args.steps, [pruner(), timer]).fit(m, datamodule=dm)
        ppl = validation_ppl(m, dm)
        step = statistics.median(timer.times[2:])
        timings[label] = step
        rows.append((label, ppl, sparsity_report(m.model)["global"]["sparsity"], step, memory.extra_mb))
        print(f"{label}: {ppl:.3f}, {step:.2f} s/step, +{memory.extra_mb:.0f} MB", flush=True)
        del m

    gap = ppl_oneshot - ppl_dense
    print(f"\nSmolLM2-135M-Instruct, {args.steps} optimizer steps of {args.batch_size} x {args.block_size} tokens of "
          f"stdlib code, lr {args.lr}, {args.nsamples} calibration windows; perplexity on {args.val_tokens} held-out tokens")
    print("| run | held-out ppl | sparsity | gap closed | s / step | peak extra RSS in fit (MB) |")
    print("|---|---|---|---|---|---|")
    for label, ppl, sparsity, step, extra in rows:
        closed = f"{(ppl_oneshot - ppl) / gap:.0%}" if label.startswith(("(c)", "(d)")) and gap > 0 else ""
        print(f"| {label} | {ppl:.3f} | {sparsity:.3f} | {closed} | {'' if step is None else f'{step:.2f}'} | "
              f"{'' if extra is None else f'{extra:.0f}'} |")
    ce, kd = timings["(c) + fine-tuning, CE only"], timings["(d) + fine-tuning, KD"]
    print(f"\nteacher cost: {kd / ce:.2f}x time per optimizer step ({ce:.2f} s without, {kd:.2f} s with)")


if __name__ == "__main__":
    main()
