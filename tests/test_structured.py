"""Structured pruning: metric formulas by hand, physical removal that keeps outputs when
the removed units were already zero, reloading the smaller model, GQA consistency, the callback, bad input."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from gradprune import MaskRegistry, prune_structured, remove_zeroed_units
from gradprune.calibration import ChannelStats
from gradprune.structured import ARCHITECTURES, Removal, apply_removal, find_units, parameter_count
from gradprune.structured import metrics
from lightning_helpers import tiny_module, token_loader, trainer
from tiny_models import tiny_gpt2

torch.set_grad_enabled(True)


def gqa_llama(layers=4, heads=6, kv=2, hidden=48, head_dim=8, intermediate=64, model_type="llama", seed=0):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, vocab_size=128, hidden_size=hidden, intermediate_size=intermediate,
                                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                                  head_dim=head_dim, max_position_embeddings=128, tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(config).eval()


def tiny_opt(layers=3, seed=0):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    return OPTForCausalLM(OPTConfig(vocab_size=128, hidden_size=32, ffn_dim=64, num_hidden_layers=layers,
                                    num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=32)).eval()


def ids(n=3, length=12, seed=0):
    return torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(seed))


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def snapshot(model):
    return copy.deepcopy(model.state_dict()), copy.deepcopy(model.config.to_dict())


def assert_unchanged(model, before):
    state, config = before
    after = model.state_dict()
    assert set(after) == set(state) and all(torch.equal(state[k], v) for k, v in after.items())
    assert model.config.to_dict() == config


# -- metric formulas on hand-made activations ----------------------------------------------------------------------
def stats_of(rows):
    x = torch.tensor(rows, dtype=torch.float32)
    stats = ChannelStats.empty(x.shape[1], torch.device("cpu"), near_zero_eps=0.1)
    stats.add(x)
    return stats


def test_neuron_metrics_by_hand():
    # 3 tokens, 2 neurons: neuron 0 sees 1, -1, 0.05; neuron 1 sees 2, 2, 2
    s = stats_of([[1.0, 2.0], [-1.0, 2.0], [0.05, 2.0]])
    assert torch.allclose(metrics.l2(s), torch.tensor([math.sqrt(2.0025), math.sqrt(12)], dtype=torch.float64))
    assert torch.allclose(metrics.mean_abs(s), torch.tensor([2.05 / 3, 2.0], dtype=torch.float64))
    mean0 = 0.05 / 3
    assert torch.allclose(metrics.variance(s), torch.tensor([2.0025 / 3 - mean0**2, 0.0], dtype=torch.float64), atol=1e-7)
    assert torch.allclose(metrics.near_zero(s), torch.tensor([2 / 3, 1.0], dtype=torch.float64))
    w = torch.tensor([[1.0, -2.0], [3.0, 0.5]])  # down_proj (out=2, neurons=2)
    assert torch.allclose(metrics.wanda(s, w), torch.tensor([4 * math.sqrt(2.0025), 2.5 * math.sqrt(12)], dtype=torch.float64))


def test_combined_metric_is_the_weighted_sum_of_mean_normalised_metrics():
    s = stats_of([[1.0, 2.0], [-1.0, 2.0], [0.05, 2.0]])
    l2, nz = metrics.l2(s), metrics.near_zero(s)
    expected = 2.0 * l2 / l2.mean() + 0.5 * nz / nz.mean()
    assert torch.allclose(metrics.combined(s, {"l2": 2.0, "near_zero": 0.5}), expected)
    assert torch.allclose(metrics.neuron_importance("combined", s, torch.ones(1, 2), {"l2": 2.0, "near_zero": 0.5}), expected)


def test_head_group_importance_sums_each_groups_channels():
    sum_sq = torch.tensor([1.0, 3.0, 4.0, 5.0, 0.0, 9.0], dtype=torch.float64)  # 3 groups of 2 channels
    assert torch.allclose(metrics.head_group_importance(sum_sq, 2), torch.tensor([2.0, 3.0, 3.0], dtype=torch.float64))


def test_block_influence_by_hand():
    h_in = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [5.0, 5.0]]])
    h_out = torch.tensor([[[0.0, 1.0], [2.0, 2.0], [-1.0, 0.0]]])
    # 1 - cos: orthogonal 1, parallel 0, third token is padding
    assert metrics.block_influence(h_in, h_out, torch.tensor([[True, True, False]])) == pytest.approx(0.5)
    assert metrics.block_influence(h_in, h_out) == pytest.approx((1 + 0 + 1 + math.sqrt(0.5)) / 3)


# -- removal keeps outputs when the units were already zero -----------------------------------------------------------
def zero_units(model, neurons=(), groups=(), layers=()):
    units = find_units(model)
    with torch.no_grad():
        for b in units.blocks:
            for j in neurons:
                b.mlp_in[-1].weight[j] = 0  # up_proj row j (a gated MLP: act(gate) * 0)
            for g in groups:
                cols = slice(g * units.group_size * units.head_dim, (g + 1) * units.group_size * units.head_dim)
                b.attention[3].weight[:, cols] = 0
        for i in layers:
            units.blocks[i].attention[3].weight.zero_()
            units.blocks[i].mlp_out.weight.zero_()


def test_removing_zeroed_units_keeps_the_outputs_and_the_model_reloads_smaller(tmp_path):
    from transformers import AutoModelForCausalLM

    model = gqa_llama()
    zero_units(model, neurons=[1, 5, 9], groups=[1], layers=[2])
    x = ids()
    before = logits(model, x)
    report = remove_zeroed_units(model)
    assert report["removed"] == {"mlp_per_layer": 3, "head_groups_per_layer": 1, "layers": [2]}
    assert report["sizes"] == {"intermediate_size": 61, "num_attention_heads": 3, "num_key_value_heads": 1, "num_hidden_layers": 3}
    assert torch.allclose(logits(model, x), before, atol=1e-5)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    layer = again.model.layers[0]
    assert tuple(layer.mlp.down_proj.weight.shape) == (48, 61) and tuple(layer.mlp.gate_proj.weight.shape) == (61, 48)
    assert tuple(layer.self_attn.q_proj.weight.shape) == (24, 48) and tuple(layer.self_attn.k_proj.weight.shape) == (8, 48)
    assert tuple(layer.self_attn.o_proj.weight.shape) == (48, 24) and len(again.model.layers) == 3
    assert torch.allclose(logits(again, x), before, atol=1e-5)


def test_uniform_rule_removes_as_many_zeroed_neurons_as_the_layer_with_fewest():
    model = gqa_llama(layers=2)
    units = find_units(model)
    with torch.no_grad():
        units.blocks[0].mlp_out.weight[:, [0, 1, 2]] = 0
        units.blocks[1].mlp_out.weight[:, [7]] = 0
    x = ids()
    before = logits(model, x)
    report = remove_zeroed_units(model, heads=False, layers=False)
    assert report["removed"]["mlp_per_layer"] == 1 and model.config.intermediate_size == 63
    assert torch.allclose(logits(model, x), before, atol=1e-5)


@pytest.mark.parametrize("model_type", ["mistral", "qwen2", "qwen3"])
def test_other_llama_style_architectures_remove_and_keep_outputs(model_type):
    model = gqa_llama(layers=3, model_type=model_type)
    zero_units(model, neurons=[0, 3], groups=[0], layers=[1])
    x = ids()
    before = logits(model, x)
    remove_zeroed_units(model)
    assert model.config.num_attention_heads == 3 and model.config.num_hidden_layers == 2
    assert torch.allclose(logits(model, x), before, atol=1e-5)


def test_gpt2_and_opt_neurons_and_layers(tmp_path):
    from transformers import AutoModelForCausalLM

    for model, name in ((tiny_gpt2(layers=3).eval(), "gpt2"), (tiny_opt(), "opt")):
        units = find_units(model)
        with torch.no_grad():
            for b in units.blocks:
                out = b.mlp_out
                if name == "gpt2":  # Conv1D: (in, out)
                    out.weight[[2, 4], :] = 0
                else:
                    out.weight[:, [2, 4]] = 0
        x = ids()
        before = logits(model, x)
        assert remove_zeroed_units(model)["removed"]["mlp_per_layer"] == 2
        assert torch.allclose(logits(model, x), before, atol=1e-5)
        model.save_pretrained(tmp_path / name)
        again = AutoModelForCausalLM.from_pretrained(tmp_path / name).eval()
        assert torch.allclose(logits(again, x), before, atol=1e-5)


# -- prune_structured -------------------------------------------------------------------------------------------------
def test_prune_structured_removes_exact_counts_gqa_groups_and_generates(tmp_path):
    from transformers import AutoModelForCausalLM

    model = gqa_llama(layers=4, heads=6, kv=2)
    params = parameter_count(model)
    report = prune_structured(model, ids(), mlp=0.25, heads=3, layers=1, metric="wanda", progress=False)
    assert report["sizes_after"] == {"intermediate_size": 48, "num_attention_heads": 3, "num_key_value_heads": 1,
                                     "num_hidden_layers": 3}
    assert report["removed"]["query_heads_per_layer"] == 3 and report["removed"]["head_groups_per_layer"] == 1
    assert report["parameters_before"] == params > report["parameters_after"] == parameter_count(model)
    assert len(report["block_influence"]) == 4
    assert report["removed"]["layers"] == [min(range(4), key=report["block_influence"].__getitem__)]
    for i, layer in enumerate(model.model.layers):  # KV caches index by layer_idx
        assert layer.self_attn.layer_idx == i
    out = model.generate(ids(1), max_new_tokens=4, do_sample=False, pad_token_id=0)  # with the KV cache
    full = ids(1)
    for _ in range(4):
        full = torch.cat([full, logits(model, full)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, full)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.allclose(logits(again, ids()), logits(model, ids()), atol=1e-5)


def test_layer_scope_removes_the_lowest_scored_neurons():
    model = gqa_llama(layers=2)
    x = ids()
    down = {i: b.mlp.down_proj.weight.detach().clone() for i, b in enumerate(model.model.layers)}
    from gradprune.calibration import collect_activation_stats
    from gradprune.targets import find_targets

    stats = collect_activation_stats(model, [x], find_targets(model, include=["down_proj"]))
    prune_structured(model, [x], mlp=16, metric="l2", progress=False)
    for i, layer in enumerate(model.model.layers):
        l2 = stats[f"model.layers.{i}.mlp.down_proj"].sum_sq.sqrt()
        kept = torch.sort(torch.sort(l2, stable=True).indices[16:]).values
        assert torch.equal(layer.mlp.down_proj.weight, down[i][:, kept])


def test_global_scope_shrinks_uniformly_and_masks_the_rest():
    model = gqa_llama(layers=3)
    report = prune_structured(model, ids(), mlp=0.25, scope="global", metric="l2", progress=False)
    removed, masked = report["removed"]["mlp_per_layer"], report["removed"]["mlp_masked"]
    assert removed * 3 + masked == 16 * 3  # exactly 25% of all 192 neurons chosen
    assert model.config.intermediate_size == 64 - removed
    registry = MaskRegistry.of(model)
    assert sum(int((~mask).all(0).sum()) for name, mask in registry.masks.items() if name.endswith("down_proj")) == masked
    # the masked neurons are zero: removing them changes nothing
    x = ids()
    before = logits(model, x)
    MaskRegistry.remove_from(model)
    remove_zeroed_units(model, heads=False, layers=False)
    assert torch.allclose(logits(model, x), before, atol=1e-5)


def test_one_statistics_pass_serves_several_calls():
    from gradprune.structured import unit_statistics

    dense = gqa_llama(layers=3)
    a, b = copy.deepcopy(dense), copy.deepcopy(dense)
    prune_structured(a, ids(), mlp=0.5, heads=3, layers=1, progress=False)
    stats = unit_statistics(dense, ids(), progress=False)
    report = prune_structured(b, statistics=stats, mlp=0.5, heads=3, layers=1, progress=False)
    assert report["calibration"]["tokens"] == 36
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    with pytest.raises(ValueError, match=r"statistics= do not fit this call: missing \[\], taken on a model of 3 layers, this one has 2"):
        prune_structured(b, statistics=stats, mlp=0.25, progress=False)


def test_every_metric_runs_and_gives_the_requested_size():
    for metric in metrics.NEURON_METRICS:
        model = gqa_llama(layers=2)
        prune_structured(model, ids(), mlp=0.5, metric=metric, progress=False)
        assert model.config.intermediate_size == 32


def test_masks_in_the_registry_follow_the_removal():
    from gradprune import prune_oneshot

    model = gqa_llama(layers=3)
    prune_oneshot(model, "magnitude", 0.5)
    prune_structured(model, ids(), mlp=0.5, layers=1, progress=False)
    registry = MaskRegistry.of(model)
    assert sorted({n.split(".")[2] for n in registry.masks}) == ["0", "1"]
    for name, mask in registry.masks.items():
        assert mask.shape == model.get_submodule(name).weight.shape
        assert not bool((model.get_submodule(name).weight[~mask] != 0).any())


# -- bad input: a clear error and the model untouched ---------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(mlp=1.0), r"mlp=1.0 would remove all 64 MLP neurons of a layer"),
    (dict(mlp=64), r"mlp=64 would remove all 64 MLP neurons"),
    (dict(heads=6), r"heads=6 would remove all 6 attention heads"),
    (dict(layers=4), r"layers=4 would remove all 4 decoder layers"),
    (dict(heads=2), r"heads=2 removes 2 of 6 query heads, which breaks grouped-query attention.*whole groups of 3"),
    (dict(heads=0.25), r"heads=0.25 removes 2 of 6 query heads, which breaks grouped-query attention"),
    (dict(mlp=0.5, metric="entropy"), r"metric must be one of \['l2', 'mean_abs'"),
    (dict(mlp=0.5, scope="row"), r"scope must be one of \['layer', 'global'\]"),
    (dict(), r"nothing to remove"),
    (dict(mlp=0.5, metric="l2", metric_weights={"l2": 1}), r"metric_weights is only used by metric='combined'"),
])
def test_bad_amounts_are_refused_with_the_model_untouched(kwargs, match):
    model = gqa_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        prune_structured(model, ids(), progress=False, **kwargs)
    assert_unchanged(model, before)


def test_global_scope_that_would_empty_a_layer_is_refused():
    model = gqa_llama(layers=2)
    with torch.no_grad():  # layer 0's MLP is silent: a global ranking would take all its neurons
        model.model.layers[0].mlp.up_proj.weight.mul_(1e-6)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"would remove every MLP neuron of layers \[0\]"):
        prune_structured(model, ids(), mlp=0.5, scope="global", progress=False)
    assert_unchanged(model, before)


def test_unknown_architecture_names_the_supported_ones():
    from transformers import BloomConfig, BloomForCausalLM

    model = BloomForCausalLM(BloomConfig(vocab_size=128, hidden_size=32, n_layer=2, n_head=4))
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"does not know the architecture 'bloom'; supported model types: \['gpt2', 'llama'"):
        prune_structured(model, ids(), mlp=0.5)
    assert_unchanged(model, before)
    assert set(ARCHITECTURES) >= {"llama", "gpt2", "opt"}


def test_gpt2_heads_are_refused_with_the_reason():
    model = tiny_gpt2().eval()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"attention heads of gpt2 cannot be removed: its attention derives head_dim"):
        prune_structured(model, ids(), heads=1)
    assert_unchanged(model, before)


def test_apply_removal_refuses_non_uniform_counts_and_changes_nothing():
    model = gqa_llama(layers=2)
    before = snapshot(model)
    removal = Removal(mlp_keep={0: torch.arange(10), 1: torch.arange(20)})
    with pytest.raises(ValueError, match=r"every layer must keep the same number of MLP neurons"):
        apply_removal(model, removal)
    assert_unchanged(model, before)


# -- the callback -------------------------------------------------------------------------------------------------------
def test_callback_prunes_at_fit_start_rebuilds_the_optimizer_and_distills(tmp_path):
    from gradprune.callbacks import StructuredPruningCallback
    from gradprune.distill import Distillation

    module = tiny_module(distill=Distillation(hidden_layers="all", hidden_loss="squarehead"))
    module.model.config.num_hidden_layers  # 2 blocks, 4 heads / 2 kv, 64 neurons
    callback = StructuredPruningCallback(mlp=0.5, heads=2, layers=1, nsamples=4, seqlen=16)
    fit = trainer(tmp_path, max_steps=3, callbacks=[callback])
    fit.fit(module, train_dataloaders=token_loader())
    config = module.model.config
    assert (config.intermediate_size, config.num_attention_heads, config.num_key_value_heads, config.num_hidden_layers) == (32, 2, 1, 1)
    assert module.teacher.config.num_hidden_layers == 2  # the dense teacher
    params = {id(p) for p in module.parameters()}
    optimizer = fit.optimizers[0]
    assert {id(p) for group in optimizer.param_groups for p in group["params"]} <= params
    assert all(optimizer.state[p] for group in optimizer.param_groups for p in group["params"])  # they trained
    assert callback.done and callback.report["removed"]["layers"] in ([0], [1])
    assert module.distiller.teacher_hidden == {1: 2}  # the student's last (normed) hidden state against the teacher's last


def test_callback_refuses_bad_arguments_at_construction():
    from gradprune.callbacks import StructuredPruningCallback

    with pytest.raises(ValueError, match=r"metric must be one of"):
        StructuredPruningCallback(mlp=0.5, metric="bogus")
    with pytest.raises(ValueError, match=r"nothing to remove"):
        StructuredPruningCallback()


def test_another_pruning_callback_listed_first_is_refused_before_anything_changes(tmp_path):
    from gradprune.callbacks import GradualPruningCallback, StructuredPruningCallback

    module = tiny_module()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    fit = trainer(tmp_path, max_steps=2, callbacks=[GradualPruningCallback(0.5, every=1, scorer="wanda", start_step=1),
                                                    StructuredPruningCallback(layers=1, nsamples=4, seqlen=16)])
    with pytest.raises(ValueError, match=r"StructuredPruningCallback must come before the other pruning callbacks .*"
                                         r"\['GradualPruningCallback'\] come first"):
        fit.fit(module, train_dataloaders=token_loader())
    assert module.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


def test_explicit_hidden_layers_with_layer_removal_is_a_clear_error(tmp_path):
    from gradprune.callbacks import StructuredPruningCallback
    from gradprune.distill import Distillation

    module = tiny_module(distill=Distillation(hidden_layers=[1, 2]))
    fit = trainer(tmp_path, max_steps=1, callbacks=[StructuredPruningCallback(layers=1, nsamples=4, seqlen=16)])
    with pytest.raises(ValueError, match=r"hidden_layers=\[1, 2\] lists blocks of the unpruned model"):
        fit.fit(module, train_dataloaders=token_loader())
