import pytest
import torch

import gradprune as gp
from gradprune import MaskRegistry, pack_mask, sparsity_report, unpack_mask
from gradprune.optimizer_state import second_moment_keys
from tiny_models import tiny_gpt2, tiny_llama

pytestmark = pytest.mark.numerics  # run again under other CPU kernels by .ci/run (make test-numerics)


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("autocast", [False, True])
def test_pruned_weights_stay_zero_through_adamw_accumulation_and_clipping(build, autocast):
    model = build()
    gp.prune(model, 0.6, scope="global")
    registry = MaskRegistry.of(model)
    pruned = {n: ~m for n, m in registry.masks.items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    registry.attach(optimizer)
    torch.manual_seed(0)
    accumulate = 2
    for step in range(50):
        for _ in range(accumulate):
            ids = torch.randint(0, 128, (2, 16))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = model(input_ids=ids, labels=ids).loss / accumulate
            loss.backward()
        registry.mask_gradients_()  # before clipping: the norm only sees live weights
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        optimizer.step()
        optimizer.zero_grad()
    for name, mask in pruned.items():
        weight = registry.targets[name].weight
        assert (weight[mask] == 0).all(), name
    report = sparsity_report(model)["global"]
    assert report["zeros"] == gp.exact_count(0.6, report["numel"])
    # live weights did train
    assert any((registry.targets[n].weight[registry.masks[n]] != 0).all() for n in registry.masks)


def test_without_enforcement_adamw_revives_pruned_weights():
    """The failure the enforcement prevents: momentum and decoupled weight decay move zeros."""
    model = tiny_llama()
    gp.prune(model, 0.5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        ids = torch.randint(0, 128, (2, 16))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert sparsity_report(model)["global"]["sparsity"] < 0.1


def test_registry_is_one_per_model_and_masks_compose(llama):
    gp.prune(llama, 0.3)
    first = {n: m.clone() for n, m in MaskRegistry.of(llama).masks.items()}
    gp.prune(llama, 0.5, scope="global")
    registry = MaskRegistry.of(llama)
    assert registry is MaskRegistry.of(llama)
    for name, mask in registry.masks.items():
        assert not (mask & ~first[name]).any()
    assert registry.pruned_count() == round(0.5 * registry.numel())


def test_pack_roundtrip_and_size():
    torch.manual_seed(0)
    for shape in [(3, 5), (64, 24), (7,)]:
        mask = torch.rand(shape) > 0.5
        packed = pack_mask(mask)
        assert packed.dtype == torch.uint8 and packed.numel() == (mask.numel() + 7) // 8
        assert torch.equal(unpack_mask(packed, shape), mask)


def test_registry_state_dict_roundtrip_into_fresh_model():
    model = tiny_llama()
    gp.prune(model, 0.7, scope="global")
    state = MaskRegistry.of(model).state_dict()
    fresh = tiny_llama()
    MaskRegistry.of(fresh).load_state_dict(state)
    for name, mask in MaskRegistry.of(model).masks.items():
        assert torch.equal(MaskRegistry.of(fresh).masks[name], mask)
    report = sparsity_report(fresh)["global"]
    assert report["zeros"] == gp.exact_count(0.7, report["numel"])


def test_load_state_dict_rejects_wrong_model_unchanged():
    state = {"nope": {"shape": [2, 2], "bits": pack_mask(torch.ones(2, 2, dtype=torch.bool))}}
    model = tiny_llama()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="checkpoint has a mask for 'nope'"):
        MaskRegistry.of(model).load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_report_is_json_serialisable(gpt2):
    import json

    gp.prune(gpt2, 0.5)
    report = sparsity_report(gpt2)
    json.loads(json.dumps(report))
    assert report["global"]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert set(report["by_type"]) == {"c_attn", "c_proj", "c_fc"}
    assert all(v["sparsity"] == pytest.approx(0.5, abs=1e-3) for v in report["layers"].values())


OPTIMIZERS = [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1),
    lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.1, amsgrad=True),
    lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, fused=True),
    lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, foreach=True),
    lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.1, fused=True),
    lambda p: torch.optim.Adamax(p, lr=1e-2, weight_decay=0.1),
    lambda p: torch.optim.NAdam(p, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True),
    lambda p: torch.optim.RAdam(p, lr=1e-2, weight_decay=0.1),
    lambda p: torch.optim.RMSprop(p, lr=1e-2, momentum=0.9, centered=True, weight_decay=0.1),
    lambda p: torch.optim.Adagrad(p, lr=1e-2, weight_decay=0.1, initial_accumulator_value=0.1),
    lambda p: torch.optim.Adadelta(p, lr=1.0, weight_decay=0.1),
]


@pytest.mark.parametrize("make_optimizer", OPTIMIZERS)
def test_zero_preserving_optimizers_keep_zeros_without_remasking(make_optimizer):
    """The registry skips re-zeroing weights after steps of these optimizers: check the claim holds,
    with optimizer state built up before pruning (it is zeroed when the masks change)."""
    model = tiny_llama()
    optimizer = make_optimizer(model.parameters())
    assert isinstance(optimizer, gp.masks.ZERO_PRESERVING_OPTIMIZERS)
    registry = MaskRegistry.of(model)
    registry.attach(optimizer, mask_gradients=False)
    floors = bool(second_moment_keys(optimizer))
    assert len(registry._hooks[id(optimizer)]) == floors  # no weight re-zeroing hook, only the floors' refresh

    def step():
        ids = torch.randint(0, 128, (2, 16))
        model(input_ids=ids, labels=ids).loss.backward()
        registry.mask_gradients_()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()

    torch.manual_seed(0)
    for _ in range(3):
        step()  # dense: builds momentum / moments for every weight
    gp.prune(model, 0.5)
    for _ in range(3):
        step()
    gp.prune(model, 0.7, scope="global")  # a second event with state present
    for _ in range(5):
        step()
    for name, mask in registry.masks.items():
        assert (registry.targets[name].weight[~mask] == 0).all(), name
        state = optimizer.state[registry.targets[name].weight]
        for key in second_moment_keys(optimizer):  # floored, not zero (so square roots stay fast)
            if key in state:
                assert (state[key][~mask] >= torch.finfo(torch.float32).tiny).all(), (name, key)


class Drift(torch.optim.Optimizer):
    """An optimizer that moves every weight, zero or not (as noise-adding optimizers do)."""

    def __init__(self, params):
        super().__init__(params, {})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(0.01)


def test_other_optimizers_get_weights_rezeroed_after_each_step():
    model = tiny_llama()
    gp.prune(model, 0.5)
    registry = MaskRegistry.of(model)
    optimizer = Drift(model.parameters())
    registry.attach(optimizer)
    optimizer.step()
    assert all((registry.targets[n].weight[~m] == 0).all() for n, m in registry.masks.items())

    unguarded = tiny_llama()
    gp.prune(unguarded, 0.5)
    other = MaskRegistry.of(unguarded)
    drift = Drift(unguarded.parameters())
    other.attach(drift, remask_weights=False)
    drift.step()
    assert not any((other.targets[n].weight[~m] == 0).any() for n, m in other.masks.items())


def test_gradient_masking_runs_once_per_step_when_shared():
    model = tiny_llama()
    gp.prune(model, 0.5)
    registry = MaskRegistry.of(model)
    name, mask = next(iter(registry.masks.items()))
    weight = registry.targets[name].weight
    weight.grad = torch.ones_like(weight)
    registry.mask_gradients_(step=3)
    assert (weight.grad[~mask] == 0).all()
    weight.grad = torch.ones_like(weight)
    registry.mask_gradients_(step=3)  # a second callback at the same step: no second pass
    assert (weight.grad == 1).all()
    registry.mask_gradients_(step=4)
    assert (weight.grad[~mask] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64])
def test_zero_pruned_keeps_live_bits_and_writes_positive_zero(dtype):
    torch.manual_seed(0)
    values = torch.randn(6, 10).to(dtype) if dtype.is_floating_point else torch.randint(-9, 9, (6, 10))
    if dtype.is_floating_point:
        values[0, :4] = torch.tensor([-0.0, float("nan"), float("inf"), -float("inf")], dtype=dtype)
    keep = torch.rand(6, 10) > 0.5
    keep[0, :4] = False
    strided = values.clone().t()  # a non-contiguous view, as a transposed weight's gradient can be
    gp.masks.zero_pruned_(strided, keep.t())
    result = strided.t()
    assert torch.equal(result[keep], values[keep])  # the NaN and infs above are all in pruned places
    if dtype.is_floating_point:
        width = {2: torch.int16, 4: torch.int32, 8: torch.int64}[values.element_size()]
        assert torch.equal(result.view(width)[keep], values.view(width)[keep])  # bit for bit
        assert (result.view(width)[~keep] == 0).all()  # +0.0: no -0.0, no NaN left behind
    else:
        assert (result[~keep] == 0).all()
