"""The optimizer state of pruned weights on the plain path (a torch optimizer, the registry's hooks):
pruned weights stay exactly zero over many steps, their second moments stay normal floats (never zero or
subnormal: slow square roots), kept weights train exactly as with all-zero state, and the state still
loads into torch's own AdamW."""
import copy

import lightning.pytorch as pl
import pytest
import torch

import gradprune as gp
from gradprune import MaskRegistry
from gradprune.callbacks import GradualPruningCallback
from gradprune.optimizer_state import fill_pruned_, moment_floor, refresh_interval, second_moment_keys
from lightning_helpers import token_loader, trainer
from tiny_models import tiny_llama

TINY = torch.finfo(torch.float32).tiny


def test_floor_is_normal_with_a_root_far_below_eps_and_refreshed_before_it_decays_to_subnormal():
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        floor = moment_floor(dtype)
        assert torch.tensor(floor, dtype=dtype).item() == floor >= torch.finfo(dtype).tiny
        for decay in (0.999, 0.95, 0.5):
            every = refresh_interval(decay, dtype)
            value = torch.tensor(floor, dtype=dtype)
            for _ in range(2 * every):  # twice the interval: still normal (half the lifetime is the margin)
                value = value * decay
            assert value.item() >= torch.finfo(dtype).tiny, (dtype, decay)
    assert moment_floor(torch.float32) ** 0.5 < 1e-8 / 20  # negligible next to AdamW's default eps
    assert refresh_interval(1.0, torch.float32) is None and refresh_interval(0.0, torch.float32) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_fill_pruned_writes_the_value_and_keeps_live_bits(dtype):
    torch.manual_seed(0)
    values = torch.randn(64, 33).to(dtype)
    values[0, :4] = torch.tensor([float("nan"), float("-inf"), -0.0, 1e-30])
    keep = torch.rand(64, 33) > 0.5
    keep[0, :2] = False
    expected = torch.where(keep, values, torch.tensor(0.25, dtype=dtype))
    fill_pruned_(values, keep, 0.25)
    assert torch.equal(values.view(torch.uint8), expected.view(torch.uint8))


def make_sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=0.01)


def make_adamw(params):
    return torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.6))  # beta2 0.6: the floor is refreshed every 42 steps


OPTIMIZERS = [
    make_adamw,
    lambda p: torch.optim.AdamW(p, lr=1e-2, betas=(0.9, 0.6), foreach=True),
    lambda p: torch.optim.AdamW(p, lr=1e-2, betas=(0.9, 0.6), fused=True),
    lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.9, 0.6), weight_decay=0.1, amsgrad=True),
    lambda p: torch.optim.RMSprop(p, lr=1e-3, alpha=0.6, momentum=0.9, centered=True),
    make_sgd,
]


def train(model, optimizer, registry, steps, check=None):
    generator = torch.Generator().manual_seed(1)
    for step in range(steps):
        ids = torch.randint(0, 128, (2, 16), generator=generator)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if check is not None:
            check(step)


@pytest.mark.parametrize("make_optimizer", OPTIMIZERS)
def test_many_steps_keep_pruned_weights_zero_and_their_second_moments_normal(make_optimizer):
    floored = tiny_llama()
    optimizer = make_optimizer(floored.parameters())
    train(floored, optimizer, None, 3)  # dense steps first: state exists before pruning
    plain = copy.deepcopy(floored)
    plain_optimizer = make_optimizer(plain.parameters())
    plain_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # load_state_dict would share tensors
    for model, opt, floors in ((floored, optimizer, True), (plain, plain_optimizer, False)):
        gp.prune(model, 0.6, scope="global")
        MaskRegistry.of(model).attach(opt, floor_second_moments=floors)
    registry = MaskRegistry.of(floored)
    keys = second_moment_keys(optimizer)

    def check(step):
        for name, keep in registry.masks.items():
            weight = registry.targets[name].weight
            assert (weight[~keep] == 0).all() and not torch.signbit(weight[~keep]).any(), (step, name)
            for key in keys & optimizer.state[weight].keys():
                pruned = optimizer.state[weight][key][~keep]
                assert (pruned >= TINY).all(), (step, name, key)  # no zero, no subnormal

    train(floored, optimizer, registry, 40, check)
    train(plain, plain_optimizer, None, 40)
    gp.prune(floored, 0.75, scope="global")  # an event with state present
    gp.prune(plain, 0.75, scope="global")
    train(floored, optimizer, registry, 110, check)  # > 2 refresh intervals at beta2 = 0.6
    train(plain, plain_optimizer, None, 110)
    # the floors change nothing else: the same weights bit for bit as with all-zero pruned state
    for (name, a), b in zip(floored.named_parameters(), plain.parameters()):
        assert torch.equal(a, b), name


def test_state_dict_loads_into_a_fresh_torch_adamw_with_the_layout_of_a_dense_one():
    model = tiny_llama()
    dense = copy.deepcopy(model)
    optimizer = make_adamw(model.parameters())
    dense_optimizer = make_adamw(dense.parameters())
    gp.prune(model, 0.5, scope="global")
    MaskRegistry.of(model).attach(optimizer)
    train(model, optimizer, None, 5)
    train(dense, dense_optimizer, None, 5)
    saved, reference = optimizer.state_dict(), dense_optimizer.state_dict()
    assert saved["param_groups"] == reference["param_groups"]
    for index, state in reference["state"].items():
        assert saved["state"][index].keys() == state.keys()
        for key, value in state.items():
            assert saved["state"][index][key].shape == value.shape and saved["state"][index][key].dtype == value.dtype
    fresh = torch.optim.AdamW(copy.deepcopy(model).parameters(), lr=1e-2, betas=(0.9, 0.6))
    fresh.load_state_dict(saved)
    for index, state in saved["state"].items():
        for key, value in state.items():
            assert torch.equal(fresh.state_dict()["state"][index][key], value)


class UserLM(pl.LightningModule):
    """What users write: ``self.model`` an HF causal LM, no forward, torch's optimizer at its defaults."""

    def __init__(self, optimizer="adamw"):
        super().__init__()
        self.model = tiny_llama()
        self.optimizer = optimizer

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch[0], labels=batch[0]).loss

    def configure_optimizers(self):
        if self.optimizer == "sgd":
            return make_sgd(self.parameters())
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


@pytest.mark.parametrize("optimizer, precision", [("adamw", "32-true"), ("adamw", "bf16-mixed"), ("sgd", "32-true")])
def test_gradual_callback_on_a_plain_module_keeps_zeros_and_floors(tmp_path, optimizer, precision):
    module = UserLM(optimizer)
    gradual = GradualPruningCallback(0.5, schedule="linear", start_step=2, end_step=6, every=2, scope="global")
    trainer(tmp_path, max_epochs=2, callbacks=[gradual], precision=precision,
            gradient_clip_val=1.0).fit(module, token_loader(n=40))
    registry = MaskRegistry.of(module)
    assert registry.sparsity(list(registry.targets.values())) == pytest.approx(0.5, abs=1e-3)
    state = module.trainer.optimizers[0].state
    for name, keep in registry.masks.items():
        weight = registry.targets[name].weight
        assert (weight[~keep] == 0).all(), name
        if optimizer == "adamw":
            assert (state[weight]["exp_avg"][~keep] == 0).all()
            floors = state[weight]["exp_avg_sq"][~keep]
            assert ((floors >= TINY) & (floors <= moment_floor(torch.float32))).all()
        else:
            assert (state[weight]["momentum_buffer"][~keep] == 0).all()
