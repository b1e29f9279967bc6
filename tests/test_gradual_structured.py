"""Gradual structured pruning: the unit maths (counts, choice, masks) by hand, then GradualStructuredPruningCallback
through fit (exact counts at every event, monotone masks, masked units stay zero), resume inside a statistics
window, the structured export (smaller shapes, same logits), bad input, and two real DDP processes."""
from datetime import timedelta

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from transformers import AutoModelForCausalLM

import gradprune as gp
from gradprune import MaskRegistry
from gradprune.callbacks import GradualStructuredPruningCallback
from gradprune.structured import find_units
from gradprune.structured.masking import choose_units, mask_units_, unit_count
from gradprune.validation import Problems
from lightning_helpers import tiny_module, token_loader, trainer
from tiny_models import tiny_gpt2, tiny_llama

# TINY_LLAMA: 2 layers, 64 MLP neurons per layer, 4 query heads sharing 2 key/value heads (2 groups of 2 heads,
# head_dim 8)
NEURONS, GROUPS, LAYERS = 64, 2, 2


# -- the maths ---------------------------------------------------------------------------------------------------
def test_unit_count_rounds_half_up_and_is_monotone():
    assert [unit_count(f, 10) for f in (0.0, 0.04, 0.05, 0.25, 0.5, 0.94, 0.95)] == [0, 0, 1, 3, 5, 9, 10]
    counts = [unit_count(f / 1000, 64) for f in range(1000)]
    assert counts == sorted(counts) and counts[0] == 0


def test_choose_units_per_layer_adds_the_lowest_unmasked():
    scores = {0: torch.tensor([5.0, 1.0, 3.0, 0.5, 2.0]), 1: torch.tensor([1.0, 1.0, 1.0, 0.0, 9.0])}
    masked = {0: torch.tensor([False, False, False, True, False])}
    chosen = choose_units(scores, masked, 3, "layer")
    assert chosen[0].tolist() == [False, True, False, True, True]  # 0.5 (already) then 1.0 and 2.0
    assert chosen[1].tolist() == [True, True, False, True, False]  # ties go to the lower index
    assert masked[0].tolist() == [False, False, False, True, False]  # the input is not changed


def test_choose_units_keeps_what_is_masked_even_if_it_scores_high():
    scores = {0: torch.tensor([9.0, 1.0, 2.0, 3.0])}
    chosen = choose_units(scores, {0: torch.tensor([True, False, False, False])}, 2, "layer")
    assert chosen[0].tolist() == [True, True, False, False]
    assert choose_units(scores, {0: torch.tensor([True, True, True, False])}, 2, "layer")[0].sum() == 3  # only grows


def test_choose_units_globally_never_empties_a_layer():
    scores = {0: torch.tensor([0.1, 0.2, 0.3]), 1: torch.tensor([5.0, 6.0, 0.05])}
    chosen = choose_units(scores, {}, 3, "global")
    # the three lowest are 0.05, 0.1, 0.2; then layer 0 keeps 0.3
    assert chosen[0].tolist() == [True, True, False] and chosen[1].tolist() == [False, False, True]
    chosen = choose_units(scores, {}, 4, "global")  # 0.3 would empty layer 0: the next lowest, 5.0, goes
    assert chosen[0].tolist() == [True, True, False] and chosen[1].tolist() == [True, False, True]
    with pytest.raises(ValueError, match="leave some layer with none"):
        choose_units(scores, {}, 5, "global")


def test_choose_units_refuses_non_finite_scores():
    with pytest.raises(ValueError, match=r"blocks \[1\] are not finite"):
        choose_units({0: torch.ones(3), 1: torch.tensor([1.0, float("nan"), 2.0])}, {}, 1, "layer")


def test_mask_units_masks_whole_neurons_and_whole_kv_groups():
    model = tiny_llama()
    units = find_units(model)
    mlp = {0: torch.zeros(NEURONS, dtype=torch.bool)}
    mlp[0][[3, 10]] = True
    heads = {1: torch.tensor([False, True])}
    assert mask_units_(model, units, mlp, heads) == 3
    masks = MaskRegistry.of(model).masks
    block0, block1 = "model.layers.0", "model.layers.1"
    for proj in ("gate_proj", "up_proj"):
        mask = masks[f"{block0}.mlp.{proj}"]
        assert not mask[[3, 10]].any() and mask.sum() == (NEURONS - 2) * 32
    down = masks[f"{block0}.mlp.down_proj"]
    assert not down[:, [3, 10]].any() and down.sum() == 32 * (NEURONS - 2)
    # group 1 = KV head 1 and query heads 2, 3: q rows 16..31, k / v rows 8..15, o_proj columns 16..31
    q, k, v, o = (masks[f"{block1}.self_attn.{p}_proj"] for p in "qkvo")
    assert not q[16:32].any() and q[:16].all()
    assert not k[8:16].any() and k[:8].all() and torch.equal(k, v)
    assert not o[:, 16:32].any() and o[:, :16].all()
    assert f"{block1}.mlp.down_proj" not in masks and f"{block0}.self_attn.q_proj" not in masks
    assert not model.model.layers[1].self_attn.o_proj.weight[:, 16:32].any()


def test_masked_units_are_removed_by_remove_zeroed_units_with_the_same_logits():
    model = tiny_llama().eval()
    units = find_units(model)
    mlp = {b: torch.arange(NEURONS) % 4 == b for b in range(LAYERS)}  # 16 neurons in each layer
    mask_units_(model, units, mlp, {b: torch.tensor([b == 0, b == 1]) for b in range(LAYERS)})
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        gp.remove_zeroed_units(model)
        after = model(input_ids=ids).logits
    assert model.config.intermediate_size == NEURONS - 16 and model.config.num_key_value_heads == 1
    assert model.config.num_attention_heads == 2
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


# -- through fit -------------------------------------------------------------------------------------------------
class UnitProbe(Callback):
    """Runs after the pruning callback: masked weights are zero at every batch; each event's masked units."""

    def __init__(self, gradual):
        self.gradual, self.events = gradual, {}

    def _check(self, trainer, pl_module):
        registry = MaskRegistry.of(pl_module)
        for name, mask in registry.masks.items():
            assert not registry.targets[name].weight[~mask].any(), (trainer.global_step, name)
        step = trainer.global_step
        if self.gradual.last_event_step == step and step not in self.events:
            self.events[step] = self.gradual.masked_units

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._check(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._check(trainer, pl_module)


def hooks_left(module):
    return any(m._forward_hooks for m in module.modules())


@pytest.mark.parametrize("kind", ["cubic", "linear", "exponential"])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_exact_unit_counts_at_every_event_and_monotone_masks(tmp_path, kind, scope):
    module = tiny_module()
    gradual = GradualStructuredPruningCallback(mlp=0.6, heads=0.5, schedule=kind, start_step=2, end_step=14, every=4,
                                               scope=scope, metric="combined", stat_batches=3)
    probe = UnitProbe(gradual)
    trainer(tmp_path, max_steps=18, callbacks=[gradual, probe]).fit(module, token_loader())
    assert sorted(probe.events) == [2, 6, 10, 14]
    previous = None
    for step, masked in sorted(probe.events.items()):
        for unit, per_layer in (("mlp", NEURONS), ("heads", GROUPS)):
            count = unit_count(gradual.fraction_at(unit, step), per_layer if scope == "layer" else per_layer * LAYERS)
            got = [int(m.sum()) for m in masked[unit].values()]
            assert (got == [count] * LAYERS) if scope == "layer" else (sum(got) == count), (step, unit, got, count)
            assert all(m.sum() < m.numel() for m in masked[unit].values())  # no layer loses all its units
            if previous is not None:  # masks only grow
                assert all((previous[unit][b] & ~m).sum() == 0 for b, m in masked[unit].items())
        previous = masked
    assert gradual.unit_count_at("mlp", 14) == unit_count(0.6, NEURONS if scope == "layer" else NEURONS * LAYERS)
    assert not hooks_left(module)


def test_masked_units_stay_zero_and_weights_match_the_masks_after_training(tmp_path):
    module = tiny_module()
    gradual = GradualStructuredPruningCallback(mlp=0.5, schedule="linear", start_step=1, end_step=4, every=1,
                                               metric="wanda", stat_batches=2)
    trainer(tmp_path, max_steps=10, callbacks=[gradual], gradient_clip_val=0.5).fit(module, token_loader())
    units = find_units(module)
    for b in units.blocks:
        dropped = gradual.masked_units["mlp"][b.index]
        assert int(dropped.sum()) == 32
        assert not b.mlp_out.weight[:, dropped].any()
        assert not any(m.weight[dropped].any() for m in b.mlp_in)
        assert b.mlp_out.weight[:, ~dropped].all()  # the kept neurons trained on


class Boom(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 5:  # inside the window before the event at step 6
            raise RuntimeError("boom")


def test_hooks_exist_only_in_windows_and_are_removed_when_fit_fails(tmp_path):
    module = tiny_module()
    gradual = GradualStructuredPruningCallback(mlp=0.5, start_step=2, end_step=10, every=4, stat_batches=3)
    with pytest.raises(RuntimeError, match="boom"):
        trainer(tmp_path, max_steps=12, callbacks=[gradual, Boom()]).fit(module, token_loader())
    assert not hooks_left(module)


class HookProbe(Callback):
    def __init__(self):
        self.hooked = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.hooked.append((trainer.global_step, hooks_left(pl_module)))


def test_statistics_window_is_the_micro_batches_before_each_event(tmp_path):
    module = tiny_module()
    gradual = GradualStructuredPruningCallback(mlp=0.5, schedule="linear", start_step=4, end_step=12, every=4,
                                               stat_batches=2)
    probe = HookProbe()
    trainer(tmp_path, max_steps=14, callbacks=[gradual, probe]).fit(module, token_loader())
    # the event at start_step (4) masks nothing (the fraction is 0 there), so it needs no window
    assert [step for step, hooked in probe.hooked if hooked] == [6, 7, 10, 11]


def test_window_counts_micro_batches_under_gradient_accumulation(tmp_path):
    module = tiny_module()
    gradual = GradualStructuredPruningCallback(mlp=0.5, schedule="linear", start_step=2, end_step=4, every=2,
                                               stat_batches=3)
    probe = HookProbe()
    trainer(tmp_path, max_steps=4, accumulate_grad_batches=2, callbacks=[gradual, probe]).fit(module, token_loader())
    # 8 micro-batches, 2 per optimizer step; the event at 2 masks nothing, the one at 4 takes the last 3 before it
    assert [hooked for _, hooked in probe.hooked] == [False] * 5 + [True] * 3
    assert all(int(m.sum()) == 32 for m in gradual.masked_units["mlp"].values())


def test_a_plain_module_with_sgd_momentum_keeps_masked_units_at_zero(tmp_path):
    from test_gradual_scorers import PlainLM

    module = PlainLM()
    gradual = GradualStructuredPruningCallback(mlp=0.5, heads=0.5, schedule="linear", start_step=1, end_step=5,
                                               every=2, stat_batches=2)
    probe = UnitProbe(gradual)
    trainer(tmp_path, max_steps=9, callbacks=[gradual, probe]).fit(module, token_loader())
    assert sorted(probe.events) == [1, 3, 5]
    assert [int(m.sum()) for m in gradual.masked_units["heads"].values()] == [1, 1]
    assert not hooks_left(module)


# -- resume ----------------------------------------------------------------------------------------------------------
def test_resume_inside_a_statistics_window_gives_the_same_masks_and_weights(tmp_path):
    def run(root, ckpt_path=None, checkpoint=None):
        module = tiny_module(seed=1)
        callbacks = [GradualStructuredPruningCallback(mlp=0.5, heads=0.5, start_step=2, end_step=14, every=4,
                                                      metric="variance", scope="global", stat_batches=4)]
        if checkpoint is not None:
            callbacks.append(checkpoint)
        trainer(root, max_epochs=4, limit_train_batches=4, callbacks=callbacks,
                enable_checkpointing=checkpoint is not None).fit(module, token_loader(), ckpt_path=ckpt_path)
        return module, callbacks[0]

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{step}")
    full, full_cb = run(tmp_path / "a", checkpoint=checkpoint)
    middle = tmp_path / "ckpt" / "step=8.ckpt"  # events at 2, 6, 10, 14: step 8 is inside the window before 10
    state = torch.load(middle, weights_only=False)
    (key,) = [k for k in state["callbacks"] if k.startswith("GradualStructuredPruningCallback")]
    saved = state["callbacks"][key]
    assert saved["last_event_step"] == 6 and saved["statistics"]
    assert all(float(s["count"]) > 0 for s in saved["statistics"].values())
    resumed, resumed_cb = run(tmp_path / "b", ckpt_path=str(middle))
    assert resumed_cb.last_event_step == full_cb.last_event_step == 14
    for kind in ("mlp", "heads"):
        for b, m in full_cb.masked_units[kind].items():
            assert torch.equal(m, resumed_cb.masked_units[kind][b]), (kind, b)
    masks_a, masks_b = MaskRegistry.of(full).masks, MaskRegistry.of(resumed).masks
    assert masks_a.keys() == masks_b.keys() and all(torch.equal(masks_a[k], masks_b[k]) for k in masks_a)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


# -- export ---------------------------------------------------------------------------------------------------------
def test_structured_export_is_smaller_with_the_same_logits(tmp_path):
    module = tiny_module()
    gradual = GradualStructuredPruningCallback(mlp=0.5, heads=0.5, schedule="linear", start_step=1, end_step=6,
                                               every=1, stat_batches=2)
    trainer(tmp_path, max_steps=8, callbacks=[gradual]).fit(module, token_loader())
    out = gp.export(module, tmp_path / "out", format="structured")
    smaller = AutoModelForCausalLM.from_pretrained(out).eval()
    assert smaller.config.intermediate_size == NEURONS // 2
    assert (smaller.config.num_attention_heads, smaller.config.num_key_value_heads) == (2, 1)
    layer = smaller.model.layers[0]
    assert tuple(layer.mlp.gate_proj.weight.shape) == (32, 32) and tuple(layer.mlp.down_proj.weight.shape) == (32, 32)
    assert tuple(layer.self_attn.q_proj.weight.shape) == (16, 32) and tuple(layer.self_attn.k_proj.weight.shape) == (8, 32)
    assert tuple(layer.self_attn.o_proj.weight.shape) == (32, 16)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    masked = module.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(smaller(input_ids=ids).logits, masked(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_prunable_lm_distilling_from_itself_exports_the_narrower_model_at_fit_end(tmp_path):
    import json

    module = tiny_module(distill={"teacher": "self"}, export_dir=str(tmp_path / "export"), export_format="structured")
    gradual = GradualStructuredPruningCallback(mlp=0.25, schedule="cubic", start_step=0, end_step=0.5, every=2,
                                               metric="combined", stat_batches=2)
    trainer(tmp_path, max_steps=8, callbacks=[gradual]).fit(module, token_loader())
    assert gradual.resolved_end_step == 4 and gradual.last_event_step == 4
    smaller = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    assert smaller.config.intermediate_size == NEURONS - 16
    teacher = module.teacher.model.layers[0].mlp.down_proj.weight
    assert teacher.shape == (32, NEURONS) and teacher.count_nonzero() == teacher.numel()  # the teacher is not masked
    recipe = json.loads((tmp_path / "export" / "gradprune.json").read_text())["recipe"]
    assert recipe["callbacks"][0]["init_args"]["mlp"] == 0.25


def test_after_one_shot_removal_the_gradual_fractions_apply_to_the_smaller_model(tmp_path):
    from gradprune.callbacks import StructuredPruningCallback

    module = tiny_module()
    one_shot = StructuredPruningCallback(mlp=0.25, nsamples=4, seqlen=16)  # 64 -> 48 neurons at fit start
    gradual = GradualStructuredPruningCallback(mlp=0.5, schedule="linear", start_step=1, end_step=4, every=1,
                                               stat_batches=1)
    trainer(tmp_path, max_steps=6, callbacks=[one_shot, gradual]).fit(module, token_loader())
    assert [m.numel() for m in gradual.masked_units["mlp"].values()] == [48, 48]
    assert [int(m.sum()) for m in gradual.masked_units["mlp"].values()] == [24, 24]
    out = gp.export(module, tmp_path / "out", format="structured")
    assert AutoModelForCausalLM.from_pretrained(out).config.intermediate_size == 24


def test_the_recipe_rebuilds_the_callback():
    import importlib

    from gradprune.lightning_module import describe_callbacks

    callback = GradualStructuredPruningCallback(mlp=0.3, heads=0.25, schedule="linear", end_step=0.5, every=7,
                                                metric="combined", metric_weights={"l2": 1.0}, scope="global")
    (entry,) = describe_callbacks([callback])
    assert entry["init_args"]["schedule"] == "linear" and entry["init_args"]["end_step"] == 0.5
    module, name = entry["class_path"].rsplit(".", 1)
    rebuilt = getattr(importlib.import_module(module), name)(**entry["init_args"])
    assert describe_callbacks([rebuilt]) == [entry]


# -- bad input --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, error, match", [
    ({}, ValueError, r"nothing to prune: give mlp and/or heads"),
    ({"mlp": 1.0}, ValueError, r"mlp must be in \[0, 1\), got 1.0"),
    ({"heads": -0.1}, ValueError, r"heads must be in \[0, 1\), got -0.1"),
    ({"mlp": "half"}, TypeError, r"mlp must be a number in \[0, 1\), got 'half'"),
    ({"mlp": 0.5, "schedule": "constant"}, ValueError, r"schedule must be one of \['cubic', 'linear', 'exponential'\], got 'constant'"),
    ({"mlp": 0.5, "scope": "row"}, ValueError, r"scope must be one of \['layer', 'global'\], got 'row'"),
    ({"mlp": 0.5, "metric": "taylor"}, ValueError, r"metric must be one of \[.*'wanda'\], got 'taylor'"),
    ({"mlp": 0.5, "metric_weights": {"l2": 1}}, ValueError, r"metric_weights is only used by metric='combined'"),
    ({"mlp": 0.5, "stat_batches": 0}, ValueError, r"stat_batches must be an int >= 1 .*got 0"),
    ({"mlp": 0.5, "end_step": 1.5}, ValueError, r"end_step as a float is a fraction of the run and must be in \(0, 1\], got 1.5"),
    ({"mlp": 0.5, "every": 0}, ValueError, r"every must be an integer > 0, got 0"),
    ({"mlp": 0.5, "exponent": 0}, ValueError, r"exponent must be a finite number > 0, got 0"),
    ({"mlp": 0.5, "start_step": -1}, ValueError, r"start_step must be an integer >= 0, got -1"),
    ({"mlp": 0.5, "start_step": 5, "end_step": 5}, ValueError, r"end_step \(5\) must be greater than start_step \(5\)"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        GradualStructuredPruningCallback(**kwargs)


def test_all_problems_are_reported_together():
    with pytest.raises(ValueError, match=r"invalid arguments:\n  - mlp must be in .*\n  - scope must be one of.*\n"
                                         r"  - every must be an integer > 0, got -1"):
        GradualStructuredPruningCallback(mlp=2.0, scope="row", every=-1)


@pytest.mark.parametrize("kwargs, model, match", [
    ({"heads": 0.9}, None, r"heads=0.9 would mask all 2 head groups of every layer .*use heads < 0.75"),
    ({"mlp": 0.999}, None, r"mlp=0.999 would mask all 64 MLP neurons of every layer"),
    ({"heads": 0.7, "scope": "global"}, None, r"heads=0.7 with scope='global' would mask 3 of the model's 4 head groups, "
                                               r"more than the 2 that leave one in each of its 2 layers"),
    ({"heads": 0.5}, "gpt2", r"heads=0.5: attention heads of gpt2 cannot be masked: .*Heads are supported for LLaMA-style"),
])
def test_bad_amounts_for_the_model_fail_at_fit_start_with_the_model_untouched(tmp_path, kwargs, model, match):
    module = gp.PrunableLM(model=tiny_gpt2(), learning_rate=1e-2, warmup_steps=0) if model == "gpt2" else tiny_module()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    gradual = GradualStructuredPruningCallback(**kwargs)
    with pytest.raises(ValueError, match=match):
        trainer(tmp_path, max_steps=2, callbacks=[gradual]).fit(module, token_loader())
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    assert not MaskRegistry.of(module).masks and not hooks_left(module)


def test_unknown_architecture_names_the_supported_ones(tmp_path):
    from tiny_models import tiny_bert

    module = gp.PrunableLM(model=tiny_bert(), learning_rate=1e-2, warmup_steps=0)
    gradual = GradualStructuredPruningCallback(mlp=0.5)
    with pytest.raises(ValueError, match=r"does not know the architecture 'bert'; supported model types: \['gpt2', "):
        trainer(tmp_path, max_steps=1, callbacks=[gradual]).fit(module, token_loader())


def test_check_counts_collects_a_problem_per_kind():
    from gradprune.structured.masking import check_counts

    problems = Problems()
    check_counts(problems, "mlp", 0.5, 64, 2, "layer", "MLP neurons")
    check_counts(problems, "heads", 0.8, 2, 2, "layer", "head groups")
    assert len(problems.value_errors) == 1 and "heads=0.8" in problems.value_errors[0]


# -- DDP: two real processes ---------------------------------------------------------------------------------------
class SaveMasks(Callback):
    def __init__(self, directory, gradual):
        self.directory, self.gradual = directory, gradual

    def on_fit_end(self, trainer, pl_module):
        torch.save({"world": trainer.world_size,
                    "masks": {k: v.clone() for k, v in MaskRegistry.of(pl_module).masks.items()},
                    "units": self.gradual.masked_units,
                    "weights": {k: v.detach().clone() for k, v in pl_module.state_dict().items()}},
                   self.directory / f"rank{trainer.global_rank}.pt")


@pytest.mark.distributed
def test_ddp_ranks_end_with_identical_exact_masks(tmp_path):
    module = tiny_module()
    gradual = GradualStructuredPruningCallback(mlp=0.5, heads=0.5, schedule="cubic", start_step=1, end_step=6, every=2,
                                               scope="global", metric="combined", stat_batches=2)
    ddp = DDPStrategy(start_method="spawn", process_group_backend="gloo", timeout=timedelta(seconds=120))
    fit = trainer(tmp_path, max_steps=8, strategy=ddp, devices=2, callbacks=[gradual, SaveMasks(tmp_path, gradual)])
    fit.fit(module, token_loader())
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert ranks[0]["world"] == 2
    assert ranks[0]["masks"] and ranks[0]["masks"].keys() == ranks[1]["masks"].keys()
    for name, mask in ranks[0]["masks"].items():
        assert torch.equal(mask, ranks[1]["masks"][name]), name
    for kind, per_layer in (("mlp", NEURONS), ("heads", GROUPS)):
        for b, m in ranks[0]["units"][kind].items():
            assert torch.equal(m, ranks[1]["units"][kind][b]), (kind, b)
        assert sum(int(m.sum()) for m in ranks[0]["units"][kind].values()) == unit_count(0.5, per_layer * LAYERS)
    for name, weight in ranks[0]["weights"].items():
        assert torch.equal(weight, ranks[1]["weights"][name]), name
