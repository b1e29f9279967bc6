"""Benchmark: which way of making SmolLM2-135M-Instruct sparse keeps it best, at equal training steps and tokens.

Run all rows, or some (each row appends one JSON line to --results, so a long benchmark can run across
sessions; the table is printed from every row recorded there):

    python scripts/bench_recovery.py --rows all --steps 100
    python scripts/bench_recovery.py --rows gradual-wanda-kd oneshot-wanda-kd --steps 100
    python scripts/bench_recovery.py --table            # only print the table of what is recorded
    python scripts/bench_recovery.py --plot docs/recovery.png   # and draw sparsity against perplexity
                                                                # (needs matplotlib: pip install gradprune[plot])
    python scripts/make_nextline_task.py --out tasks/nextline   # a local lm-eval task, then with accuracy:
    python scripts/bench_recovery.py --rows dense --task stdlib_nextline --task-include-path tasks/nextline

Every row uses the same data: stdlib code through TextDataModule with the SmolLM2 tokenizer (seed --seed, 0; with
--split-seed the held-out files are that seed's whatever --seed, so runs of several seeds share their held-out text), the
same training batches in the same order, the same number of optimizer steps and tokens, AdamW (PrunableLM,
lr --lr, 4 warm-up steps, cosine), gradient clipping 1.0, and, for "+ KD", the dense model as teacher
(alpha 0.5, T 2). Held-out perplexity is PrunableLM's validation perplexity on TextDataModule's validation
files (never trained on or used for calibration). One-shot rows prune at fit start with the method's callback
(--nsamples windows of --block-size tokens from the training side), then fine-tune all --steps steps. Gradual
rows ramp --initial-sparsity (0) -> sparsity with a --schedule (cubic) schedule from step 0 to --end-fraction of the run, an
event every --every steps, activation statistics over the --stat-batches micro-batches before each event, then
train on; the "on calibration data" rows instead run the one-shot method sequentially at each event on the
--nsamples calibration windows the one-shot rows use (GradualPruningCallback(statistics="calibration")).
"+ LoRA" rows train only LoRA adapters (PrunableLM(lora=...), rank --lora-r, alpha 2 x rank, learning rate
--lora-lr) on the frozen pruned base; their sparsity and perplexity are those of the merged model.
With --task (lm-eval task names; needs pip install gradprune[eval]) each row also records the final model's
accuracy on them (--task-limit items per task, default 200) under "tasks": {task: {metric: value, metric_stderr:
value}}, and the table shows the first task's acc +/- stderr; without it the rows are as before.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from gradprune import PrunableLM, sparsity_report
from gradprune.callbacks import (DynamicMasks, GradualPruningCallback, LearnedMasks, RIAPruningCallback,
                                 SparseGPTPruningCallback, WandaPruningCallback)
from gradprune.distill import Distillation
from gradprune.models import load_causal_lm

from benchtools import PeakRSS, StepTimer, quiet, recovery_data, recovery_trainer, validation_ppl

KD = dict(alpha=0.5, temperature=2.0)
SQUAREHEAD = dict(KD, hidden_layers="all", hidden_loss="squarehead", hidden_weight=1.0)
NSAMPLES = 32  # calibration windows of the rows that calibrate, unless --nsamples says otherwise
LR = 5e-5  # the recovery fine-tuning's learning rate, unless --lr says otherwise


def lora_options(args) -> dict:
    return dict(r=args.lora_r, alpha=2.0 * args.lora_r, dropout=0.0)


def rows(args) -> dict:
    """Row name -> (description, pruning callback factory or None, distillation options or None[, LoRA
    options: the row trains adapters only])."""
    s, pattern = args.sparsity, args.pattern

    def oneshot(cls, sparsity=None, allocation="uniform"):
        return lambda: cls(sparsity=s if sparsity is None else sparsity, pattern=pattern, nsamples=args.nsamples,
                           seqlen=args.block_size, allocation=allocation)

    def gradual(scorer, scope="row", allocation="uniform", statistics="window", stream=False):
        # stream: each calibration event also calibrates on every training sequence seen before it
        calibration = dict(nsamples=args.nsamples, seqlen=args.block_size) if statistics == "calibration" else {}
        if stream:
            calibration["stream_windows"] = args.steps * args.batch_size
        return lambda: GradualPruningCallback(s, schedule=args.schedule, exponent=args.exponent, start_step=0,
                                              end_step=args.end_fraction,
                                              every=args.every, scope=scope, pattern=pattern, scorer=scorer,
                                              stat_batches=args.stat_batches, allocation=allocation,
                                              initial_sparsity=args.initial_sparsity, statistics=statistics,
                                              **calibration)

    def learned(prior):  # MaskLLM-style masks learned from step 0 to the freeze step (--end-fraction of the run)
        return lambda: GradualPruningCallback(s, pattern=pattern, start_step=0, end_step=args.end_fraction,
                                              every=args.every, nsamples=args.nsamples, seqlen=args.block_size,
                                              mode=LearnedMasks(prior=prior, prior_strength=args.prior_strength,
                                                                logit_scale=tuple(args.logit_scale),
                                                                temperature=tuple(args.temperature),
                                                                logit_lr=args.logit_lr, reconstruct=args.reconstruct,
                                                                seed=args.seed))

    def dynamic(scorer):  # SR-STE: masks chosen afresh at every event until the freeze step
        return lambda: GradualPruningCallback(s, schedule=args.schedule, exponent=args.exponent, pattern=pattern,
                                              start_step=0, end_step=args.end_fraction, every=args.every,
                                              scorer=scorer, scope="row" if pattern == "unstructured" else "layer",
                                              stat_batches=args.stat_batches, initial_sparsity=args.initial_sparsity,
                                              mode=DynamicMasks(decay=args.sr_decay))

    def sparsegpt_then_gradual(scorer):  # one-shot SparseGPT to --start-sparsity, then the ramp on from there
        first = oneshot(SparseGPTPruningCallback, sparsity=args.start_sparsity)
        return lambda: [first(), gradual(scorer)()]

    def sparsegpt_then_dynamic(scorer):  # one-shot SparseGPT at the target, then SR-STE from its masks and weights
        first = oneshot(SparseGPTPruningCallback)
        return lambda: [first(), dynamic(scorer)()]

    return {
        "dense": ("dense", None, None),
        "oneshot-wanda-kd": ("one-shot Wanda + KD", oneshot(WandaPruningCallback), KD),
        "oneshot-wanda-lora-kd": ("one-shot Wanda + LoRA + KD", oneshot(WandaPruningCallback), KD, lora_options(args)),
        "oneshot-wanda-owl-kd": ("one-shot Wanda + OWL + KD", oneshot(WandaPruningCallback, allocation="owl"), KD),
        "oneshot-sparsegpt-kd": ("one-shot SparseGPT + KD", oneshot(SparseGPTPruningCallback), KD),
        "oneshot-ria-kd": ("one-shot RIA + KD", oneshot(RIAPruningCallback), KD),
        "gradual-magnitude-kd": ("gradual magnitude + KD", gradual("magnitude", scope="layer"), KD),
        "gradual-wanda-kd": ("gradual wanda + KD", gradual("wanda"), KD),
        "gradual-wanda-owl-kd": ("gradual wanda + OWL + KD", gradual("wanda", allocation="owl"), KD),
        "gradual-ria-kd": ("gradual ria + KD", gradual("ria"), KD),
        "gradual-taylor-kd": ("gradual taylor + KD", gradual("taylor", scope="layer"), KD),
        "gradual-sparsegpt-kd": ("gradual sparsegpt + KD", gradual("sparsegpt", scope="layer"), KD),
        "gradual-sparsegpt-calibration-kd": ("gradual sparsegpt on calibration data + KD",
                                             gradual("sparsegpt", scope="layer", statistics="calibration"), KD),
        "gradual-sparsegpt-calibration-squarehead": ("gradual sparsegpt on calibration data + KD + SquareHead",
                                                     gradual("sparsegpt", scope="layer", statistics="calibration"),
                                                     SQUAREHEAD),
        "learned-sparsegpt-kd": ("learned N:M masks (SparseGPT prior) + KD", learned("sparsegpt"), KD),
        "dynamic-wanda-kd": ("dynamic masks (SR-STE, wanda scores) + KD", dynamic("wanda"), KD),
        "gradual-sparsegpt-calibration-stream-kd": ("gradual sparsegpt on calibration data and the training stream + KD",
                                                    gradual("sparsegpt", scope="layer", statistics="calibration",
                                                            stream=True), KD),
        "sparsegpt-dynamic-magnitude-kd": ("one-shot SparseGPT, then dynamic masks (SR-STE, magnitude) + KD",
                                           sparsegpt_then_dynamic("magnitude"), KD),
        "gradual-wanda-calibration-kd": ("gradual wanda on calibration data + KD",
                                         gradual("wanda", statistics="calibration"), KD),
        "gradual-wanda-squarehead": ("gradual wanda + KD + SquareHead", gradual("wanda"), SQUAREHEAD),
        "sparsegpt-gradual-wanda-kd": ("SparseGPT one-shot, then gradual wanda + KD",
                                       sparsegpt_then_gradual("wanda"), KD),
    }


def run_row(name: str, args, dense, dm) -> dict:
    label, pruner, distill, *lora = rows(args)[name]
    lora = lora[0] if lora else None
    pl.seed_everything(args.seed, verbose=False)
    module = PrunableLM(model=copy.deepcopy(dense), learning_rate=args.lora_lr if lora else args.lr, weight_decay=0.0,
                        warmup_steps=4, distill=Distillation(**distill) if distill else None, lora=lora)
    start = time.perf_counter()
    timer = StepTimer()
    callbacks = [] if pruner is None else (lambda c: c if isinstance(c, list) else [c])(pruner())
    with PeakRSS() as memory:
        if pruner is not None:
            trainer = recovery_trainer(args.steps, [*callbacks, timer])
            trainer.fit(module, datamodule=dm)
    if lora:  # what is exported: the merged model (the masked adapters' function, the pruned base's zeros)
        module.model = module.merged_model()
    ppl = validation_ppl(module, dm)
    wall = time.perf_counter() - start
    tasks = None
    if args.task:  # after the wall time: the evaluation is not part of the recipe's cost
        from gradprune import evaluate_tasks

        tasks = evaluate_tasks(module, args.task, tokenizer=dm.tokenizer, limit=args.task_limit,
                               include_path=args.task_include_path)
    steps = args.steps if pruner is not None else 0
    return {
        "row": name, "label": label, "sparsity_target": args.sparsity, "pattern": args.pattern,
        "sparsity": sparsity_report(module.model)["global"]["sparsity"] if pruner is not None else 0.0,
        "ppl": ppl, "steps": steps, "tokens": steps * args.batch_size * args.block_size, "wall_s": wall,
        "s_per_step": statistics.median(timer.times[2:]) if len(timer.times) > 2 else None,
        "peak_extra_rss_mb": memory.extra_mb, "lr": args.lr, "every": args.every, "end_fraction": args.end_fraction,
        "stat_batches": args.stat_batches, "schedule": args.schedule, "exponent": args.exponent, "start_sparsity": args.start_sparsity, "initial_sparsity": args.initial_sparsity, "nsamples": args.nsamples, "block_size": args.block_size,
        "batch_size": args.batch_size, "val_tokens": args.val_tokens, "lora": lora,
        "lr_used": args.lora_lr if lora else args.lr, "seed": args.seed, "threads": torch.get_num_threads(),
        "fixed_split": args.split_seed,  # None: the seed picked the held-out files (as in every row before the key)
        "prior_strength": args.prior_strength, "logit_scale": args.logit_scale, "temperature": args.temperature,
        "logit_lr": args.logit_lr, "sr_decay": args.sr_decay,
        "first_event_prunes": True,  # rows recorded before this key existed skipped an initial_sparsity > 0 event
        # learned rows: the prior's mask on the dense weights ("updated": rows that kept SparseGPT's updated weights)
        # and SparseGPT's weight update with the learned masks at the freeze step
        "prior_weights": "dense", "reconstruct": args.reconstruct,
        # training sequences each calibration event adds to its windows (0: none; rows before this key: 0 unless
        # the row is a "-stream-" row, which kept every sequence of its run)
        "stream_windows": max((getattr(c, "stream_windows", 0) for c in callbacks), default=0),
        **({"tasks": tasks, "task_limit": args.task_limit} if tasks is not None else {}),
    }


def print_table(results: Path) -> None:
    if not results.exists():
        print("no rows recorded yet")
        return
    records = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    dense = {split_of(r): r["ppl"] for r in records if r["row"] == "dense"}  # per set of held-out files
    with_tasks = any(r.get("tasks") for r in records)
    print("| run | target | ramp | held-out ppl | x dense (same held-out files) | sparsity | steps | tokens | wall (s) | s / step | peak extra RSS (MB) |"
          + (" task acc +/- stderr |" if with_tasks else ""))
    print("|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if with_tasks else ""))
    for r in records:
        start = (f"{r['start_sparsity']:.0%} (SparseGPT)" if r["row"].startswith("sparsegpt-")
                 else f"{r.get('initial_sparsity', 0.0):.0%}" if r.get("initial_sparsity") else "0")
        if r.get("initial_sparsity") and not r.get("first_event_prunes"):  # recorded before the step-0 fix:
            start = f"0 (the {start} event at step 0 pruned nothing)"  # that event did not run
        schedule = r.get("schedule", "cubic")
        shape = ("" if (schedule, r.get("exponent", 3.0)) == ("cubic", 3.0) else f", {schedule}" if schedule == "linear"
                 else f", {schedule} ({'power' if schedule == 'cubic' else 'rate'} {r['exponent']:g})")
        ramp = (f"{start} -> {r['sparsity_target']:.0%} by step {round(r['end_fraction'] * r['steps'])}, every {r['every']}{shape}"
                if "gradual" in r["row"] else "-")
        if r["row"].startswith("learned") or "dynamic" in r["row"]:
            settings = (f", scale {r['logit_scale'][0]:g}->{r['logit_scale'][1]:g}, temperature {r['temperature'][0]:g}->"
                        f"{r['temperature'][1]:g}, logit lr {r['logit_lr']:g}" if r["row"].startswith("learned") else "")
            if r["row"].startswith("learned") and r.get("prior_weights") == "updated":  # before the prior fix
                settings += ", SparseGPT's updated weights kept under the learned masks"
            elif r["row"].startswith("learned") and r.get("reconstruct"):  # dynamic rows have no such update
                settings += ", SparseGPT's update with the learned masks at the freeze"
            elif r["row"].startswith("learned") and r.get("reconstruct") is False:
                settings += ", no weight update at the freeze"
            ramp = f"masks chosen by training to step {round(r['end_fraction'] * r['steps'])}, then frozen{settings}"
        ratio = f"{r['ppl'] / dense[split_of(r)]:.2f}" if split_of(r) in dense else ""
        step = "" if r["s_per_step"] is None else f"{r['s_per_step']:.2f}"
        target = "-" if r["row"] == "dense" else f"{r['sparsity_target']:.0%} {r['pattern']}"
        label = (r["label"] + windows_note(r) + lr_note(r) + (f" (seed {r['seed']})" if r.get("seed", 0) else "")
                 + split_note(r.get("fixed_split")))
        print(f"| {label} | {target} | {ramp} | {r['ppl']:.3f} | {ratio} | {r['sparsity']:.3f} | {r['steps']} | "
              f"{r['tokens']} | {r['wall_s']:.0f} | {step} | {r['peak_extra_rss_mb']:.0f} |" + (f" {task_cell(r)} |" if with_tasks else ""))


def windows_note(record: dict) -> str:
    """" (N calibration windows)" for a row calibrated on another number of windows than the default 32."""
    row = record["row"]  # the one-shot rows, the calibration ramps and the learned rows' prior calibrate
    uses_windows = row.startswith(("oneshot", "sparsegpt-", "learned")) or "calibration" in row
    n = record.get("nsamples", NSAMPLES)
    return f" ({n} calibration windows)" if uses_windows and n != NSAMPLES else ""


def split_of(record: dict) -> int:
    """The seed that picked a row's held-out files: --split-seed, or (without it, and in older rows) --seed."""
    fixed = record.get("fixed_split")
    return record.get("seed", 0) if fixed is None else fixed


def split_note(fixed: int | None) -> str:
    """" (held-out files of seed S)" for rows whose held-out files --split-seed S fixed apart from their seed."""
    return "" if fixed is None else f" (held-out files of seed {fixed})"


def lr_used(record: dict) -> float:
    """The learning rate a row trained with (rows recorded before the key existed used the default)."""
    return record.get("lr_used", record.get("lr", LR))


def lr_note(record: dict) -> str:
    """" (lr X)" for a row fine-tuned at another learning rate than the default (LoRA rows name theirs apart)."""
    return f" (lr {lr_used(record):g})" if not record.get("lora") and lr_used(record) != LR else ""


def settings_note(record: dict) -> str:
    """What tells apart the seed groups of one row in the summary: a ramp's start and end (and whether its first
    event pruned), a learned row's logit lr and scale; "" for the one-shot rows."""
    row = record["row"]
    if row.startswith("learned"):
        return f" [logit lr {record['logit_lr']:g}, scale {record['logit_scale'][0]:g}->{record['logit_scale'][1]:g}]"
    if "gradual" in row:
        start = record.get("initial_sparsity", 0.0)
        skipped = "" if record.get("first_event_prunes") or not start else ", first event pruned nothing"
        end = round(record["end_fraction"] * record["steps"])
        return f" [{start:.0%} -> {record['sparsity_target']:.0%} by step {end}{skipped}]"
    return ""


def task_cell(record: dict) -> str:
    """The first task's accuracy +/- stderr of a row (with its name and the items per task), or "" without."""
    if not record.get("tasks"):
        return ""
    name, metrics = next(iter(record["tasks"].items()))
    return f"{name}: {metrics['acc']:.3f} +/- {metrics['acc_stderr']:.3f} ({record['task_limit']} items)"


def summarize(records: list[dict]) -> list[dict]:
    """Rows run with several seeds, grouped by row, target, pattern, steps and learning rate (and for ramps and
    learned rows their settings): mean and sample std of the held-out perplexity, and each train-time group's
    margin over the one-shot + KD group it does worst against at the same target, steps and learning rate, in
    percent and in units of the larger of the two stds."""
    groups: dict = {}
    for r in records:
        if r["row"] == "dense":
            continue
        ramp = ("every", "end_fraction", "schedule", "exponent", "initial_sparsity", "first_event_prunes", "stat_batches")
        learned = ("prior_strength", "logit_scale", "temperature", "logit_lr", "prior_weights", "reconstruct")
        keys = ("nsamples",) + (() if r["row"].startswith("oneshot") else
                                ramp + (learned if r["row"].startswith("learned") else ()))
        extra = tuple(str(r.get(k, NSAMPLES if k == "nsamples" else None)) for k in keys)  # older rows: 32 windows
        extra += (str(lr_used(r)),)  # a row at another learning rate is another group (and another baseline)
        key = (r["row"], r["sparsity_target"], r["pattern"], r["steps"], extra)
        group = groups.setdefault(key + (r.get("fixed_split"),), {})
        group[r.get("seed", 0)] = r  # a seed measured again: its latest record
    for key, by_seed in groups.items():  # seed S without --split-seed held out what --split-seed S holds out
        fixed, plain = key[-1], groups.get(key[:-1] + (None,), {})
        if fixed is not None and fixed in plain:
            by_seed.setdefault(fixed, plain[fixed])
    summary = []
    for (row, target, pattern, steps, _, fixed), by_seed in groups.items():
        rs = list(by_seed.values())
        ppl = [r["ppl"] for r in rs]
        summary.append({"label": rs[0]["label"] + windows_note(rs[0]) + lr_note(rs[0]) + settings_note(rs[0])
                        + split_note(fixed), "row": row,
                        "target": target, "pattern": pattern, "steps": steps, "lr": lr_used(rs[0]), "fixed_split": fixed,
                        "seeds": sorted(r.get("seed", 0) for r in rs), "mean": statistics.mean(ppl),
                        "std": statistics.stdev(ppl) if len(ppl) > 1 else float("nan"),
                        "by_seed": {r.get("seed", 0): r["ppl"] for r in rs}})
    for g in summary:
        if g["row"].startswith("oneshot"):
            continue
        # the seed also picks the held-out files (seed 2's perplexities are about half seed 0's), so a row is
        # compared with a baseline only on the seeds both have, seed by seed, and the baseline it is held
        # against is the one it does worst against there, not the one with the lowest mean over its own seeds
        compared = [margin_over(g, b) for b in summary if b["row"].startswith("oneshot") and b["row"].endswith("-kd")
                    and (b["target"], b["pattern"], b["steps"], b["lr"], b["fixed_split"])
                    == (g["target"], g["pattern"], g["steps"], g["lr"], g["fixed_split"])]
        compared = [c for c in compared if c is not None]
        if compared:
            g.update(min(compared, key=lambda c: c["margin_pct"]))
    return summary


def margin_over(row: dict, baseline: dict) -> dict | None:
    """The row's margin over the baseline on the seeds both have (None without one): the mean and sample std of
    the seed-by-seed margins in percent of the baseline, and the difference of the two means over those seeds in
    units of the larger of their stds."""
    shared = sorted(set(row["by_seed"]) & set(baseline["by_seed"]))
    if not shared:
        return None
    ours, theirs = [row["by_seed"][s] for s in shared], [baseline["by_seed"][s] for s in shared]
    margins = [100 * (b - r) / b for r, b in zip(ours, theirs)]
    spread = max(statistics.stdev(ours), statistics.stdev(theirs)) if len(shared) > 1 else 0.0
    difference = statistics.mean(theirs) - statistics.mean(ours)
    return {"margin_pct": statistics.mean(margins),
            "margin_sd": statistics.stdev(margins) if len(margins) > 1 else float("nan"),
            "margin_seeds": shared, "margin_std": difference / spread if spread > 0 else float("nan"),
            "baseline": baseline["label"]}


def print_summary(results: Path) -> None:
    """Mean +/- std over seeds per row (rows with at least two seeds), and the margin over the one-shot + KD row
    it does worst against on the seeds they share (named in the last column)."""
    if not results.exists():
        return
    records = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    rows = [g for g in summarize(records) if len(g["seeds"]) > 1]
    if not rows:
        return
    print("\n| run | target | steps | seeds | held-out ppl, mean +/- std | margin over one-shot + KD (the row it does "
          "worst against), seed by seed: mean +/- std (seeds) | the same in stds of the seeds | against |")
    print("|---|---|---|---|---|---|---|---|")
    for g in rows:
        margin = (f"{g['margin_pct']:+.1f}% +/- {g['margin_sd']:.1f}% ({', '.join(map(str, g['margin_seeds']))})"
                  if "margin_pct" in g else "-")
        stds = f"{g['margin_std']:+.2f}" if "margin_std" in g and g["margin_std"] == g["margin_std"] else "-"
        print(f"| {g['label']} | {g['target']:.0%} {g['pattern']} | {g['steps']} | {', '.join(map(str, g['seeds']))} | "
              f"{g['mean']:.2f} +/- {g['std']:.2f} | {margin} | {stds} | {g.get('baseline', '-')} |")


def plot(results: Path, out: Path) -> None:
    """Held-out perplexity against sparsity, one marker per recorded row (the dense model as a line)."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install 'gradprune[plot]' (or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    records = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    rows = [r for r in records if r["row"] != "dense"]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for r in records:
        if r["row"] == "dense":
            ax.axhline(r["ppl"], color="black", linestyle="--", linewidth=1, label=f"dense ({r['ppl']:.2f})")
    groups: dict = {}  # rows at one target sparsity and pattern, spread apart by a small horizontal offset
    for r in rows:
        groups.setdefault((r["sparsity_target"], r["pattern"]), []).append(r)
    for r in rows:
        group = groups[(r["sparsity_target"], r["pattern"])]
        offset = 0.005 * (group.index(r) - (len(group) - 1) / 2)
        gradual = r["row"].startswith("gradual")
        cycle = rows.index(r) // 20  # tab20 has 20 colours: after them the marker shape changes
        marker = ("o", "^", "v")[cycle % 3] if gradual else ("s", "D", "P")[cycle % 3]
        ax.scatter(r["sparsity"] + offset, r["ppl"], marker=marker, s=40, color=plt.cm.tab20(rows.index(r) % 20),
                   label=f"{r['label']}" + windows_note(r) + (f" ({r['steps']} steps)" if r["steps"] != 100 else "")
                   + (f" (seed {r['seed']})" if r.get("seed", 0) else "") + split_note(r.get("fixed_split")) + (f" (ramp to step {round(r['end_fraction'] * r['steps'])})" if "gradual" in r["row"] else "")
                   + f", {r['pattern']}: {r['ppl']:.2f}")
    ax.set_xlim(0.4, 0.8)
    ax.set_xlabel("sparsity of the targeted weights (markers at one sparsity are spread apart)")
    ax.set_ylabel("held-out perplexity (log scale)")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_title("SmolLM2-135M-Instruct: recovery at equal steps and tokens")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), ncol=1)  # beside: no marker hidden
    ax.grid(True, which="both", alpha=0.3)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    print(f"wrote {out}")


# over 60 lines: most of it is the argument parser and the --task options; the run reads top to bottom
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="*", default=[], help="row names, or 'all'")
    parser.add_argument("--table", action="store_true", help="only print the table of recorded rows")
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG of sparsity against perplexity")
    parser.add_argument("--results", type=Path, default=Path("docs/bench_recovery.jsonl"),
                        help="JSON lines of recorded rows (committed, so a benchmark run across sessions keeps them)")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--pattern", default="unstructured")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--val-tokens", type=int, default=16384)
    parser.add_argument("--nsamples", type=int, default=NSAMPLES,
                        help="calibration windows of the one-shot, calibration-ramp and learned rows")
    parser.add_argument("--lr", type=float, default=LR)
    parser.add_argument("--lora-r", type=int, default=16, help="adapter rank of the + LoRA rows")
    parser.add_argument("--lora-lr", type=float, default=2e-4, help="learning rate of the + LoRA rows (adapters only)")
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--end-fraction", type=float, default=0.6)
    parser.add_argument("--stat-batches", type=int, default=4)
    parser.add_argument("--schedule", default="cubic", choices=("cubic", "linear", "exponential"),
                        help="the gradual rows' schedule (gradprune.schedules)")
    parser.add_argument("--exponent", type=float, default=3.0,
                        help="power of the cubic schedule (3 = Zhu & Gupta) or rate of the exponential one")
    parser.add_argument("--start-sparsity", type=float, default=0.3, help="one-shot sparsity of the sparsegpt-gradual row")
    parser.add_argument("--initial-sparsity", type=float, default=0.0,
                        help="the gradual rows' sparsity at step 0 (pruned at step 0 by the calibration rows)")
    parser.add_argument("--seed", type=int, default=0,
                        help="order of the files (and so which files are held out), of the training batches, the "
                             "calibration windows and the initialisation seed: rows of different seeds are compared "
                             "seed by seed")
    parser.add_argument("--seeds", type=int, nargs="*", default=None,
                        help="run every row once per seed (e.g. --seeds 0 1 2); the summary gives mean +/- std per row")
    parser.add_argument("--split-seed", type=int, default=None,
                        help="hold out the files this seed holds out, whatever --seed (default: --seed picks them), so "
                             "that the spread over seeds is the runs' own and not the held-out text's")
    parser.add_argument("--prior-strength", type=float, default=3.0, help="learned rows: LearnedMasks(prior_strength)")
    parser.add_argument("--logit-scale", type=float, nargs=2, default=[4.0, 12.0], help="learned rows: start, end")
    parser.add_argument("--temperature", type=float, nargs=2, default=[1.0, 0.5], help="learned rows: start, end")
    parser.add_argument("--logit-lr", type=float, default=0.03, help="learned rows: Adam learning rate of the logits")
    parser.add_argument("--no-reconstruct", dest="reconstruct", action="store_false",
                        help="learned rows: no SparseGPT weight update with the learned masks at the freeze step "
                             "(LearnedMasks(reconstruct=False); the kept weights are those training left)")
    parser.add_argument("--sr-decay", type=float, default=2e-4, help="dynamic rows: SR-STE decay of pruned weights")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--task", default=None,
                        help="also record each row's accuracy on these lm-eval tasks (comma-separated; default off)")
    parser.add_argument("--task-limit", type=int, default=200, help="items per task of --task (default 200)")
    parser.add_argument("--task-include-path", default=None, help="folder of local task YAMLs for --task")
    args = parser.parse_args()
    if args.task_limit < 1:
        parser.error(f"--task-limit must be >= 1, got {args.task_limit}")
    if args.task:  # a wrong task name or a missing lm-eval fails now, not after the first row's training
        from gradprune.task_eval import check_task_arguments, check_task_names, parse_tasks, require_lm_eval
        from gradprune.validation import Problems

        problems = Problems()
        check_task_arguments(problems, parse_tasks(args.task), args.task_limit, include_path=args.task_include_path)
        problems.raise_if_any()
        require_lm_eval()
        check_task_names(problems, parse_tasks(args.task), args.task_include_path)
        problems.raise_if_any()
    known = rows(args)
    names = list(known) if args.rows == ["all"] else args.rows
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {list(known)} or 'all'")
    if not names:
        print_table(args.results)
        print_summary(args.results)
        if args.plot is not None:
            plot(args.results, args.plot)
        return
    quiet(args.threads)
    dense = load_causal_lm("smollm2")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds if args.seeds else [args.seed]:
        args.seed = seed
        dm = recovery_data(args.steps, args.batch_size, args.block_size, args.val_tokens, seed=seed,
                           split_seed=args.split_seed)
        for name in names:
            record = run_row(name, args, dense, dm)
            print(json.dumps(record), flush=True)
            with args.results.open("a") as f:
                f.write(json.dumps(record) + "\n")
    print_table(args.results)
    print_summary(args.results)
    if args.plot is not None:
        plot(args.results, args.plot)


if __name__ == "__main__":
    main()
