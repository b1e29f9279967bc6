"""Two real processes (Lightning's ddp_spawn, gloo on CPU, a collective timeout so a hang fails): a user's
LightningModule without forward pruned by one-shot Wanda; calibration sets that do not divide over the
ranks, that leave a rank without a batch, or that are empty; distillation from ``teacher: self`` with
one-shot Wanda and gradual pruning in the same run."""
from datetime import timedelta

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy

from gradprune import MaskRegistry, exact_count, prune_oneshot, sparsity_report
from gradprune.callbacks import GradualPruningCallback, WandaPruningCallback
from gradprune.distill import Distillation
from lightning_helpers import tiny_module, token_loader, trainer
from test_plain_module import UserLM, windows

# two real processes (distributed); run again under other CPU kernels by .ci/run (numerics: make test-numerics)
pytestmark = [pytest.mark.distributed, pytest.mark.numerics]


def ddp():
    """Two spawned CPU processes; a collective that waits longer than the timeout raises instead of hanging."""
    return DDPStrategy(start_method="spawn", process_group_backend="gloo", timeout=timedelta(seconds=120))


class Save(Callback):
    def __init__(self, path):
        self.path = path

    def on_fit_end(self, trainer, pl_module):
        registry = MaskRegistry.of(pl_module)
        teacher = getattr(pl_module, "teacher", None)
        torch.save({
            "world": trainer.world_size,
            "masks": {k: v.clone() for k, v in registry.masks.items()},
            "weights": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
            "teacher": None if teacher is None else {k: v.clone() for k, v in teacher.state_dict().items()},
            "report": sparsity_report(pl_module, list(registry.targets.values())),
        }, self.path / f"rank{trainer.global_rank}.pt")


def load_ranks(path):
    ranks = [torch.load(path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert ranks[0]["world"] == 2
    return ranks


def assert_same_on_both_ranks(ranks):
    assert ranks[0]["masks"] and ranks[0]["masks"].keys() == ranks[1]["masks"].keys()
    for name, mask in ranks[0]["masks"].items():
        assert torch.equal(mask, ranks[1]["masks"][name]), name
    for name, weight in ranks[0]["weights"].items():
        assert torch.equal(weight, ranks[1]["weights"][name]), name


class Windows(pl.LightningDataModule):
    """Seeded windows, the same on every rank (``rank0_only``: rank 1 gets none)."""

    def __init__(self, rank0_only=False):
        super().__init__()
        self.rank0_only = rank0_only

    def calibration_batches(self, nsamples, seqlen):
        if self.rank0_only and self.trainer.global_rank != 0:
            return []
        return windows(nsamples, seqlen)

    def train_dataloader(self):
        return token_loader(n=16)


def test_user_module_without_forward_under_ddp_with_uneven_calibration(tmp_path):
    """Five windows over two ranks (3 + 2): the masks are one process's Wanda on all five, and both ranks
    train on (torch's AdamW) with the same weights."""
    wanda = WandaPruningCallback(0.5, nsamples=5, seqlen=12)
    fit = trainer(tmp_path, max_steps=2, strategy=ddp(), devices=2, callbacks=[wanda, Save(tmp_path)])
    fit.fit(UserLM(), datamodule=Windows())
    ranks = load_ranks(tmp_path)
    assert_same_on_both_ranks(ranks)
    alone = prune_oneshot(UserLM(), "wanda", 0.5, "unstructured", windows(5, 12), progress=False)["masks"]
    assert ranks[0]["masks"].keys() == alone.keys()
    for name, mask in alone.items():
        assert torch.equal(ranks[0]["masks"][name], mask), name
        assert (ranks[0]["weights"][f"{name}.weight"][~mask] == 0).all(), name


class CalibrationCases(Callback):
    """Runs the one-shot callback's calibration on each rank for several data cases, and Wanda on a fresh
    copy of the model with the statistics combined as the callback would; saves masks or the error."""

    def __init__(self, path):
        self.path = path

    def on_fit_start(self, trainer, pl_module):
        results = {}
        for case, nsamples, rank0_only in (("rank0_only", 4, True), ("fewer_than_ranks", 1, False), ("none", 0, False)):
            trainer.datamodule.rank0_only = rank0_only
            wanda = WandaPruningCallback(0.5, nsamples=4, seqlen=12)
            wanda.nsamples = nsamples  # 0: a datamodule that gives no window to any rank
            try:
                batches = wanda.calibration(trainer)
            except ValueError as error:
                results[case] = str(error)
                continue
            module = UserLM()
            report = prune_oneshot(module, "wanda", 0.5, "unstructured", batches, reduce=wanda._combine, progress=False)
            results[case] = {"batches": len(batches), "masks": report["masks"]}
        torch.save(results, self.path / f"cases{trainer.global_rank}.pt")


def test_calibration_that_leaves_a_rank_without_batches_does_not_hang(tmp_path):
    fit = trainer(tmp_path, max_steps=1, strategy=ddp(), devices=2, callbacks=[CalibrationCases(tmp_path)])
    fit.fit(UserLM(), datamodule=Windows())
    ranks = [torch.load(tmp_path / f"cases{r}.pt", weights_only=False) for r in (0, 1)]
    # only rank 0 drew windows: they are pooled and dealt out (2 + 2), masks are those of all four
    # one window, two ranks: both run it, rank 0's statistics are used (not the sum of two copies)
    for case, data, shares in (("rank0_only", windows(4, 12), [2, 2]), ("fewer_than_ranks", windows(1, 12), [1, 1])):
        expected = prune_oneshot(UserLM(), "wanda", 0.5, "unstructured", data, progress=False)["masks"]
        assert [r[case]["batches"] for r in ranks] == shares, case
        for rank in ranks:
            for name, mask in expected.items():
                assert torch.equal(rank[case]["masks"][name], mask), (case, name)
    for rank in ranks:  # nothing anywhere: the same error on both ranks, no rank left waiting
        assert "no rank got a calibration batch (counts per rank [0, 0])" in rank["none"]


def test_distillation_from_self_under_ddp_with_wanda_and_gradual(tmp_path):
    """``teacher: self`` on two ranks, one-shot Wanda to 30% at fit start and a cubic ramp to 60%: the
    ranks end with the same weights and masks, the teacher stays the dense model on both, and the
    checkpoint holds no teacher."""
    module = tiny_module(distill=Distillation(teacher="self", alpha=0.5, temperature=2.0))
    dense = {k: v.clone() for k, v in module.model.state_dict().items()}
    wanda = WandaPruningCallback(0.3, nsamples=4, seqlen=12)
    gradual = GradualPruningCallback(0.6, start_step=2, end_step=4, every=2, scope="global")
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit = trainer(tmp_path, max_steps=6, strategy=ddp(), devices=2, enable_checkpointing=True,
                  callbacks=[wanda, gradual, checkpoint, Save(tmp_path)])
    fit.fit(module, datamodule=Windows())
    ranks = load_ranks(tmp_path)
    assert_same_on_both_ranks(ranks)
    for rank in ranks:
        report = rank["report"]["global"]
        assert report["zeros"] == exact_count(0.6, report["numel"])
        assert rank["teacher"].keys() == dense.keys()
        for name, value in rank["teacher"].items():  # the dense weights, as built, on both ranks
            assert torch.equal(value, dense[name]), name
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert not [k for k in state["state_dict"] if "teacher" in k]
    assert {k for k in state["state_dict"] if k.startswith("model.")} == {f"model.{k}" for k in dense}
