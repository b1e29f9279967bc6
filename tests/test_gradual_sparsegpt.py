"""Gradual SparseGPT: the Hessian window, exact counts over masks pruned before, reconstruction at each
event (kept weights updated), and the same weights and masks on every DDP rank."""
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from gradprune import MaskRegistry, exact_count, find_targets
from gradprune.callbacks import GradualPruningCallback
from gradprune.methods.sparsegpt import sparsegpt_prune
from gradprune.methods.wanda import wanda_scores
from gradprune.scorers import get_scorer
from gradprune.selection import drop_lowest_per_row
from gradprune.statistics import HessianWindow
from lightning_helpers import token_loader, trainer
from test_gradual_scorers import PlainLM, RankShards

pytestmark = pytest.mark.numerics


def test_earlier_mask_in_one_block_stays_pruned_and_the_count_is_exact():
    torch.manual_seed(0)
    W, X = torch.randn(8, 32), torch.randn(64, 32)
    keep = torch.ones(8, 32, dtype=torch.bool)
    keep[:, 24:] = torch.rand(8, 8) < 0.25  # the earlier pruning all sits in the last column block
    pruned_before = int((~keep).sum())
    assert pruned_before > exact_count(0.5, 8 * 32) // 4  # more than that block's share of the new count
    new, kept = sparsegpt_prune(W, 2 / 64 * X.t().double() @ X.double(), 0.5, blocksize=8, keep=keep)
    assert int((~kept).sum()) == exact_count(0.5, 8 * 32)
    assert not (~keep & kept).any()  # nothing pruned before comes back
    assert not new[~kept].any()


class QKV(nn.Module):
    """Three layers reading one input, as q/k/v do."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(4, 3, bias=False) for _ in range(3))

    def forward(self, x):
        return self.q(x) + self.k(x) + self.v(x)


def test_hessian_window_sums_x_xt_of_real_tokens_once_per_input():
    model = QKV()
    targets = find_targets(model)
    window = HessianWindow(targets)
    x = torch.tensor([[[1.0, 2.0, 0.0, -1.0], [3.0, 0.0, 1.0, 1.0], [9.0, 9.0, 9.0, 9.0]]])
    window.open()
    window.tokens({"attention_mask": torch.tensor([[1, 1, 0]])})  # the third position is padding
    model(x)
    window.close()
    real = x[0, :2].double()
    for t in targets:
        assert torch.equal(window.hessian(t.name), 2 / 2 * real.t() @ real), t.name
        assert torch.equal(window.sum_sq(t.name), real.square().sum(0)), t.name
    assert window.tokens_seen() == 2
    assert not any(m._forward_hooks for m in model.modules())


def test_sparsegpt_event_keeps_a_layer_output_closer_than_wanda_masks():
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(64, 32, bias=False))
    (target,) = find_targets(layer)
    # correlated channels of different scales, as LLM activations are: what SparseGPT's update exploits
    x = (torch.randn(4, 32, 16) @ torch.randn(16, 64) + 0.1 * torch.randn(4, 32, 64)) * torch.linspace(0.1, 3.0, 64)
    window = HessianWindow([target])
    window.open()
    window.tokens({})
    layer(x)
    window.close()
    dense = layer(x).detach()
    weight, keep = get_scorer("sparsegpt").prune(target, window.hessian(target.name), exact_count(0.5, target.numel), None)
    assert int((~keep).sum()) == exact_count(0.5, target.numel) and not weight[~keep].any()
    wanda_keep = drop_lowest_per_row(wanda_scores(target.weight.detach(), window.sum_sq(target.name)), 32)
    error_sparsegpt = (x @ weight.t() - dense).square().sum()
    error_wanda = (x @ (target.weight.detach() * wanda_keep).t() - dense).square().sum()
    assert error_sparsegpt < 0.5 * error_wanda


class WeightsAtEvents(Callback):
    def __init__(self, gradual):
        self.gradual, self.before, self.after = gradual, {}, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before[trainer.global_step] = {t.name: t.weight.detach().clone() for t in self.gradual.targets or []}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.gradual.last_event_step == trainer.global_step:
            self.after.setdefault(trainer.global_step, {t.name: t.weight.detach().clone() for t in self.gradual.targets})


def test_gradual_sparsegpt_updates_kept_weights_at_events_only(tmp_path):
    """lr 0: only the events change weights. SparseGPT changes kept weights too (it compensates), and every
    layer ends at exactly its count."""
    module = PlainLM(lr=0.0)
    gradual = GradualPruningCallback(0.5, start_step=2, end_step=6, every=4, scorer="sparsegpt", stat_batches=2)  # prunes at 6
    seen = WeightsAtEvents(gradual)
    trainer(tmp_path, max_steps=8, callbacks=[gradual, seen]).fit(module, token_loader())
    registry = MaskRegistry.of(module)
    for t in gradual.targets:
        keep = registry.masks[t.name]
        assert int((~keep).sum()) == exact_count(0.5, t.numel), t.name
        before, after = seen.before[5][t.name], seen.after[6][t.name]  # the event at 6 ends the batch begun at 5
        kept = after != 0
        assert not torch.equal(before[kept], after[kept]), t.name  # kept weights moved to make up for the pruned


class SaveState(Callback):
    def __init__(self, directory):
        self.directory = directory

    def on_fit_end(self, trainer, pl_module):
        torch.save({"weights": {k: v.clone() for k, v in pl_module.state_dict().items()},
                    "masks": {k: v.clone() for k, v in MaskRegistry.of(pl_module).masks.items()}},
                   self.directory / f"rank{trainer.global_rank}.pt")


@pytest.mark.distributed
def test_gradual_sparsegpt_gives_every_ddp_rank_the_same_weights_and_masks(tmp_path):
    gradual = GradualPruningCallback(0.5, schedule="constant", start_step=2, end_step=3, every=1, scorer="sparsegpt",
                                     stat_batches=2)
    ddp = trainer(tmp_path, max_steps=3, strategy="ddp_spawn", devices=2, use_distributed_sampler=False,
                  callbacks=[gradual, SaveState(tmp_path)])
    ddp.fit(PlainLM(lr=1e-3), datamodule=RankShards())
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert ranks[0]["masks"].keys() == ranks[1]["masks"].keys() and ranks[0]["masks"]
    for kind in ("weights", "masks"):
        for name, value in ranks[0][kind].items():
            assert torch.equal(value, ranks[1][kind][name]), (kind, name)
