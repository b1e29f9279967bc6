import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

import gradprune as gp
from gradprune import MaskRegistry, exact_count, find_targets, sparsity_report
from gradprune.callbacks import GradualPruningCallback
from lightning_helpers import tiny_module, token_loader, trainer

pytestmark = pytest.mark.numerics  # run again under other CPU kernels by .ci/run (make test-numerics)


class EventProbe(Callback):
    """Runs after the pruning callback: records each event's achieved per-layer counts and checks that
    every pruned weight is zero at every batch."""

    def __init__(self, gradual):
        self.gradual = gradual
        self.events = {}

    def _check(self, trainer, pl_module):
        registry = MaskRegistry.of(pl_module)
        for name, mask in registry.masks.items():
            assert (registry.targets[name].weight[~mask] == 0).all(), (trainer.global_step, name)
        if self.gradual.last_event_step == trainer.global_step and trainer.global_step not in self.events:
            self.events[trainer.global_step] = sparsity_report(pl_module, self.gradual.targets)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._check(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._check(trainer, pl_module)


@pytest.mark.parametrize("kind", ["cubic", "linear", "exponential"])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_exact_sparsity_at_every_event_through_fit(tmp_path, kind, scope):
    module = tiny_module()
    gradual = GradualPruningCallback(0.7, schedule=kind, start_step=2, end_step=14, every=4, scope=scope)
    probe = EventProbe(gradual)
    trainer(tmp_path, max_steps=20, callbacks=[gradual, probe]).fit(module, token_loader())
    schedule = gradual.schedule
    assert sorted(probe.events) == schedule.events() == [2, 6, 10, 14]
    for step, report in probe.events.items():
        s = schedule.sparsity_at(step)
        if scope == "layer":
            for layer in report["layers"].values():
                assert layer["zeros"] == exact_count(s, layer["numel"]), step
        else:
            assert report["global"]["zeros"] == exact_count(s, report["global"]["numel"]), step
    final = sparsity_report(module, find_targets(module))["global"]
    assert final["sparsity"] == pytest.approx(0.7, abs=1e-3)


def test_steps_are_optimizer_steps_under_gradient_accumulation(tmp_path):
    module = tiny_module()
    gradual = GradualPruningCallback(0.5, schedule="linear", start_step=0, end_step=1.0, every=2)
    probe = EventProbe(gradual)
    trainer(tmp_path, max_epochs=3, accumulate_grad_batches=2, callbacks=[gradual, probe]).fit(module, token_loader())
    # 10 batches per epoch / 2 = 5 optimizer steps per epoch, 15 in all; events on optimizer steps
    assert gradual.resolved_end_step == 15
    assert sorted(probe.events) == [0, 2, 4, 6, 8, 10, 12, 14, 15]
    assert probe.events[15]["global"]["sparsity"] == pytest.approx(0.5, abs=1e-3)


def test_resume_mid_schedule_is_bit_identical(tmp_path):
    def run(root, ckpt_path=None, checkpoint=None):
        module = tiny_module(seed=1)
        callbacks = [GradualPruningCallback(0.6, start_step=1, end_step=16, every=3, scope="global")]
        if checkpoint is not None:
            callbacks.append(checkpoint)
        trainer(root, max_epochs=4, limit_train_batches=5, callbacks=callbacks,
                enable_checkpointing=checkpoint is not None).fit(module, token_loader(), ckpt_path=ckpt_path)
        return module, callbacks[0]

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{step}")
    full, full_cb = run(tmp_path / "a", checkpoint=checkpoint)
    middle = tmp_path / "ckpt" / "step=10.ckpt"  # between the events at steps 10 and 13: mid-schedule
    assert middle.exists()
    state = torch.load(middle, weights_only=False)
    (key,) = [k for k in state["callbacks"] if k.startswith("GradualPruningCallback")]
    assert state["callbacks"][key]["last_event_step"] == 10
    resumed, resumed_cb = run(tmp_path / "b", ckpt_path=str(middle))
    assert resumed_cb.last_event_step == full_cb.last_event_step == 16
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    masks_a, masks_b = MaskRegistry.of(full).masks, MaskRegistry.of(resumed).masks
    assert masks_a.keys() == masks_b.keys() and all(torch.equal(masks_a[k], masks_b[k]) for k in masks_a)


def test_checkpoint_masks_are_bit_packed(tmp_path):
    module = tiny_module()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    gradual = GradualPruningCallback(0.5, end_step=4, every=2)
    trainer(tmp_path, max_steps=5, callbacks=[gradual, checkpoint], enable_checkpointing=True).fit(module, token_loader())
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["callbacks"][gradual.state_key]
    numel = sum(t.numel for t in find_targets(module))
    assert sum(entry["bits"].numel() for entry in state["masks"].values()) == pytest.approx(numel / 8, abs=16)


def test_ramps_from_one_shot_sparsity(tmp_path):
    module = tiny_module()
    gp.prune(module, 0.5, scope="layer")  # what a one-shot callback does at fit start
    gradual = GradualPruningCallback(0.7, schedule="linear", start_step=0, end_step=10, every=5)
    probe = EventProbe(gradual)
    trainer(tmp_path, max_steps=12, callbacks=[gradual, probe]).fit(module, token_loader())
    assert gradual.base_sparsity == pytest.approx(0.5, abs=1e-3)
    assert probe.events[5]["global"]["sparsity"] == pytest.approx(0.6, abs=1e-3)  # half way from 0.5, not from 0
    assert probe.events[10]["global"]["sparsity"] == pytest.approx(0.7, abs=1e-3)


def test_end_step_beyond_run_warns_with_the_staged_run_hint(tmp_path):
    module = tiny_module()
    gradual = GradualPruningCallback(0.5, end_step=100, every=3)
    with pytest.warns(UserWarning, match=r"end_step \(100\) is beyond this run's total optimizer steps \(8\): this run "
                      r"will apply the event at step 6 as the last one, short of final_sparsity 0.5. To run in stages, "
                      r"resume from this run's last checkpoint with a larger max_epochs"):
        trainer(tmp_path, max_steps=8, callbacks=[gradual]).fit(module, token_loader())
    assert gradual.last_event_step == 6 and gradual.resolved_end_step == 100


def test_staged_run_resumed_with_a_larger_budget_finishes_the_schedule_bit_identically(tmp_path, recwarn):
    """A schedule planned over 4 epochs (end_step 36 of 40 steps), run as 2 epochs then resumed from the
    last checkpoint with max_epochs=4, ends as the uninterrupted 4-epoch run (constant-LR AdamW, so the
    budget does not change the optimizer's schedule)."""
    from test_plain_module import UserLM

    def run(root, max_epochs, ckpt_path=None):
        module = UserLM(seed=1)
        gradual = GradualPruningCallback(0.6, start_step=2, end_step=36, every=4, scope="global")
        checkpoint = ModelCheckpoint(dirpath=root / "ckpt", save_last=True)
        fit = trainer(root, max_epochs=max_epochs, callbacks=[gradual, checkpoint], enable_checkpointing=True)
        fit.fit(module, token_loader(), ckpt_path=ckpt_path)
        return module, gradual

    full, full_cb = run(tmp_path / "full", 4)
    assert not [w for w in recwarn if "end_step" in str(w.message)]
    with pytest.warns(UserWarning, match=r"end_step \(36\) is beyond this run's total optimizer steps \(20\)"):
        first, first_cb = run(tmp_path / "staged", 2)
    assert first_cb.last_event_step == 18
    recwarn.clear()
    resumed, resumed_cb = run(tmp_path / "staged", 4, ckpt_path=str(tmp_path / "staged" / "ckpt" / "last.ckpt"))
    assert not [w for w in recwarn if "end_step" in str(w.message)]  # the budget now covers the schedule
    assert resumed_cb.last_event_step == full_cb.last_event_step == 36
    report = sparsity_report(resumed, resumed_cb.targets)["global"]
    assert report["zeros"] == exact_count(0.6, report["numel"])
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    masks_a, masks_b = MaskRegistry.of(full).masks, MaskRegistry.of(resumed).masks
    assert masks_a.keys() == masks_b.keys() and all(torch.equal(masks_a[k], masks_b[k]) for k in masks_a)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(final_sparsity=0.3, initial_sparsity=0.5, end_step=10), ValueError, r"initial_sparsity \(0.5\) must not exceed final_sparsity \(0.3\)"),
        (dict(final_sparsity=1.2), ValueError, r"final_sparsity must be in \[0, 1\), got 1.2"),
        (dict(final_sparsity=0.5, schedule="cosine"), ValueError, r"schedule must be one of .* got 'cosine'"),
        (dict(final_sparsity=0.5, scope="rows"), ValueError, r"scope must be one of \['layer', 'global', 'row'\], got 'rows'"),
        (dict(final_sparsity=0.5, scorer="movement"), ValueError, r"scorer must be one of \['magnitude', 'ria', 'sparsegpt', 'taylor', 'wanda'\], got 'movement'"),
        (dict(final_sparsity=0.5, end_step=1.5), ValueError, r"end_step as a float .* \(0, 1\], got 1.5"),
        (dict(final_sparsity=0.5, end_step=10, every=0), ValueError, r"every must be an integer > 0, got 0"),
        (dict(final_sparsity=0.6, pattern="2:4"), ValueError, r"final_sparsity 0.6 is above what pattern '2:4' allows"),
        (dict(final_sparsity=0.5, pattern="3:2"), ValueError, r"pattern '3:2' is not a valid N:M pattern"),
        (dict(final_sparsity=0.5, scorer="wanda", statistics="calibration", scope="global"), ValueError,
         r"statistics='calibration' prunes block by block: use scope 'layer' or 'row', got scope='global'"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        GradualPruningCallback(**kwargs)


def test_include_matching_nothing_fails_at_fit_start(tmp_path):
    module = tiny_module()
    with pytest.raises(ValueError, match=r"include=\['nothing'\] matches no module"):
        trainer(tmp_path, max_steps=2, callbacks=[GradualPruningCallback(0.5, end_step=2, include=["nothing"])]).fit(
            module, token_loader()
        )


def test_any_module_returning_logits_works(tmp_path):
    from torch import nn

    from gradprune import PrunableLM

    class TinyLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(128, 32)
            self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
            self.head = nn.Linear(32, 128)

        def forward(self, input_ids, attention_mask=None):
            return self.head(self.mlp(self.embed(input_ids)))

    module = PrunableLM(model=TinyLM(), learning_rate=1e-2, warmup_steps=0)
    gradual = GradualPruningCallback(0.5, end_step=4, every=2, exclude=["head"])
    trainer(tmp_path, max_steps=5, callbacks=[gradual]).fit(module, token_loader())
    assert [t.name for t in gradual.targets] == ["model.mlp.0", "model.mlp.2"]
    report = sparsity_report(module, gradual.targets)["global"]
    assert report["zeros"] == exact_count(0.5, report["numel"])

