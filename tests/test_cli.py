import json
from pathlib import Path

import pytest
import yaml

from gradprune.cli import GradpruneCLI, main, run_cli
from gradprune.data import TextDataModule
from gradprune.lightning_module import PrunableLM

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


class ParseOnlyCLI(GradpruneCLI):
    """Parses and type-checks a config against the real signatures without building anything."""

    def instantiate_classes(self) -> None:
        pass


def parse(path):
    return ParseOnlyCLI(PrunableLM, TextDataModule, run=False, args=["--config", str(path)]).config


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_parses_against_real_signatures(path):
    config = parse(path)
    assert config.model is not None and config.data is not None
    for callback in config.trainer.callbacks or []:
        assert callback.class_path.startswith(("gradprune.callbacks.", "lightning."))


def test_quickstart_is_a_cubic_ramp_to_70_percent():
    config = parse(ROOT / "configs" / "quickstart.yaml")
    (gradual,) = [c for c in config.trainer.callbacks if c.class_path.endswith("GradualPruningCallback")]
    assert gradual.init_args.final_sparsity == 0.7 and gradual.init_args.schedule == "cubic"


@pytest.mark.parametrize("name, ramp, nsamples", [
    # 50% -> 70% by step 20, every 5; 1:4 at step 0 -> 2:4 at step 20, every 10
    ("smollm2-gradual-70-kd.yaml", ("unstructured", 0.5, 0.7, 0.2, 5), 128),
    ("smollm2-gradual-2of4-kd.yaml", ("2:4", 0.25, 0.5, 0.2, 10), 128),
])
def test_stream_ramp_configs_are_the_benchmarked_rows(name, ramp, nsamples):
    # the recovery benchmark's rows: every event calibrates on the windows plus every training sequence seen so
    # far, at lr 5e-4, while the dense model teaches
    config = parse(ROOT / "configs" / name)
    (gradual,) = [c for c in config.trainer.callbacks if c.class_path.endswith("GradualPruningCallback")]
    args = gradual.init_args
    assert (args.pattern, args.initial_sparsity, args.final_sparsity, args.end_step, args.every) == ramp
    assert (args.scorer, args.statistics, args.nsamples) == ("sparsegpt", "calibration", nsamples)
    assert args.stream_windows == config.trainer.max_steps * config.data.batch_size
    assert config.model.learning_rate == 5e-4 and config.model.distill.teacher == "self"


def test_gradual_structured_config_masks_30_percent_of_mlp_neurons_and_exports_the_smaller_model():
    config = parse(ROOT / "configs" / "smollm2-gradual-structured-kd.yaml")
    (gradual,) = [c for c in config.trainer.callbacks if c.class_path.endswith("GradualStructuredPruningCallback")]
    assert gradual.init_args.mlp == 0.3 and gradual.init_args.schedule == "cubic" and gradual.init_args.end_step == 0.3
    assert config.model.export_format == "structured" and config.model.distill.teacher == "self"


def test_unknown_key_is_rejected(tmp_path, capsys):
    config = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    config["model"]["learning_rat"] = 0.1
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as info:
        parse(path)
    assert info.value.code != 0
    assert "learning_rat" in capsys.readouterr().err


def test_bad_callback_argument_is_rejected(tmp_path, capsys):
    config = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    config["trainer"]["callbacks"][0]["init_args"]["schedule"] = "quadratic"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit):
        parse(path)
    assert "quadratic" in capsys.readouterr().err


TINY = """
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  max_steps: 12
  val_check_interval: 6
  check_val_every_n_epoch: null
  num_sanity_val_steps: 0
  log_every_n_steps: 1
  enable_progress_bar: false
  default_root_dir: {root}
  logger:
    class_path: lightning.pytorch.loggers.TensorBoardLogger
    init_args: {{save_dir: {root}, name: tb}}
  callbacks:
    - class_path: gradprune.callbacks.GradualPruningCallback
      init_args: {{final_sparsity: 0.5, schedule: linear, end_step: 1.0, every: 3, scope: layer}}
    - class_path: gradprune.callbacks.SparsityMonitor
model:
  model: {{model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1,
          num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 64}}
  warmup_steps: 0
  export_dir: {root}/export
data:
  block_size: 32
  batch_size: 4
  max_train_tokens: 20000
  max_val_tokens: 2000
"""


def test_fit_from_yaml_logs_reports_and_exports(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY.format(root=tmp_path))
    cli = run_cli(["fit", "--config", str(path)])
    assert cli.model.model.config.vocab_size == 258  # linked from the byte tokenizer
    export = tmp_path / "export"
    assert (export / "model.safetensors").exists() and (export / "tokenizer.json").exists()
    report = json.loads((export / "gradprune.json").read_text())["sparsity"]
    assert report["global"]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert (tmp_path / "tb" / "version_0" / "gradprune_report.json").exists()
    assert list((tmp_path / "tb" / "version_0").glob("events.out.tfevents.*"))

    from transformers import AutoModelForCausalLM, AutoTokenizer

    reloaded = AutoModelForCausalLM.from_pretrained(export)
    tokenizer = AutoTokenizer.from_pretrained(export)
    assert tokenizer.decode(tokenizer("def f():")["input_ids"]) == "def f():"
    zeros = sum(int((m.weight == 0).sum()) for m in reloaded.model.layers.modules() if hasattr(m, "weight") and m.weight.ndim == 2)
    assert zeros == report["global"]["zeros"]


def test_compressed_export_from_the_command_line(tmp_path):
    import gradprune as gp

    path = tmp_path / "tiny.yaml"
    path.write_text(TINY.format(root=tmp_path).replace("max_steps: 12", "max_steps: 3"))
    cli = run_cli(["fit", "--config", str(path), "--model.export_format", "compressed"])
    export = tmp_path / "export"
    assert (export / "model.compressed.safetensors").exists() and not (export / "model.safetensors").exists()
    info = json.loads((export / "gradprune.json").read_text())
    assert info["format"] == "compressed" and info["recipe"]["callbacks"][0]["init_args"]["final_sparsity"] == 0.5
    reloaded = gp.load(export)
    for name, tensor in cli.model.model.state_dict().items():
        assert tensor.equal(reloaded.state_dict()[name]), name


def test_validate_subcommand_reports_perplexity(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY.format(root=tmp_path))
    cli = run_cli(["validate", "--config", str(path)])
    ppl = float(cli.trainer.callback_metrics["val/ppl"])
    assert 1.0 < ppl < 300.0  # an untrained byte-level model: about the vocabulary size
    assert float(cli.trainer.callback_metrics["sparsity/global"]) == 0.0


def test_console_script_exits_zero(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "tiny.yaml"
    path.write_text(TINY.format(root=tmp_path).replace("max_steps: 12", "max_steps: 2"))
    script = Path(sys.executable).parent / "gradprune"
    done = subprocess.run([str(script), "fit", "--config", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "gradprune report" in done.stderr


def test_print_config(capsys):
    with pytest.raises(SystemExit) as info:
        run_cli(["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--print_config"])
    assert info.value.code == 0
    assert "GradualPruningCallback" in capsys.readouterr().out


def test_lora_from_yaml_trains_adapters_and_exports_the_pruned_sparsity(tmp_path):
    pytest.importorskip("peft")
    from gradprune.lora import LoRA, lora_layers

    lora = "  lora: {r: 4, alpha: 8, dropout: 0.05, target_modules: [q_proj, v_proj, down_proj]}\n"
    text = TINY.format(root=tmp_path).replace("max_steps: 12", "max_steps: 3").replace("  warmup_steps: 0\n", "  warmup_steps: 0\n" + lora)
    path = tmp_path / "lora.yaml"
    path.write_text(text)
    cli = run_cli(["fit", "--config", str(path)])
    assert cli.model.lora == LoRA(r=4, alpha=8.0, dropout=0.05, target_modules=["q_proj", "v_proj", "down_proj"])
    assert len(lora_layers(cli.model.model)) == 3  # one block: q_proj, v_proj, down_proj
    report = json.loads((tmp_path / "export" / "gradprune.json").read_text())["sparsity"]
    assert report["global"]["sparsity"] == pytest.approx(0.5, abs=1e-3)


# -- the command as a new user meets it (issue 25, item 5) --------------------------------------------------
def _quickstart_with(tmp_path, edit):
    config = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    edit(config)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_typo_in_a_callback_key_prints_a_few_lines_with_the_closest_key_and_exits_2(tmp_path, capsys):
    from gradprune.cli import main

    def typo(config):
        init_args = config["trainer"]["callbacks"][0]["init_args"]
        init_args["final_sparsty"] = init_args.pop("final_sparsity")

    path = _quickstart_with(tmp_path, typo)
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(path)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) <= 10, err
    assert "unknown key 'final_sparsty' for gradprune.callbacks.GradualPruningCallback" in lines[0]
    assert str(path) in lines[0]
    assert "did you mean final_sparsity?" in err
    assert "allowed keys: final_sparsity, schedule," in err
    assert "Given value" not in err and "Subtypes" not in err and "usage:" not in err


@pytest.mark.parametrize("section, key, closest", [("model", "learning_rat", "learning_rate"),
                                                   ("trainer", "max_step", "max_steps")])
def test_a_typo_in_a_core_key_names_the_closest_key(tmp_path, capsys, section, key, closest):
    path = _quickstart_with(tmp_path, lambda config: config[section].update({key: 1}))
    with pytest.raises(SystemExit) as info:
        parse(path)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"unknown key {key!r} under {section!r} (file {path})" in err and f"did you mean {closest}?" in err
    assert len(err.strip().splitlines()) <= 10, err


def test_a_misspelt_callback_class_names_gradprunes_callbacks(tmp_path, capsys):
    path = _quickstart_with(tmp_path, lambda c: c["trainer"]["callbacks"][0].update(class_path="GradualPrunigCallback"))
    with pytest.raises(SystemExit) as info:
        parse(path)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown class 'GradualPrunigCallback'" in err and "did you mean GradualPruningCallback?" in err


def test_short_callback_names_resolve(tmp_path):
    def short(config):
        config["trainer"]["callbacks"][0]["class_path"] = "GradualPruningCallback"
        config["trainer"]["callbacks"][1]["class_path"] = "SparsityMonitor"

    config = parse(_quickstart_with(tmp_path, short))
    paths = [c.class_path for c in config.trainer.callbacks]
    assert paths == ["gradprune.callbacks.GradualPruningCallback", "gradprune.callbacks.SparsityMonitor"]


def test_help_lists_only_the_working_subcommands_without_importing_torch():
    import subprocess
    import sys

    from gradprune.cli import SUBCOMMANDS
    from gradprune.subcommands import OWN_SUBCOMMANDS

    code = ("import sys\nfrom gradprune.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit as e:\n"
            "    assert e.code == 0\nprint('TORCH' if 'torch' in sys.modules else 'NO TORCH')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    usage = done.stdout.splitlines()[0]
    assert usage == "usage: gradprune [-h] [-c CONFIG] {fit,validate,evaluate} ..."
    assert "test" not in done.stdout.split("subcommands:")[1].split("options:")[0]
    assert "predict" not in done.stdout and done.stdout.rstrip().endswith("NO TORCH")
    assert set(GradpruneCLI.subcommands()) == set(SUBCOMMANDS) - set(OWN_SUBCOMMANDS) == {"fit", "validate"}
    assert OWN_SUBCOMMANDS == ("evaluate",)


def test_the_test_subcommand_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as info:
        ParseOnlyCLI(PrunableLM, TextDataModule, run=True, args=["test", "--config", str(CONFIGS[0])])
    assert info.value.code == 2
    assert "test" in capsys.readouterr().err


def test_fit_help_shows_gradprunes_callbacks_first(capsys):
    with pytest.raises(SystemExit):
        ParseOnlyCLI(PrunableLM, TextDataModule, args=["fit", "--help"])
    text = capsys.readouterr().out
    start = text.index("  --trainer.callbacks CALLBACKS, ")
    section = text[start:text.index("  --trainer.fast_dev_run ", start)]
    assert section.index("GradualPruningCallback") < section.index("lightning.pytorch.callbacks.")
    assert "gradprune.callbacks." not in section  # named once, by short name, not again among the others


def test_one_callbacks_help_by_its_short_name(capsys):
    with pytest.raises(SystemExit) as info:
        ParseOnlyCLI(PrunableLM, TextDataModule, args=["fit", "--trainer.callbacks.help", "GradualPruningCallback"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--trainer.callbacks.final_sparsity FINAL_SPARSITY" in out and "--trainer.callbacks.scorer" in out


def test_learned_2of4_config_gives_the_gradual_callback_a_learned_masks_mode():
    config = parse(ROOT / "configs" / "smollm2-learned-2of4-kd.yaml")
    (gradual,) = [c for c in config.trainer.callbacks if c.class_path.endswith("GradualPruningCallback")]
    assert gradual.init_args.pattern == "2:4" and gradual.init_args.final_sparsity == 0.5
    assert gradual.init_args.mode.class_path == "gradprune.callbacks.LearnedMasks"
    assert gradual.init_args.mode.init_args.prior == "sparsegpt"
    assert tuple(gradual.init_args.mode.init_args.logit_scale) == (4.0, 12.0)


def test_old_structured_class_path_resolves():
    """Recipes written before the split name GradualStructuredPruningCallback under callbacks.structured."""
    from jsonargparse._typehints import import_object  # the importer the CLI uses for a class path

    from gradprune.callbacks import GradualStructuredPruningCallback
    assert import_object("gradprune.callbacks.structured.GradualStructuredPruningCallback") is GradualStructuredPruningCallback


def test_an_abbreviated_option_is_an_error_not_the_option_it_starts(tmp_path, capsys):
    """argparse's prefix matching would read --model.learning_rat as --model.learning_rate."""
    with pytest.raises(SystemExit) as info:
        run_cli(["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--model.learning_rat", "0.1"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "learning_rat" in err and "did you mean" in err, err


def test_a_trainer_value_lightning_refuses_is_a_short_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--trainer.max_steps", "-3",
              f"--trainer.default_root_dir={tmp_path}"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "gradprune: error: trainer: `max_steps` must be a non-negative integer or -1" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 3, err
