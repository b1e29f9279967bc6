#!/usr/bin/env python
"""Benchmark of one-shot pruning on SmolLM2-135M: held-out perplexity, pruning wall time and peak memory
for dense, magnitude, Wanda and SparseGPT at 50% unstructured, 4:8 and 2:4, and Wanda with more
calibration samples. Prints a markdown table (rows are also appended to --out as JSON lines as they finish).

    python scripts/bench_oneshot.py --nsamples 32 --seqlen 512 --eval-windows 16 --more-samples 128

Calibration draws: ``--seeds 0 1 2`` repeats every calibrated configuration on the windows drawn with each seed
(the seeds are interleaved, so a slow spell of a shared machine does not hit one draw only) and the table gives
the mean and the spread (min..max) over the draws. ``--calib-seqlen`` sets the calibration windows' length
apart from the evaluation windows' (``--seqlen``); ``--threads`` fixes torch's thread count.

Data as in prune_oneshot.py, all from TextDataModule (stdlib, seed 0): calibration windows from
calibration_batches over the first --calib-tokens training tokens, perplexity (gradprune.evaluate) on
heldout_ids. The model is loaded once; before each configuration the dense weights are restored and the mask
registry cleared. Peak memory: the process's resident set size sampled every 20 ms during pruning,
reported as the peak and as the increase over the resident size before pruning.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchtools import PeakRSS, rss_mb  # noqa: E402

from gradprune.data import TextDataModule  # noqa: E402
from gradprune.evaluate import perplexity  # noqa: E402
from gradprune.masks import MaskRegistry  # noqa: E402
from gradprune.models import load_causal_lm  # noqa: E402
from gradprune.oneshot import prune_oneshot  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--more-samples", type=int, default=128, help="extra Wanda 50%% run with this many samples (0: skip)")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--calib-tokens", type=int, default=2_000_000, help="calibration windows come from the first N training tokens")
    p.add_argument("--seed", type=int, default=0, help="calibration draw (ignored when --seeds is given)")
    p.add_argument("--seeds", type=int, nargs="*", default=None, help="several calibration draws: mean and spread")
    p.add_argument("--calib-seqlen", type=int, default=None, help="calibration window length (default: --seqlen)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-dense", action="store_true", help="skip the dense row")
    p.add_argument("--patterns", nargs="*", default=["unstructured", "2:4", "4:8"])
    p.add_argument("--methods", nargs="*", default=["magnitude", "wanda", "sparsegpt"])
    p.add_argument("--out", default="bench_oneshot.jsonl")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = args.seeds if args.seeds else [args.seed]
    calib_seqlen = args.calib_seqlen or args.seqlen

    model = load_causal_lm(args.model)
    dense = {k: v.detach().clone() for k, v in model.state_dict().items()}
    data = TextDataModule(sources="stdlib", tokenizer=args.model, block_size=args.seqlen, seed=0,
                          max_train_tokens=max(args.calib_tokens, calib_seqlen), max_val_tokens=args.eval_windows * args.seqlen)
    heldout = data.heldout_ids()
    draws = {seed: torch.cat(data.calibration_batches(max(args.nsamples, args.more_samples), calib_seqlen, seed=seed))
             for seed in seeds}
    print(f"torch threads: {torch.get_num_threads()}, held-out tokens: {heldout.numel()}, model RSS {rss_mb():.0f} MB", flush=True)

    configs = [] if args.no_dense else [("dense", "-", 0)]
    for pattern in args.patterns:
        configs += [(m, pattern, args.nsamples) for m in args.methods]
        if args.more_samples and pattern == "unstructured":  # early, so a stopped run still has it
            configs.append(("wanda", "unstructured", args.more_samples))
    runs = [(c, seed) for seed in seeds for c in configs if seed == seeds[0] or c[0] not in ("dense", "magnitude")]
    rows = []
    for (method, pattern, nsamples), seed in runs:
        model.load_state_dict(dense)
        MaskRegistry.of(model).clear()
        row = {"method": method, "pattern": pattern, "nsamples": nsamples, "seed": seed, "calib_seqlen": calib_seqlen,
               "threads": torch.get_num_threads()}
        if method != "dense":
            windows = draws[seed]
            calibration = list(windows[:nsamples].split(args.batch_size)) if method != "magnitude" else None
            with PeakRSS() as mem:
                report = prune_oneshot(model, method, 0.5, pattern, calibration, progress=False)
            row.update(sparsity=report["global"]["sparsity"], calibration_s=report["time"]["calibration_s"],
                       pruning_s=report["time"]["pruning_s"], total_s=report["time"]["total_s"],
                       peak_rss_mb=mem.peak, extra_rss_mb=mem.peak - mem.before)
        row["perplexity"] = perplexity(model, heldout, args.seqlen)
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")

    print()
    print(table(rows))


def table(rows: list) -> str:
    """Markdown table, one line per configuration: the mean over its calibration draws, with min..max when
    there are several."""
    def spread(values: list, fmt: str) -> str:
        mean = sum(values) / len(values)
        return format(mean, fmt) if len(values) == 1 else f"{mean:{fmt}} ({min(values):{fmt}}..{max(values):{fmt}})"

    lines = ["| method | pattern | calib samples | draws | held-out ppl | sparsity | prune wall time (s) | of which "
             "calibration (s) | of which pruning (s) | peak RSS (MB) |", "|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["method"], r["pattern"], r["nsamples"]), []).append(r)
    for (method, pattern, nsamples), rs in groups.items():
        ppl = spread([r["perplexity"] for r in rs], ".3f")
        if method == "dense":
            lines.append(f"| dense | - | - | - | {ppl} | 0 | - | - | - | - |")
            continue
        samples = nsamples if method != "magnitude" else "-"
        lines.append(
            f"| {method} | {pattern} | {samples} | {len(rs)} | {ppl} | {rs[0]['sparsity']:.3f} | "
            f"{spread([r['total_s'] for r in rs], '.1f')} | {spread([r['calibration_s'] for r in rs], '.1f')} | "
            f"{spread([r['pruning_s'] for r in rs], '.1f')} | {max(r['peak_rss_mb'] for r in rs):.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
