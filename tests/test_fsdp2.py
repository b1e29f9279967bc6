"""FSDP2 (``fully_shard``, Lightning's ModelParallelStrategy) on two real CPU processes with gloo.

Each test starts two processes itself (``LOCAL_RANK`` etc. set, so Lightning's ModelParallelStrategy does not
relaunch the test command), with a join timeout and a collective timeout so a hang fails instead of
blocking; every process destroys its process group before it exits. Checked: sharded selection gives
exactly the masks of one process holding the whole tensors (row / layer / global, ties, earlier masks, N:M,
a weight held whole beside sharded ones) and the scorers' local scores; whole-mask checkpoints and counts;
AdamW state of sharded weights; gradual Wanda (layer, global) and RIA (row) under FSDP2 give the masks and
(up to float rounding of the averaged gradients) the weights of a single-process run on the same data, the
exact sparsity at every event (registry, sparsity_report, SparsityMonitor), pruned weights zero after every
optimizer step; a run resumed from a distributed checkpoint (inside a statistics window) ends exactly as
the uninterrupted one, under FSDP2 and DDP; and the refusals (taylor, sparsegpt, OWL, MaskedAdamW, tensor
parallelism, Conv1D, export of sharded weights, other callbacks and strategies).
"""
import os
import socket
import traceback
from datetime import timedelta
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradprune import MaskRegistry, MaskedAdamW, exact_count, select_masks, sparsity_report
from gradprune.callbacks import (GradualPruningCallback, SparsityMonitor, StructuredPruningCallback,
                                 WandaPruningCallback)
from gradprune.callbacks.base import check_strategy
from gradprune.callbacks.strategies import check_sharded_fit
from gradprune.sharding import full_mask, local, local_rows, row_shard, select_sharded_masks
from gradprune.targets import Target

pytestmark = pytest.mark.numerics  # run again under other CPU kernels by .ci/run (make test-numerics)

TIMEOUT = 150  # seconds a two-process test may take before it is killed and fails


# -- running two ranks ----------------------------------------------------------------------------------------
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, port, path, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    log = open(path / f"stderr{rank}.txt", "a")
    os.dup2(log.fileno(), 2)  # what a crash in C++ prints, for the failure message
    try:
        fn(rank, path, *args)
    except BaseException:
        (path / f"error{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.barrier()  # neither rank tears down while the other still talks to it
            dist.destroy_process_group()  # no group leaks into the next test (EADDRINUSE)


def run_ranks(path, fn, *args):
    """Run ``fn(rank, path, *args)`` in two spawned processes; fail with a rank's traceback if one fails."""
    context = mp.get_context("spawn")
    port = _free_port()
    processes = [context.Process(target=_entry, args=(rank, port, path, fn, args)) for rank in (0, 1)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(TIMEOUT)
    alive = [p for p in processes if p.is_alive()]
    for p in alive:
        p.kill()
        p.join()
    errors = [(path / f"error{r}.txt").read_text() for r in (0, 1) if (path / f"error{r}.txt").exists()]
    assert not errors, errors[0]
    assert not alive, f"ranks still running after {TIMEOUT} s"
    codes = [p.exitcode for p in processes]
    tails = [(path / f"stderr{r}.txt").read_text()[-3000:] for r in (0, 1) if codes[r] != 0]
    assert codes == [0, 0], (codes, tails)


def _init_group():
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (2,))


# -- the core: sharded selection equals one process's ---------------------------------------------------------
SHAPES = {"a": (13, 8), "b": (7, 12), "c": (4, 8), "whole": (5, 8)}  # uneven rows; "whole" is not sharded


def _layers(mesh):
    """Linear layers with seeded weights, all but "whole" row-sharded over ``mesh``; and plain copies."""
    from torch.distributed.tensor import Shard, distribute_tensor

    generator = torch.Generator().manual_seed(0)
    sharded, plain = {}, {}
    for name, (rows, cols) in SHAPES.items():
        weight = torch.randn(rows, cols, generator=generator)
        plain[name] = nn.Linear(cols, rows, bias=False)
        plain[name].weight.data.copy_(weight)
        sharded[name] = nn.Linear(cols, rows, bias=False)
        sharded[name].weight = nn.Parameter(distribute_tensor(weight, mesh, [Shard(0)]) if name != "whole" else weight.clone())
    return sharded, plain


def _selection_worker(rank, path):
    mesh = _init_group()
    sharded, plain = _layers(mesh)
    targets = [Target(n, m) for n, m in sharded.items()]
    whole_targets = [Target(n, m) for n, m in plain.items()]
    generator = torch.Generator().manual_seed(1)
    # Scores with many ties (a few distinct values) and earlier masks, the same on both ranks.
    scores = {n: torch.randint(0, 4, shape, generator=generator).float() for n, shape in SHAPES.items()}
    earlier = {n: torch.rand(shape, generator=generator) > 0.1 for n, shape in SHAPES.items()}
    local_earlier = {t.name: local_rows(earlier[t.name], t.weight) for t in targets}
    checked = 0
    for scope, pattern, sparsity in (("row", "unstructured", 0.45), ("layer", "unstructured", 0.3),
                                     ("layer", "unstructured", 0.55), ("global", "unstructured", 0.37),
                                     ("global", "unstructured", 0.61), ("layer", "2:4", 0.5), ("global", "2:4", 0.4)):
        for with_earlier in (False, True):
            expected = select_masks(whole_targets, sparsity, lambda t: scores[t.name], scope, pattern,
                                    earlier if with_earlier else None)
            got = select_sharded_masks(targets, sparsity, lambda t: local_rows(scores[t.name], t.weight), scope,
                                       pattern, local_earlier if with_earlier else None)
            for t in targets:
                whole = full_mask(t.weight, got[t.name])
                assert torch.equal(whole, expected[t.name]), (scope, pattern, sparsity, with_earlier, t.name)
            checked += 1
    # the scorers' local scores: magnitude and wanda exactly one process's, ria's column sums summed per shard
    from gradprune.methods.ria import ria_scores
    from gradprune.methods.wanda import wanda_scores
    from gradprune.sharding import sharded_scores

    sum_sq = {n: torch.rand(shape[1], generator=generator, dtype=torch.float64) for n, shape in SHAPES.items()}
    for t, whole in zip(targets, whole_targets):
        w = whole.weight.detach()
        for scorer, reference, exact in (("magnitude", w.abs(), True), ("wanda", wanda_scores(w, sum_sq[t.name]), True),
                                         ("ria", ria_scores(w, sum_sq[t.name]), False)):
            got = sharded_scores(scorer, t, sum_sq[t.name])
            expected = local_rows(reference, t.weight)
            assert (torch.equal(got, expected) if exact else torch.allclose(got, expected, rtol=1e-6, atol=0)), (scorer, t.name)

    # magnitude by default, ties of |W| broken the same way
    expected = select_masks(whole_targets, 0.5, scope="global")
    got = select_sharded_masks(targets, 0.5, scope="global")
    assert all(torch.equal(full_mask(t.weight, got[t.name]), expected[t.name]) for t in targets)

    # The registry: local masks, whole counts, whole masks in its state, sliced back on load.
    registry = MaskRegistry(nn.ModuleDict(sharded))
    registry.update(targets, got)
    assert all(tuple(m.shape) == tuple(local(t.weight).shape) for t, m in zip(targets, registry.masks.values()))
    pruned = sum(int((~m).sum()) for m in expected.values())
    assert registry.pruned_count() == pruned
    assert registry.numel() == sum(r * c for r, c in SHAPES.values())
    for t in targets:
        assert (local(t.weight)[~registry.masks[t.name]] == 0).all()
    report = sparsity_report(nn.ModuleDict(sharded), targets)
    assert report["global"]["zeros"] == pruned and report["global"]["numel"] == registry.numel()
    state = registry.state_dict()
    assert {n: e["shape"] for n, e in state.items()} == {n: list(s) for n, s in SHAPES.items()}
    fresh_sharded, _ = _layers(mesh)
    fresh = MaskRegistry(nn.ModuleDict(fresh_sharded))
    fresh.load_state_dict(state)
    for name, mask in registry.masks.items():
        assert torch.equal(fresh.masks[name], mask), name

    # AdamW on a sharded weight: its state is sharded too; pruned entries reset (first moment 0, second at
    # the floor) and the weight stays zero through steps with unmasked gradients given
    from torch.distributed.tensor import Shard, distribute_tensor

    from gradprune.optimizer_state import moment_floor

    layer = sharded["b"]
    optimizer = torch.optim.AdamW([layer.weight], lr=0.1, weight_decay=0.1)
    adam = MaskRegistry(nn.ModuleDict({"b": layer}))
    adam.attach(optimizer)
    for step in range(3):
        layer.weight.grad = distribute_tensor(torch.randn(SHAPES["b"], generator=generator), mesh, [Shard(0)])
        if step == 1:
            keep = select_sharded_masks([Target("b", layer)], 0.5)["b"]
            adam.update([Target("b", layer)], {"b": keep})
            state = optimizer.state[layer.weight]
            assert (local(state["exp_avg"])[~keep] == 0).all()
            assert (local(state["exp_avg_sq"])[~keep] == moment_floor(torch.float32)).all()
        optimizer.step()  # attach masks the (local) gradients before every step
        if step >= 1:
            assert (local(layer.weight.detach())[~keep] == 0).all(), step
            assert (local(layer.weight.grad)[~keep] == 0).all(), step
    adam.detach()

    # export needs whole weights
    from gradprune import export

    try:
        export(nn.ModuleDict(sharded), path / f"export{rank}")
    except ValueError as error:
        assert "export needs whole weights, but 3 are sharded across ranks" in str(error), error
    else:
        raise AssertionError("exporting sharded weights was not refused")
    assert not (path / f"export{rank}").exists()

    # What sharded pruning refuses: Conv1D targets, tensor-parallel placements, MaskedAdamW.
    from torch.distributed.tensor import Shard, distribute_tensor
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(8, 6)
    conv.weight = nn.Parameter(distribute_tensor(conv.weight.detach(), mesh, [Shard(0)]))
    columns = nn.Linear(8, 6)
    columns.weight = nn.Parameter(distribute_tensor(columns.weight.detach(), mesh, [Shard(1)]))
    odd = [Target("conv", conv, True), Target("columns", columns)]
    try:
        select_sharded_masks(odd, 0.5)
    except ValueError as error:
        assert "GPT-2 Conv1D" in str(error) and "not tensor parallelism" in str(error), error
    else:
        raise AssertionError("Conv1D and Shard(1) targets were not refused")
    callback = GradualPruningCallback(0.5, end_step=2, every=1, scorer="wanda")
    fake = SimpleNamespace(strategy=ModelParallelStrategy(),
                           optimizers=[MaskedAdamW(nn.Linear(2, 2).parameters())])
    try:
        check_sharded_fit(callback, fake, odd)
    except ValueError as error:
        message = str(error)
        for part in ("tensor parallelism is not supported", "GPT-2 Conv1D", "MaskedAdamW",
                     "use torch.optim.AdamW"):
            assert part in message, (part, message)
    else:
        raise AssertionError("MaskedAdamW / Conv1D / Shard(1) were not refused")
    (path / f"selection{rank}.ok").write_text(str(checked))


@pytest.mark.distributed
def test_sharded_selection_is_one_process_selection_and_checkpoints_whole_masks(tmp_path):
    run_ranks(tmp_path, _selection_worker)
    assert (tmp_path / "selection0.ok").read_text() == (tmp_path / "selection1.ok").read_text() == "14"


# -- Lightning: GradualPruningCallback under ModelParallelStrategy ------------------------------------------
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.a = nn.Linear(16, 24)
        self.b = nn.Linear(24, 13)  # 13 rows: 7 + 6 on two ranks
        self.c = nn.Linear(13, 16)
        self.lm_head = nn.Linear(16, 32)

    def forward(self, ids):
        return self.lm_head(self.c(torch.relu(self.b(torch.relu(self.a(self.embed(ids)))))))


class ShardedLM(pl.LightningModule):
    """A user's module: ``configure_model`` shards each Linear and the net with ``fully_shard`` when a
    device mesh exists (ModelParallelStrategy), and leaves it whole otherwise (the single-process reference)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = Net()

    def configure_model(self):
        if self._device_mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in (self.net.a, self.net.b, self.net.c, self.net.lm_head):
            fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch, batch_idx):
        ids = batch[0]
        return nn.functional.cross_entropy(self.net(ids).flatten(0, 1), ids.flatten())

    def configure_optimizers(self):
        # SGD, not Adam: Adam's first steps move a weight by about lr * sign(g), which turns the float
        # rounding of averaged gradients (near-zero entries of either sign) into differences of 2 * lr
        return torch.optim.SGD(self.parameters(), lr=0.5, momentum=0.9, weight_decay=0.01)


class Record(Callback):
    """After every batch (events are applied at batch end): the whole masks, the registry's sparsity and the
    report; pruned weights must be zero after every optimizer step. At fit end: whole weights and masks."""

    def __init__(self, path, tag):
        self.path, self.tag, self.steps = path, tag, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        registry = MaskRegistry.of(pl_module)
        for name, mask in registry.masks.items():
            assert (local(registry.targets[name].weight.detach())[~mask] == 0).all(), name
        masks = {n: full_mask(registry.targets[n].weight, m) for n, m in registry.masks.items()}
        targets = [c for c in trainer.callbacks if isinstance(c, GradualPruningCallback)][0].targets  # the gradual callback's
        report = sparsity_report(pl_module, targets)["global"]
        self.steps[trainer.global_step] = {"masks": masks, "sparsity": registry.sparsity(targets),
                                           "zeros": report["zeros"], "numel": report["numel"]}

    def on_fit_end(self, trainer, pl_module):
        weights = {}
        for name, value in pl_module.named_parameters():
            value = value.detach()
            weights[name] = value.full_tensor() if hasattr(value, "full_tensor") else value.clone()
        monitor = [c for c in trainer.callbacks if isinstance(c, SparsityMonitor)][0]
        torch.save({"steps": self.steps, "weights": weights, "world": trainer.world_size, "monitor": monitor.report},
                   self.path / f"{self.tag}{trainer.global_rank}.pt")


def _loader(rank=None):
    """16 sequences in 4 steps: one process takes 4 per batch in order; with two ranks (no distributed
    sampler: Lightning's would shuffle) rank r takes sequences r, r + 2 of each 4, so every step sees the
    same 4 sequences."""
    ids = torch.randint(0, 32, (16, 8), generator=torch.Generator().manual_seed(0))
    if rank is None:
        return DataLoader(TensorDataset(ids), batch_size=4, shuffle=False)
    return DataLoader(TensorDataset(ids[rank::2]), batch_size=2, shuffle=False)


def _gradual(scope, scorer):
    # events at optimizer steps 1, 3, 5, 7; each activation window the 2 micro-batches before the event
    return GradualPruningCallback(0.6, schedule="linear", start_step=1, end_step=7, every=2, scope=scope,
                                  scorer=scorer, stat_batches=2, include=["a", "b", "c"])


def _fit(path, tag, max_epochs, rank=None, checkpoint_dir=None, resume=None, scope="layer", scorer="wanda",
         kind="fsdp2"):
    sharded = rank is not None
    callbacks = [_gradual(scope, scorer), SparsityMonitor(), Record(path, tag)]  # the monitor reports before Record saves
    if checkpoint_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=checkpoint_dir, save_last=True, save_top_k=0))
    if not sharded:
        strategy = "auto"
    elif kind == "fsdp2":
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, timeout=timedelta(seconds=60))
    else:  # the same module unsharded (configure_model sees no device mesh), whole on both ranks
        strategy = DDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=60))
    trainer = pl.Trainer(accelerator="cpu", devices=2 if sharded else 1, strategy=strategy, use_distributed_sampler=False,
                         max_epochs=max_epochs, logger=False, enable_checkpointing=checkpoint_dir is not None,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         deterministic=True, default_root_dir=path, callbacks=callbacks)
    trainer.fit(ShardedLM(), _loader(rank), ckpt_path=resume)


def _fsdp2_worker(rank, path, tag, max_epochs, checkpoint_dir, resume, scope, scorer, kind="fsdp2"):
    _fit(path, tag, max_epochs, rank, checkpoint_dir, resume, scope, scorer, kind)


def _load(path, tag, ranks=(0, 1)):
    return [torch.load(path / f"{tag}{r}.pt", weights_only=False) for r in ranks]


@pytest.mark.distributed
@pytest.mark.parametrize("scope, scorer, kind", [("layer", "wanda", "fsdp2"), ("global", "wanda", "fsdp2"),
                                                 ("row", "ria", "fsdp2"), ("layer", "wanda", "ddp")])
def test_gradual_under_fsdp2_prunes_as_one_process_and_resumes_exactly(tmp_path, scope, scorer, kind):
    """Two ranks with fully_shard against one process on the same data: identical masks at every step
    (for RIA, whose column sums are summed per shard, all but a few entries a rounding could flip), the
    exact schedule count at each event, pruned weights zero after every step, the same weights up to the
    float rounding of averaged gradients; a run stopped after epoch 1 (inside the window of the event at
    step 5) and resumed from its distributed checkpoint ends exactly as the uninterrupted run. The same
    under DDP (whole weights; the window's sums in the checkpoint are summed over the ranks)."""
    run_ranks(tmp_path, _fsdp2_worker, "full", 2, None, None, scope, scorer, kind)
    _fit(tmp_path, "alone", 2, scope=scope, scorer=scorer)
    ranks, (alone,) = _load(tmp_path, "full"), _load(tmp_path, "alone", (0,))
    assert ranks[0]["world"] == 2 and sorted(alone["steps"]) == sorted(ranks[0]["steps"]) == list(range(1, 9))
    numel = 24 * 16 + 13 * 24 + 16 * 13
    schedule = {1: 0.0, 3: 0.2, 5: 0.4, 7: 0.6}
    for step, record in alone["steps"].items():
        event = max(e for e in schedule if e <= step)
        if scope == "global":
            expected = exact_count(schedule[event], numel)
        elif scope == "layer":
            expected = sum(exact_count(schedule[event], n) for n in (24 * 16, 13 * 24, 16 * 13))
        else:
            expected = sum(rows * exact_count(schedule[event], cols) for rows, cols in ((24, 16), (13, 24), (16, 13)))
        for rank in ranks:
            got = rank["steps"][step]
            assert got["zeros"] == expected and got["numel"] == numel, (step, got["zeros"], expected)
            assert got["sparsity"] == expected / numel
            assert got["masks"].keys() == record["masks"].keys()
            for name, mask in record["masks"].items():
                differ = int((got["masks"][name] != mask).sum())
                assert differ == 0 or (scorer == "ria" and differ <= 4), (step, name, differ)
    final = expected / numel  # of the last event
    for rank in ranks + [alone]:  # the monitor's end-of-fit report counts whole tensors on every rank
        assert rank["monitor"]["global_sparsity"] == final
    for name, weight in alone["weights"].items():
        for rank in ranks:
            if scorer == "wanda":
                assert torch.allclose(rank["weights"][name], weight, atol=1e-5, rtol=1e-4), name
    assert all(torch.equal(ranks[0]["weights"][n], ranks[1]["weights"][n]) for n in alone["weights"])

    # stop after epoch 1 (step 4: one of the two window batches of the event at step 5 seen), resume to 2
    run_ranks(tmp_path, _fsdp2_worker, "first", 1, tmp_path / "ckpt", None, scope, scorer, kind)
    last = tmp_path / "ckpt" / "last.ckpt"
    if kind == "fsdp2":
        assert last.is_dir()  # a distributed checkpoint: a folder of shards, the callbacks' state in meta.pt
    meta = torch.load(last / "meta.pt" if kind == "fsdp2" else last, weights_only=False)
    (state,) = [v for k, v in meta["callbacks"].items() if k.startswith("GradualPruningCallback")]
    assert {n: e["shape"] for n, e in state["masks"].items()} == {"net.a": [24, 16], "net.b": [13, 24], "net.c": [16, 13]}
    assert state["statistics"] and state["statistics_summed"]  # the half-filled window, both ranks' share
    run_ranks(tmp_path, _fsdp2_worker, "resumed", 2, None, str(last), scope, scorer, kind)
    resumed = _load(tmp_path, "resumed")
    for rank, full in zip(resumed, ranks):
        assert sorted(rank["steps"]) == [5, 6, 7, 8]
        for step in (5, 6, 7, 8):
            for name, mask in full["steps"][step]["masks"].items():
                assert torch.equal(rank["steps"][step]["masks"][name], mask), (step, name)
        for name, weight in full["weights"].items():
            assert torch.equal(rank["weights"][name], weight), name


# -- refusals -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(scorer="taylor"), r"scorer 'taylor' under strategy ModelParallelStrategy \(FSDP2\): .*use one of "
                                r"\['magnitude', 'wanda', 'ria'\], or strategy='ddp'"),
        (dict(scorer="sparsegpt"), r"scorer 'sparsegpt' under strategy ModelParallelStrategy \(FSDP2\): its Hessian"),
        (dict(scorer="wanda", allocation="owl"), r"allocation='owl' under strategy ModelParallelStrategy \(FSDP2\).*"
                                                 r"use allocation='uniform'"),
        (dict(scorer="wanda", statistics="calibration"), r"statistics='calibration' under strategy "
                                                         r"ModelParallelStrategy \(FSDP2\): .*use statistics='window'"),
    ],
)
def test_gradual_options_that_do_not_work_sharded_are_refused_at_setup(kwargs, match):
    callback = GradualPruningCallback(0.5, end_step=2, every=1, start_step=1, **kwargs)
    fake = SimpleNamespace(strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1))
    with pytest.raises(ValueError, match=match + r"(.|\n)*supported for GradualPruningCallback only"):
        callback.setup(fake, None, "fit")


def test_tensor_parallelism_is_refused_and_fsdp2_accepted_for_the_gradual_callback():
    check_strategy(ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1), "GradualPruningCallback", fsdp2=True)
    with pytest.raises(ValueError, match=r"GradualPruningCallback does not support strategy ModelParallelStrategy with "
                                         r"tensor parallelism \(tensor_parallel_size=2\).*tensor_parallel_size=1"):
        check_strategy(ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2), "GradualPruningCallback",
                       fsdp2=True)


@pytest.mark.parametrize("strategy, match", [
    (ModelParallelStrategy(), r"WandaPruningCallback does not support strategy ModelParallelStrategy"),
    (ModelParallelStrategy(), r"StructuredPruningCallback does not support strategy ModelParallelStrategy"),
    (FSDPStrategy(), r"GradualPruningCallback does not support strategy FSDPStrategy: FSDP shards"),
    (DeepSpeedStrategy.__new__(DeepSpeedStrategy), r"GradualPruningCallback does not support strategy DeepSpeedStrategy"),
])
def test_other_callbacks_and_sharded_strategies_stay_refused(strategy, match):
    callback = (WandaPruningCallback(0.5) if "Wanda" in match else StructuredPruningCallback(mlp=0.25)
                if "Structured" in match else GradualPruningCallback(0.5, end_step=2, every=1))
    with pytest.raises(ValueError, match=match + r".*Use strategy='ddp'.*FSDP2 \(ModelParallelStrategy with fully_shard, "
                                                 r"no tensor parallelism\) is supported for GradualPruningCallback only"):
        callback.setup(SimpleNamespace(strategy=strategy), None, "fit")
