"""One-shot pruning of a user's own LightningModule that has no forward(input_ids): the causal LM inside
is found (or named with ``lm``), and a module with nothing recognisable gets an error saying what to
define. Also: the strategies the pruning callbacks refuse."""
import os
import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import (DDPStrategy, DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy,
                                          SingleDeviceStrategy)
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig

from gradprune import MaskRegistry, prune_oneshot
from gradprune.blocks import find_causal_lm
from gradprune.callbacks import (GradualPruningCallback, MagnitudePruningCallback, SparseGPTPruningCallback,
                                 WandaPruningCallback)
from gradprune.callbacks.base import check_strategy
from lightning_helpers import token_loader, trainer
from tiny_models import TINY_LLAMA, tiny_llama


class UserLM(pl.LightningModule):
    """What users write: ``self.model`` an HF causal LM, no forward, loss from labels, torch's AdamW."""

    def __init__(self, seed=0, attribute="model"):
        super().__init__()
        torch.manual_seed(seed)
        setattr(self, attribute, AutoModelForCausalLM.from_config(LlamaConfig(**{**TINY_LLAMA, "vocab_size": 128})))
        self.attribute = attribute

    def training_step(self, batch, batch_idx):
        ids = batch[0]
        return getattr(self, self.attribute)(input_ids=ids, labels=ids).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def windows(n=6, seqlen=12, seed=7):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (1, seqlen), generator=generator) for _ in range(n)]


class Windows(pl.LightningDataModule):
    def calibration_batches(self, nsamples, seqlen):
        return windows(nsamples, seqlen)

    def train_dataloader(self):
        return token_loader(n=8)


# -- finding the causal LM -----------------------------------------------------------------------------------
class Wrapper(nn.Module):
    """Holds an LM and a helper, no forward of its own."""

    def __init__(self):
        super().__init__()
        self.net = tiny_llama()
        self.head = nn.Linear(4, 4)


class TwoLMs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        self.a.forward = lambda input_ids=None: None  # two children that take input_ids, no block stack
        self.b.forward = lambda input_ids=None: None


def test_find_causal_lm_picks_the_owner_of_the_blocks_or_the_named_one():
    user = UserLM()
    assert find_causal_lm(user) is user.model  # the LlamaForCausalLM, not its inner LlamaModel
    assert find_causal_lm(user, "model.model") is user.model.model
    assert find_causal_lm(user.model) is user.model  # a module with forward(input_ids) is its own LM
    wrapper = Wrapper()
    assert find_causal_lm(wrapper) is wrapper.net
    assert find_causal_lm(wrapper, wrapper.net) is wrapper.net


@pytest.mark.parametrize(
    "module, lm, error, match",
    [
        (UserLM(), "decoder", ValueError, r"lm='decoder': UserLM has no submodule of that name; its children are \['model'\]"),
        (UserLM(), "model.lm_head", ValueError, r"lm='model.lm_head': its forward does not take input_ids"),
        (UserLM(), 3, TypeError, r"lm must be the dotted name of a submodule .*got 3"),
        (UserLM(), nn.Linear(2, 2), ValueError, r"lm must be a submodule of the UserLM being pruned"),
        (nn.Sequential(nn.Linear(4, 4)), None, ValueError,
         r"cannot find the causal LM inside Sequential: it has no forward\(input_ids, attention_mask=None\), no "
         r"submodule that owns .* define forward\(self, input_ids, attention_mask=None\) .* lm='model'"),
        (TwoLMs(), None, ValueError, r"several children could be it: \['a', 'b'\]"),
    ],
)
def test_find_causal_lm_errors_say_what_to_define(module, lm, error, match):
    with pytest.raises(error, match=match):
        find_causal_lm(module, lm)


# -- one process ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sequential", [True, False])
def test_wanda_callback_on_a_module_without_forward_matches_the_bare_model(tmp_path, sequential):
    module = UserLM()
    bare = UserLM().model  # same seed: the same weights, pruned directly
    expected = prune_oneshot(bare, "wanda", 0.5, "unstructured", windows(6, 12), sequential=sequential, progress=False)["masks"]
    wanda = WandaPruningCallback(0.5, nsamples=6, seqlen=12, sequential=sequential)
    trainer(tmp_path, max_steps=2, callbacks=[wanda]).fit(module, datamodule=Windows())
    masks = MaskRegistry.of(module).masks
    assert masks.keys() == {f"model.{name}" for name in expected}
    for name, mask in expected.items():
        assert torch.equal(masks[f"model.{name}"], mask), name
        assert (module.get_submodule(f"model.{name}").weight[~mask] == 0).all(), name  # AdamW kept them at 0


def test_lm_argument_names_the_model(tmp_path):
    module = UserLM(attribute="backbone")
    sparsegpt = SparseGPTPruningCallback(0.5, nsamples=2, seqlen=12, lm="backbone")
    trainer(tmp_path, max_steps=1, callbacks=[sparsegpt]).fit(module, datamodule=Windows())
    assert sparsegpt.report["global"]["sparsity"] == pytest.approx(0.5, abs=1e-3)


class NoModel(pl.LightningModule):
    """Its LM is built from parts the finder cannot recognise: nothing takes input_ids."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(128, 8)
        self.proj = nn.Linear(8, 128)

    def training_step(self, batch, batch_idx):
        ids = batch[0]
        return nn.functional.cross_entropy(self.proj(self.embed(ids)).flatten(0, 1), ids.flatten())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters())


def test_module_with_no_recognisable_model_fails_at_fit_start_and_changes_nothing(tmp_path):
    module = NoModel()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    wanda = WandaPruningCallback(0.5, nsamples=2, seqlen=8, sequential=False)
    with pytest.raises(ValueError, match=r"cannot find the causal LM inside NoModel: .*define forward\(self, input_ids"):
        trainer(tmp_path, max_steps=1, callbacks=[wanda]).fit(module, datamodule=Windows())
    assert not wanda.done and not MaskRegistry.of(module).masks
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


def test_magnitude_needs_no_forward(tmp_path):
    module = NoModel()
    magnitude = MagnitudePruningCallback(0.5)
    trainer(tmp_path, max_steps=1, callbacks=[magnitude]).fit(module, token_loader(n=8))
    assert magnitude.report["global"]["sparsity"] == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize("lm", ["", 5])
def test_lm_argument_is_checked(lm):
    with pytest.raises(ValueError, match=r"lm must be the dotted name of the causal LM .*got"):
        WandaPruningCallback(0.5, lm=lm)


# -- strategies ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "strategy, match",
    [
        (FSDPStrategy(), r"WandaPruningCallback does not support strategy FSDPStrategy: FSDP shards every weight"),
        (ModelParallelStrategy(), r"strategy ModelParallelStrategy: it shards weights across ranks"),
        (DeepSpeedStrategy.__new__(DeepSpeedStrategy), r"strategy DeepSpeedStrategy: DeepSpeed partitions"),
    ],
)
def test_sharding_strategies_are_refused_with_what_works_instead(strategy, match):
    with pytest.raises(ValueError, match=match + r".*Use strategy='ddp'.*or a single device; FSDP2 \(ModelParallelStrategy "
                                                 r"with fully_shard, no tensor parallelism\) is supported for "
                                                 r"GradualPruningCallback only"):
        check_strategy(strategy, "WandaPruningCallback")


def test_whole_model_strategies_are_accepted():
    check_strategy(SingleDeviceStrategy(device=torch.device("cpu")))
    check_strategy(DDPStrategy())
    check_strategy(DDPStrategy(start_method="spawn"))


def test_every_pruning_callback_refuses_a_sharding_strategy_before_pruning(tmp_path):
    """In a real fit: ModelParallelStrategy (FSDP2 / tensor parallel) runs on CPU, and the callback's setup
    stops it before any weight changes: one-shot callbacks always, the gradual one with an option that does
    not work on sharded weights (its FSDP2 runs are in test_fsdp2.py)."""
    module = UserLM()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    for callback, match in (
        (WandaPruningCallback(0.5), r"WandaPruningCallback does not support strategy ModelParallelStrategy.*FSDP2 "
                                    r"\(ModelParallelStrategy with fully_shard, no tensor parallelism\) is supported "
                                    r"for GradualPruningCallback only"),
        (GradualPruningCallback(0.5, start_step=1, end_step=2, every=1, scorer="taylor"),
         r"scorer 'taylor' under strategy ModelParallelStrategy \(FSDP2\)"),
    ):
        fit = trainer(tmp_path, max_steps=2, callbacks=[callback], strategy=ModelParallelStrategy())
        try:
            with pytest.raises(ValueError, match=match):
                fit.fit(module, datamodule=Windows())
        finally:  # the strategy set up a one-process group on MASTER_PORT: a later DDP test would find it taken
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
            os.environ.pop("MASTER_PORT", None)
    assert not MaskRegistry.of(module).masks
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())
