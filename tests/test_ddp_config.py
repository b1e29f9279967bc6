"""configs/ddp.yaml end to end: the `gradprune` command, two real processes (Lightning's ddp strategy, gloo on
CPU), the config as shipped except for a tiny model, short calibration and a 4-step ramp."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from gradprune import exact_count

# two real processes (distributed); run again under other CPU kernels by .ci/run (numerics: make test-numerics)
pytestmark = [pytest.mark.distributed, pytest.mark.numerics]

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}


def tiny_ddp_config(root: Path) -> dict:
    """configs/ddp.yaml with only sizes changed: the strategy, devices, callbacks, distillation and export stay."""
    config = yaml.safe_load((ROOT / "configs" / "ddp.yaml").read_text())
    trainer = config["trainer"]
    assert trainer["strategy"] == "ddp" and trainer["devices"] == 2
    trainer.update(accelerator="cpu", max_steps=4, val_check_interval=2, enable_progress_bar=False,
                   default_root_dir=str(root))
    trainer["logger"]["init_args"]["save_dir"] = str(root / "runs")
    for callback in trainer["callbacks"]:
        args = callback.get("init_args", {})
        if callback["class_path"].endswith("WandaPruningCallback"):
            args.update(nsamples=4, seqlen=32)
        if callback["class_path"].endswith("GradualPruningCallback"):
            args.update(start_step=1, end_step=1.0, every=1, stat_batches=1)
    config["model"].update(model=TINY_MODEL, export_dir=str(root / "export"))
    config["data"].update(tokenizer="bytes", block_size=32, batch_size=2, max_train_tokens=20000, max_val_tokens=2000)
    return config


def test_ddp_config_runs_end_to_end_on_two_processes(tmp_path):
    config = tiny_ddp_config(tmp_path)
    path = tmp_path / "ddp-tiny.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    script = Path(sys.executable).parent / "gradprune"
    try:  # the ddp strategy launches rank 1 by running this same command again
        done = subprocess.run([str(script), "fit", "--config", str(path)], cwd=tmp_path, capture_output=True, text=True,
                              timeout=300)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the two-process run did not finish in 300 s:\n{(exc.stderr or b'')[-3000:]}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "sync_dist=True" not in done.stderr  # the monitor's epoch-level metrics need no warning

    export = json.loads((tmp_path / "export" / "gradprune.json").read_text())["sparsity"]
    assert export["global"]["zeros"] == exact_count(0.5, export["global"]["numel"])
    version = tmp_path / "runs" / "ddp" / "version_0"
    report = json.loads((version / "gradprune_report.json").read_text())  # written by rank 0 at the end of fit
    assert report["global_sparsity"] == export["global"]["sparsity"]
    (checkpoint,) = (version / "checkpoints").glob("*.ckpt")
    saved = torch.load(checkpoint, weights_only=False)
    assert saved["global_step"] == 4
    assert not any("teacher" in key for key in saved["state_dict"])
    masks = [state["masks"] for state in saved["callbacks"].values() if isinstance(state, dict) and state.get("masks")]
    assert len(masks) == 2 and len(masks[0]) == 14  # the one-shot and the gradual callback, every Linear but the head
