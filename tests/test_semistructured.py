"""accelerate_2of4: the rules checked on CPU (errors name the layer, nothing changes), and the real swap on
a CUDA GPU (skipped without one)."""
import re

import pytest
import torch
from torch import nn

import gradprune as gp
from gradprune.semistructured import layer_problems, satisfies_2of4, shape_rules
from tiny_models import tiny_llama

CUSPARSELT = {torch.float16: (16, 16), torch.bfloat16: (16, 16), torch.int8: (32, 32)}


def test_the_2of4_pattern_is_checked_per_group_of_four_inputs():
    assert satisfies_2of4(torch.tensor([[1.0, 0, 2, 0, 0, 0, 0, 3]]))
    assert not satisfies_2of4(torch.tensor([[1.0, 1, 2, 0, 0, 0, 0, 3]]))  # 3 nonzeros in the first four
    assert not satisfies_2of4(torch.tensor([[1.0, 0, 0]]))  # in_features not a multiple of 4
    model = tiny_llama(hidden=64, intermediate=128)
    gp.prune(model, 0.5, pattern="2:4")
    assert all(satisfies_2of4(t.weight) for t in gp.find_targets(model))


def test_torch_rules_are_read_from_torch():
    backend, rules = shape_rules()
    assert backend == "cuSPARSELt" and rules[torch.bfloat16] == (16, 16) and torch.float32 not in rules


def meta_weight(shape, dtype):
    """A weight that claims to live on a CUDA device, for the pure rule checks (no GPU needed)."""
    return type("FakeCudaWeight", (), {"device": torch.device("cuda", 0), "dtype": dtype, "shape": torch.Size(shape)})()


@pytest.mark.parametrize("shape, dtype, capability, message", [
    ((64, 128), torch.bfloat16, (8, 0), None),
    ((576, 1536), torch.float16, (9, 0), None),  # SmolLM2's MLP
    ((40, 64), torch.bfloat16, (8, 0), r"layer 'l' has shape \(40, 64\) \(out, in\); cuSPARSELt needs out_features a multiple of 16"),
    ((64, 72), torch.float16, (8, 0), r"in_features a multiple of 16"),
    ((64, 64), torch.float32, (8, 0), r"layer 'l' has dtype torch.float32; cuSPARSELt takes"),
    ((64, 64), torch.float16, (7, 5), r"compute capability 7.5: 2:4 sparse tensor cores need 8.0\+"),
])
def test_shape_dtype_and_gpu_rules_name_the_layer(shape, dtype, capability, message):
    problems = layer_problems("l", meta_weight(shape, dtype), CUSPARSELT, "cuSPARSELt", capability)
    if message is None:
        assert problems == []
    else:
        assert len(problems) == 1 and re.search(message, problems[0]), problems


def test_on_cpu_the_error_names_the_layer_and_nothing_changes():
    model = tiny_llama(hidden=64, intermediate=128).half()
    gp.prune(model, 0.5, pattern="2:4")
    before = {name: p for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"layer 'model.layers.0.self_attn.q_proj' is on cpu: 2:4 sparse matmuls need a CUDA GPU"):
        gp.accelerate_2of4(model)
    assert all(p is before[name] and p.layout == torch.strided for name, p in model.named_parameters())


def test_a_model_without_2of4_layers_is_refused():
    model = tiny_llama()
    gp.prune(model, 0.5)  # unstructured: no 2:4 groups
    with pytest.raises(ValueError, match=r"no nn.Linear of the LlamaForCausalLM satisfies 2:4 .* pattern='2:4'"):
        gp.accelerate_2of4(model)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
                    reason="needs a CUDA GPU with compute capability 8.0+")
def test_swap_on_a_gpu_keeps_the_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128)).half().cuda().eval()
    gp.prune(model, 0.5, pattern="2:4", include=["0", "2"])
    x = torch.randn(64, 128, dtype=torch.half, device="cuda")
    with torch.no_grad():
        dense = model(x)
        assert gp.accelerate_2of4(model) == ["0", "2"]
        sparse = model(x)
    assert any(isinstance(w, torch.sparse.SparseSemiStructuredTensor) for w in (model[0].weight, model[0].weight.data))
    torch.testing.assert_close(sparse, dense, rtol=1e-2, atol=1e-2)
