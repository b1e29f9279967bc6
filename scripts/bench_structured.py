#!/usr/bin/env python
"""Benchmark of structured pruning on SmolLM2-135M-Instruct (30 layers, 9 query / 3 KV heads, 1536 MLP neurons):
what removing neurons, heads and layers buys in size and CPU speed, and what it costs in perplexity.

    python scripts/bench_structured.py                   # perplexity + speed, every row
    python scripts/bench_structured.py --measure ppl     # perplexity, sizes and the metric table only
    python scripts/bench_structured.py --measure speed   # decode / prefill speed only (needs a quiet machine)
    python scripts/bench_structured.py --kd-steps 100    # and held-out perplexity after a short KD fine-tune
    python scripts/bench_structured.py --measure --kd-steps 40 --rows mlp30   # only the KD fine-tune of a row
    python scripts/bench_structured.py --table           # print the table of what --results holds

Rows: dense; 30% and 50% of MLP neurons removed (by --metric); heads 9q/3kv -> 6q/2kv; 10 of 30 layers dropped by
block influence; 50% MLP + 10 layers; 50% unstructured Wanda (gradprune.prune_oneshot, one dense calibration pass,
sequential=False) for comparison. With --measure ppl also every neuron metric at 50% MLP. Calibration: --nsamples
windows of --seqlen tokens (TextDataModule stdlib, seed 0), one pass (gradprune.structured.unit_statistics) shared by
every structured row, then gradprune.prune_structured(statistics=...).

Measured per row: parameters (tied embedding once); file size = save_pretrained (safetensors) of the model in
bfloat16; held-out perplexity (gradprune.evaluate.perplexity on heldout_ids, windows of --seqlen); CPU greedy
generate() of 64 new tokens after a --prompt-tokens prompt, KV cache on: prefill tokens/s = prompt tokens / time
of generate(max_new_tokens=1), decode tokens/s = 63 / (time of 64 tokens - time of 1 token); medians of --repeats
repeats, interleaved over the rows in one process (row order rotated each repeat). The KD fine-tune (optional) runs
every row through PrunableLM with the same data, steps and tokens: the structured rows prune at fit start with
StructuredPruningCallback, the Wanda row with WandaPruningCallback, teacher = the dense model, alpha 0.5, T 2.

Every result is appended to --results as a JSON line; the table shows the latest value of each (row, quantity).
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchtools import quiet, recovery_data, recovery_trainer  # noqa: E402

from gradprune import prune_oneshot, prune_structured  # noqa: E402
from gradprune.data import TextDataModule  # noqa: E402
from gradprune.evaluate import perplexity  # noqa: E402
from gradprune.masks import MaskRegistry  # noqa: E402
from gradprune.models import load_causal_lm  # noqa: E402
from gradprune.structured import NEURON_METRICS, parameter_count, unit_statistics  # noqa: E402


def rows(metric: str) -> dict:
    """Row name -> (label, structured options or "wanda" or None for dense)."""
    return {
        "dense": ("dense", None),
        "mlp30": ("MLP -30%", dict(mlp=0.3, metric=metric)),
        "mlp50": ("MLP -50%", dict(mlp=0.5, metric=metric)),
        "heads": ("heads 9q/3kv -> 6q/2kv", dict(heads=3)),
        "layers10": ("10 of 30 layers", dict(layers=10)),
        "mlp50-layers10": ("MLP -50% + 10 layers", dict(mlp=0.5, layers=10, metric=metric)),
        "wanda50": ("Wanda 50% unstructured", "wanda"),
    }


def build(dense, options, calibration, statistics):
    model = copy.deepcopy(dense)
    if options == "wanda":
        prune_oneshot(model, "wanda", 0.5, calibration=calibration, sequential=False, progress=False)
        MaskRegistry.remove_from(model)
    elif options is not None:
        prune_structured(model, statistics=statistics, progress=False, **options)
    return model.eval()


def file_size_mb(model) -> float:
    with tempfile.TemporaryDirectory() as d:
        copy.deepcopy(model).to(torch.bfloat16).save_pretrained(d, safe_serialization=True)
        return sum(f.stat().st_size for f in Path(d).iterdir()) / 1e6


@torch.no_grad()
def timed_generate(model, prompt, new_tokens: int) -> float:
    start = time.perf_counter()
    model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                   do_sample=False, pad_token_id=0)
    return time.perf_counter() - start


def speed(models: dict, prompt: torch.Tensor, repeats: int, new_tokens: int = 64) -> dict:
    names = list(models)
    prefill, full = {n: [] for n in names}, {n: [] for n in names}
    for name in names:  # warm-up
        timed_generate(models[name], prompt, 2)
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            prefill[name].append(timed_generate(models[name], prompt, 1))
            full[name].append(timed_generate(models[name], prompt, new_tokens))
        print(f"speed repeat {r + 1}/{repeats}: " + ", ".join(f"{n} {full[n][-1]:.2f}s" for n in names), flush=True)
    out = {}
    for name in names:
        p, f = statistics.median(prefill[name]), statistics.median(full[name])
        out[name] = {"prefill_tok_s": prompt.shape[1] / p, "decode_tok_s": (new_tokens - 1) / max(f - p, 1e-9)}
    return out


def kd_finetune(name: str, options, args, dm) -> float:
    import lightning.pytorch as pl

    from gradprune import PrunableLM
    from gradprune.callbacks import StructuredPruningCallback, WandaPruningCallback
    from gradprune.distill import Distillation

    pl.seed_everything(0, verbose=False)
    module = PrunableLM(model="smollm2", learning_rate=args.lr, weight_decay=0.0, warmup_steps=4,
                        distill=Distillation(teacher="self", alpha=0.5, temperature=2.0))
    callbacks = []
    if options == "wanda":
        callbacks.append(WandaPruningCallback(sparsity=0.5, nsamples=args.nsamples, seqlen=args.seqlen))
    elif options is not None:
        callbacks.append(StructuredPruningCallback(nsamples=args.nsamples, seqlen=args.seqlen, **options))
    trainer = recovery_trainer(args.kd_steps, callbacks)
    trainer.fit(module, datamodule=dm)
    return module.model


def record(path: Path, row: str, **values) -> None:
    entry = {"row": row, **values}
    print(json.dumps(entry), flush=True)
    with path.open("a") as f:
        f.write(json.dumps(entry) + "\n")


def latest(path: Path) -> dict:
    table: dict = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                entry = json.loads(line)
                table.setdefault(entry.pop("row"), {}).update(entry)
    return table


def print_table(path: Path, metric: str) -> None:
    t = latest(path)
    dense = t.get("dense", {})
    fmt = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
    print("| row | parameters | file (MB, bf16) | held-out ppl | ppl after KD | decode tok/s | x dense | prefill tok/s | x dense |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (label, _) in rows(metric).items():
        r = t.get(name)
        if r is None:
            continue
        dx = r.get("decode_tok_s") and dense.get("decode_tok_s") and r["decode_tok_s"] / dense["decode_tok_s"]
        px = r.get("prefill_tok_s") and dense.get("prefill_tok_s") and r["prefill_tok_s"] / dense["prefill_tok_s"]
        params = f"{r['parameters'] / 1e6:.1f}M" if "parameters" in r else ""
        kd = fmt(r.get("ppl_kd"), ".2f") + (f" ({r['kd_steps']} steps)" if r.get("ppl_kd") else "")
        print(f"| {label} | {params} | {fmt(r.get('file_mb'), '.0f')} | {fmt(r.get('ppl'), '.2f')} | {kd} | "
              f"{fmt(r.get('decode_tok_s'), '.1f')} | {fmt(dx, '.2f')} | {fmt(r.get('prefill_tok_s'), '.0f')} | {fmt(px, '.2f')} |")
    metrics = {m: t[f"metric-{m}"]["ppl"] for m in NEURON_METRICS if f"metric-{m}" in t}
    if metrics:
        print("\nMLP -50% by neuron metric (held-out perplexity, before fine-tuning):\n")
        print("| metric | " + " | ".join(metrics) + " |")
        print("|---|" + "---|" * len(metrics))
        print("| ppl | " + " | ".join(f"{v:.2f}" for v in metrics.values()) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--measure", nargs="*", default=["ppl", "speed"], choices=["ppl", "speed"])
    p.add_argument("--rows", nargs="*", default=None, help="row names (default all)")
    p.add_argument("--metric", default="l2", choices=NEURON_METRICS, help="neuron metric of the MLP rows")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: on a shared machine 2 threads wait on each other)")
    p.add_argument("--kd-steps", type=int, default=0, help="KD fine-tune steps per row (0: skip)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--block-size", type=int, default=128, help="KD training sequence length")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--results", type=Path, default=Path("runs/bench_structured.jsonl"))
    p.add_argument("--skip-metric-table", action="store_true", help="with --measure ppl: not the per-metric rows")
    p.add_argument("--table", action="store_true")
    args = p.parse_args()
    if args.table:
        print_table(args.results, args.metric)
        return
    logging.basicConfig(level=logging.WARNING)
    quiet(args.threads)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    known = rows(args.metric)
    names = args.rows or list(known)
    dense = load_causal_lm("smollm2").eval()
    data = TextDataModule(sources="stdlib", tokenizer="smollm2", block_size=args.seqlen, seed=0,
                          max_train_tokens=2_000_000, max_val_tokens=args.eval_windows * args.seqlen)
    heldout = data.heldout_ids()
    calibration = data.calibration_batches(args.nsamples, args.seqlen)
    prompt = heldout[: args.prompt_tokens].unsqueeze(0)

    start = time.perf_counter()
    statistics = unit_statistics(dense, calibration)  # one pass, shared by every structured row
    record(args.results, "calibration", seconds=time.perf_counter() - start, tokens=statistics.tokens)
    models = {}
    for name in names:
        label, options = known[name]
        start = time.perf_counter()
        models[name] = build(dense, options, calibration, statistics)
        built = time.perf_counter() - start
        values = {"label": label, "parameters": parameter_count(models[name]), "prune_s": built}
        if "ppl" in args.measure:
            values.update(file_mb=file_size_mb(models[name]), ppl=perplexity(models[name], heldout, args.seqlen))
        record(args.results, name, **values)
    if "ppl" in args.measure and not args.skip_metric_table:
        for metric in NEURON_METRICS:
            model = build(dense, dict(mlp=0.5, metric=metric), calibration, statistics)
            record(args.results, f"metric-{metric}", ppl=perplexity(model, heldout, args.seqlen))
            del model
    if "speed" in args.measure:
        for name, values in speed(models, prompt, args.repeats).items():
            record(args.results, name, repeats=args.repeats, prompt_tokens=args.prompt_tokens, threads=args.threads, **values)
    if args.kd_steps:
        dm = recovery_data(args.kd_steps, args.batch_size, args.block_size, args.eval_windows * args.seqlen, seed=0)
        for name in names:
            model = kd_finetune(name, known[name][1], args, dm)
            record(args.results, name, ppl_kd=perplexity(model.eval(), heldout, args.seqlen), kd_steps=args.kd_steps,
                   kd_tokens=args.kd_steps * args.batch_size * args.block_size)
    print_table(args.results, args.metric)


if __name__ == "__main__":
    main()
