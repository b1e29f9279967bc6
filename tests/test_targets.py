import pytest
import torch
from torch import nn

from gradprune import find_targets
from tiny_models import tiny_llama


def test_llama_defaults_exclude_embeddings_and_head(llama):
    names = [t.name for t in find_targets(llama)]
    assert "lm_head" not in names
    assert not any("embed" in n or "norm" in n for n in names)
    assert len(names) == 2 * 7  # q, k, v, o, gate, up, down per block
    assert "model.layers.0.self_attn.q_proj" in names


def test_untied_head_is_excluded_too():
    model = tiny_llama()
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    assert "lm_head" not in [t.name for t in find_targets(model)]


def test_gpt2_conv1d_is_transposed(gpt2):
    targets = {t.name: t for t in find_targets(gpt2)}
    attn = targets["transformer.h.0.attn.c_attn"]
    assert attn.transposed
    assert attn.weight.shape == (32, 96)  # Conv1D stores (in, out)
    assert (attn.in_features, attn.out_features) == (32, 96)
    assert attn.out_in(attn.weight).shape == (96, 32)
    assert "lm_head" not in targets


def test_include_regex_and_suffix_list(llama):
    regex = [t.name for t in find_targets(llama, include=r".*\.mlp\..*")]
    assert len(regex) == 6 and all(".mlp." in n for n in regex)
    suffix = [t.name for t in find_targets(llama, include=["q_proj", "v_proj"])]
    assert suffix == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    ]
    rest = [t.name for t in find_targets(llama, exclude=["down_proj"])]
    assert len(rest) == 12 and not any(n.endswith("down_proj") for n in rest)


def test_include_can_select_an_untied_head_explicitly():
    from tiny_models import tiny_llama

    untied = tiny_llama()
    untied.lm_head.weight = torch.nn.Parameter(untied.lm_head.weight.detach().clone())
    assert [t.name for t in find_targets(untied, include=["lm_head"])] == ["lm_head"]


def test_a_head_tied_to_the_embedding_is_never_a_target(llama):
    """Pruning a tied head would zero the input embedding too."""
    with pytest.raises(ValueError, match=r"include=\['lm_head'\] selects only \['lm_head'\].*tied embeddings"):
        find_targets(llama, include=["lm_head"])
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("gradprune.targets")
    logger.addHandler(handler)
    try:
        names = [t.name for t in find_targets(llama, include=".*")]
    finally:
        logger.removeHandler(handler)
    assert "lm_head" not in names and names
    assert any("tied to the input embedding" in r.getMessage() for r in records)


def test_no_match_lists_module_names(llama):
    with pytest.raises(ValueError, match=r"include=\['qproj'\] matches no module .*model.embed_tokens"):
        find_targets(llama, include=["qproj"])
    with pytest.raises(ValueError, match=r"exclude='nothing.\*' matches no module"):
        find_targets(llama, exclude="nothing.*")


def test_everything_excluded_is_an_error(llama):
    with pytest.raises(ValueError, match="no prunable Linear/Conv1D weights"):
        find_targets(llama, exclude=r".*proj")


def test_bad_selector_types():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(TypeError, match="include must be None, a regex string or a list"):
        find_targets(model, include=3)
    with pytest.raises(ValueError, match="not a valid regular expression"):
        find_targets(model, include="(")


def test_integer_weights_rejected():
    model = nn.Sequential(nn.Linear(4, 4))
    model[0].weight = nn.Parameter(torch.ones(4, 4, dtype=torch.int32), requires_grad=False)
    with pytest.raises(TypeError, match=r"integer or boolean weights .*'0 \(torch.int32\)'"):
        find_targets(model)


def test_head_excluded_when_model_is_wrapped(llama):
    wrapper = nn.Module()
    wrapper.model = llama
    names = [t.name for t in find_targets(wrapper)]
    assert "model.lm_head" not in names and len(names) == 14
    untied = tiny_llama()
    untied.lm_head.weight = nn.Parameter(untied.lm_head.weight.detach().clone())
    wrapper.model = untied
    assert "model.lm_head" not in [t.name for t in find_targets(wrapper)]


class _AdapterWrapper(nn.Module):
    """Shaped like PEFT's tuner layers (lora.Linear): a base_layer, get_base_layer() and adapter Linears."""

    def __init__(self, base):
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.ModuleDict({"default": nn.Linear(base.in_features, 2, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(2, base.out_features, bias=False)})

    def get_base_layer(self):
        return self.base_layer

    @property
    def weight(self):
        return self.base_layer.weight

    def forward(self, x):
        return self.base_layer(x) + self.lora_B["default"](self.lora_A["default"](x))


def test_adapter_wrappers_are_targets_under_their_own_names_and_adapters_are_not():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
    plain = [t.name for t in find_targets(model)]
    base = model[2]
    model[2] = _AdapterWrapper(base)
    targets = find_targets(model)
    assert [t.name for t in targets] == plain == ["0", "2"]
    assert targets[1].weight is base.weight and not targets[1].transposed
