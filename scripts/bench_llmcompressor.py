#!/usr/bin/env python
"""llm-compressor's SparseGPT (its oneshot entry point, sequential pipeline) on exactly the calibration windows
and held-out tokens of scripts/bench_oneshot.py (TextDataModule over stdlib, seed 0), scored by the same
gradprune.evaluate.perplexity, for comparison with gradprune's rows. One line of JSON per calibration draw.

llm-compressor is not a dependency of gradprune: run this in a virtual environment of its own that can also
import gradprune's dependencies, e.g.

    python -m venv /tmp/lc-venv
    echo "$PWD/.venv/lib/python3.11/site-packages" > /tmp/lc-venv/lib/python3.11/site-packages/gradprune.pth
    /tmp/lc-venv/bin/pip install --no-deps llmcompressor==0.14.0.1 compressed-tensors loguru
    OMP_NUM_THREADS=1 /tmp/lc-venv/bin/python scripts/bench_llmcompressor.py --seeds 0 1 2 --nsamples 32

Measured with llmcompressor 0.14.0.1 and compressed-tensors 0.20.1. Its SparseGPTModifier prunes every Linear
of the decoder blocks (lm_head ignored, as gradprune leaves it), with its defaults: dampening 0.01, blocks of
128 columns, float32 Hessian (running mean) and inverse; the windows are not shuffled.
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
p = argparse.ArgumentParser()
p.add_argument("--seeds", type=int, nargs="*", default=[0])
p.add_argument("--nsamples", type=int, default=32)
p.add_argument("--calib-seqlen", type=int, default=128)
p.add_argument("--seqlen", type=int, default=512)
p.add_argument("--eval-windows", type=int, default=16)
p.add_argument("--batch-size", type=int, default=8)
p.add_argument("--pattern", default="2:4")
p.add_argument("--out", default="bench_llmcompressor.jsonl")
p.add_argument("--save-masks", default=None, help="keep-masks of the first draw's layers (torch.save)")
args = p.parse_args()
torch.set_num_threads(1)
from gradprune.models import load_causal_lm, load_tokenizer
from gradprune.data import TextDataModule
from gradprune.evaluate import perplexity
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier

model = load_causal_lm("smollm2")
tok = load_tokenizer("smollm2")
config_dir = tempfile.mkdtemp()  # oneshot reads the config again from the model's name_or_path
model.config.save_pretrained(config_dir)
model.config._name_or_path = config_dir
dense = {k: v.detach().clone() for k, v in model.state_dict().items()}
data = TextDataModule(sources="stdlib", tokenizer="smollm2", block_size=args.seqlen, seed=0,
                      max_train_tokens=2_000_000, max_val_tokens=args.eval_windows * args.seqlen)
heldout = data.heldout_ids()
for seed in args.seeds:
    model.load_state_dict(dense)
    windows = torch.cat(data.calibration_batches(args.nsamples, args.calib_seqlen, seed=seed))
    ds = Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()})
    mask = "0:0" if args.pattern == "unstructured" else args.pattern
    recipe = SparseGPTModifier(sparsity=0.5, mask_structure=mask, ignore=["re:.*lm_head"])
    t = time.perf_counter()
    oneshot(model=model, tokenizer=tok, dataset=ds, recipe=recipe, num_calibration_samples=args.nsamples,
            max_seq_length=args.calib_seqlen, batch_size=args.batch_size, shuffle_calibration_samples=False,
            pipeline="sequential")
    total = time.perf_counter() - t
    zeros = sum(int((m.weight == 0).sum()) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n)
    numel = sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n)
    if args.save_masks and seed == args.seeds[0]:
        torch.save({n: (m.weight != 0) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n},
                   args.save_masks)
    row = {"lib": "llm-compressor", "pattern": args.pattern, "nsamples": args.nsamples, "seed": seed,
           "calib_seqlen": args.calib_seqlen, "total_s": total, "sparsity": zeros / numel,
           "embed_changed": not torch.equal(model.get_input_embeddings().weight, dense["model.embed_tokens.weight"]),
           "perplexity": perplexity(model, heldout, args.seqlen)}
    print(json.dumps(row), flush=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")
