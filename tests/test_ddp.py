"""Two real processes (Lightning's ddp_spawn, gloo on CPU): every rank ends with the same exact masks and
the same weights, pruned ones exactly zero (MaskedAdamW and its clipping by the live weights' norm)."""
import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from gradprune import MaskRegistry, exact_count, prune_oneshot, sparsity_report
from gradprune.callbacks import GradualPruningCallback, WandaPruningCallback
from lightning_helpers import tiny_module, token_loader, trainer

# two real processes (distributed); run again under other CPU kernels by .ci/run (numerics: make test-numerics)
pytestmark = [pytest.mark.distributed, pytest.mark.numerics]


class SaveMasks(Callback):
    def __init__(self, directory):
        self.directory = directory

    def on_fit_end(self, trainer, pl_module):
        masks = {k: v.clone() for k, v in MaskRegistry.of(pl_module).masks.items()}
        report = sparsity_report(pl_module, [t for t in MaskRegistry.of(pl_module).targets.values()])
        weights = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        windows = [getattr(c, "windows", None) for c in trainer.callbacks if isinstance(c, RecordingWanda)]
        torch.save({"masks": masks, "report": report, "world": trainer.world_size, "weights": weights,
                    "windows": windows},
                   self.directory / f"rank{trainer.global_rank}.pt")


def test_gradual_pruning_under_ddp_gives_identical_exact_masks(tmp_path):
    module = tiny_module()
    gradual = GradualPruningCallback(0.6, schedule="cubic", end_step=6, every=2, scope="global")
    fit = trainer(tmp_path, max_steps=8, strategy="ddp_spawn", devices=2, callbacks=[gradual, SaveMasks(tmp_path)],
                  gradient_clip_val=0.5)
    fit.fit(module, token_loader())
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert ranks[0]["world"] == 2
    assert ranks[0]["masks"].keys() == ranks[1]["masks"].keys()
    for name in ranks[0]["masks"]:
        assert torch.equal(ranks[0]["masks"][name], ranks[1]["masks"][name]), name
    for rank in ranks:
        report = rank["report"]["global"]
        assert report["zeros"] == exact_count(0.6, report["numel"])
    for name, weight in ranks[0]["weights"].items():
        assert torch.equal(weight, ranks[1]["weights"][name]), name
    for name, mask in ranks[0]["masks"].items():
        assert (ranks[0]["weights"][f"{name}.weight"][~mask] == 0).all(), name


def calibration_windows(nsamples, seqlen):
    generator = torch.Generator().manual_seed(7)
    return [torch.randint(0, 128, (1, seqlen), generator=generator) for _ in range(nsamples)]


class Windows(pl.LightningDataModule):
    """Seeded calibration windows (the same on every rank) and a small training set."""

    def calibration_batches(self, nsamples, seqlen):
        return calibration_windows(nsamples, seqlen)

    def train_dataloader(self):
        return token_loader()


class RecordingWanda(WandaPruningCallback):
    def calibration(self, trainer):
        batches = super().calibration(trainer)
        self.windows = [b.clone() for b in batches]
        return batches


def test_wanda_under_ddp_shards_calibration_and_matches_one_process(tmp_path):
    wanda = RecordingWanda(0.5, nsamples=8, seqlen=12)
    fit = trainer(tmp_path, max_steps=1, strategy="ddp_spawn", devices=2, callbacks=[wanda, SaveMasks(tmp_path)])
    fit.fit(tiny_module(), datamodule=Windows())
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    everything = calibration_windows(8, 12)
    for rank, saved in enumerate(ranks):  # each rank calibrated on every other window, not on all of them
        assert [w.tolist() for w in saved["windows"][0]] == [w.tolist() for w in everything[rank::2]]
    # the summed statistics are those of all eight windows: the masks are one process's Wanda on them
    # (taken before the training step, so pruning the same untrained model in one process must agree)
    alone = tiny_module()
    prune_oneshot(alone, "wanda", 0.5, "unstructured", everything, progress=False)
    expected = MaskRegistry.of(alone).masks
    for saved in ranks:
        assert saved["masks"].keys() == expected.keys()
        for name, mask in expected.items():
            assert torch.equal(saved["masks"][name], mask), name
