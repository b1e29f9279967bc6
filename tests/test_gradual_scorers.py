"""Gradual scorers (magnitude, wanda, ria, taylor, sparsegpt) and their statistics: hand-computed scores, one
contract every scorer passes through fit, statistics windows, resume inside a window, DDP, bad input."""
import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from transformers import AutoModelForCausalLM, LlamaConfig

from gradprune import MaskRegistry, exact_count, find_targets, sparsity_report
from gradprune.callbacks import GradualPruningCallback
from gradprune.scorers import get_scorer
from gradprune.statistics import ActivationWindow, SaliencyAccumulator
from lightning_helpers import TINY_LLAMA, tiny_module, token_loader, trainer

pytestmark = pytest.mark.numerics  # run again under other CPU kernels by .ci/run (make test-numerics)

SCORERS = ["magnitude", "wanda", "ria", "taylor", "sparsegpt"]
LAYER_ONLY = {"sparsegpt"}  # prunes each layer to its count and updates the kept weights


def one_linear(weight):
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
    return nn.Sequential(layer)


def no_hooks_left(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# -- hand-computed scores -------------------------------------------------------------------------------
def test_wanda_scorer_by_hand():
    model = one_linear(torch.tensor([[1.0, -2.0], [3.0, 0.5]]))
    (target,) = find_targets(model)
    window = ActivationWindow([target])
    window.open()
    model(torch.tensor([[1.0, 2.0], [1.0, 2.0], [1.0, 0.0]]))  # sum x^2 = [3, 8]
    window.close()
    assert no_hooks_left(model)
    assert torch.equal(window.sum_sq(target.name), torch.tensor([3.0, 8.0], dtype=torch.float64))
    scores = get_scorer("wanda").score(target, window.sum_sq(target.name))
    expected = torch.tensor([[1.0, 2.0], [3.0, 0.5]]) * torch.tensor([3.0, 8.0]).sqrt()
    assert torch.allclose(scores, expected, rtol=1e-6)


def test_wanda_window_leaves_out_padding():
    model = one_linear(torch.ones(1, 2))
    (target,) = find_targets(model)
    window = ActivationWindow([target])
    window.open()
    window.tokens({"attention_mask": torch.tensor([[1, 0]])})
    model(torch.tensor([[[1.0, 1.0], [5.0, 5.0]]]))  # the second position is padding
    window.close()
    assert window.tokens_seen() == 1 and window.sum_sq(target.name).tolist() == [1.0, 1.0]


def test_ria_scorer_by_hand():
    w = torch.tensor([[1.0, -2.0, 1.0], [3.0, 0.0, 1.0]])
    model = one_linear(w)
    (target,) = find_targets(model)
    sum_sq = torch.tensor([4.0, 16.0, 1.0], dtype=torch.float64)
    scores = get_scorer("ria").score(target, sum_sq)
    # |W|/column sum + |W|/row sum, times sqrt(sum x^2) ** 0.5
    col, row = torch.tensor([4.0, 2.0, 2.0]), torch.tensor([4.0, 4.0])
    expected = (w.abs() / col + w.abs() / row.unsqueeze(1)) * torch.tensor([2.0, 4.0, 1.0]).sqrt()
    assert torch.allclose(scores, expected, rtol=1e-6)


def test_taylor_scorer_sums_abs_weight_times_gradient_over_steps():
    model = one_linear(torch.tensor([[1.0, -2.0]]))
    (target,) = find_targets(model)
    saliency = SaliencyAccumulator([target])
    for grad in (torch.tensor([[0.5, 1.0]]), torch.tensor([[-1.0, 0.25]])):
        target.weight.grad = grad
        saliency.add()
    assert saliency.steps == 2
    assert torch.equal(get_scorer("taylor").score(target, saliency.saliency(target.name)), torch.tensor([[1.5, 2.5]]))


# -- the contract every scorer passes -----------------------------------------------------------------
class EventCounts(Callback):
    def __init__(self, gradual):
        self.gradual, self.events = gradual, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.gradual.last_event_step == trainer.global_step and trainer.global_step not in self.events:
            self.events[trainer.global_step] = sparsity_report(pl_module, self.gradual.targets)


def fit_scorer(tmp_path, scorer, scope="layer", seed=0, **kwargs):
    module = tiny_module(seed=seed)
    dtypes = {n: p.dtype for n, p in module.named_parameters()}
    gradual = GradualPruningCallback(0.6, schedule="cubic", start_step=2, end_step=10, every=4, scope=scope,
                                     scorer=scorer, stat_batches=2, **kwargs)
    counts = EventCounts(gradual)
    trainer(tmp_path, max_steps=12, callbacks=[gradual, counts]).fit(module, token_loader())
    assert {n: p.dtype for n, p in module.named_parameters()} == dtypes
    return module, gradual, counts


@pytest.mark.parametrize("scorer, scope", [(scorer, scope) for scorer in SCORERS for scope in ("layer", "row", "global")
                                           if scope == "layer" or scorer not in LAYER_ONLY])
def test_every_scorer_prunes_exactly_deterministically_and_leaves_no_hooks(tmp_path, scorer, scope):
    module, gradual, counts = fit_scorer(tmp_path / "a", scorer, scope)
    schedule = gradual.schedule
    assert sorted(counts.events) == [2, 6, 10]
    for step, report in counts.events.items():
        s = schedule.sparsity_at(step)
        for t in gradual.targets:
            zeros = report["layers"][t.name]["zeros"]
            if scope == "layer":
                assert zeros == exact_count(s, t.numel), (step, t.name)
            elif scope == "row":
                assert zeros == t.out_features * exact_count(s, t.in_features), (step, t.name)
        if scope == "global":
            assert report["global"]["zeros"] == exact_count(s, report["global"]["numel"]), step
    registry = MaskRegistry.of(module)
    for t in gradual.targets:
        mask = registry.masks[t.name]
        assert mask.dtype == torch.bool and mask.shape == t.weight.shape and not t.weight[~mask].any()
    assert no_hooks_left(module)
    again, _, _ = fit_scorer(tmp_path / "b", scorer, scope)
    for name, mask in MaskRegistry.of(again).masks.items():
        assert torch.equal(mask, registry.masks[name]), name


def test_activation_scorers_rank_differently_from_magnitude(tmp_path):
    masks = {s: MaskRegistry.of(fit_scorer(tmp_path / s, s)[0]).masks for s in SCORERS}
    for scorer in ("wanda", "ria", "taylor", "sparsegpt"):
        assert any(not torch.equal(masks[scorer][n], masks["magnitude"][n]) for n in masks["magnitude"]), scorer


class Boom(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 5:  # inside the window before the event at step 6
            raise RuntimeError("boom")


@pytest.mark.parametrize("scorer", ["wanda", "ria"])
def test_hooks_are_removed_when_fit_fails_inside_a_window(tmp_path, scorer):
    module = tiny_module()
    gradual = GradualPruningCallback(0.6, start_step=2, end_step=10, every=4, scorer=scorer, stat_batches=3)
    with pytest.raises(RuntimeError, match="boom"):
        trainer(tmp_path, max_steps=12, callbacks=[gradual, Boom()]).fit(module, token_loader())
    assert no_hooks_left(module)


class WindowProbe(Callback):
    """Counts the micro-batches whose forward ran hooked (the window) before each event."""

    def __init__(self, gradual):
        self.gradual, self.hooked = gradual, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        # runs after the gradual callback's own on_train_batch_start, which opens or closes the window
        self.hooked.append((trainer.global_step, not no_hooks_left(pl_module)))


def test_statistics_are_collected_only_in_the_window_before_each_event(tmp_path):
    module = tiny_module()
    gradual = GradualPruningCallback(0.5, schedule="linear", start_step=4, end_step=12, every=4, scorer="wanda",
                                     stat_batches=3)
    probe = WindowProbe(gradual)
    trainer(tmp_path, max_steps=14, accumulate_grad_batches=1, callbacks=[gradual, probe]).fit(module, token_loader())
    hooked_steps = [step for step, hooked in probe.hooked if hooked]
    # a micro-batch at global step g leads to step g + 1; the events at 4, 8 and 12 get the 3 batches before
    assert hooked_steps == [1, 2, 3, 5, 6, 7, 9, 10, 11]
    assert no_hooks_left(module)


class HooksInValidation(Callback):
    def __init__(self):
        self.hooked = []

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.hooked.append(not no_hooks_left(pl_module))


@pytest.mark.parametrize("scorer", ["wanda", "sparsegpt"])
def test_validation_inside_a_window_is_left_out_of_the_statistics(tmp_path, scorer):
    masks = {}
    for validate in (False, True):
        module = tiny_module()
        gradual = GradualPruningCallback(0.5, schedule="linear", start_step=4, end_step=8, every=4, scorer=scorer,
                                         stat_batches=3)
        probe = HooksInValidation()
        trainer(tmp_path / str(validate), max_steps=8, val_check_interval=2, limit_val_batches=2 if validate else 0,
                callbacks=[gradual, probe]).fit(module, token_loader(), token_loader(n=8, seed=1))
        assert probe.hooked == ([False] * 8 if validate else [])  # validation at steps 2, 4, 6, 8, inside windows
        masks[validate] = MaskRegistry.of(module).masks
    assert all(torch.equal(masks[True][name], mask) for name, mask in masks[False].items())


def test_window_counts_micro_batches_under_gradient_accumulation(tmp_path):
    module = tiny_module()
    gradual = GradualPruningCallback(0.5, schedule="linear", start_step=2, end_step=4, every=2, scorer="wanda",
                                     stat_batches=3)
    probe = WindowProbe(gradual)
    trainer(tmp_path, max_steps=4, accumulate_grad_batches=2, callbacks=[gradual, probe]).fit(module, token_loader())
    hooked = [hooked for _, hooked in probe.hooked]
    # 8 micro-batches, 2 per optimizer step; events at steps 2 and 4 take the last 3 micro-batches before each
    assert hooked == [False, True, True, True, False, True, True, True]


# -- resume inside a statistics window --------------------------------------------------------------------
@pytest.mark.parametrize("scorer", ["wanda", "taylor", "sparsegpt"])
def test_resume_inside_a_statistics_window_is_bit_identical(tmp_path, scorer):
    scope = "layer" if scorer in LAYER_ONLY else "row"

    def run(root, ckpt_path=None, checkpoint=None):
        module = tiny_module(seed=1)
        callbacks = [GradualPruningCallback(0.6, start_step=2, end_step=14, every=4, scope=scope, scorer=scorer,
                                            stat_batches=4)]
        if checkpoint is not None:
            callbacks.append(checkpoint)
        trainer(root, max_epochs=4, limit_train_batches=4, callbacks=callbacks,
                enable_checkpointing=checkpoint is not None).fit(module, token_loader(), ckpt_path=ckpt_path)
        return module, callbacks[0]

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{step}")
    full, full_cb = run(tmp_path / "a", checkpoint=checkpoint)
    middle = tmp_path / "ckpt" / "step=8.ckpt"  # events at 2, 6, 10, 14: step 8 is inside the window before 10
    state = torch.load(middle, weights_only=False)
    (key,) = [k for k in state["callbacks"] if k.startswith("GradualPruningCallback")]
    saved = state["callbacks"][key]["statistics"]
    assert saved and (scorer != "wanda" or all(float(s["count"]) > 0 for s in saved.values()))
    resumed, resumed_cb = run(tmp_path / "b", ckpt_path=str(middle))
    assert resumed_cb.last_event_step == full_cb.last_event_step == 14
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    masks_a, masks_b = MaskRegistry.of(full).masks, MaskRegistry.of(resumed).masks
    assert all(torch.equal(masks_a[k], masks_b[k]) for k in masks_a)


# -- a user's own LightningModule and DDP --------------------------------------------------------------------
class PlainLM(pl.LightningModule):
    """What users write: an HF model attribute, loss from labels, a plain torch optimizer."""

    def __init__(self, lr=1e-2, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.model = AutoModelForCausalLM.from_config(LlamaConfig(**{**TINY_LLAMA, "vocab_size": 128}))
        self.lr = lr

    def training_step(self, batch, batch_idx):
        ids = batch[0]
        return self.model(input_ids=ids, labels=ids).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class SaveMasks(Callback):
    def __init__(self, directory):
        self.directory = directory

    def on_fit_end(self, trainer, pl_module):
        masks = {k: v.clone() for k, v in MaskRegistry.of(pl_module).masks.items()}
        torch.save(masks, self.directory / f"rank{trainer.global_rank}.pt")


def rank_tokens(n=16, length=16):
    return torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(0))


class RankShards(pl.LightningDataModule):
    """Rank r trains on rows r, r + 2, r + 4, ... in order (Lightning's own sampler would shuffle)."""

    def train_dataloader(self):
        return DataLoader(TensorDataset(rank_tokens()[self.trainer.global_rank::2]), batch_size=2)


def interleaved_loader(batch_size=2):
    """One process seeing the two ranks' micro-batches one after another: rank 0's first, rank 1's first, ..."""
    ids = rank_tokens()
    shards = [ids[r::2] for r in (0, 1)]
    order = [shard[i:i + batch_size] for i in range(0, len(shards[0]), batch_size) for shard in shards]
    return DataLoader(TensorDataset(torch.cat(order)), batch_size=batch_size, shuffle=False)


def test_plain_module_with_sgd_prunes_exactly_with_wanda(tmp_path):
    module = PlainLM()
    gradual = GradualPruningCallback(0.5, start_step=1, end_step=5, every=2, scorer="wanda", stat_batches=2)
    trainer(tmp_path, max_steps=6, callbacks=[gradual]).fit(module, token_loader())
    registry = MaskRegistry.of(module)
    assert registry.pruned_count() == sum(exact_count(0.5, t.numel) for t in gradual.targets)
    assert all(not w[~m].any() for w, m in registry.weight_masks())
    assert no_hooks_left(module)


@pytest.mark.distributed
def test_wanda_statistics_are_summed_over_ddp_ranks(tmp_path):
    """lr 0 keeps the weights at their initial values, so the masks depend on the statistics alone: two
    ranks end with identical masks, equal to one process that saw both ranks' micro-batches."""
    def gradual(event, window):  # one pruning event, after `window` micro-batches
        return GradualPruningCallback(0.5, schedule="constant", start_step=event, end_step=event + 1, every=1,
                                      scope="row", scorer="wanda", stat_batches=window)

    ddp = trainer(tmp_path, max_steps=3, strategy="ddp_spawn", devices=2, use_distributed_sampler=False,
                  callbacks=[gradual(2, 2), SaveMasks(tmp_path)])
    ddp.fit(PlainLM(lr=0.0), datamodule=RankShards())
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    alone_module = PlainLM(lr=0.0)
    trainer(tmp_path / "one", max_steps=5, callbacks=[gradual(4, 4)]).fit(alone_module, interleaved_loader())
    alone = MaskRegistry.of(alone_module).masks
    assert ranks[0].keys() == ranks[1].keys() == alone.keys()
    for name in alone:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        assert torch.equal(ranks[0][name], alone[name]), name
    # and the statistics mattered: rank 0's batches alone give other masks
    one_rank = PlainLM(lr=0.0)
    trainer(tmp_path / "rank0", max_steps=3, callbacks=[gradual(2, 2)]).fit(
        one_rank, DataLoader(TensorDataset(rank_tokens()[0::2]), batch_size=2))
    assert any(not torch.equal(MaskRegistry.of(one_rank).masks[n], alone[n]) for n in alone)


# -- bad input -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(scorer="movement"), r"scorer must be one of \['magnitude', 'ria', 'sparsegpt', 'taylor', 'wanda'\], got 'movement'"),
    (dict(scorer="sparsegpt", scope="row"), r"scorer 'sparsegpt' .* use scope 'layer' and pattern 'unstructured', got scope='row'"),
    (dict(scorer="sparsegpt", pattern="2:4"), r"scorer 'sparsegpt' .* got scope='layer', pattern='2:4'"),
    (dict(stat_batches=0), r"stat_batches must be an int >= 1 .*got 0"),
    (dict(stat_batches=2.5), r"stat_batches must be an int >= 1 .*got 2.5"),
])
def test_bad_scorer_arguments_raise_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradualPruningCallback(0.5, **kwargs)


def test_activation_scorer_at_step_zero_needs_a_later_start(tmp_path):
    module = tiny_module()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    gradual = GradualPruningCallback(0.6, initial_sparsity=0.2, start_step=0, end_step=4, every=2, scorer="wanda")
    with pytest.raises(ValueError, match=r"scorer 'wanda' ranks by activations .* set start_step >= 1"):
        trainer(tmp_path, max_steps=5, callbacks=[gradual]).fit(module, token_loader())
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


class WithIdleLayer(PlainLM):
    def __init__(self):
        super().__init__()
        self.idle = nn.Linear(32, 32)  # never called in forward


def test_activation_scorer_names_a_target_that_never_runs(tmp_path):
    module = WithIdleLayer()
    gradual = GradualPruningCallback(0.5, start_step=1, end_step=3, every=2, scorer="wanda")
    with pytest.raises(RuntimeError, match=r"saw no input in forward .*'idle'"):
        trainer(tmp_path, max_steps=4, callbacks=[gradual]).fit(module, token_loader())
    assert no_hooks_left(module)


# -- OWL budgets at every event ------------------------------------------------------------------------------
class MasksAtEvents(Callback):
    def __init__(self, gradual):
        self.gradual, self.masks = gradual, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.gradual.last_event_step == trainer.global_step and trainer.global_step not in self.masks:
            self.masks[trainer.global_step] = {k: v.clone() for k, v in MaskRegistry.of(pl_module).masks.items()}


@pytest.mark.parametrize("scope", ["row", "layer"])
def test_gradual_owl_is_exact_at_every_event_and_monotone(tmp_path, scope):
    module = tiny_module()
    gradual = GradualPruningCallback(0.6, start_step=2, end_step=10, every=4, scope=scope, scorer="wanda",
                                     stat_batches=2, allocation="owl", owl_lambda=0.1)
    counts, at_events = EventCounts(gradual), MasksAtEvents(gradual)
    trainer(tmp_path, max_steps=12, callbacks=[gradual, counts, at_events]).fit(module, token_loader())
    for step, report in counts.events.items():
        assert report["global"]["zeros"] == exact_count(gradual.schedule.sparsity_at(step), report["global"]["numel"])
    final = counts.events[10]["layers"]
    blocks = [[n for n in final if f".layers.{i}." in n] for i in (0, 1)]
    block_sparsity = [sum(final[n]["zeros"] for n in b) / sum(final[n]["numel"] for n in b) for b in blocks]
    assert abs(block_sparsity[0] - block_sparsity[1]) > 0.01  # OWL gave the blocks different budgets
    assert all(0.5 - 1e-3 <= s <= 0.7 + 1e-3 for s in block_sparsity)
    steps = sorted(at_events.masks)
    for before, after in zip(steps, steps[1:]):  # pruned weights stay pruned from one event to the next
        earlier = at_events.masks[before]  # targets without a mask yet had nothing pruned
        assert all(not (mask & ~earlier[n]).any() for n, mask in at_events.masks[after].items() if n in earlier)
    assert no_hooks_left(module)


@pytest.mark.parametrize("kwargs, match", [
    (dict(allocation="owl"), r"allocation='owl' .* activation scorer .* got scorer='magnitude'"),
    (dict(allocation="owl", scorer="wanda", owl_lambda=0.6), r"owl_lambda must be in \[0, 0.5\]"),
    (dict(allocation="owl", scorer="wanda", scope="global"), r"use scope 'layer' or 'row' .* got scope='global'"),
    (dict(allocation="best"), r"allocation must be one of \['uniform', 'owl'\], got 'best'"),
])
def test_gradual_owl_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradualPruningCallback(0.5, **kwargs)
