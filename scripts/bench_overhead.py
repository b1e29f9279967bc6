"""Benchmark: what train-time pruning costs per optimizer step, in memory, and per pruning event.

Run:  python scripts/bench_overhead.py [--reps 8] [--steps 30] [--event-layers 30]

1. Step time. A small LLaMA at a weight-heavy setting (micro-batches of 1 x 32 tokens, where per-weight
   work matters most) is trained with Lightning for --steps measured optimizer steps, three ways, in one
   process, interleaved (dense, gradual, ModelPruning, dense, gradual, ...) for --reps repetitions:
     dense    no pruning (PrunableLM's optimizer, MaskedAdamW, with no masks: torch's fused AdamW);
     gradual  GradualPruningCallback at 50% global sparsity, between events (the only event is at step 0);
     lightning  Lightning's ModelPruning("l1_unstructured", global, 50%), applied at the end of a
              warm-up epoch, so the measured epoch runs with its re-parametrisation in place.
   Each run trains two epochs of --steps batches; only the second epoch is timed (median per run).
   The table gives the median over repetitions of the per-repetition ratio to dense, and its range.
2. Memory held while training per targeted parameter, counted from the tensors each approach keeps
   (gradual: the bool masks; ModelPruning: weight_orig, the same-dtype mask and the recomputed weight,
   minus the plain weight they replace).
3. The cost of the per-step masking pass: float x bool multiply, gradprune's integer-view multiply, and a
   multiply by a same-dtype (float32) mask.
4. Enforcement inside a plain PyTorch training step of the small LLaMA, in milliseconds and as a share
   of the step: the separate masking pass (gradprune's; with a same-dtype float32 mask), and what
   MaskedAdamW (PrunableLM's optimizer, which folds the masks into its update) adds over torch's fused
   AdamW.
5. One global pruning event, in a fresh process of its own, on a model with SmolLM2-135M's shapes
   (random weights, built from config; --event-layers decoder blocks, several values to see how memory
   scales): seconds per million targeted parameters, and the extra resident memory during the event
   (sampled from /proc/self/statm every millisecond, with glibc told to return freed tensors to the
   system at once) next to the size of the masks and of the largest weight.

With --plain it measures instead the plain path: a user's own LightningModule (``self.model`` an HF causal
LM built from SMALL_LLAMA's config, ``training_step`` returning its loss) with a plain torch optimizer,
trained as in 1. (dense, GradualPruningCallback at 50% global between events, ModelPruning at 50% global)
under three settings: torch.optim.AdamW at its defaults, SGD with momentum 0.9, and AdamW under
precision="bf16-mixed". All nine runs are interleaved (the order reversed every other repetition):

    python scripts/bench_overhead.py --plain --reps 8

With --statistics it measures instead what the gradual scorers' statistics cost over a whole run: the
small LLaMA trains --stat-steps batches of 1 x 32 tokens with GradualPruningCallback ramping to 50% (row
scope, cubic, an event every --stat-every steps) under each scorer, interleaved for --reps repetitions;
the table gives the mean time per batch over the whole run (events and statistics windows included) as a
ratio to the same run with magnitude scores (median, middle half and range of the per-repetition ratios),
and the scorer's extra bytes per targeted weight; --scorers picks the scorers compared with magnitude:

    python scripts/bench_overhead.py --statistics --reps 8
    python scripts/bench_overhead.py --statistics --scorers wanda --reps 32
"""
from __future__ import annotations

import argparse
import copy
import logging
import multiprocessing
import statistics
import time
import warnings

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelPruning
from torch.utils.data import DataLoader, TensorDataset

import gradprune as gp
import gradprune.models
from gradprune import PrunableLM
from gradprune.callbacks import GradualPruningCallback

from benchtools import PeakRSS, StepTimer, return_freed_memory_to_os

SMALL_LLAMA = dict(model_type="llama", hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, vocab_size=512,
                   tie_word_embeddings=True)
SMOLLM2_SHAPES = dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)


def target_modules(module):
    return [(t.module, "weight") for t in gp.find_targets(module)]


def run(variant: str, steps: int, fused_adamw: bool = True, clip: float | None = None) -> tuple[float, PrunableLM]:
    """Median batch time of the second of two epochs of ``steps`` batches; the first is a warm-up (and
    ModelPruning prunes at its end)."""
    pl.seed_everything(0, verbose=False)
    module = PrunableLM(model=dict(SMALL_LLAMA), learning_rate=1e-3, warmup_steps=0, fused_adamw=fused_adamw)
    loader = DataLoader(TensorDataset(torch.randint(0, 512, (steps, 32))), batch_size=1)
    timer = StepTimer(from_epoch=1)
    callbacks: list[Callback] = [timer]
    if variant == "gradual":
        callbacks.append(GradualPruningCallback(0.5, schedule="constant", end_step=1, every=10**6, scope="global"))
    elif variant == "lightning":
        callbacks.append(ModelPruning("l1_unstructured", parameters_to_prune=target_modules(module), amount=0.5,
                                      use_global_unstructured=True, apply_pruning=lambda epoch: epoch == 0,
                                      make_pruning_permanent=False, verbose=0))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=callbacks, gradient_clip_val=clip)
    trainer.fit(module, train_dataloaders=loader)
    return statistics.median(timer.times), module


class UserLM(pl.LightningModule):
    """The plain path: what users write (no forward, a torch optimizer from configure_optimizers)."""

    def __init__(self, optimizer: str) -> None:
        super().__init__()
        self.model = gp.models.load_causal_lm(dict(SMALL_LLAMA))
        self.optimizer = optimizer

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch[0], labels=batch[0]).loss

    def configure_optimizers(self):
        if self.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=1e-3, momentum=0.9)
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


PLAIN_SETTINGS = {"torch AdamW": ("adamw", "32-true"), "SGD momentum 0.9": ("sgd", "32-true"),
                  "torch AdamW, bf16-mixed": ("adamw", "bf16-mixed")}


def plain_run(variant: str, setting: str, steps: int) -> float:
    """Median batch time of the second of two epochs of the plain module (ModelPruning prunes at the end
    of the first)."""
    optimizer, precision = PLAIN_SETTINGS[setting]
    pl.seed_everything(0, verbose=False)
    module = UserLM(optimizer)
    loader = DataLoader(TensorDataset(torch.randint(0, 512, (steps, 32))), batch_size=1)
    timer = StepTimer(from_epoch=1)
    callbacks: list[Callback] = [timer]
    if variant == "gradual":
        callbacks.append(GradualPruningCallback(0.5, schedule="constant", end_step=1, every=10**6, scope="global"))
    elif variant == "lightning":
        callbacks.append(ModelPruning("l1_unstructured", parameters_to_prune=target_modules(module.model), amount=0.5,
                                      use_global_unstructured=True, apply_pruning=lambda epoch: epoch == 0,
                                      make_pruning_permanent=False, verbose=0))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=callbacks, precision=precision)
    trainer.fit(module, train_dataloaders=loader)
    return statistics.median(timer.times)


def plain_overhead(args) -> None:
    runs = [(setting, variant) for setting in PLAIN_SETTINGS for variant in ("dense", "gradual", "lightning")]
    times: dict[tuple[str, str], list[float]] = {run: [] for run in runs}
    for rep in range(args.reps):
        for setting, variant in (runs if rep % 2 == 0 else runs[::-1]):
            times[setting, variant].append(plain_run(variant, setting, args.steps))
        print(f"rep {rep + 1}/{args.reps}: " + ", ".join(f"{s} {v} {times[s, v][-1] * 1e3:.2f} ms" for s, v in runs),
              flush=True)
    print(f"\nPlain path: a user's LightningModule around the small LLaMA, 1 x 32 tokens, {args.reps} interleaved "
          f"repetitions x {args.steps} steps, {args.threads} threads")
    print("| optimizer | variant | median step (ms) | ratio to dense: median | range |")
    print("|---|---|---|---|---|")
    for setting, variant in runs:
        ratios = [t / d for t, d in zip(times[setting, variant], times[setting, "dense"])]
        print(f"| {setting} | {variant} | {statistics.median(times[setting, variant]) * 1e3:.2f} | "
              f"{statistics.median(ratios):.3f} | {min(ratios):.3f}-{max(ratios):.3f} |")


def whole_run(scorer: str, steps: int, every: int, stat_batches: int) -> float:
    """Mean seconds per batch over a whole gradual run (events and statistics windows included)."""
    pl.seed_everything(0, verbose=False)
    module = PrunableLM(model=dict(SMALL_LLAMA), learning_rate=1e-3, warmup_steps=0)
    loader = DataLoader(TensorDataset(torch.randint(0, 512, (steps, 32))), batch_size=1)
    gradual = GradualPruningCallback(0.5, schedule="cubic", start_step=every, end_step=steps - every, every=every,
                                     scope="row", scorer=scorer, stat_batches=stat_batches)
    timer = StepTimer()  # after the pruning callback, so each batch's time includes its event
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[gradual, timer])
    trainer.fit(module, train_dataloaders=loader)
    return sum(timer.times) / len(timer.times)


STATISTICS_BYTES = {"magnitude": 0, "wanda": 0, "ria": 0, "taylor": 4}  # per targeted weight (float32 |W * G| sums)


def statistics_overhead(args) -> None:
    scorers = ["magnitude"] + [s for s in args.scorers if s != "magnitude"]  # magnitude: the baseline
    times = {s: [] for s in scorers}
    for rep in range(args.reps):
        order = scorers if rep % 2 == 0 else scorers[::-1]
        for scorer in order:
            times[scorer].append(whole_run(scorer, args.stat_steps, args.stat_every, args.stat_batches))
        print(f"rep {rep + 1}/{args.reps}: " + ", ".join(f"{s} {times[s][-1] * 1e3:.2f} ms" for s in scorers), flush=True)
    print(f"\nWhole gradual runs of the small LLaMA: {args.stat_steps} batches of 1 x 32 tokens, an event every "
          f"{args.stat_every} steps, statistics windows of {args.stat_batches} batches, {args.reps} interleaved "
          f"repetitions, {args.threads} threads")
    print("| scorer | mean batch time over the run (ms) | ratio to magnitude: median | middle half | range | "
          "extra bytes / targeted weight |")
    print("|---|---|---|---|---|---|")
    for scorer in scorers:
        ratios = [t / m for t, m in zip(times[scorer], times["magnitude"])]
        low, _, high = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0], None, ratios[0])
        print(f"| {scorer} | {statistics.median(times[scorer]) * 1e3:.2f} | {statistics.median(ratios):.3f} | "
              f"{low:.3f}-{high:.3f} | {min(ratios):.3f}-{max(ratios):.3f} | {STATISTICS_BYTES[scorer]} |")


def memory_per_parameter(variant: str, module: PrunableLM) -> float:
    if variant == "gradual":
        registry = gp.MaskRegistry.of(module)
        numel = sum(m.numel() for m in registry.masks.values())
        return sum(m.numel() * m.element_size() for m in registry.masks.values()) / numel
    if variant == "lightning":
        extra = numel = 0
        for m in module.modules():
            if hasattr(m, "weight_orig"):
                numel += m.weight_orig.numel()
                held = m.weight_orig.nbytes + m.weight_mask.nbytes + m.weight.nbytes
                extra += held - m.weight_orig.nbytes  # the plain weight they replace
        return extra / numel
    return 0.0


def global_event(threads: int, layers: int) -> tuple[float, float, float, float, int]:
    """(seconds per million params, extra peak RSS MB, masks MB, largest weight MB, targeted params) of
    one event on a model with SmolLM2-135M's shapes and ``layers`` decoder blocks."""
    torch.set_num_threads(threads)
    return_freed_memory_to_os()  # so that the resident size tracks live tensors, not freed heap
    model = gp.models.load_causal_lm(dict(SMOLLM2_SHAPES, num_hidden_layers=layers))
    targets = gp.find_targets(model)
    numel = sum(t.numel for t in targets)
    largest = max(t.weight.nbytes for t in targets)
    with PeakRSS(interval=0.001) as memory:
        start = time.perf_counter()
        masks = gp.select_masks(targets, 0.5, scope="global")
        gp.MaskRegistry.of(model).update(targets, masks)
        seconds = time.perf_counter() - start
    masks_mb = sum(m.numel() for m in masks.values()) / 2**20
    return seconds / (numel / 1e6), memory.extra_mb, masks_mb, largest / 2**20, numel


def mask_multiply_cost(numel: int = 4 * 2**20, reps: int = 20) -> dict[str, float]:
    """Milliseconds per million elements of zeroing the pruned entries of a float32 tensor in place:
    multiplying by the bool mask, what gradprune does (gradprune.masks.zero_pruned_: the bits read as
    int32 times the mask's bytes), and multiplying by a float32 mask (what a same-dtype mask costing 4
    bytes per parameter would take). Interleaved, median of ``reps``."""
    values = torch.randn(numel)
    keep = torch.rand(numel) > 0.5
    keep_float = keep.float()
    methods = {
        "float x bool": lambda: values.mul_(keep),
        "gradprune (int32 view x mask bytes)": lambda: gp.masks.zero_pruned_(values, keep),
        "float x float32 mask": lambda: values.mul_(keep_float),
    }
    times: dict[str, list[float]] = {k: [] for k in methods}
    for _ in range(reps):
        for kind, method in methods.items():
            start = time.perf_counter()
            method()
            times[kind].append(time.perf_counter() - start)
    return {k: statistics.median(v) * 1e3 / (numel / 1e6) for k, v in times.items()}


def enforcement_in_a_step(steps: int = 60) -> dict[str, float]:
    """Median milliseconds of the pieces of enforcement inside a plain PyTorch training step of the small
    LLaMA (1 x 32 tokens, 50% global masks), measured on two copies of the model trained side by side:
    the step itself (torch's fused AdamW, no enforcement), the separate masking pass over the gradients
    (gradprune's, and one with a same-dtype float32 mask), and the time MaskedAdamW's step takes beyond
    torch's fused AdamW step."""
    torch.manual_seed(0)
    plain = gp.models.load_causal_lm(dict(SMALL_LLAMA)).train()
    gp.prune(plain, 0.5, scope="global")
    masked = copy.deepcopy(plain)
    registry = gp.MaskRegistry.of(plain)
    float_masks = [(weight, mask.float()) for weight, mask in registry.weight_masks()]
    torch_adamw = torch.optim.AdamW(plain.parameters(), lr=1e-3, fused=True)
    masked_adamw = gp.MaskedAdamW(masked.parameters(), lr=1e-3, fused=True)
    gp.MaskRegistry.of(masked).attach(masked_adamw)
    ids = torch.randint(0, SMALL_LLAMA["vocab_size"], (1, 32))

    def float_pass():
        for weight, mask in float_masks:
            weight.grad.mul_(mask)

    passes = {"gradprune": registry.mask_gradients_, "float32 mask": float_pass}
    times: dict[str, list[float]] = {k: [] for k in ("step", "torch AdamW step", "MaskedAdamW step", *passes)}
    for i in range(steps):
        for kind, masking in passes.items():
            start = time.perf_counter()
            plain(input_ids=ids, labels=ids).loss.backward()
            middle = time.perf_counter()
            masking()
            end = time.perf_counter()
            torch_adamw.step()
            stepped = time.perf_counter()
            torch_adamw.zero_grad()
            times["step"].append(stepped - end + middle - start)
            times["torch AdamW step"].append(stepped - end)
            times[kind].append(end - middle)

            masked(input_ids=ids, labels=ids).loss.backward()
            start = time.perf_counter()
            masked_adamw.step()
            times["MaskedAdamW step"].append(time.perf_counter() - start)
            masked_adamw.zero_grad()
    return {k: statistics.median(v[2:]) * 1e3 for k, v in times.items()}  # the first steps warm up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--event-layers", type=int, nargs="+", default=[30],
                        help="decoder blocks of the SmolLM2-shaped models for the pruning-event measurement")
    parser.add_argument("--clip", type=float, default=None, help="gradient_clip_val (norm) in every variant")
    parser.add_argument("--unfused", action="store_true", help="torch's default (non-fused) AdamW in every variant")
    parser.add_argument("--plain", action="store_true",
                        help="only the plain path: a user's LightningModule with torch AdamW, SGD, bf16-mixed")
    parser.add_argument("--statistics", action="store_true", help="only the whole-run cost of the scorers' statistics")
    parser.add_argument("--stat-steps", type=int, default=200)
    parser.add_argument("--stat-every", type=int, default=20)
    parser.add_argument("--stat-batches", type=int, default=8)
    parser.add_argument("--scorers", nargs="+", default=["wanda", "ria", "taylor"], choices=sorted(STATISTICS_BYTES),
                        help="with --statistics: the scorers to compare with magnitude")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    if args.statistics:
        statistics_overhead(args)
        return
    if args.plain:
        plain_overhead(args)
        return

    # In a fresh process: freed memory of the other phases would hide its allocations, and the malloc
    # setting it needs (every large tensor its own mmap) would slow the other phases down.
    events = {}
    for layers in args.event_layers:
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            events[layers] = pool.apply(global_event, (args.threads, layers))

    variants = ["dense", "gradual", "lightning"]
    times = {v: [] for v in variants}
    memory = {}
    for rep in range(args.reps):
        order = variants if rep % 2 == 0 else variants[::-1]  # alternate the order to cancel drift
        for variant in order:
            median, module = run(variant, args.steps, fused_adamw=not args.unfused, clip=args.clip)
            times[variant].append(median)
            memory[variant] = memory_per_parameter(variant, module)
        print(f"rep {rep + 1}/{args.reps}: " + ", ".join(f"{v} {times[v][-1] * 1e3:.2f} ms" for v in variants), flush=True)

    targeted = sum(t.numel for t in gp.find_targets(PrunableLM(model=dict(SMALL_LLAMA))))
    print(f"\nStep time, small LLaMA ({targeted / 1e6:.1f} M targeted parameters), 1 x 32 tokens, "
          f"{args.reps} interleaved repetitions x {args.steps} steps, {args.threads} threads, "
          f"{'default' if args.unfused else 'fused'} AdamW, "
          f"{f'gradient clipping at norm {args.clip}' if args.clip else 'no gradient clipping'}")
    print("| variant | median step (ms) | ratio to dense: median | range | extra bytes / targeted param while training |")
    print("|---|---|---|---|---|")
    for variant in variants:
        ratios = [t / d for t, d in zip(times[variant], times["dense"])]
        print(f"| {variant} | {statistics.median(times[variant]) * 1e3:.2f} | {statistics.median(ratios):.3f} | "
              f"{min(ratios):.3f}-{max(ratios):.3f} | {memory[variant]:.2f} |")

    costs = mask_multiply_cost()
    print("\nZeroing the pruned entries of a float32 tensor in place, ms per million elements (median of 20)")
    print("| " + " | ".join(costs) + " |")
    print("|" + "---|" * len(costs))
    print("| " + " | ".join(f"{v:.3f}" for v in costs.values()) + " |")

    ms = enforcement_in_a_step()
    rows = {
        "separate masking pass, gradprune (other optimizers; before gradient clipping)": ms["gradprune"],
        "separate masking pass with a float32 mask (4 bytes per parameter)": ms["float32 mask"],
        "MaskedAdamW step minus torch's fused AdamW step (no pass)": ms["MaskedAdamW step"] - ms["torch AdamW step"],
    }
    print(f"\nEnforcement inside a plain PyTorch step of the same model (the step: {ms['step']:.2f} ms, "
          f"of which torch's fused AdamW {ms['torch AdamW step']:.2f} ms)")
    print("| enforcement | ms per step | share of the step |")
    print("|---|---|---|")
    for kind, value in rows.items():
        print(f"| {kind} | {value:.3f} | {value / ms['step']:.1%} |")

    print("\nOne global magnitude pruning event to 50% on SmolLM2-135M's shapes (random weights)")
    print("| decoder blocks | targeted params (M) | seconds per million targeted params | extra peak RSS (MB) "
          "| bool masks (MB) | extra beyond the masks (MB) | largest weight (MB) |")
    print("|---|---|---|---|---|---|---|")
    for layers, (per_million, extra_mb, masks_mb, largest_mb, numel) in events.items():
        print(f"| {layers} | {numel / 1e6:.1f} | {per_million:.4f} | {extra_mb:.1f} | {masks_mb:.1f} | "
              f"{extra_mb - masks_mb:.1f} | {largest_mb:.1f} |")


if __name__ == "__main__":
    main()
