"""Bad input fails fast, with a named error, and changes nothing.

Each kind of bad input has a test here (or next to the code it concerns, as noted), and
``test_public_entries_reject_bad_input`` is the table over the public entries: for every case the
exception type, a ``match=`` on the message, and the model's state dict and masks compared before and
after. New public arguments join the table when they are added.
"""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from gradprune import MaskRegistry, PrunableLM, SparsitySchedule, TextDataModule, find_targets, prune, prune_oneshot, select_masks
from gradprune.callbacks import (GradualPruningCallback, MagnitudePruningCallback, SparseGPTPruningCallback,
                                 SparsityMonitor, WandaPruningCallback)
from gradprune.distill import Distillation
from gradprune.masks import pack_mask
from gradprune.models import load_causal_lm
from gradprune.validation import Problems, check_pattern
from tiny_models import TINY_LLAMA, tiny_llama


def calib():
    return [torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))]


def snapshot(model):
    registry = MaskRegistry.of(model)
    return copy.deepcopy(model.state_dict()), {k: v.clone() for k, v in registry.masks.items()}


def assert_unchanged(model, before):
    state, masks = before
    after = model.state_dict()
    assert set(after) == set(state)
    assert all(torch.equal(state[k], v) or (state[k].isnan() == v.isnan()).all() for k, v in after.items())
    now = MaskRegistry.of(model).masks
    assert set(now) == set(masks) and all(torch.equal(masks[k], now[k]) for k in masks)


# -- item 5: pruning a model that already has masks -------------------------------------------------------------
def test_pruning_again_to_a_pattern_the_masks_break_is_refused():
    model = tiny_llama()
    prune_oneshot(model, "wanda", 0.5, calibration=calib(), progress=False)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"pattern='2:4': earlier pruning left groups of 4 with more than 2 pruned.*masks only grow"):
        prune_oneshot(model, "wanda", 0.5, "2:4", calibration=calib(), progress=False)
    assert_unchanged(model, before)


def test_pruning_again_below_the_current_sparsity_is_refused():
    model = tiny_llama()
    prune_oneshot(model, "magnitude", 0.7)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"sparsity=0.5 \(scope='row'\) is below what earlier pruning already removed"):
        prune_oneshot(model, "wanda", 0.5, calibration=calib(), progress=False)
    assert_unchanged(model, before)


def test_pruning_again_to_more_is_monotone_and_the_report_holds():
    model = tiny_llama()
    first = prune_oneshot(model, "magnitude", 0.3)
    second = prune_oneshot(model, "wanda", 0.5, calibration=calib(), progress=False)
    assert all((first["masks"][k] | ~second["masks"][k]).all() for k in first["masks"])  # nothing revived
    assert second["global"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    # the same request twice is a no-op, and a 2:4 request on 2:4 masks is allowed
    again = prune_oneshot(model, "wanda", 0.5, calibration=calib(), progress=False)
    assert all(torch.equal(again["masks"][k], second["masks"][k]) for k in again["masks"])
    nm = tiny_llama()
    prune_oneshot(nm, "magnitude", 0.5, "2:4")
    report = prune_oneshot(nm, "wanda", 0.5, "2:4", calibration=calib(), progress=False)
    for mask in report["masks"].values():
        assert ((~mask).reshape(mask.shape[0], -1, 4).sum(-1) <= 2).all()


# -- item 6: calibration ids out of range -------------------------------------------------------------------------
def test_calibration_ids_out_of_range_name_the_item_and_the_vocabulary():
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"calibration item 1 has token id 300, but the model's vocabulary has 128 ids"):
        prune_oneshot(model, "wanda", 0.5, calibration=[torch.tensor([[1, 2]]), torch.tensor([[3, 300]])])
    assert_unchanged(model, before)


# -- item 7: tied embeddings (also tests/test_targets.py) ------------------------------------------------------
def test_prune_with_include_everything_leaves_a_tied_embedding_alone():
    model = tiny_llama()
    embedding = model.get_input_embeddings().weight.detach().clone()
    prune(model, 0.5, include=".*")
    assert torch.equal(model.get_input_embeddings().weight, embedding)
    with pytest.raises(ValueError, match="tied embeddings"):
        prune(tiny_llama(), 0.5, include=["lm_head"])


# -- item 8: non-finite weights --------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "magnitude"])
def test_a_nan_weight_in_a_later_block_is_refused_before_any_block_is_pruned(method):
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"non-finite \(NaN or inf\) weights in \['model.layers.1.mlp.up_proj.weight'\]"):
        prune_oneshot(model, method, 0.5, calibration=calib(), progress=False)
    assert_unchanged(model, before)


def test_sparsegpt_refuses_a_non_finite_update_and_leaves_that_layer():
    from gradprune.calibration import HessianStats  # noqa: F401  (the statistics type the method reads)
    from gradprune.methods.base import Job
    from gradprune.methods.sparsegpt import SPARSEGPT, prune_sparsegpt
    from gradprune.targets import find_targets

    model = tiny_llama(layers=1)
    target = find_targets(model)[0]

    class NaNHessian:
        def hessian(self):
            h = torch.eye(target.in_features, dtype=torch.float64)
            h[0, 0] = float("nan")
            return h

    weight = target.weight.detach().clone()
    registry = MaskRegistry.of(model)
    job = Job(SPARSEGPT, 0.5, "unstructured", None, {"blocksize": 128, "percdamp": 0.01, "hessian_dtype": "float32"}, registry, False)
    with pytest.raises((ValueError, RuntimeError), match=r"non-finite|not positive definite"):
        prune_sparsegpt(job, [target], {target.name: NaNHessian()})
    assert torch.equal(target.weight, weight) and not registry.masks


# -- item 11: meta device ------------------------------------------------------------------------------------------
def test_a_model_on_the_meta_device_is_refused_by_name():
    with torch.device("meta"):
        model = tiny_llama()
    with pytest.raises(ValueError, match="weights on the meta device"):
        prune_oneshot(model, "magnitude", 0.5)


# -- the table: every public entry, bad input -> named error, nothing changed --------------------------------------

MISSING = "/no/such/dir/model"


def _magnitude(t):
    return t.weight.detach().abs()


def _load_masks(model, state):
    MaskRegistry.of(model).load_state_dict(state)


def _corrupt_masks(model):
    (t, *_) = find_targets(model)
    return {t.name: {"shape": list(t.weight.shape), "bits": pack_mask(torch.ones_like(t.weight, dtype=torch.bool))[:-3]}}


def _spoiled_hf_folder(how):
    import tempfile

    global _SPOILED
    _SPOILED = tempfile.TemporaryDirectory()  # removed when replaced or at exit
    folder = Path(_SPOILED.name) / "hf"
    tiny_llama().save_pretrained(folder)
    if how == "truncate":
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    else:
        (folder / "config.json").write_text("{not json")
    return str(folder)


def _empty_corpus_setup():
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "notes.rst").write_text("text in a suffix that is not read")
        TextDataModule(sources=folder, block_size=4).setup("fit")


def _pattern(value):
    problems = Problems()
    check_pattern(problems, value, "sparsity", 0.5)
    problems.raise_if_any()


# (id, call(model), exception, match). ``model`` is a tiny LLaMA (tied embeddings) with one earlier
# magnitude pruning at 0.5, so the "nothing changed" check covers existing masks too.
CASES = [
    # prune_oneshot
    ("oneshot-sparsity-inf", lambda m: prune_oneshot(m, "magnitude", float("inf")), ValueError, r"sparsity must be in \[0, 1\), got inf"),
    ("oneshot-sparsity-nan", lambda m: prune_oneshot(m, "magnitude", float("nan")), ValueError, r"sparsity must be in \[0, 1\), got nan"),
    ("oneshot-sparsity-str", lambda m: prune_oneshot(m, "magnitude", "0.5"), TypeError, r"sparsity must be a number in \[0, 1\), got '0.5' \(str\)"),
    ("oneshot-sparsity-bool", lambda m: prune_oneshot(m, "magnitude", True), TypeError, r"sparsity must be a number.*got True \(bool\)"),
    ("oneshot-method", lambda m: prune_oneshot(m, "Wanda", 0.6), ValueError, r"method must be one of \[.*'wanda'.*\], got 'Wanda'"),
    ("oneshot-scope", lambda m: prune_oneshot(m, "magnitude", 0.6, scope="Row"), ValueError, r"scope must be one of \['layer', 'global', 'row'\], got 'Row'"),
    ("oneshot-pattern-yaml-int", lambda m: prune_oneshot(m, "magnitude", 0.5, pattern=124), ValueError, r"pattern=124 is a number: YAML 1.1 reads an unquoted N:M such as 2:4.*quote it"),
    ("oneshot-include-int", lambda m: prune_oneshot(m, "magnitude", 0.6, include=5), TypeError, r"include must be None, a regex string or a list of module names, got 5"),
    ("oneshot-sequential", lambda m: prune_oneshot(m, "wanda", 0.6, calibration=calib(), sequential="yes"), TypeError, r"sequential must be True or False, got 'yes'"),
    ("oneshot-lower-than-masks", lambda m: prune_oneshot(m, "magnitude", 0.3), ValueError, r"sparsity=0.3 \(scope='layer'\) is below what earlier pruning already removed"),
    ("oneshot-nm-over-masks", lambda m: prune_oneshot(m, "magnitude", 0.5, "2:4"), ValueError, r"pattern='2:4': earlier pruning left groups of 4"),
    ("oneshot-calib-ids", lambda m: prune_oneshot(m, "wanda", 0.6, calibration=[torch.tensor([[1, 128]])], scope="layer", sequential=False), ValueError, r"calibration item 0 has token id 128, but the model's vocabulary has 128 ids"),
    ("oneshot-calib-negative", lambda m: prune_oneshot(m, "wanda", 0.6, calibration=[torch.tensor([[-1, 3]])], scope="layer", sequential=False), ValueError, r"calibration item 0 has token id -1"),
    ("oneshot-alpha-tolerance", lambda m: prune_oneshot(m, "wanda", 0.6, calibration=calib(), adaptive=True, alpha_tolerance=0), ValueError, r"alpha_tolerance must be a number in \(0, 1\), got 0"),
    ("oneshot-percdamp-inf", lambda m: prune_oneshot(m, "sparsegpt", 0.6, calibration=calib(), percdamp=float("inf")), ValueError, r"percdamp must be a number >= 0, got inf"),
    ("oneshot-tied-head", lambda m: prune_oneshot(m, "magnitude", 0.6, include=["lm_head"]), ValueError, r"tied embeddings"),
    # prune, find_targets, select_masks, masks from a file
    ("prune-tied-head", lambda m: prune(m, 0.6, include=["lm_head"]), ValueError, r"include=\['lm_head'\] selects only \['lm_head'\]"),
    ("prune-scope", lambda m: prune(m, 0.6, scope="rows"), ValueError, r"scope must be one of"),
    ("find-targets-nomatch", lambda m: find_targets(m, include=["qproj"]), ValueError, r"include=\['qproj'\] matches no module"),
    ("find-targets-bad-regex", lambda m: find_targets(m, include="(("), ValueError, r"include='\(\(' is not a valid regular expression"),
    ("select-masks-pattern", lambda m: select_masks(find_targets(m), 0.75, _magnitude, "layer", "2:4"), ValueError, r"final|sparsity 0.75 is above what pattern '2:4' allows"),
    ("masks-corrupted", lambda m: _load_masks(m, _corrupt_masks(m)), ValueError, r"checkpoint mask for 'model.layers.0.self_attn.q_proj' is corrupted: expected \d+ uint8 bytes"),
    ("pattern-check-int", lambda m: _pattern(124), ValueError, r"quote it \(pattern: '2:4'\)"),
    # schedules and callbacks: checked at construction
    ("schedule-exponent-inf", lambda m: SparsitySchedule("cubic", 0.5, end_step=10, exponent=float("inf")), ValueError, r"exponent must be a finite number > 0, got inf"),
    ("schedule-every-float", lambda m: SparsitySchedule("cubic", 0.5, end_step=10, every=2.5), ValueError, r"every must be an integer > 0, got 2.5"),
    ("gradual-end-step-str", lambda m: GradualPruningCallback(0.5, end_step="0.8"), TypeError, r"end_step must be an int \(optimizer step\) or a float in \(0, 1\].*got '0.8' \(str\)"),
    ("gradual-end-step-float", lambda m: GradualPruningCallback(0.5, end_step=1.5), ValueError, r"end_step as a float is a fraction of the run and must be in \(0, 1\], got 1.5"),
    ("gradual-include-int", lambda m: GradualPruningCallback(0.5, include=5), TypeError, r"include must be None, a regex string or a list of module names, got 5"),
    ("gradual-exclude-empty", lambda m: GradualPruningCallback(0.5, exclude=[]), ValueError, r"exclude must not be an empty list"),
    ("gradual-stat-batches", lambda m: GradualPruningCallback(0.5, stat_batches=0), ValueError, r"stat_batches must be an int >= 1"),
    ("gradual-final-sparsity", lambda m: GradualPruningCallback(1.0), ValueError, r"final_sparsity must be in \[0, 1\), got 1.0"),
    ("gradual-pattern-yaml-int", lambda m: GradualPruningCallback(0.5, pattern=124), ValueError, r"pattern=124 is a number"),
    ("monitor-include-int", lambda m: SparsityMonitor(include=5), TypeError, r"include must be None, a regex string or a list of module names, got 5"),
    ("monitor-per-layer", lambda m: SparsityMonitor(per_layer="no"), TypeError, r"per_layer must be True or False, got 'no'"),
    ("wanda-cb-seqlen", lambda m: WandaPruningCallback(0.5, seqlen=0), ValueError, r"seqlen must be a positive integer, got 0"),
    ("magnitude-cb-include", lambda m: MagnitudePruningCallback(0.5, include=3.0), TypeError, r"include must be None"),
    ("sparsegpt-cb-blocksize", lambda m: SparseGPTPruningCallback(0.5, blocksize=0), ValueError, r"blocksize must be a positive int, got 0"),
    # issue 22 item 6: options the chosen mode does not use are checked too, and combinations that cannot work
    ("gradual-unused-owl-lambda", lambda m: GradualPruningCallback(0.5, owl_lambda=float("inf")), ValueError,
     r"owl_lambda must be a finite number >= 0 and <= 0.5, got inf"),
    ("gradual-unused-nsamples", lambda m: GradualPruningCallback(0.5, nsamples=0), ValueError, r"nsamples must be a positive integer, got 0"),
    ("gradual-unused-seqlen", lambda m: GradualPruningCallback(0.5, seqlen="128"), ValueError, r"seqlen must be a positive integer, got '128'"),
    ("gradual-calibration-nm", lambda m: GradualPruningCallback(0.4, scorer="wanda", statistics="calibration", pattern="2:4"),
     ValueError, r"statistics='calibration' with pattern '2:4' ends at exactly N/M: final_sparsity must be 0.5, got final_sparsity=0.4"),
    ("oneshot-unused-owl-lambda", lambda m: prune_oneshot(m, "wanda", 0.6, calibration=calib(), owl_lambda=float("inf")),
     ValueError, r"owl_lambda must be a finite number >= 0 and <= 0.5, got inf"),
    ("oneshot-unused-owl-m", lambda m: prune_oneshot(m, "wanda", 0.6, calibration=calib(), owl_m=-1), ValueError,
     r"owl_m must be a finite number > 0, got -1"),
    ("oneshot-cb-unused-owl-lambda", lambda m: WandaPruningCallback(0.5, owl_lambda=float("nan")), ValueError,
     r"owl_lambda must be a finite number >= 0 and <= 0.5, got nan"),
    ("structured-near-zero-eps-nan", lambda m: _prune_structured(m, mlp=0.25, metric="l2", near_zero_eps=float("nan")),
     ValueError, r"near_zero_eps must be a finite number >= 0, got nan"),
    ("lm-truncated-weights", lambda m: PrunableLM(model=_spoiled_hf_folder("truncate")), ValueError,
     r"model='.*hf': the Hugging Face model in this directory \(config.json, weights \['model.safetensors'\]\) cannot be "
     r"loaded: SafetensorError"),
    ("lm-corrupt-config", lambda m: PrunableLM(model=_spoiled_hf_folder("config")), ValueError,
     r"model='.*hf': the Hugging Face model in this directory \(config.json, weights \['model.safetensors'\]\) cannot be "
     r"loaded: OSError: .*config.json"),
    # PrunableLM, Distillation, TextDataModule, loading
    ("lm-learning-rate-bool", lambda m: PrunableLM(model=dict(TINY_LLAMA), vocab_size=128, learning_rate=True), TypeError, r"learning_rate must be a finite number > 0, got True \(bool\)"),
    ("lm-learning-rate-inf", lambda m: PrunableLM(model=dict(TINY_LLAMA), vocab_size=128, learning_rate=float("inf")), ValueError, r"learning_rate must be a finite number > 0, got inf"),
    ("lm-weight-decay-inf", lambda m: PrunableLM(model=dict(TINY_LLAMA), vocab_size=128, weight_decay=float("inf")), ValueError, r"weight_decay must be a finite number >= 0, got inf"),
    ("lm-betas", lambda m: PrunableLM(model=dict(TINY_LLAMA), vocab_size=128, betas=(1.5, 0.9)), ValueError, r"betas\[0\] must be a finite number >= 0 and < 1, got 1.5"),
    ("lm-fused", lambda m: PrunableLM(model=dict(TINY_LLAMA), vocab_size=128, fused_adamw="no"), TypeError, r"fused_adamw must be True or False, got 'no'"),
    ("lm-export-dir", lambda m: PrunableLM(model=dict(TINY_LLAMA), vocab_size=128, export_dir=123), TypeError, r"export_dir must be None or a directory path \(str\), got 123"),
    ("lm-missing-path", lambda m: PrunableLM(model=MISSING), ValueError, r"model='/no/such/dir/model': no such local directory or file; allowed: a local Hugging Face model directory"),
    ("lm-missing-relative-offline", lambda m: PrunableLM(model="models/tiny"), ValueError, r"model='models/tiny': no such local directory or file, and the hub is offline"),
    ("lm-config-typo", lambda m: PrunableLM(model={**TINY_LLAMA, "num_hiden_layers": 2}, vocab_size=128), ValueError, r"unknown key\(s\): 'num_hiden_layers' \(did you mean 'num_hidden_layers'\?\)"),
    ("lm-config-type", lambda m: PrunableLM(model={**TINY_LLAMA, "model_type": "lama"}, vocab_size=128), ValueError, r"model_type='lama' is not a transformers model type \(did you mean 'llama'\?\)"),
    ("lm-model-int", lambda m: PrunableLM(model=5), TypeError, r"model must be a model source .* got int"),
    ("load-gguf-missing", lambda m: load_causal_lm("/no/such/file.gguf"), ValueError, r"no such local directory or file"),
    ("distill-teacher-missing", lambda m: Distillation(teacher=MISSING), ValueError, r"distill.teacher='/no/such/dir/model': no such local directory or file"),
    ("distill-temperature-inf", lambda m: Distillation(temperature=float("inf")), ValueError, r"distill.temperature must be > 0 and finite, got inf"),
    ("data-tokenizer-missing", lambda m: TextDataModule(tokenizer=MISSING), ValueError, r"tokenizer='/no/such/dir/model': no such local directory or file; allowed: 'bytes'"),
    ("data-block-size", lambda m: TextDataModule(block_size=0), ValueError, r"block_size must be a positive integer \(>= 1\), got 0"),
    ("data-val-fraction", lambda m: TextDataModule(val_fraction=float("nan")), ValueError, r"val_fraction must be in \(0, 1\)"),
    ("data-no-documents", lambda m: _empty_corpus_setup(), ValueError,
     r"contain no documents: a directory is read for files ending in \['.py', '.txt', '.md', '.jsonl', '.json'\]"),
]


@pytest.fixture
def pruned_llama():
    model = tiny_llama()
    prune_oneshot(model, "magnitude", 0.5)
    return model


@pytest.mark.parametrize("call, error, match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_public_entries_reject_bad_input(pruned_llama, call, error, match):
    before = snapshot(pruned_llama)
    with pytest.raises(error, match=match):
        call(pruned_llama)
    assert_unchanged(pruned_llama, before)


def test_numpy_scalars_are_numbers():
    model = tiny_llama()
    report = prune_oneshot(model, "magnitude", np.float64(0.5))
    assert report["global"]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    callback = GradualPruningCallback(np.float32(0.5), end_step=np.int64(10), every=np.int64(2))
    assert callback.end_step == 10 and isinstance(callback.end_step, int)
    SparsitySchedule("cubic", np.float64(0.5), end_step=np.int64(10))


# -- helpers for the Lightning / script / data items ------------------------------------------------------------
class LogRecords:
    """Collects log records of a logger (the suite runs with -p no:logging, so no caplog)."""

    def __init__(self, name):
        self.logger, self.records = logging.getLogger(name), []
        self.handler = logging.Handler()
        self.handler.emit = self.records.append

    def __enter__(self):
        self.logger.addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self.handler)

    def text(self):
        return "\n".join(r.getMessage() for r in self.records)


# -- item 1: the one-shot script checks everything before loading ----------------------------------------------
def _script():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "prune_oneshot.py"
    spec = importlib.util.spec_from_file_location("prune_oneshot_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("argv, match", [
    (["--sparsity", "1.2"], r"sparsity must be in \[0, 1\), got 1.2"),
    (["--scope", "Row"], r"scope must be one of \['layer', 'global', 'row'\], got 'Row'"),
    (["--pattern", "2:4", "--sparsity", "0.6"], r"sparsity 0.6 does not match pattern '2:4'"),
    (["--seqlen", "0", "--batch-size", "0", "--eval-windows", "-1"],
     r"--seqlen must be an integer >= 1, got 0\n.*--batch-size must be an integer >= 1, got 0\n.*--eval-windows must be an integer >= 0, got -1"),
    (["--model", MISSING], r"--model='/no/such/dir/model': no such local directory or file"),
    (["--calib", "/no/such/file.jsonl"], r"--calib '/no/such/file.jsonl': no such file"),
])
def test_script_rejects_bad_arguments_before_loading_anything(monkeypatch, argv, match):
    script = _script()

    def must_not_run(*args, **kwargs):
        raise AssertionError("loaded something before the arguments were checked")

    monkeypatch.setattr(script, "load_causal_lm", must_not_run)
    monkeypatch.setattr(script, "data_module", must_not_run)
    with pytest.raises(SystemExit, match=match):
        script.main(argv)


def test_script_reads_data_before_the_model_and_checks_seqlen_against_the_context(monkeypatch):
    script = _script()

    def bad_data(*args, **kwargs):
        raise ValueError("text_field='text' is not a field of ['x.jsonl']")

    monkeypatch.setattr(script, "load_causal_lm", lambda *a, **k: pytest.fail("model loaded before the data was read"))
    monkeypatch.setattr(script, "data_module", bad_data)
    with pytest.raises(ValueError, match="text_field='text' is not a field"):
        script.main(["--method", "magnitude"])
    with pytest.raises(ValueError, match=r"--seqlen 100000 is longer than the model's context of 256 tokens"):
        script.check_context(tiny_llama(), 100000)
    script.check_context(tiny_llama(), 256)


# -- item 2: unquoted N:M in YAML --------------------------------------------------------------------------------
def test_unquoted_nm_pattern_in_yaml_is_the_pattern(tmp_path):
    from test_cli import parse

    config = tmp_path / "nm.yaml"
    config.write_text(
        "trainer:\n  max_steps: 4\n  callbacks:\n    - class_path: gradprune.callbacks.GradualPruningCallback\n"
        "      init_args: {final_sparsity: 0.5, pattern: 2:4, end_step: 2, every: 1}\n"
        "model:\n  model: {model_type: llama, hidden_size: 32}\ndata:\n  tokenizer: bytes\n"
    )
    parsed = parse(config)
    assert parsed.trainer.callbacks[0].init_args.pattern == "2:4"
    assert parsed.trainer.max_steps == 4  # plain integers are still integers


# -- item 6: vocabulary mismatch in the Python API ------------------------------------------------------------
def test_a_data_module_with_more_ids_than_the_model_embeds_fails_at_setup(tmp_path):
    from lightning_helpers import tiny_module, trainer

    source = tmp_path / "text.txt"
    source.write_text("def f(x):\n    return x + 1\n" * 200)
    module = tiny_module()
    before = snapshot(module)
    data = TextDataModule(sources=str(source), tokenizer="bytes", block_size=16, batch_size=2)
    with pytest.raises(ValueError, match=r"tokenizer \('bytes'\) has 258 token ids but the model embeds only 128"):
        trainer(tmp_path, max_steps=2, callbacks=[GradualPruningCallback(0.5, end_step=2, every=1)]).fit(module, datamodule=data)
    assert_unchanged(module, before)


# -- item 9: resume ----------------------------------------------------------------------------------------------
def _checkpointed_run(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_helpers import tiny_module, token_loader, trainer

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1, filename="{step}")
    gradual = GradualPruningCallback(0.6, start_step=1, end_step=8, every=1)
    trainer(tmp_path, max_steps=8, callbacks=[gradual, checkpoint], enable_checkpointing=True).fit(tiny_module(), token_loader())
    return tmp_path / "ckpt" / "step=4.ckpt"


def test_resume_problems_are_named(tmp_path):
    from lightning_helpers import tiny_module, token_loader, trainer

    ckpt = _checkpointed_run(tmp_path)
    # (a) a resumed run too short for the checkpoint's end step says so, as a fresh one does (a staged run)
    with pytest.warns(UserWarning, match=r"end_step \(8\) is beyond this run's total optimizer steps \(6\)"):
        trainer(tmp_path / "a", max_steps=6, callbacks=[GradualPruningCallback(0.6, start_step=1, end_step=8, every=1)]).fit(
            tiny_module(), token_loader(), ckpt_path=str(ckpt))
    # (b) without a pruning callback: a specific warning
    with LogRecords("gradprune.checkpoints") as logs:
        trainer(tmp_path / "b", max_steps=5).fit(tiny_module(), token_loader(), ckpt_path=str(ckpt))
    assert "holds pruning masks for 14 layers" in logs.text() and "no pruning callback" in logs.text()
    # (c) corrupted mask bits name the layer and the file
    state = torch.load(ckpt, weights_only=False)
    (key,) = [k for k in state["callbacks"] if k.startswith("GradualPruningCallback")]
    name = sorted(state["callbacks"][key]["masks"])[0]
    state["callbacks"][key]["masks"][name]["bits"] = state["callbacks"][key]["masks"][name]["bits"][:-1]
    broken = tmp_path / "broken.ckpt"
    torch.save(state, broken)
    with pytest.raises(ValueError, match=rf"checkpoint mask for '{name}' is corrupted.*broken.ckpt"):
        trainer(tmp_path / "c", max_steps=8, callbacks=[GradualPruningCallback(0.6, start_step=1, end_step=8, every=1)]).fit(
            tiny_module(), token_loader(), ckpt_path=str(broken))


# -- item 11: degenerate runs ------------------------------------------------------------------------------------
def test_a_tiny_int_end_step_warns_and_an_unbounded_run_is_named(tmp_path):
    from lightning_helpers import tiny_module, token_loader, trainer

    with LogRecords("gradprune.callbacks.events") as logs:
        callback = GradualPruningCallback(0.5, end_step=1, every=1)
        run = trainer(tmp_path, max_steps=120, callbacks=[callback])
        run.fit(tiny_module(), token_loader(n=8, batch_size=8))
    assert "end_step=1 is an optimizer step (an int)" in logs.text()
    with pytest.raises(ValueError, match=r"need a finite run, but max_steps=-1 and max_epochs=-1"):
        trainer(tmp_path, max_steps=-1, max_epochs=-1).fit(tiny_module(), token_loader())


# -- item 12: data -------------------------------------------------------------------------------------------------
def test_binary_and_utf16_sources_warn_and_bad_json_lines_are_located(tmp_path):
    binary = tmp_path / "blob.txt"
    binary.write_bytes(bytes(range(256)) * 40)
    utf16 = tmp_path / "wide.txt"
    utf16.write_text("def f():\n    return 1\n" * 50, encoding="utf-16")
    for path, message in ((binary, "does not look like UTF-8 text"), (utf16, "looks like UTF-16 text")):
        with LogRecords("gradprune.corpus") as logs:
            TextDataModule(sources=str(path), block_size=4).setup("fit")
        assert str(path) in logs.text() and message in logs.text()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a = 1"}\n{"text": "b = 2"\n{"text": "c = 3"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl line 2: not valid JSON"):
        TextDataModule(sources=str(bad), block_size=2).setup("fit")


def test_a_one_shot_callback_warns_when_the_loader_blocks_are_shorter_than_seqlen(tmp_path):
    from lightning_helpers import tiny_module, token_loader, trainer

    with LogRecords("gradprune.callbacks.calibration") as logs:
        trainer(tmp_path, max_steps=1, callbacks=[WandaPruningCallback(0.5, nsamples=4, seqlen=512)]).fit(
            tiny_module(), token_loader(length=16))
    assert "seqlen=512, but the train dataloader's sequences have only 16 tokens" in logs.text()


# -- item 13: the command prints the message, not a traceback --------------------------------------------------
def test_cli_bad_value_prints_the_message_without_a_traceback(tmp_path, capsys):
    from gradprune.cli import main

    config = tmp_path / "bad.yaml"
    config.write_text(
        "trainer:\n  max_steps: 4\n  logger: false\n  callbacks:\n"
        "    - class_path: gradprune.callbacks.GradualPruningCallback\n      init_args: {final_sparsity: 1.5}\n"
        "model:\n  model: {model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1,"
        " num_attention_heads: 4, num_key_value_heads: 2}\ndata:\n  tokenizer: bytes\n"
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "final_sparsity must be in [0, 1), got 1.5" in err and "Traceback" not in err and "GRADPRUNE_DEBUG" in err


def test_prune_follows_the_same_rule_for_earlier_masks_and_bad_weights():
    model = tiny_llama()
    prune(model, 0.5)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"sparsity=0.3 \(scope='layer'\) is below what earlier pruning already removed"):
        prune(model, 0.3)
    assert_unchanged(model, before)
    prune(model, 0.6)  # more is fine
    with torch.device("meta"):
        meta = tiny_llama()
    with pytest.raises(ValueError, match="weights on the meta device"):
        prune(meta, 0.5)


# == issue 22: nothing lost ========================================================================================
# Every public entry point checks everything before the first change and, when it fails, leaves the model, the
# masks and the files on disk as they were.
import gradprune as gp  # noqa: E402
from gradprune.compressed import COMPRESSED_FILE, ExportError  # noqa: E402


def files_of(directory):
    """Every file under ``directory`` (relative path -> bytes), for "nothing on disk changed"."""
    directory = Path(directory)
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _other_model(seed=1):
    model = tiny_llama(seed=seed)
    prune(model, 0.6)
    return model


def _hf_folder(path):
    tiny_llama(seed=3).save_pretrained(path)  # an unrelated Hugging Face model, not a gradprune export
    return path


# (id, prepare(tmp_path) -> out_dir, call(out_dir), exception, match). The folder's files are compared before
# and after, and a gradprune export there must still load.
EXPORT_CASES = [
    ("export-tokenizer-str", lambda p: gp.export(_other_model(), p / "d", format="compressed"),
     lambda d: gp.export(_other_model(2), d, tokenizer="bytes"), TypeError,
     r"tokenizer must be None or a tokenizer with save_pretrained .* got 'bytes' \(str\)"),
    ("export-recipe-list", lambda p: gp.export(_other_model(), p / "d"),
     lambda d: gp.export(_other_model(2), d, format="compressed", recipe=["wanda"]), TypeError,
     r"recipe must be None or a dict, got \['wanda'\] \(list\)"),
    ("export-overwrite-str", lambda p: gp.export(_other_model(), p / "d"),
     lambda d: gp.export(_other_model(2), d, overwrite="yes"), TypeError, r"overwrite must be True or False, got 'yes'"),
    ("export-into-hf-model", lambda p: _hf_folder(p / "hf"),
     lambda d: gp.export(_other_model(2), d), ValueError,
     r"out_dir='.*hf' holds files that are not a gradprune export \(a Hugging Face model\): \['config.json', "
     r"'generation_config.json', 'model.safetensors'\]; .* overwrite=True"),
]


@pytest.mark.parametrize("prepare, call, error, match", [c[1:] for c in EXPORT_CASES], ids=[c[0] for c in EXPORT_CASES])
def test_exports_refuse_bad_input_and_keep_the_folder(tmp_path, prepare, call, error, match):
    out = Path(prepare(tmp_path))
    before = files_of(out)
    with pytest.raises(error, match=match):
        call(out)
    assert files_of(out) == before
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no temporary folder left beside it
    if (out / "gradprune.json").exists():
        gp.load(out)


def test_overwrite_replaces_an_unrelated_folder_whole(tmp_path):
    out = _hf_folder(tmp_path / "hf")
    (out / "notes.txt").write_text("x")
    model = _other_model()
    gp.export(model, out, format="compressed", overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "gradprune.json", COMPRESSED_FILE]
    assert torch.equal(gp.load(out).lm_head.weight, model.lm_head.weight)


def test_a_new_export_leaves_no_file_of_the_previous_one(tmp_path):
    from gradprune.tokenizer import byte_tokenizer

    out = gp.export(_other_model(), tmp_path / "d", tokenizer=byte_tokenizer())
    assert (out / "tokenizer.json").exists()
    (out / "model-00001-of-00002.safetensors").write_bytes(b"shard")  # as a sharded save_pretrained leaves
    gp.export(_other_model(2), out, format="compressed")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "gradprune.json", COMPRESSED_FILE]


def _fail_midway(path_arg):
    """A writer that writes half a file, then fails as a full disk does."""
    def write(*args, **kwargs):
        path = Path(path_arg(*args, **kwargs))
        (path / "model.safetensors" if path.is_dir() else path).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")
    return write


@pytest.mark.parametrize("first, second", [("compressed", "dense"), ("dense", "compressed"), ("dense", "structured"),
                                           ("structured", "compressed")])
def test_an_export_interrupted_midway_keeps_the_previous_one(tmp_path, monkeypatch, first, second):
    import safetensors.torch
    from transformers import PreTrainedModel

    model = _other_model()
    out = gp.export(model, tmp_path / "d", format=first)
    before = files_of(out)
    monkeypatch.setattr(safetensors.torch, "save_file", _fail_midway(lambda tensors, path, **k: path))
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", _fail_midway(lambda self, path, **k: path))
    with pytest.raises(OSError, match="No space left on device"):
        gp.export(_other_model(2), out, format=second)
    assert files_of(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    monkeypatch.undo()
    assert torch.equal(gp.load(out).model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight)


def test_a_failed_export_into_a_new_folder_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", _fail_midway(lambda tensors, path, **k: path))
    with pytest.raises(OSError, match="No space left on device"):
        gp.export(_other_model(), tmp_path / "a" / "b" / "d", format="compressed")
    assert list(tmp_path.iterdir()) == []


# -- item 7: a load that fails names the file, what was expected and what was found ----------------------------------
def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _edit_config(directory, **changes):
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


LOAD_CASES = [
    ("load-a-file", lambda d: d / "gradprune.json", ExportError, r"'.*gradprune.json' is a file; an export is a directory"),
    ("load-truncated-dense", lambda d: _truncate(d / "model.safetensors") or d, ExportError,
     r"cannot load the weights in .*d/model.safetensors into the model that .*config.json describes \(llama\): "),
    ("load-corrupt-config", lambda d: (d / "config.json").write_text("{not json") and d, ExportError,
     r"d/config.json cannot be read as a Hugging Face model config"),
    ("load-other-width", lambda d: _edit_config(d, hidden_size=64) or d, ExportError,
     r"cannot load the weights in .*model.safetensors .*: weights whose shapes do not fit the config"),
    ("load-not-a-path", lambda d: 5, TypeError, r"directory must be an export directory path \(str or os.PathLike\), got 5"),
]


@pytest.mark.parametrize("spoil, error, match", [c[1:] for c in LOAD_CASES], ids=[c[0] for c in LOAD_CASES])
def test_a_load_that_fails_names_the_file(tmp_path, spoil, error, match):
    out = gp.export(_other_model(), tmp_path / "d")
    with pytest.raises(error, match=match) as info:
        gp.load(spoil(out))
    assert "ignore_mismatched_sizes" not in str(info.value)


# -- item 3: non-finite values are refused before the first change -------------------------------------------------
def _overflowing():
    """Finite weights whose block 0 makes inf activations: block 1's statistics are not finite."""
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.fill_(3e38)
        model.model.layers[0].mlp.up_proj.weight.mul_(100)
    return model


def _prune_structured(model, **kwargs):
    from gradprune.structured import prune_structured

    return prune_structured(model, calib(), progress=False, **kwargs)


NON_FINITE = r"non-finite \(NaN or inf\) activation statistics in \['model.layers.1.self_attn.q_proj \(sum of squared inputs\)'"
NON_FINITE_CASES = [
    ("wanda-sequential", lambda m: prune_oneshot(m, "wanda", 0.5, calibration=calib(), progress=False), NON_FINITE),
    ("ria-sequential", lambda m: prune_oneshot(m, "ria", 0.5, calibration=calib(), progress=False), NON_FINITE),
    ("sparsegpt-sequential", lambda m: prune_oneshot(m, "sparsegpt", 0.5, calibration=calib(), progress=False),
     r"non-finite \(NaN or inf\) activation statistics in \['model.layers.1.self_attn.q_proj \(X\^T X\)'"),
    ("wanda-owl", lambda m: prune_oneshot(m, "wanda", 0.5, calibration=calib(), allocation="owl", progress=False),
     r"OWL calibration: non-finite \(NaN or inf\) activation statistics in \['model.layers.1"),
    ("wanda-whole-model", lambda m: prune_oneshot(m, "wanda", 0.5, calibration=calib(), sequential=False, progress=False),
     r"wanda calibration: non-finite .* in \['model.layers.1"),
    ("structured-mlp", lambda m: _prune_structured(m, mlp=0.25),
     r"prune_structured: non-finite \(NaN or inf\) calibration statistics in \['layer 1 mlp: input \(sum of squared"),
    ("structured-layers", lambda m: _prune_structured(m, layers=1), r"prune_structured: non-finite .* block influence"),
]


@pytest.mark.parametrize("call, match", [c[1:] for c in NON_FINITE_CASES], ids=[c[0] for c in NON_FINITE_CASES])
def test_non_finite_activations_are_refused_with_nothing_changed(call, match):
    model = _overflowing()
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        call(model)
    assert_unchanged(model, before)


def test_prune_structured_refuses_non_finite_weights_before_calibrating():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"non-finite \(NaN or inf\) weights in \['model.layers.1.mlp.up_proj.weight'\]"):
        _prune_structured(model, mlp=0.25)
    assert_unchanged(model, before)
    assert model.config.intermediate_size == 64


def test_a_gradual_event_with_non_finite_weights_prunes_nothing(tmp_path):
    from lightning.pytorch.callbacks import Callback

    from lightning_helpers import tiny_module, token_loader, trainer

    class Spoil(Callback):  # a diverged weight just before the event of step 3
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3:
                self.masks = {k: v.clone() for k, v in MaskRegistry.of(pl_module).masks.items()}
                with torch.no_grad():
                    pl_module.model.model.layers[1].mlp.up_proj.weight[0, 0] = float("inf")

    spoil = Spoil()
    module = tiny_module()
    gradual = GradualPruningCallback(0.6, start_step=1, end_step=6, every=1)
    with pytest.raises(ValueError, match=r"pruning event at step 3: non-finite \(NaN or inf\) values in "
                                         r"\['model.model.layers.1.mlp.up_proj \(weights\)'\]; nothing was pruned"):
        trainer(tmp_path, max_steps=6, callbacks=[spoil, gradual]).fit(module, token_loader())
    now = MaskRegistry.of(module).masks
    assert spoil.masks and set(now) == set(spoil.masks) and all(torch.equal(now[k], spoil.masks[k]) for k in now)


def test_a_gradual_window_with_non_finite_activations_prunes_nothing(tmp_path):
    from lightning_helpers import tiny_module, token_loader, trainer

    module = tiny_module()
    with torch.no_grad():
        module.model.model.layers[0].mlp.down_proj.weight.fill_(3e38)
        module.model.model.layers[0].mlp.up_proj.weight.mul_(100)
    for param in module.parameters():  # the targets stay finite: only the statistics are not
        param.requires_grad_(False)
    module.model.model.norm.weight.requires_grad_(True)
    gradual = GradualPruningCallback(0.5, scorer="wanda", start_step=1, end_step=4, every=1, stat_batches=1)
    with pytest.raises(ValueError, match=r"pruning event at step 2: non-finite \(NaN or inf\) values in "
                                         r"\['model.model.layers.1.self_attn.q_proj \(sum_sq\)'"):
        trainer(tmp_path, max_steps=4, callbacks=[gradual]).fit(module, token_loader())
    assert not MaskRegistry.of(module).masks


# -- item 2: the masks come back on every resume ------------------------------------------------------------------
def _resume(tmp_path, ckpt, callback, max_steps=8):
    from lightning.pytorch.callbacks import Callback

    from lightning_helpers import tiny_module, token_loader, trainer

    class AtTrainStart(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if not hasattr(self, "masks"):
                self.masks = {k: v.clone() for k, v in MaskRegistry.of(pl_module).masks.items()}

    seen = AtTrainStart()
    module = tiny_module()
    trainer(tmp_path, max_steps=max_steps, callbacks=[seen, callback]).fit(module, token_loader(), ckpt_path=str(ckpt))
    return module, seen.masks


def _saved_masks(ckpt):
    from gradprune.masks import unpack_mask

    state = torch.load(ckpt, weights_only=False)
    (key,) = [k for k in state["callbacks"] if k.startswith("GradualPruningCallback")]
    return {name: unpack_mask(e["bits"], e["shape"]) for name, e in state["callbacks"][key]["masks"].items()}


@pytest.mark.parametrize("callback", [
    lambda: GradualPruningCallback(0.7, start_step=1, end_step=8, every=1),
    lambda: GradualPruningCallback(0.6, start_step=1, end_step=10, every=1),
    lambda: GradualPruningCallback(0.6, schedule="linear", start_step=1, end_step=8, every=1),
    lambda: GradualPruningCallback(0.6, include=r".*_proj", start_step=1, end_step=8, every=1),
    lambda: MagnitudePruningCallback(0.6),
], ids=["final-sparsity", "end-step", "schedule", "include", "other-class"])
def test_a_resume_with_changed_arguments_keeps_the_checkpoints_masks(tmp_path, callback):
    ckpt = _checkpointed_run(tmp_path)
    saved = _saved_masks(ckpt)
    module, at_start = _resume(tmp_path / "r", ckpt, callback())
    assert set(at_start) == set(saved)  # restored (and, for a one-shot callback, pruned further at fit start)
    assert all(not (~saved[k] & at_start[k]).any() for k in saved)
    final = MaskRegistry.of(module)
    for name, keep in saved.items():  # nothing pruned at the checkpoint trained back
        assert not (~keep & final.masks[name]).any()
        assert (final.targets[name].weight[~keep] == 0).all()


def test_a_resume_whose_schedule_cannot_continue_is_refused_naming_both_values(tmp_path):
    ckpt = _checkpointed_run(tmp_path)
    with pytest.raises(ValueError, match=r"final_sparsity=0.1 is below the sparsity of the masks restored from checkpoint "
                                         r"'.*step=4.ckpt' \(0\.\d{4} of this callback's targets\).*set final_sparsity >= 0\.\d{4}"):
        _resume(tmp_path / "r", ckpt, GradualPruningCallback(0.1, start_step=1, end_step=8, every=1))


def test_a_resume_with_another_scorer_starts_a_fresh_window(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_helpers import tiny_module, token_loader, trainer

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1, filename="{step}")
    taylor = GradualPruningCallback(0.5, scorer="taylor", start_step=2, end_step=8, every=4, stat_batches=2)
    trainer(tmp_path, max_steps=3, callbacks=[taylor, checkpoint], enable_checkpointing=True).fit(tiny_module(), token_loader())
    with LogRecords("gradprune.callbacks.window") as logs:
        module, _ = _resume(tmp_path / "r", tmp_path / "ckpt" / "step=3.ckpt",
                            GradualPruningCallback(0.5, scorer="wanda", start_step=2, end_step=8, every=4, stat_batches=2))
    assert "does not fit scorer 'wanda'" in logs.text() and "starts afresh" in logs.text()
    assert MaskRegistry.of(module).sparsity(find_targets(module)) == pytest.approx(0.5, abs=1e-3)


# -- the injected-failure test: each entry point fails at its last step and nothing has changed -------------------
class Injected(RuntimeError):
    pass


def _fail_after(monkeypatch, owner, name, when):
    """Wrap ``owner.name`` so that it does its work and then raises :class:`Injected` on the call where
    ``when(call_number)`` is true; returns the list of call numbers seen."""
    real = getattr(owner, name)
    calls = []

    def wrapper(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append(len(calls) + 1)
        if when(len(calls)):
            raise Injected(f"injected failure after {name} call {len(calls)}")
        return result

    monkeypatch.setattr(owner, name, wrapper)
    return calls


def _structured_module():
    import gradprune.structured.prune as module

    return module


ONESHOT_LAST_STEP = [
    ("magnitude", lambda m: prune_oneshot(m, "magnitude", 0.6)),
    ("wanda", lambda m: prune_oneshot(m, "wanda", 0.6, calibration=calib(), progress=False)),
    ("sparsegpt", lambda m: prune_oneshot(m, "sparsegpt", 0.6, calibration=calib(), progress=False)),
    ("ria", lambda m: prune_oneshot(m, "ria", 0.6, calibration=calib(), progress=False)),
    ("wanda-owl-whole-model", lambda m: prune_oneshot(m, "wanda", 0.6, calibration=calib(), sequential=False,
                                                      allocation="owl", progress=False)),
]


@pytest.mark.parametrize("call", [c[1] for c in ONESHOT_LAST_STEP], ids=[c[0] for c in ONESHOT_LAST_STEP])
def test_prune_oneshot_failing_at_its_last_step_changes_nothing(monkeypatch, call):
    counted = _fail_after(monkeypatch, MaskRegistry, "update", lambda n: False)
    dry = tiny_llama()
    prune_oneshot(dry, "magnitude", 0.3, scope="row")
    counted.clear()
    call(dry)
    last = len(counted)  # the number of mask updates of a whole run: the last one fails below
    monkeypatch.undo()
    model = tiny_llama()
    prune_oneshot(model, "magnitude", 0.3, scope="row")  # earlier masks, restored too
    before = snapshot(model)
    _fail_after(monkeypatch, MaskRegistry, "update", lambda n: n == last)
    with pytest.raises(Injected):
        call(model)
    assert_unchanged(model, before)


@pytest.mark.parametrize("kwargs", [dict(mlp=0.25, heads=2, layers=1), dict(mlp=0.25, scope="global")], ids=["layer", "global"])
def test_prune_structured_failing_at_its_last_step_changes_nothing(monkeypatch, kwargs):
    model = tiny_llama(layers=3)
    prune(model, 0.3)
    before = snapshot(model)
    config = model.config.to_dict()
    ids = calib()[0]
    logits = model(ids).logits
    _fail_after(monkeypatch, _structured_module(), "parameter_count", lambda n: n == 2)  # the report's, after removal
    with pytest.raises(Injected):
        _prune_structured(model, **kwargs)
    assert_unchanged(model, before)
    assert model.config.to_dict() == config and len(model.model.layers) == 3
    assert torch.equal(model(ids).logits, logits)


@pytest.mark.parametrize("scorer", ["magnitude", "sparsegpt"])
def test_a_gradual_event_failing_at_its_last_step_changes_nothing(tmp_path, monkeypatch, scorer):
    from lightning.pytorch.callbacks import Callback

    from lightning_helpers import tiny_module, token_loader, trainer

    class Arm(Callback):  # runs just before the gradual callback's event of step 3
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3:
                self.before = snapshot(pl_module)
                self.armed = True

    arm = Arm()
    arm.armed = False
    _fail_after(monkeypatch, MaskRegistry, "update", lambda n: arm.armed)
    module = tiny_module()
    gradual = GradualPruningCallback(0.6, scorer=scorer, start_step=1, end_step=6, every=1, stat_batches=1)
    with pytest.raises(Injected):
        trainer(tmp_path, max_steps=6, callbacks=[arm, gradual]).fit(module, token_loader())
    assert_unchanged(module, arm.before)


def test_a_resume_failing_at_its_last_step_restores_no_half_of_the_masks(tmp_path, monkeypatch):
    ckpt = _checkpointed_run(tmp_path)
    data = ckpt.read_bytes()
    from lightning_helpers import tiny_module, token_loader, trainer

    module = tiny_module()
    _fail_after(monkeypatch, MaskRegistry, "apply_", lambda n: n == 1)  # the restore's zeroing, its last step
    with pytest.raises(Injected):
        trainer(tmp_path / "r", max_steps=8, callbacks=[GradualPruningCallback(0.6, start_step=1, end_step=8, every=1)]).fit(
            module, token_loader(), ckpt_path=str(ckpt))
    assert MaskRegistry.of(module).masks == {} and ckpt.read_bytes() == data


@pytest.mark.parametrize("format", ["dense", "compressed", "structured"])
def test_load_failing_at_its_last_step_returns_nothing_and_changes_no_file(tmp_path, monkeypatch, format):
    from transformers import PreTrainedModel

    out = gp.export(_other_model(), tmp_path / "d", format=format)
    before = files_of(out)
    real = PreTrainedModel.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        real(cls, *args, **kwargs)
        raise Injected("injected failure after from_pretrained")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(from_pretrained))
    with pytest.raises((Injected, ExportError), match="injected failure after from_pretrained"):
        gp.load(out)
    assert files_of(out) == before


# -- item 4: gp.load verifies the compressed file's content hashes -------------------------------------------------
def _rewrite_compressed(directory, change):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = directory / COMPRESSED_FILE
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
    tensors = load_file(path)
    change(tensors, metadata)
    save_file(tensors, str(path), metadata=metadata)


def _swap_bits_of_a_byte(tensors, metadata):
    """A bitmask byte with four bits set turned into its complement: the same count, other positions."""
    bits = tensors[UP + "::bitmask"]
    index = next(i for i, b in enumerate(bits.tolist()) if bin(b).count("1") == 4)
    bits[index] = bits[index] ^ 0xFF


def _nan_over_a_value(tensors, metadata):
    tensors[UP + "::values"][3] = float("nan")


def _redirect_tied(tensors, metadata):
    metadata["gradprune.tied"] = json.dumps({"lm_head.weight": UP})


UP = "model.layers.0.mlp.up_proj.weight"
HASH_CASES = [
    ("bitmask-byte", _swap_bits_of_a_byte, rf"tensor '{UP}' in .*{COMPRESSED_FILE} does not match its content hash"),
    ("nan-value", _nan_over_a_value, rf"tensor '{UP}' in .* does not match its content hash"),
    ("tied-redirected", _redirect_tied, r"tensor 'lm_head.weight' in .* does not match its content hash"),
    ("shapes-edited", lambda t, m: m.__setitem__("gradprune.shapes", m["gradprune.shapes"].replace(" ", "  ")),
     r"the gradprune metadata does not match its digest"),
]


@pytest.mark.parametrize("change, match", [c[1:] for c in HASH_CASES], ids=[c[0] for c in HASH_CASES])
def test_load_verifies_the_content_hash_of_a_compressed_export(tmp_path, change, match):
    model = tiny_llama(vocab=64)  # the embedding (and the tied head) has up_proj's shape
    prune(model, 0.5)
    out = gp.export(model, tmp_path / "c", format="compressed")
    _rewrite_compressed(out, change)
    with pytest.raises(ExportError, match=match):
        gp.load(out)


# -- item 7: a resume from a checkpoint that cannot be read or does not fit names the file; nothing is loaded -------
def _deeper_checkpoint(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_helpers import token_loader, trainer

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "deep", every_n_train_steps=1, save_top_k=-1, filename="{step}")
    deeper = PrunableLM(model={**TINY_LLAMA, "num_hidden_layers": 3}, vocab_size=128, warmup_steps=0)
    trainer(tmp_path, max_steps=1, callbacks=[checkpoint], enable_checkpointing=True).fit(deeper, token_loader())
    return tmp_path / "deep" / "step=1.ckpt"


def _truncated_checkpoint(tmp_path):
    ckpt = _checkpointed_run(tmp_path)
    half = tmp_path / "half.ckpt"
    half.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    return half


def _foreign_checkpoint(tmp_path):
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"model": tiny_llama().state_dict()}, foreign)
    return foreign


def _wider_checkpoint(tmp_path):
    ckpt = _checkpointed_run(tmp_path)
    state = torch.load(ckpt, weights_only=False)
    name = "model.model.layers.0.mlp.up_proj.weight"
    state["state_dict"][name] = torch.zeros(96, 32)
    wider = tmp_path / "wider.ckpt"
    torch.save(state, wider)
    return wider


RESUME_CASES = [
    ("deeper", _deeper_checkpoint, r"checkpoint '.*step=1.ckpt' does not fit this model \(LlamaForCausalLM.*weights this model lacks: "
                                   r"\['model.model.layers.2.self_attn.q_proj.weight'"),
    ("wider", _wider_checkpoint, r"checkpoint '.*wider.ckpt' does not fit this model .*shapes that differ: "
                                 r"\['model.model.layers.0.mlp.up_proj.weight \(checkpoint \[96, 32\], model \[64, 32\]\)'\]"),
]


@pytest.mark.parametrize("make, match", [c[1:] for c in RESUME_CASES], ids=[c[0] for c in RESUME_CASES])
def test_a_resume_from_a_checkpoint_that_does_not_fit_names_it_and_loads_nothing(tmp_path, make, match):
    from lightning_helpers import tiny_module, token_loader, trainer

    ckpt = make(tmp_path)
    module = tiny_module(seed=5)
    before = copy.deepcopy(module.state_dict())
    with pytest.raises(ValueError, match=match):
        trainer(tmp_path / "r", max_steps=8, callbacks=[GradualPruningCallback(0.6, start_step=1, end_step=8, every=1)]).fit(
            module, token_loader(), ckpt_path=str(ckpt))
    after = module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("make, match", [
    (_truncated_checkpoint, r"checkpoint '.*half.ckpt' cannot be read as a torch checkpoint \(truncated, or not one\)"),
    (_foreign_checkpoint, r"checkpoint '.*foreign.ckpt' is not a Lightning checkpoint \(a dict with 'state_dict'\); found \['model'\]"),
], ids=["truncated", "foreign"])
def test_the_command_names_a_checkpoint_it_cannot_resume_from(tmp_path, capsys, make, match):
    from gradprune.cli import main

    ckpt = make(tmp_path)
    config = tmp_path / "run.yaml"
    config.write_text(
        "trainer:\n  max_steps: 4\n  logger: false\n  enable_checkpointing: false\n"
        "model:\n  model: {model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2,"
        " num_attention_heads: 4, num_key_value_heads: 2}\ndata:\n  tokenizer: bytes\n"
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--ckpt_path", str(ckpt)])
    assert exit_info.value.code == 2
    import re

    assert re.search(match, capsys.readouterr().err)


def test_an_export_dir_that_the_export_at_fit_end_would_refuse_fails_before_training(tmp_path):
    from lightning_helpers import tiny_module, token_loader, trainer

    hf = _hf_folder(tmp_path / "hf")
    before = files_of(hf)
    module = tiny_module(export_dir=str(hf))
    with pytest.raises(ValueError, match=r"export_dir='.*hf' holds files that are not a gradprune export \(a Hugging Face model\)"):
        trainer(tmp_path, max_steps=2).fit(module, token_loader())
    assert module.trainer.global_step == 0 and files_of(hf) == before


def test_a_gradual_event_on_calibration_data_with_non_finite_activations_prunes_nothing(tmp_path):
    from lightning_helpers import tiny_module, token_loader, trainer

    module = tiny_module()
    with torch.no_grad():
        module.model.model.layers[0].mlp.down_proj.weight.fill_(3e38)
        module.model.model.layers[0].mlp.up_proj.weight.mul_(100)
    before = snapshot(module)
    gradual = GradualPruningCallback(0.5, scorer="wanda", statistics="calibration", nsamples=4, seqlen=16,
                                     initial_sparsity=0.2, start_step=0, end_step=4, every=1)  # an event before any step
    with pytest.raises(ValueError, match=r"wanda calibration: non-finite \(NaN or inf\) activation statistics in "
                                         r"\['model.model.layers.1.self_attn.q_proj \(sum of squared inputs\)'"):
        trainer(tmp_path, max_steps=4, callbacks=[gradual]).fit(module, token_loader())
    assert_unchanged(module, before)
