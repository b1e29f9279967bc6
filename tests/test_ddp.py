"""Two real processes (Lightning's ddp_spawn, gloo on CPU): every rank ends with the same exact masks and
the same weights, pruned ones exactly zero (MaskedAdamW and its clipping by the live weights' norm)."""
import torch
from lightning.pytorch.callbacks import Callback

from gradprune import MaskRegistry, exact_count, sparsity_report
from gradprune.callbacks import GradualPruningCallback
from lightning_helpers import tiny_module, token_loader, trainer


class SaveMasks(Callback):
    def __init__(self, directory):
        self.directory = directory

    def on_fit_end(self, trainer, pl_module):
        masks = {k: v.clone() for k, v in MaskRegistry.of(pl_module).masks.items()}
        report = sparsity_report(pl_module, [t for t in MaskRegistry.of(pl_module).targets.values()])
        weights = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        torch.save({"masks": masks, "report": report, "world": trainer.world_size, "weights": weights},
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
