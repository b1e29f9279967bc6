"""One-shot callbacks: fire once at fit start, masks enforced through fine-tuning, state survives resume."""
import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

import gradprune.callbacks.oneshot as oneshot_module
from gradprune import MaskRegistry, find_targets
from gradprune.callbacks import GradualPruningCallback, MagnitudePruningCallback, SparseGPTPruningCallback, WandaPruningCallback
from lightning_helpers import tiny_module, token_loader, trainer

pytestmark = pytest.mark.numerics  # run again under other CPU kernels by .ci/run (make test-numerics)


@pytest.fixture
def calls(monkeypatch):
    """Counts prune_oneshot calls made by the callbacks (and records their calibration)."""
    seen = []
    real = oneshot_module.prune_oneshot

    def counting(model, method, sparsity, pattern, calibration, **kwargs):
        seen.append({"method": method, "calibration": calibration, "model": model})
        return real(model, method, sparsity, pattern, calibration, **kwargs)

    monkeypatch.setattr(oneshot_module, "prune_oneshot", counting)
    return seen


class MaskProbe(Callback):
    """Checks before and after every batch that every registered pruned weight is exactly zero."""

    def __init__(self):
        self.checks = 0

    def _check(self, pl_module):
        registry = MaskRegistry.of(pl_module)
        assert registry.masks
        for name, keep in registry.masks.items():
            assert not registry.targets[name].weight[~keep].any(), name
        self.checks += 1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._check(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._check(pl_module)


def block_targets(module):
    return [t for t in find_targets(module) if ".layers." in t.name]


@pytest.mark.parametrize(
    "callback",
    [WandaPruningCallback(0.5, nsamples=6, seqlen=8), MagnitudePruningCallback(0.5, pattern="2:4"),
     SparseGPTPruningCallback(0.5, nsamples=6, seqlen=8)],
    ids=["wanda", "magnitude", "sparsegpt"],
)
def test_fires_once_and_masks_hold_through_fine_tuning(tmp_path, calls, callback):
    module = tiny_module()
    probe = MaskProbe()
    trainer(tmp_path, max_epochs=2, limit_train_batches=4, callbacks=[callback, probe]).fit(module, token_loader())
    assert len(calls) == 1 and callback.done
    assert calls[0]["model"] is module  # names relative to the LightningModule: one registry per pl_module
    registry = MaskRegistry.of(module)
    targets = block_targets(module) if callback.method != "magnitude" else find_targets(module)
    assert sorted(registry.masks) == sorted(t.name for t in targets)
    assert all(n.startswith("model.model.layers.") for n in registry.masks)
    for t in targets:
        zeros = int((t.weight == 0).sum())
        assert zeros == t.numel // 2, t.name  # the sparsity is exact after 8 optimizer steps
    assert probe.checks == 16
    if callback.method != "magnitude":
        batches = calls[0]["calibration"]  # fallback: the first training batches, cut to nsamples x seqlen
        assert sum(b["input_ids"].shape[0] for b in batches) == 6 and all(b["input_ids"].shape[1] == 8 for b in batches)
    assert callback.report["global"]["sparsity"] == pytest.approx(0.5)


class CalibrationData(pl.LightningDataModule):
    def __init__(self):
        super().__init__()
        self.requests = []

    def calibration_batches(self, nsamples, seqlen):
        self.requests.append((nsamples, seqlen))
        g = torch.Generator().manual_seed(5)
        return [torch.randint(0, 128, (1, seqlen), generator=g) for _ in range(nsamples)]

    def train_dataloader(self):
        return token_loader()


def test_uses_datamodule_calibration_batches(tmp_path, calls):
    data = CalibrationData()
    trainer(tmp_path, max_steps=2, callbacks=[WandaPruningCallback(0.5, nsamples=3, seqlen=10)]).fit(tiny_module(), datamodule=data)
    assert data.requests == [(3, 10)]
    assert len(calls[0]["calibration"]) == 3 and calls[0]["calibration"][0].shape == (1, 10)


def test_resume_does_not_prune_again(tmp_path, calls):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = WandaPruningCallback(0.5, nsamples=4, seqlen=8)
    module = tiny_module(seed=2)
    trainer(tmp_path / "a", max_steps=4, callbacks=[first, checkpoint], enable_checkpointing=True).fit(module, token_loader())
    assert len(calls) == 1
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["callbacks"][first.state_key]
    assert saved["done"] is True and saved["masks"]

    resumed_cb = WandaPruningCallback(0.5, nsamples=4, seqlen=8)
    resumed = tiny_module(seed=3)  # different initial weights: everything must come from the checkpoint
    probe = MaskProbe()
    trainer(tmp_path / "b", max_steps=8, callbacks=[resumed_cb, probe]).fit(resumed, token_loader(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert len(calls) == 1 and resumed_cb.done and probe.checks > 0
    masks_a, masks_b = MaskRegistry.of(module).masks, MaskRegistry.of(resumed).masks
    assert masks_a.keys() == masks_b.keys() and all(torch.equal(masks_a[k], masks_b[k]) for k in masks_a)


def test_gradual_schedule_starts_from_one_shot_sparsity(tmp_path, calls):
    module = tiny_module()
    oneshot = WandaPruningCallback(0.5, nsamples=4, seqlen=8)
    gradual = GradualPruningCallback(0.7, schedule="linear", start_step=0, end_step=6, every=3,
                                     include=r".*\.layers\..*")
    trainer(tmp_path, max_steps=8, callbacks=[oneshot, gradual, MaskProbe()]).fit(module, token_loader())
    assert gradual.base_sparsity == pytest.approx(0.5, abs=1e-3)
    registry = MaskRegistry.of(module)
    assert registry.pruned_count() / registry.numel() == pytest.approx(0.7, abs=1e-3)


def test_state_keys_are_distinct_per_instance():
    keys = {WandaPruningCallback(0.5).state_key, WandaPruningCallback(0.6).state_key,
            WandaPruningCallback(0.5, pattern="2:4").state_key, SparseGPTPruningCallback(0.5).state_key,
            MagnitudePruningCallback(0.5).state_key}
    assert len(keys) == 5


@pytest.mark.parametrize(
    "cls, kwargs, error, match",
    [
        (WandaPruningCallback, {"sparsity": 0.3, "pattern": "2:4"}, ValueError, "does not match pattern '2:4'"),
        (WandaPruningCallback, {"nsamples": 0}, ValueError, "nsamples must be a positive integer"),
        (WandaPruningCallback, {"scope": "column"}, ValueError, "scope must be one of"),
        (SparseGPTPruningCallback, {"percdamp": -1.0}, ValueError, "percdamp must be a number >= 0"),
        (MagnitudePruningCallback, {"sparsity": 1.5}, ValueError, r"sparsity must be in \[0, 1\)"),
    ],
)
def test_bad_arguments_fail_in_init(cls, kwargs, error, match):
    with pytest.raises(error, match=match):
        cls(**kwargs)
