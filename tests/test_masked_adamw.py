"""MaskedAdamW: AdamW with the pruning masks folded into its update (no separate gradient pass)."""
import copy
import shutil

import lightning.pytorch as pl
import pytest
import torch

import gradprune as gp
import gradprune.optim
from gradprune.optimizer_state import moment_floor
from gradprune import MaskedAdamW, MaskRegistry, PrunableLM
from gradprune.callbacks import GradualPruningCallback
from lightning_helpers import token_loader, trainer
from tiny_models import TINY_LLAMA, tiny_llama

pytestmark = pytest.mark.numerics  # run again under other CPU kernels by .ci/run (make test-numerics)


def train_pair(make_optimizer, steps=12, clip=None, norms=None, **optimizer_kwargs):
    """The same pruned model trained by torch's AdamW (gradients masked before each step, then clipped
    by torch if ``clip``) and by ``make_optimizer`` (clipped by its clip_grad_norm_); returns both
    registries and the second optimizer. ``norms`` collects (torch's, the optimizer's) clipping norms."""
    torch.manual_seed(0)
    reference = tiny_llama()
    gp.prune(reference, 0.6, scope="global")
    model = copy.deepcopy(reference)
    registries = []
    optimizers = [torch.optim.AdamW(reference.parameters(), **optimizer_kwargs),
                  make_optimizer(model.parameters(), **optimizer_kwargs)]
    for net, optimizer in zip((reference, model), optimizers):
        registries.append(MaskRegistry.of(net))
        registries[-1].attach(optimizer)
    for _ in range(steps):
        ids = torch.randint(0, 128, (2, 16))
        for net, optimizer in zip((reference, model), optimizers):
            net(input_ids=ids, labels=ids).loss.backward()
        if clip:
            registries[0].mask_gradients_()
            pair = (torch.nn.utils.clip_grad_norm_(reference.parameters(), clip), optimizers[1].clip_grad_norm_(clip))
            if norms is not None:
                norms.append(pair)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    return registries, optimizers[1]


def test_kernel_builds_here():
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler: MaskedAdamW falls back to a separate masking pass")
    assert gradprune.optim._kernel() is not None


def test_matches_adamw_on_masked_gradients_and_keeps_pruned_weights_zero(monkeypatch):
    kernel = gradprune.optim._kernel()
    if kernel is None:
        pytest.skip("the kernel cannot be built here")
    calls = []

    class Counting:
        def masked_adamw_(self, *args):
            calls.extend(args[0])  # the weights of one parameter group
            kernel.masked_adamw_(*args)

    monkeypatch.setattr(gradprune.optim, "_kernel", lambda: Counting())
    (reference, registry), optimizer = train_pair(MaskedAdamW, steps=12, lr=1e-2, weight_decay=0.1)
    assert registry.enforced_by(optimizer) and len(registry._hooks[id(optimizer)]) == 1  # no gradient pass: only
    # the refresh of the second-moment floors
    assert len(calls) == 12 * len(registry.masks)  # every masked weight went through the kernel
    for name, mask in registry.masks.items():
        weight, expected = registry.targets[name].weight, reference.targets[name].weight
        assert (weight[~mask] == 0).all(), name
        torch.testing.assert_close(weight, expected, rtol=0, atol=1e-5)


def test_state_has_torchs_layout_and_loads_into_adamw():
    (_, registry), optimizer = train_pair(MaskedAdamW, steps=3, lr=1e-2)
    name = next(iter(registry.masks))
    state = optimizer.state[registry.targets[name].weight]
    assert set(state) == {"step", "exp_avg", "exp_avg_sq"} and int(state["step"]) == 3
    pruned = ~registry.masks[name]  # first moments zero, second moments at the registry's floor (normal, tiny)
    assert (state["exp_avg"][pruned] == 0).all() and (state["exp_avg_sq"][pruned] >= torch.finfo(torch.float32).tiny).all()
    assert (state["exp_avg_sq"][pruned] <= moment_floor(torch.float32)).all()
    plain = torch.optim.AdamW(registry.model.parameters(), lr=1e-2)
    plain.load_state_dict(optimizer.state_dict())
    assert torch.equal(plain.state[registry.targets[name].weight]["exp_avg"], state["exp_avg"])


def test_without_the_kernel_it_is_exactly_adamw_on_masked_gradients(monkeypatch):
    monkeypatch.setattr(gradprune.optim, "_kernel", lambda: None)
    (reference, registry), _ = train_pair(MaskedAdamW, lr=1e-2, weight_decay=0.1)
    for name in registry.masks:
        assert torch.equal(registry.targets[name].weight, reference.targets[name].weight), name


def test_options_the_kernel_does_not_cover_fall_back_to_torch():
    (reference, registry), _ = train_pair(MaskedAdamW, lr=1e-2, amsgrad=True)
    for name, mask in registry.masks.items():
        assert (registry.targets[name].weight[~mask] == 0).all()
        assert torch.equal(registry.targets[name].weight, reference.targets[name].weight), name


def test_clipping_by_the_norm_of_live_gradients_matches_torch_on_masked_gradients():
    norms = []
    (reference, registry), optimizer = train_pair(MaskedAdamW, steps=10, clip=0.5, norms=norms, lr=1e-2,
                                                  weight_decay=0.1)
    assert all(float(theirs) > 0.5 for theirs, _ in norms)  # clipping was active at every step
    for theirs, ours in norms:
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=0)
    for name, mask in registry.masks.items():
        assert (registry.targets[name].weight[~mask] == 0).all(), name
        torch.testing.assert_close(registry.targets[name].weight, reference.targets[name].weight, rtol=0, atol=1e-5)


class PrunedGradientsSeen(PrunableLM):
    """Records the largest gradient of any pruned weight when Lightning's clipping hook runs."""

    seen = 0.0

    def record(self):
        pruned = [float(w.grad[~m].abs().max()) for w, m in MaskRegistry.of(self).weight_masks()
                  if w.grad is not None and (~m).any()]
        self.seen = max([self.seen] + pruned)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        self.record()
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)


class MaskThenClip(PrunedGradientsSeen):
    """Lightning's own clipping, so the callbacks mask the gradients in a pass before it."""

    clips_live_gradients = False

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        self.record()
        pl.LightningModule.configure_gradient_clipping(self, optimizer, gradient_clip_val, gradient_clip_algorithm)


def fit_gradual(tmp_path, module_class, clip, schedule="linear", **trainer_kwargs):
    torch.manual_seed(0)
    module = module_class(model=dict(TINY_LLAMA), vocab_size=128, learning_rate=1e-2, warmup_steps=0)
    callback = GradualPruningCallback(0.5, schedule=schedule, end_step=6, every=2)
    trainer(tmp_path, max_steps=10, callbacks=[callback], gradient_clip_val=clip, **trainer_kwargs).fit(
        module, token_loader())
    return module


@pytest.mark.parametrize("clip, precision", [(None, "32-true"), (0.5, "32-true"), (0.5, "bf16-mixed")])
def test_lightning_runs_no_masking_pass_with_prunable_lm(tmp_path, clip, precision):
    module = fit_gradual(tmp_path, PrunedGradientsSeen, clip, precision=precision)
    registry = MaskRegistry.of(module)
    assert registry.pruned_count() == gp.exact_count(0.5, registry.numel())
    assert all((w[~m] == 0).all() for w, m in registry.weight_masks())
    assert module.seen > 0.0  # gradients of pruned weights were never masked in a pass: the optimizer ignored them
    assert module.trainer.optimizers[0].mask_registry is None  # handed back at fit end


def test_lightning_clipping_of_live_gradients_trains_like_masking_then_clipping(tmp_path):
    # The two ways round to different last bits (the kernel folds the clipping factor into the update), so
    # masks chosen after some steps could differ by a near-tied magnitude pair on some CPUs: the masks are
    # chosen once, at step 0, on identical weights ("constant" schedule), and training then compares them.
    fused = fit_gradual(tmp_path / "fused", PrunedGradientsSeen, 0.5, schedule="constant")
    passes = fit_gradual(tmp_path / "passes", MaskThenClip, 0.5, schedule="constant")
    assert passes.seen == 0.0  # there, the callback masked the gradients before Lightning's clipping
    for (name, ours), theirs in zip(fused.named_parameters(), passes.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5, msg=name)
    assert torch.equal(*(torch.cat([m.flatten() for m in MaskRegistry.of(x).masks.values()]) for x in (fused, passes)))


def test_without_a_compiler_the_loader_warns_and_gives_the_fallback(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # nothing cached: it has to build
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.warns(RuntimeWarning, match="could not be built"):
        assert gradprune.optim._kernel.__wrapped__() is None  # the loader itself, not its cached result


def test_step_hooks_fire_once_per_step():
    """MaskedAdamW delegates to AdamW's step, which torch wraps with the hook runner too."""
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])  # an AdamW instance: AdamW.step gets wrapped
    (_, registry), optimizer = train_pair(MaskedAdamW, steps=1, lr=1e-2)
    calls = []
    optimizer.register_step_pre_hook(lambda *_: calls.append("pre"))
    optimizer.register_step_post_hook(lambda *_: calls.append("post"))
    for weight in registry.model.parameters():
        weight.grad = torch.ones_like(weight)
    optimizer.step()
    assert calls == ["pre", "post"]


def test_clipping_twice_before_a_step_composes_like_torch():
    torch.manual_seed(0)
    model = tiny_llama()
    gp.prune(model, 0.5)
    reference = copy.deepcopy(model)
    optimizer = MaskedAdamW(model.parameters(), lr=1e-2)
    MaskRegistry.of(model).attach(optimizer)
    ids = torch.randint(0, 128, (2, 16))
    for net in (model, reference):
        net(input_ids=ids, labels=ids).loss.backward()
    MaskRegistry.of(reference).mask_gradients_()
    for limit in (1.0, 0.3):  # the second call sees the gradients as the first one left them
        torch.testing.assert_close(optimizer.clip_grad_norm_(limit),
                                   torch.nn.utils.clip_grad_norm_(reference.parameters(), limit), rtol=1e-5, atol=0)
