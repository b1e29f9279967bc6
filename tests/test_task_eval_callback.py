"""TaskEvalCallback inside real fits: eval/<task>/<metric> in TensorBoard, rank 0 evaluates, every rank logs."""
import re

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.util import tensor_util

from gradprune import PrunableLM, evaluate_tasks
from gradprune.callbacks import GradualPruningCallback, SparsityMonitor, TaskEvalCallback
from lightning_helpers import token_loader, trainer
from lm_tasks import TASK, write_local_task
from tiny_models import TINY_LLAMA

pytest.importorskip("lm_eval")  # in the dev extra, so `make test` runs these


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return str(write_local_task(tmp_path_factory.mktemp("tasks")))


def module_258(seed=0):
    import lightning.pytorch as pl

    pl.seed_everything(seed, verbose=False)
    return PrunableLM(model=dict(TINY_LLAMA), vocab_size=258, learning_rate=1e-2, warmup_steps=0)


def test_fit_logs_task_metrics_at_every_second_validation_and_trains_as_without_it(tmp_path, task_dir):
    logger = TensorBoardLogger(tmp_path, name="tb")
    callback = TaskEvalCallback(TASK, every_n_val=2, limit=8, tokenizer="bytes", include_path=task_dir)
    module = module_258()
    trainer(tmp_path, max_steps=8, logger=logger, val_check_interval=2, log_every_n_steps=1,
            callbacks=[SparsityMonitor(), callback]).fit(module, token_loader(n=32), token_loader(n=8, seed=1))

    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {f"eval/{TASK}/acc", f"eval/{TASK}/acc_stderr", f"eval/{TASK}/acc_norm", "eval/wall_s", "val/acc"} <= tags
    validations = [e.step for e in events.Scalars("val/ppl")]
    assert validations == [1, 3, 5, 7]  # 0-based global steps of the validations after steps 2, 4, 6, 8
    acc = events.Scalars(f"eval/{TASK}/acc")
    assert [e.step for e in acc] == [3, 7]  # every second validation
    assert all(e.value > 0 for e in events.Scalars("eval/wall_s"))
    final = evaluate_tasks(module, TASK, tokenizer="bytes", limit=8, include_path=task_dir)  # the model as it ended
    assert acc[-1].value == pytest.approx(final[TASK]["acc"], abs=1e-7)
    assert [h["step"] for h in callback.history] == [4, 8] and callback.history[-1][TASK] == final[TASK]
    assert callback.state_dict()["validations"] == 4
    # TensorBoard's custom-scalars tab (the last layout the run wrote): accuracy and sparsity on one chart,
    # next to the monitor's sparsity-and-perplexity chart
    record = events.Tensors("custom_scalars__config__")[-1]
    layout = layout_pb2.Layout.FromString(tensor_util.make_ndarray(record.tensor_proto).item())
    charts = {chart.title: list(chart.multiline.tag) for category in layout.category for chart in category.chart}
    assert {"task accuracy and sparsity", "sparsity and validation metric"} <= charts.keys()
    drawn = [tag for tag in tags if any(re.search(p, tag) for p in charts["task accuracy and sparsity"])]
    assert sorted(drawn) == sorted([f"eval/{TASK}/acc", f"eval/{TASK}/acc_norm", "sparsity/global"])

    plain = module_258()  # the same run without the callback: the evaluations changed nothing it trained on
    trainer(tmp_path / "plain", max_steps=8, val_check_interval=2).fit(plain, token_loader(n=32), token_loader(n=8, seed=1))
    for name, value in plain.state_dict().items():
        assert torch.equal(value, module.state_dict()[name]), name


def test_at_pruning_events_evaluates_after_each_step_that_pruned(tmp_path, task_dir):
    gradual = GradualPruningCallback(0.5, schedule="linear", start_step=2, end_step=4, every=2)
    callback = TaskEvalCallback([TASK], limit=4, at_pruning_events=True, every_n_val=100, tokenizer="bytes",
                                include_path=task_dir)
    trainer(tmp_path, max_steps=6, limit_val_batches=0, callbacks=[gradual, callback]).fit(module_258(), token_loader(n=24))
    assert [h["step"] for h in callback.history] == [2, 4]  # events at steps 2 and 4, none on the other steps


@pytest.mark.parametrize("kwargs, match", [
    (dict(tasks=[]), r"tasks must name at least one lm-eval task"),
    (dict(limit=0), r"limit must be None \(every item\), an int >= 1 .*got 0"),
    (dict(every_n_val=0), r"every_n_val must be an int >= 1 .*got 0"),
    (dict(tasks="arc_easy,nope_task"), r"tasks: 'nope_task' is not an lm-eval task"),
])
def test_bad_arguments_are_named_at_construction(task_dir, kwargs, match):
    args = dict(tasks=[TASK], include_path=task_dir)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        TaskEvalCallback(**args)


def test_a_tokenizer_the_model_cannot_embed_fails_before_training(tmp_path, task_dir):
    import lightning.pytorch as pl

    pl.seed_everything(0, verbose=False)
    module = PrunableLM(model=dict(TINY_LLAMA), vocab_size=128)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    callback = TaskEvalCallback([TASK], tokenizer="bytes", include_path=task_dir)
    with pytest.raises(ValueError, match=r"tokenizer: its vocabulary has 258 token ids but the model .* embeds only 128"):
        trainer(tmp_path, max_steps=2, callbacks=[callback]).fit(module, token_loader(n=8))
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


class SaveHistory(Callback):
    def __init__(self, directory):
        self.directory = directory

    def on_fit_end(self, trainer, pl_module):
        history = [c.history for c in trainer.callbacks if isinstance(c, TaskEvalCallback)][0]
        logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("eval/")}
        torch.save({"history": history, "logged": logged}, self.directory / f"rank{trainer.global_rank}.pt")


@pytest.mark.distributed
def test_under_ddp_rank_zero_evaluates_and_both_ranks_get_the_same_numbers(tmp_path, task_dir):
    callback = TaskEvalCallback([TASK], limit=6, tokenizer="bytes", include_path=task_dir)
    fit = trainer(tmp_path, max_steps=2, strategy="ddp_spawn", devices=2, val_check_interval=2,
                  callbacks=[callback, SaveHistory(tmp_path)])
    fit.fit(module_258(), token_loader(n=16), token_loader(n=8, seed=1))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert ranks[0]["history"] and ranks[0]["history"][0][TASK] == ranks[1]["history"][0][TASK]
    assert ranks[0]["logged"] == ranks[1]["logged"] and f"eval/{TASK}/acc" in ranks[0]["logged"]
    assert ranks[0]["history"][0]["wall_s"] == ranks[1]["history"][0]["wall_s"]  # rank 0's timing, received
