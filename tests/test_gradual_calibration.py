"""GradualPruningCallback(statistics="calibration"): at every event the one-shot pipeline of the scorer's
name runs on calibration data drawn at fit start, from the current masks to the event's exact sparsity."""
import copy
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from gradprune import MaskRegistry, exact_count, find_targets, prune_oneshot
from gradprune.callbacks import GradualPruningCallback, LearnedMasks, SparseGPTPruningCallback
from lightning_helpers import token_loader, trainer
from test_gradual_scorers import EventCounts, PlainLM, RankShards, no_hooks_left, rank_tokens
from test_gradual_sparsegpt import SaveState, WeightsAtEvents

pytestmark = pytest.mark.numerics


def test_each_event_is_the_oneshot_pipeline_on_the_calibration_batches(tmp_path):
    """lr 0: training moves no weight, so the run must equal prune_oneshot called at the schedule's sparsities,
    in order, on the first training sequences (no datamodule here), on a user's module with plain SGD."""
    module = PlainLM(lr=0.0)
    reference = copy.deepcopy(module)
    gradual = GradualPruningCallback(0.6, start_step=2, end_step=6, every=2, scope="row", scorer="wanda",
                                     statistics="calibration", nsamples=6, seqlen=12)
    counts = EventCounts(gradual)
    trainer(tmp_path, max_steps=7, callbacks=[gradual, counts]).fit(module, token_loader())

    assert sorted(counts.events) == [2, 4, 6]
    calibration = [ids[:, :12] for (ids,) in token_loader()][:2]  # batches of 4: 4 + 2 sequences
    calibration[1] = calibration[1][:2]
    for step in (2, 4, 6):
        target = gradual.schedule.sparsity_at(step)
        # scope row: every output row at exactly its count, as in the window mode
        row_counts = {t.name: t.weight.shape[0] * exact_count(target, t.weight.shape[1]) for t in gradual.targets}
        assert counts.events[step]["global"]["zeros"] == sum(row_counts.values())
        prune_oneshot(reference, "wanda", target, calibration=calibration, scope="row", progress=False,
                      counts=row_counts)
    expected = MaskRegistry.of(reference).masks
    masks = MaskRegistry.of(module).masks
    assert masks.keys() == expected.keys() and masks
    assert all(torch.equal(masks[name], expected[name]) for name in masks)
    assert no_hooks_left(module)


def test_the_ramp_its_learned_prior_and_the_oneshot_callback_calibrate_on_the_same_windows_by_default():
    """A ramp on calibration data, a learned mode's prior and the one-shot callback they are benchmarked against
    ask the datamodule for the same windows unless told otherwise (at 2:4, 32 windows instead of 128 cost 5.6%
    held-out perplexity in the recovery benchmark, so a silent difference would decide the comparison)."""
    asked = []

    class Windows:
        def calibration_batches(self, nsamples, seqlen):
            asked.append((nsamples, seqlen))
            return [torch.zeros(1, seqlen, dtype=torch.long)] * nsamples

    run = SimpleNamespace(datamodule=Windows(), world_size=1, global_rank=0)
    for callback in (GradualPruningCallback(0.5, scorer="sparsegpt", scope="layer", statistics="calibration"),
                     GradualPruningCallback(0.5, pattern="2:4", end_step=4, mode=LearnedMasks()),
                     SparseGPTPruningCallback(0.5)):
        assert len(callback.calibration(run)) == callback.nsamples
    assert len(asked) == 3 and len(set(asked)) == 1


def test_stream_windows_add_the_latest_training_sequences_to_each_events_calibration(tmp_path):
    """lr 0: the run must equal prune_oneshot at the schedule's sparsities on the calibration sequences followed
    by the latest 6 training sequences before each event (batches of 4: the last 2 of one batch and the next)."""
    module = PlainLM(lr=0.0)
    reference = copy.deepcopy(module)
    gradual = GradualPruningCallback(0.6, start_step=2, end_step=4, every=2, scope="row", scorer="wanda",
                                     statistics="calibration", nsamples=6, seqlen=12, stream_windows=6)
    counts = EventCounts(gradual)
    trainer(tmp_path, max_steps=5, callbacks=[gradual, counts]).fit(module, token_loader())

    assert sorted(counts.events) == [2, 4]
    batches = [ids[:, :12] for (ids,) in token_loader()]
    calibration = [batches[0], batches[1][:2]]
    for step in (2, 4):
        target = gradual.schedule.sparsity_at(step)
        row_counts = {t.name: t.weight.shape[0] * exact_count(target, t.weight.shape[1]) for t in gradual.targets}
        stream = [batches[step - 2][2:], batches[step - 1]]
        prune_oneshot(reference, "wanda", target, calibration=calibration + stream, scope="row", progress=False,
                      counts=row_counts)
    expected, masks = MaskRegistry.of(reference).masks, MaskRegistry.of(module).masks
    assert masks.keys() == expected.keys() and masks
    assert all(torch.equal(masks[name], expected[name]) for name in masks)
    assert sum(b["input_ids"].shape[0] for b in gradual._stream) == 6  # the latest 6, held for a resume


def test_stream_windows_resume_bit_identically_inside_the_ramp(tmp_path):
    """The kept training sequences travel in the checkpoint: resumed at step 4, the events at 6 and 8 calibrate
    on sequences from before the checkpoint too, and the run ends with the weights and masks of the run that
    went through (SparseGPT, unstructured, on a plain-SGD module)."""
    def run(root, ckpt_path=None, checkpoint=None):
        module = PlainLM(lr=1e-2, seed=1)
        callbacks = [GradualPruningCallback(0.5, start_step=0, end_step=8, every=2, initial_sparsity=0.1,
                                            scorer="sparsegpt", statistics="calibration", nsamples=4, seqlen=12,
                                            stream_windows=20)]
        if checkpoint is not None:
            callbacks.append(checkpoint)
        trainer(root, max_epochs=3, limit_train_batches=4, callbacks=callbacks,
                enable_checkpointing=checkpoint is not None).fit(module, token_loader(), ckpt_path=ckpt_path)
        return module

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{step}")
    full = run(tmp_path / "a", checkpoint=checkpoint)
    resumed = run(tmp_path / "b", ckpt_path=str(tmp_path / "ckpt" / "step=4.ckpt"))
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    masks_a, masks_b = MaskRegistry.of(full).masks, MaskRegistry.of(resumed).masks
    assert masks_a and masks_a.keys() == masks_b.keys() and all(torch.equal(masks_a[k], masks_b[k]) for k in masks_a)


def test_sparsegpt_on_calibration_data_is_exact_per_layer_and_updates_kept_weights(tmp_path):
    module = PlainLM(lr=0.0)
    gradual = GradualPruningCallback(0.5, start_step=0, end_step=4, every=2, scorer="sparsegpt",
                                     statistics="calibration", nsamples=8, seqlen=16)
    seen, counts = WeightsAtEvents(gradual), EventCounts(gradual)
    trainer(tmp_path, max_steps=5, callbacks=[gradual, seen, counts]).fit(module, token_loader())
    for step in (2, 4):
        target = gradual.schedule.sparsity_at(step)
        for name, layer in counts.events[step]["layers"].items():
            assert layer["zeros"] == exact_count(target, layer["numel"]), (step, name)
    registry = MaskRegistry.of(module)
    for t in gradual.targets:
        before, after = seen.before[3][t.name], seen.after[4][t.name]  # the event at 4 ends the batch begun at 3
        kept = registry.masks[t.name]
        assert not after[~kept].any()
        assert not torch.equal(before[kept], after[kept]), t.name  # SparseGPT compensated in the kept weights


@pytest.mark.distributed
@pytest.mark.parametrize("stream_windows", [0, 4])
def test_calibration_statistics_give_every_ddp_rank_the_same_weights_and_masks(tmp_path, stream_windows):
    """Each rank calibrates on its own first training sequences (and, with stream_windows, on its own latest
    training sequences); the statistics are summed over ranks."""
    gradual = GradualPruningCallback(0.5, start_step=1, end_step=3, every=2, scorer="sparsegpt",
                                     statistics="calibration", nsamples=4, seqlen=16, stream_windows=stream_windows)
    ddp = trainer(tmp_path, max_steps=3, strategy="ddp_spawn", devices=2, use_distributed_sampler=False,
                  callbacks=[gradual, SaveState(tmp_path)])
    ddp.fit(PlainLM(lr=1e-3), datamodule=RankShards())
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert ranks[0]["masks"] and ranks[0]["masks"].keys() == ranks[1]["masks"].keys()
    for kind in ("weights", "masks"):
        for name, value in ranks[0][kind].items():
            assert torch.equal(value, ranks[1][kind][name]), (kind, name)


class OneWindowRankShards(RankShards):
    """Rank r trains on its own rows (RankShards), and the calibration is one window, the same on every rank:
    fewer windows than ranks, so every rank runs it and rank 0's statistics are used."""

    def calibration_batches(self, nsamples, seqlen):
        return [torch.randint(0, 128, (1, seqlen), generator=torch.Generator().manual_seed(5))]


@pytest.mark.distributed
def test_with_fewer_windows_than_ranks_every_ranks_stream_reaches_the_event(tmp_path):
    """lr 0: the masks on both ranks must equal one process's wanda on the window, then rank 0's two training
    batches, then rank 1's (the stream of each rank before the event at step 2)."""
    gradual = GradualPruningCallback(0.5, schedule="constant", start_step=2, end_step=3, every=1, scope="row",
                                     scorer="wanda", statistics="calibration", nsamples=1, seqlen=16, stream_windows=4)
    ddp = trainer(tmp_path, max_steps=3, strategy="ddp_spawn", devices=2, use_distributed_sampler=False,
                  callbacks=[gradual, SaveState(tmp_path)])
    ddp.fit(PlainLM(lr=0.0), datamodule=OneWindowRankShards())

    reference = PlainLM(lr=0.0)
    window = OneWindowRankShards().calibration_batches(1, 16)
    streams = [rank_tokens()[r::2][:4].split(2) for r in (0, 1)]
    targets = find_targets(reference)
    row_counts = {t.name: t.weight.shape[0] * exact_count(0.5, t.weight.shape[1]) for t in targets}
    prune_oneshot(reference, "wanda", 0.5, calibration=window + [*streams[0], *streams[1]], scope="row",
                  progress=False, counts=row_counts)
    expected = MaskRegistry.of(reference).masks
    for rank in (0, 1):
        masks = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)["masks"]
        assert masks and masks.keys() == expected.keys()
        assert all(torch.equal(masks[name], expected[name]) for name in masks), rank


@pytest.mark.parametrize("kwargs, match", [
    (dict(scorer="taylor"), r"statistics='calibration' runs the one-shot method .* got scorer='taylor'"),
    (dict(scorer="magnitude"), r"use scorer \['ria', 'sparsegpt', 'wanda'\], got scorer='magnitude'"),
    (dict(scorer="wanda", allocation="owl"), r"allocation 'uniform' only, got allocation='owl'"),
    (dict(scorer="wanda", nsamples=0), r"nsamples must be a positive integer, got 0"),
    (dict(scorer="wanda", lm=""), r"lm must be the dotted name"),
    (dict(scorer="wanda", stream_windows=-1), r"stream_windows must be an int >= 0 .*got -1"),
])
def test_bad_calibration_arguments_raise_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradualPruningCallback(0.5, statistics="calibration", **kwargs)


@pytest.mark.distributed
def test_stream_windows_resume_under_ddp_like_the_run_that_went_through(tmp_path):
    """Two ranks, each keeping its own training sequences: resumed at step 4 (the events at 6 and 8 calibrate
    on sequences from before it), both ranks end with the weights and masks of the run that went through."""
    def run(root, ckpt_path=None, checkpoint=None):
        root.mkdir(exist_ok=True)
        gradual = GradualPruningCallback(0.5, start_step=0, end_step=8, every=2, initial_sparsity=0.1,
                                         scorer="sparsegpt", statistics="calibration", nsamples=4, seqlen=16,
                                         stream_windows=12)
        callbacks = [gradual, SaveState(root)] + ([checkpoint] if checkpoint is not None else [])
        ddp = trainer(root, max_epochs=3, limit_train_batches=4, strategy="ddp_spawn", devices=2,
                      use_distributed_sampler=False, callbacks=callbacks, enable_checkpointing=checkpoint is not None)
        ddp.fit(PlainLM(lr=1e-2, seed=1), datamodule=RankShards(), ckpt_path=ckpt_path)
        return [torch.load(root / f"rank{r}.pt", weights_only=False) for r in (0, 1)]

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{step}")
    through = run(tmp_path / "a", checkpoint=checkpoint)
    resumed = run(tmp_path / "b", ckpt_path=str(tmp_path / "ckpt" / "step=4.ckpt"))
    for rank in (0, 1):
        assert through[rank]["masks"] and through[rank]["masks"].keys() == resumed[rank]["masks"].keys()
        for kind in ("weights", "masks"):
            for name, value in through[rank][kind].items():
                assert torch.equal(value, resumed[rank][kind][name]), (rank, kind, name)


def test_a_resume_gives_each_rank_its_own_stream_or_rank_0_all_of_them():
    """Statistics are summed over ranks: on as many ranks as saved them each gets its own kept sequences back,
    on another number rank 0 takes every rank's and the others none, so the summed calibration is the same."""
    from gradprune.callbacks.gradual import rank_share

    streams = [[{"input_ids": torch.full((2, 4), r)}] for r in range(3)]
    assert [rank_share(streams, r, 3)[0]["input_ids"][0, 0].item() for r in range(3)] == [0, 1, 2]
    assert [b["input_ids"][0, 0].item() for b in rank_share(streams, 0, 2)] == [0, 1, 2]
    assert rank_share(streams, 1, 2) == []


def test_stream_windows_without_calibration_are_refused():
    with pytest.raises(ValueError, match=r"stream_windows adds training sequences to the calibration batches.*"
                                         r"got statistics='window' and mode=None"):
        GradualPruningCallback(0.5, scorer="wanda", stream_windows=8)


def test_unknown_statistics_source_is_refused():
    with pytest.raises(ValueError, match=r"statistics must be one of \['window', 'calibration'\], got 'cache'"):
        GradualPruningCallback(0.5, scorer="wanda", statistics="cache")


def test_oneshot_counts_are_checked_before_anything_changes():
    module = PlainLM()
    weights = {k: v.clone() for k, v in module.state_dict().items()}
    calibration = [torch.randint(0, 128, (2, 8))]
    with pytest.raises(ValueError, match=r"(?s)counts has no entry for .*counts must be ints in \[0, the layer's size\]: "
                                         r"\['model.model.layers.0.self_attn.q_proj=-1'\]"):
        prune_oneshot(module, "wanda", 0.5, calibration=calibration, counts={"model.model.layers.0.self_attn.q_proj": -1})
    with pytest.raises(ValueError, match=r"counts \(per-layer prune counts\) need pattern 'unstructured'"):
        prune_oneshot(module, "wanda", 0.5, pattern="2:4", calibration=calibration, counts={})
    assert all(torch.equal(v, weights[k]) for k, v in module.state_dict().items())
    assert not MaskRegistry.of(module).masks


def test_a_layer_pruned_past_the_target_beforehand_keeps_its_mask_and_the_total_stays_exact(tmp_path):
    """Earlier pruning of another scope (here one layer at 60%) must not make an event refuse mid-fit: that
    layer keeps what it has, the other layers prune that much less, and the total is the schedule's."""
    module = PlainLM(lr=0.0)
    first = "model.model.layers.0.mlp.down_proj"
    prune_oneshot(module, "magnitude", 0.6, include=[first], progress=False)
    before = MaskRegistry.of(module).masks[first].clone()
    gradual = GradualPruningCallback(0.5, start_step=0, end_step=2, every=2, initial_sparsity=0.3, scorer="sparsegpt",
                                     statistics="calibration", nsamples=4, seqlen=16)
    counts = EventCounts(gradual)
    trainer(tmp_path, max_steps=3, callbacks=[gradual, counts]).fit(module, token_loader())
    assert counts.events[2]["global"]["zeros"] == sum(exact_count(0.5, t.numel) for t in gradual.targets)
    after = MaskRegistry.of(module).masks[first]
    assert not (after & ~before).any()  # nothing pruned earlier came back
    assert counts.events[2]["layers"][first]["zeros"] == exact_count(0.6, before.numel())
    assert no_hooks_left(module)


def test_counts_below_what_earlier_pruning_removed_are_refused_before_anything_changes():
    module = PlainLM()
    name = "model.model.layers.0.self_attn.q_proj"
    prune_oneshot(module, "magnitude", 0.6, include=[name], progress=False)
    weights = {k: v.clone() for k, v in module.state_dict().items()}
    calibration = [torch.randint(0, 128, (2, 8))]
    targets = {t.name: t.numel for t in find_targets(module)}
    counts = {n: exact_count(0.5, numel) for n, numel in targets.items()}
    with pytest.raises(ValueError, match=rf"counts ask for fewer pruned weights than earlier pruning already removed in "
                                         rf"{name} \({exact_count(0.6, targets[name])} pruned, count {counts[name]}\)"):
        prune_oneshot(module, "wanda", 0.5, calibration=calibration, scope="layer", counts=counts, progress=False)
    with pytest.raises(ValueError, match=rf"in {name} \(row \d+: \d+ pruned, its share of {counts[name]} is \d+\)"):
        prune_oneshot(module, "wanda", 0.5, calibration=calibration, scope="row", counts=counts, progress=False)
    assert all(torch.equal(v, weights[k]) for k, v in module.state_dict().items())


def nm_pruned_per_group(mask: torch.Tensor, m: int) -> torch.Tensor:
    """Pruned weights in every group of ``m`` consecutive inputs of a stored (out, in) keep-mask."""
    return (~mask).reshape(mask.shape[0], -1, m).sum(dim=-1)


def test_an_nm_ramp_on_calibration_data_steps_through_1_of_4_then_2_of_4(tmp_path):
    """The one-shot method prunes an N:M pattern exactly, so a ramp 25% -> 50% at 2:4 prunes 1 of every 4 at
    the first event, nothing at an event whose target is still below 50%, and 2 of every 4 at the last; the
    weight pruned first stays pruned, and the final model is exactly 2:4 (SparseGPT, on a plain-SGD module)."""
    module = PlainLM(lr=1e-3)
    gradual = GradualPruningCallback(0.5, initial_sparsity=0.25, start_step=0, end_step=4, every=2, pattern="2:4",
                                     scorer="sparsegpt", statistics="calibration", nsamples=8, seqlen=16)
    masks_at = {}

    class Masks(EventCounts):
        def on_train_batch_end(self, trainer, pl_module, *args):
            masks_at[trainer.global_step] = {n: k.clone() for n, k in MaskRegistry.of(pl_module).masks.items()}

    trainer(tmp_path, max_steps=5, callbacks=[gradual, Masks(gradual)]).fit(module, token_loader())
    first, middle, last = masks_at[1], masks_at[3], masks_at[5]  # after the events at steps 0, 2 and 4
    assert gradual.schedule.sparsity_at(2) < 0.5
    assert first.keys() == {t.name for t in gradual.targets}
    for name, mask in first.items():
        assert (nm_pruned_per_group(mask, 4) == 1).all(), name
        assert torch.equal(middle[name], mask), name  # the event at 2 had nothing to prune
        assert (nm_pruned_per_group(last[name], 4) == 2).all(), name
        assert not (last[name] & ~mask).any(), name  # masks only grow
    for t in gradual.targets:
        assert not t.weight.detach()[~last[t.name]].any(), t.name
