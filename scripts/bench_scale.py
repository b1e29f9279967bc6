"""Benchmark: one global pruning event at 1e7, 1e8 and 1e9 parameters.

Run:  python scripts/bench_scale.py [--sizes 1e7 1e8 1e9] [--threads 2]

Each size is a synthetic set of float32 Linear weights with LLaMA's shapes (per decoder block q, k, v, o of
hidden x hidden, gate and up of intermediate x hidden, down of hidden x intermediate; intermediate =
2.6875 x hidden), uniform random values, built in a fresh process of its own. One event is what
GradualPruningCallback does at an event with scope="global": ``select_masks`` (magnitude scores, 50%)
then ``MaskRegistry.update`` (record the masks, zero the pruned weights). Reported: seconds for the event,
and the peak resident memory above what the process held before it (sampled every millisecond, with glibc
told to return freed tensors to the system at once), next to the bool masks and the largest weight.
Targets: time at most linear (1e9 at most 12x 1e8), extra memory at most the masks plus 2x the largest
weight. The 1e9 set needs about 4 GB for the weights and 1 GB for the masks.
"""
from __future__ import annotations

import argparse
import multiprocessing
import time

import torch
from torch import nn

import gradprune as gp
from gradprune.targets import Target

from benchtools import PeakRSS, return_freed_memory_to_os

# (hidden, decoder blocks) giving about the named number of targeted parameters
SETS = {"1e7": (512, 3), "1e8": (1024, 8), "1e9": (2048, 20)}


def llama_shaped(hidden: int, blocks: int) -> tuple[nn.ModuleDict, list[Target]]:
    intermediate = int(hidden * 2.6875)
    shapes = {"q_proj": (hidden, hidden), "k_proj": (hidden, hidden), "v_proj": (hidden, hidden),
              "o_proj": (hidden, hidden), "gate_proj": (intermediate, hidden), "up_proj": (intermediate, hidden),
              "down_proj": (hidden, intermediate)}
    model = nn.ModuleDict()
    generator = torch.Generator().manual_seed(0)
    for block in range(blocks):
        for kind, (out_features, in_features) in shapes.items():
            layer = nn.utils.skip_init(nn.Linear, in_features, out_features, bias=False)
            with torch.no_grad():
                layer.weight.uniform_(-1, 1, generator=generator)
            model[f"b{block}_{kind}"] = layer
    return model, [Target(name, module) for name, module in model.items()]


def event(threads: int, size: str) -> tuple[int, float, float, float, float]:
    """(targeted params, seconds, extra peak RSS MB, masks MB, largest weight MB) of one event."""
    torch.set_num_threads(threads)
    return_freed_memory_to_os()
    small, warm = llama_shaped(128, 1)  # a first event elsewhere: the code it runs is paged in, not counted
    gp.MaskRegistry.of(small).update(warm, gp.select_masks(warm, 0.5, scope="global"))
    del small, warm
    model, targets = llama_shaped(*SETS[size])
    numel = sum(t.numel for t in targets)
    largest = max(t.weight.nbytes for t in targets)
    with PeakRSS(interval=0.001) as memory:
        start = time.perf_counter()
        masks = gp.select_masks(targets, 0.5, scope="global")
        gp.MaskRegistry.of(model).update(targets, masks)
        seconds = time.perf_counter() - start
    pruned = gp.MaskRegistry.of(model).pruned_count()
    assert pruned == gp.selection.exact_count(0.5, numel), (pruned, numel)  # exact, as at every event
    return numel, seconds, memory.extra_mb, numel / 2**20, largest / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(SETS), choices=list(SETS))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    rows = {}
    for size in args.sizes:
        with multiprocessing.get_context("spawn").Pool(1) as pool:  # a fresh process: clean memory accounting
            rows[size] = pool.apply(event, (args.threads, size))
        print(f"{size}: {rows[size]}", flush=True)
    print(f"\nOne global magnitude pruning event to 50% over LLaMA-shaped float32 weights, {args.threads} threads")
    print("| set | targeted params (M) | seconds per event | time ratio to the previous set (params ratio) "
          "| extra peak RSS (MB) | bool masks (MB) | largest weight (MB) | budget: masks + 2x largest (MB) |")
    print("|---|---|---|---|---|---|---|---|")
    previous = None
    for size, (numel, seconds, extra_mb, masks_mb, largest_mb) in rows.items():
        ratio = "" if previous is None else f"{seconds / previous[1]:.1f}x ({numel / previous[0]:.1f}x)"
        print(f"| {size} | {numel / 1e6:.1f} | {seconds:.2f} | {ratio} | {extra_mb:.0f} | {masks_mb:.0f} | "
              f"{largest_mb:.1f} | {masks_mb + 2 * largest_mb:.0f} |")
        previous = (numel, seconds)


if __name__ == "__main__":
    main()
