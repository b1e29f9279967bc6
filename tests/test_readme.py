"""The README's first Python example is the recipe that works on a pretrained model (issue 25, item 4): it
runs here with the model, data and Trainer stubbed (nothing is loaded), its callback is built for real,
and its arguments are those of configs/smollm2-gradual-kd.yaml, the benchmarked recipe."""
import re
from pathlib import Path

import yaml

import gradprune
import lightning.pytorch as pl
from gradprune.callbacks import GradualPruningCallback
from gradprune.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]


def first_python_example() -> str:
    return re.search(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL).group(1)


class Recorder:
    """Stands in for PrunableLM, TextDataModule and the Trainer: keeps the arguments, does nothing."""

    calls: dict = {}

    def __init__(self, *args, **kwargs):
        Recorder.calls[type(self).__name__] = kwargs

    def fit(self, *args, **kwargs):
        Recorder.calls["fit"] = kwargs


def test_the_first_python_example_is_the_benchmarked_activation_aware_recipe(monkeypatch):
    for name in ("PrunableLM", "TextDataModule"):
        monkeypatch.setattr(gradprune, name, type(name, (Recorder,), {}), raising=False)
    monkeypatch.setattr(pl, "Trainer", type("Trainer", (Recorder,), {}))
    Recorder.calls = {}
    exec(compile(first_python_example(), "README.md", "exec"), {})

    trainer = Recorder.calls["Trainer"]
    (pruning,) = [c for c in trainer["callbacks"] if isinstance(c, GradualPruningCallback)]
    assert METHODS[pruning.scorer].statistics != "none"  # activation-aware, not magnitude
    config = yaml.safe_load((ROOT / "configs" / "smollm2-gradual-kd.yaml").read_text())
    (gradual,) = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("GradualPruningCallback")]
    for key, value in gradual["init_args"].items():
        attribute = {"schedule": "schedule_kind"}.get(key, key)
        assert getattr(pruning, attribute) == value, key
    for key in ("max_steps", "val_check_interval", "check_val_every_n_epoch", "gradient_clip_val"):
        assert trainer[key] == config["trainer"][key], key
    model, data = Recorder.calls["PrunableLM"], Recorder.calls["TextDataModule"]
    assert {k: model[k] for k in config["model"] if k != "export_dir"} == {
        k: v for k, v in config["model"].items() if k != "export_dir"}
    assert {k: data[k] for k in config["data"]} == config["data"]
