"""LoRA recovery that keeps sparsity: adapters train on the pruned model, the base stays frozen and pruned
weights stay zero; the merge keeps exactly the base's zeros and computes what was trained."""
import copy
import json
import sys

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

pytest.importorskip("peft")

from gradprune import MaskRegistry, PrunableLM, find_targets, prune, sparsity_report  # noqa: E402
from gradprune.callbacks import GradualPruningCallback, WandaPruningCallback  # noqa: E402
from gradprune.distill import Distillation  # noqa: E402
from gradprune.lora import LoRA, add_lora, keep_mask, lora_layers, merge_lora  # noqa: E402
from lightning_helpers import tiny_module, token_loader, trainer  # noqa: E402
from tiny_models import tiny_gpt2, tiny_llama  # noqa: E402


class Snapshot(Callback):
    """The module's parameters and sparsity report just after fit start (after one-shot pruning)."""

    def on_train_start(self, trainer, pl_module):
        self.params = {k: v.detach().clone() for k, v in pl_module.named_parameters()}
        self.report = sparsity_report(pl_module)
        self.masks = {k: v.clone() for k, v in MaskRegistry.of(pl_module).masks.items()}


def base_key(name):
    """A PEFT parameter name without the wrapper's parts: where the weight lives in the plain model."""
    return name.replace("base_model.model.", "", 1).replace(".base_layer", "")


def fit_pruned_lora(tmp_path, steps=6, **lora):
    module = tiny_module(lora=LoRA(**{"r": 4, "alpha": 8.0, **lora}))
    snapshot = Snapshot()
    wanda = WandaPruningCallback(0.5, nsamples=4, seqlen=16)
    trainer(tmp_path, max_steps=steps, callbacks=[wanda, snapshot]).fit(module, token_loader())
    return module, snapshot


def test_training_changes_only_adapters_and_pruned_weights_stay_zero(tmp_path):
    module, snapshot = fit_pruned_lora(tmp_path, dropout=0.1)
    registry = MaskRegistry.of(module)
    assert registry.sparsity(list(registry.targets.values())) == pytest.approx(0.5)
    assert all(".lora_" not in name for name in registry.masks)  # the adapters' own layers are not targets
    changed = {k for k, v in module.named_parameters() if not torch.equal(v.detach(), snapshot.params[k])}
    assert changed and all(".lora_A." in k or ".lora_B." in k for k in changed), sorted(changed)[:5]
    assert any(".lora_B." in k for k in changed)
    for name, target in registry.targets.items():
        assert (target.weight[~registry.masks[name]] == 0).all(), name
        assert not target.weight.requires_grad
    assert sparsity_report(module) == snapshot.report


def test_merged_model_has_the_same_zeros_masks_and_logits(tmp_path):
    module, snapshot = fit_pruned_lora(tmp_path)
    merged = module.merged_model()
    assert not lora_layers(merged) and lora_layers(module.model)  # a merged copy; the module keeps its adapters

    pruned = sparsity_report(module.model)
    report = sparsity_report(merged)
    assert report["global"] == pruned["global"] and report["global"]["sparsity"] == pytest.approx(0.5)
    assert {base_key(k): v for k, v in pruned["layers"].items()} == report["layers"]
    registry = MaskRegistry.of(module)
    plain = {t.name: t for t in find_targets(merged)}
    for name, mask in registry.masks.items():
        weight = plain[base_key(name.removeprefix("model."))].weight
        assert torch.equal(weight != 0, mask), name  # zeros exactly where the masks prune
    for name, mask in snapshot.masks.items():
        assert torch.equal(mask, registry.masks[name])

    module.eval()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        trained, exported = module(ids), merged(input_ids=ids).logits
    assert torch.allclose(trained, exported, atol=1e-5, rtol=1e-4), (trained - exported).abs().max()

    # PEFT's own merge fills the pruned weights in: what this module exists to avoid
    filled = sparsity_report(copy.deepcopy(module.model).merge_and_unload())
    assert filled["global"]["zeros"] < report["global"]["zeros"] // 100


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2-conv1d"])
def test_masked_adapters_act_only_through_kept_weights(build):
    model = build()
    prune(model, 0.5)
    before = sparsity_report(model)
    wrapped = add_lora(model, LoRA(r=4))
    with torch.no_grad():
        for _, layer in lora_layers(wrapped):
            layer.lora_B["default"].weight.normal_()  # a trained-looking, dense product B A
    wrapped.eval()
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        unmerged = wrapped(input_ids=ids).logits
        merged = merge_lora(copy.deepcopy(wrapped))
        assert torch.allclose(unmerged, merged(input_ids=ids).logits, atol=1e-5, rtol=1e-4)
    assert sparsity_report(merged) == before


@pytest.mark.parametrize("method", ["magnitude", "wanda", "ria", "sparsegpt"])
def test_one_shot_pruning_through_the_adapters_prunes_as_without_them(method):
    from gradprune import prune_oneshot

    windows = [torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    calibration = None if method == "magnitude" else windows
    plain, wrapped = tiny_llama(), add_lora(tiny_llama(), LoRA(r=2))  # the same weights (seeded), B = 0
    prune_oneshot(plain, method, 0.5, "unstructured", calibration)
    prune_oneshot(wrapped, method, 0.5, "unstructured", calibration)
    merged = merge_lora(wrapped)
    assert plain.state_dict().keys() == merged.state_dict().keys()
    for name, value in plain.state_dict().items():
        assert torch.equal(value, merged.state_dict()[name]), name


def test_keep_mask_follows_the_base_weight():
    wrapped = add_lora(tiny_llama(), LoRA(r=2))
    name, layer = lora_layers(wrapped)[0]
    assert keep_mask(layer) is None  # dense: PEFT's own low-rank forward
    with torch.no_grad():
        layer.base_layer.weight[0, :3] = 0  # in place, as a pruning callback does
    keep = keep_mask(layer)
    assert keep is not None and int((~keep).sum()) == 3 and not keep[0, :3].any()


@pytest.mark.parametrize("scorer", ["magnitude", "wanda"])
def test_gradual_pruning_of_the_frozen_base_during_lora(tmp_path, scorer):
    module = tiny_module(lora={"r": 4})  # a dict, as from YAML or a checkpoint's hyperparameters
    gradual = GradualPruningCallback(0.5, schedule="linear", start_step=0, end_step=4, every=2, scorer=scorer,
                                     stat_batches=2)
    trainer(tmp_path, max_steps=6, callbacks=[gradual]).fit(module, token_loader())
    registry = MaskRegistry.of(module)
    assert registry.sparsity(gradual.targets) == pytest.approx(0.5)
    assert sparsity_report(module.merged_model())["global"] == sparsity_report(module.model)["global"]


def test_taylor_scorer_refuses_frozen_base_weights(tmp_path):
    module = tiny_module(lora=LoRA(r=2))
    gradual = GradualPruningCallback(0.5, scorer="taylor", start_step=1, end_step=4, every=1)
    with pytest.raises(ValueError, match=r"scorer 'taylor' ranks by the gradients .* frozen .*lora"):
        trainer(tmp_path, max_steps=2, callbacks=[gradual]).fit(module, token_loader())


def test_teacher_self_is_the_base_model_without_adapters(tmp_path):
    module = tiny_module(lora=LoRA(r=2), distill=Distillation(teacher="self"))
    trainer(tmp_path, max_steps=2, callbacks=[WandaPruningCallback(0.5, nsamples=4, seqlen=16)]).fit(module, token_loader())
    assert not lora_layers(module.teacher)
    assert sparsity_report(module.teacher)["global"]["zeros"] == 0


def test_export_writes_the_merged_model_at_the_recorded_sparsity(tmp_path):
    from transformers import AutoModelForCausalLM

    module = tiny_module(lora=LoRA(r=4), export_dir=str(tmp_path / "export"), tokenizer=None)
    trainer(tmp_path, max_steps=3, callbacks=[WandaPruningCallback(0.5, nsamples=4, seqlen=16)]).fit(module, token_loader())
    written = json.loads((tmp_path / "export" / "gradprune.json").read_text())["sparsity"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    assert not lora_layers(reloaded)
    assert sparsity_report(reloaded) == written
    assert written["global"] == sparsity_report(module.model)["global"]


def test_resume_restores_adapters_and_masks(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = tiny_module(lora=LoRA(r=4))
    trainer(tmp_path / "a", max_steps=3, enable_checkpointing=True,
            callbacks=[WandaPruningCallback(0.5, nsamples=4, seqlen=16), checkpoint]).fit(first, token_loader())
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert saved["hyper_parameters"]["lora"]["r"] == 4
    assert any(".lora_B." in k for k in saved["state_dict"])
    loaded = PrunableLM.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt")  # rebuilt from the saved dict
    assert loaded.lora == LoRA(r=4) and lora_layers(loaded.model)
    assert all(torch.equal(v, saved["state_dict"][k]) for k, v in loaded.state_dict().items())

    resumed = tiny_module(seed=5, lora=LoRA(r=4))
    snapshot = Snapshot()
    trainer(tmp_path / "b", max_steps=5, callbacks=[WandaPruningCallback(0.5, nsamples=4, seqlen=16), snapshot]).fit(
        resumed, token_loader(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    for name, value in first.named_parameters():  # restored, before the resumed steps
        assert torch.equal(snapshot.params[name], value.detach()), name
    masks_a, masks_b = MaskRegistry.of(first).masks, MaskRegistry.of(resumed).masks
    assert masks_a.keys() == masks_b.keys() and all(torch.equal(masks_a[k], masks_b[k]) for k in masks_a)
    assert sparsity_report(resumed.merged_model())["global"] == sparsity_report(first.merged_model())["global"]


# -- bad input --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options, error, message", [
    (dict(r=0), ValueError, r"lora.r must be an integer >= 1, got 0"),
    (dict(r=2.5), TypeError, r"lora.r must be an integer >= 1, got 2.5"),
    (dict(alpha=0), ValueError, r"lora.alpha"),
    (dict(dropout=1.0), ValueError, r"lora.dropout"),
    (dict(target_modules=[]), ValueError, r"lora.target_modules must not be an empty list"),
])
def test_bad_lora_options_are_refused(options, error, message):
    with pytest.raises(error, match=message):
        LoRA(**options)


def test_unknown_lora_key_is_refused_before_building_the_model():
    with pytest.raises(ValueError, match=r"lora has unknown keys \['rank'\]"):
        PrunableLM(model="/nonexistent/never/read", lora={"rank": 8})


def test_lora_without_peft_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft now raises ImportError
    with pytest.raises(ImportError, match=r"pip install gradprune\[lora\]"):
        tiny_module(lora=LoRA())


def test_lora_on_a_model_without_adapter_targets_fails_clearly():
    class NoLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(128, 8)

        def forward(self, input_ids, attention_mask=None):
            return self.embed(input_ids)

    model = NoLinear()
    with pytest.raises(ValueError, match=r"lora.target_modules: no prunable Linear/Conv1D weights found"):
        PrunableLM(model=model, lora=LoRA())
    assert type(model.embed) is nn.Embedding


def test_target_modules_matching_nothing_fails_clearly():
    with pytest.raises(ValueError, match=r"lora.target_modules: include=\['qproj'\] matches no module"):
        add_lora(tiny_llama(), LoRA(target_modules=["qproj"]))


def test_a_model_that_already_has_adapters_is_refused():
    wrapped = add_lora(tiny_llama(), LoRA(r=2))
    with pytest.raises(ValueError, match="already has LoRA layers"):
        add_lora(wrapped, LoRA(r=2))


class SaveRank(Callback):
    """Each rank's adapters, masks and merged sparsity at the end of fit, for the two-process test."""

    def __init__(self, directory):
        self.directory = directory

    def on_fit_end(self, trainer, pl_module):
        torch.save({"params": {k: v.detach().clone() for k, v in pl_module.named_parameters()},
                    "masks": {k: v.clone() for k, v in MaskRegistry.of(pl_module).masks.items()},
                    "merged": sparsity_report(pl_module.merged_model())["global"], "world": trainer.world_size},
                   self.directory / f"rank{trainer.global_rank}.pt")


@pytest.mark.distributed
@pytest.mark.numerics  # like the other two-process tests: run again under other CPU kernels
def test_lora_under_ddp_trains_the_same_adapters_on_both_ranks(tmp_path):
    module = tiny_module(lora=LoRA(r=4, dropout=0.1))
    wanda = WandaPruningCallback(0.5, nsamples=4, seqlen=16)
    trainer(tmp_path, max_steps=4, strategy="ddp_spawn", devices=2, callbacks=[wanda, SaveRank(tmp_path)]).fit(
        module, token_loader())
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert ranks[0]["world"] == 2
    assert ranks[0]["masks"].keys() == ranks[1]["masks"].keys() and ranks[0]["masks"]
    for name, mask in ranks[0]["masks"].items():
        assert torch.equal(mask, ranks[1]["masks"][name]), name
    assert any(".lora_B." in k and v.abs().sum() > 0 for k, v in ranks[0]["params"].items())
    for name, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][name]), name
    for rank in ranks:
        assert rank["merged"]["sparsity"] == pytest.approx(0.5)
