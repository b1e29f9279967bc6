"""Benchmark: what a step of the learned and dynamic mask modes costs against a plain KD step, on SmolLM2-135M.

    python scripts/bench_mask_modes.py --reps 3 --steps 6

Every repetition runs the three set-ups one after another in this process (interleaved, so a slower spell of a
shared machine hits all of them): PrunableLM with the dense teacher (KD, alpha 0.5, T 2) and

- "plain KD": GradualPruningCallback at 2:4 with one event at step 0 (magnitude), then ordinary masked steps;
- "learned": the same callback with mode=LearnedMasks(prior="magnitude") learning from step 0 to the last step (its freeze);
- "dynamic": mode=DynamicMasks() with events every 2 steps (the magnitude scores, SR-STE decay).

The median step time of each over the steps after the first two of every repetition (and before the last), and the ratio to plain KD,
are printed as a table, with each set-up's peak resident memory above what its process held before it started,
and the learned mode's logit memory per targeted weight.

Time and memory are measured apart. The timed runs use the allocator a user's process gets (``--allocator
default``: glibc keeps freed blocks for the next allocation). The memory of each set-up is one more run in a
child process that makes glibc return every freed block of 128 KiB or more to the OS at once, so that its
resident size tracks the memory in use; that setting costs a fresh page for every large allocation, and so it
slows the modes that allocate more per step (the learned one most). ``--allocator mmap-128k`` times under it too,
as this benchmark did before 2026-12-07.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import statistics
import subprocess
import sys

from lightning.pytorch import seed_everything

from gradprune import PrunableLM
from gradprune.callbacks import DynamicMasks, GradualPruningCallback, LearnedMasks
from gradprune.distill import Distillation
from gradprune.learned_masks import logits_bytes_per_weight
from gradprune.models import load_causal_lm

from benchtools import PeakRSS, StepTimer, quiet, recovery_data, recovery_trainer, return_freed_memory_to_os


def callback(kind: str, steps: int) -> GradualPruningCallback:
    common = dict(pattern="2:4", start_step=0, every=2)
    if kind == "plain KD":
        return GradualPruningCallback(0.5, schedule="constant", end_step=1, **common)
    if kind == "learned":
        return GradualPruningCallback(0.5, end_step=steps, mode=LearnedMasks(prior="magnitude"), **common)
    return GradualPruningCallback(0.5, schedule="constant", end_step=steps, mode=DynamicMasks(), **common)


KINDS = ("plain KD", "learned", "dynamic")


def run(kind: str, dense, dm, steps: int) -> tuple[list[float], float]:
    seed_everything(0, verbose=False)
    module = PrunableLM(model=copy.deepcopy(dense), learning_rate=5e-5, weight_decay=0.0, warmup_steps=0,
                        distill=Distillation(alpha=0.5, temperature=2.0))
    timer = StepTimer()
    gradual = callback(kind, steps)
    trainer = recovery_trainer(steps, [gradual, timer])
    with PeakRSS() as memory:
        trainer.fit(module, datamodule=dm)
    times = timer.times[2:-1]  # not the first two, nor the last (the freeze step)
    del trainer, module, gradual, timer  # the next set-up starts from the same resident memory
    gc.collect()
    return times, memory.extra_mb


def setup(threads: int, steps: int):
    """The process set-up (threads, quiet loggers, gradprune's too) and what every run shares: the dense model and
    the data."""
    quiet(threads)
    logging.getLogger("gradprune").setLevel(logging.ERROR)
    return load_causal_lm("smollm2"), recovery_data(steps, 4, 128, 2048)


def peak_memory_mb(kind: str, steps: int, threads: int) -> float:
    """Peak extra resident memory of one run of ``kind``, in a child process with freed memory returned to the OS."""
    out = subprocess.run([sys.executable, __file__, "--memory-of", kind, "--steps", str(steps), "--threads", str(threads)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["extra_mb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--allocator", choices=("default", "mmap-128k"), default="default",
                        help="allocator of the timed runs (see above); memory is always measured under mmap-128k")
    parser.add_argument("--memory-of", choices=KINDS, default=None, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.memory_of is not None:
        return_freed_memory_to_os()
        dense, dm = setup(args.threads, args.steps)
        print(json.dumps({"extra_mb": run(args.memory_of, dense, dm, args.steps)[1]}))
        return
    # memory first, while this process holds nothing: under the default allocator it keeps what it frees
    memory = {kind: peak_memory_mb(kind, args.steps, args.threads) for kind in KINDS}
    if args.allocator == "mmap-128k":
        return_freed_memory_to_os()
    dense, dm = setup(args.threads, args.steps)
    times = {k: [] for k in KINDS}
    per_rep = {k: [] for k in KINDS}  # each repetition's median
    for rep in range(args.reps):
        for kind in KINDS:
            t, _ = run(kind, dense, dm, args.steps)
            times[kind] += t
            per_rep[kind].append(statistics.median(t))
            print(f"rep {rep} {kind}: median {per_rep[kind][-1]:.2f} s/step", flush=True)
    base = statistics.median(times["plain KD"])
    print(f"\ntimed with the {args.allocator} allocator, {args.threads} thread(s)")
    print("| set-up | s / step (median) | x plain KD | per repetition (x plain KD) | peak extra RSS (MB) |")
    print("|---|---|---|---|---|")
    for kind in KINDS:
        median = statistics.median(times[kind])
        ratios = ", ".join(f"{t / p:.2f}" for t, p in zip(per_rep[kind], per_rep["plain KD"]))
        print(f"| {kind} | {median:.2f} | {median / base:.2f} | {ratios} | {memory[kind]:.0f} |")
    print(f"\nlearned 2:4 logits while learning: {logits_bytes_per_weight(2, 4):.0f} bytes per targeted weight "
          "(float32 logits, gradient, two Adam moments); dynamic: a bool mask, 1 byte per weight")


if __name__ == "__main__":
    main()
