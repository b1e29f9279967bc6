"""TaskEvalCallback: lm-eval task accuracy of the model being pruned, in TensorBoard next to sparsity.

At the end of every ``every_n_val``-th validation (sanity checks excepted), and with ``at_pruning_events``
also after each step at which a gradual pruning callback changed the masks, rank 0 runs the tasks through
:func:`gradprune.evaluate_tasks` on the live model; the other DDP ranks wait and receive the numbers by
broadcast, and every rank logs the same values, so ``eval/<task>/<metric>`` (and ``eval/wall_s``, the
seconds the evaluation took) land at the same steps as ``val/ppl`` and ``sparsity/global``; with a
TensorBoardLogger the custom-scalars tab draws the accuracy and the sparsity on one chart. The evaluation
leaves the model's training flag and the random states as they were, so attaching the callback does not
change what the run trains on.
"""
from __future__ import annotations

import logging
import time
from typing import Any, List, Optional, Union

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from gradprune.task_eval import (check_task_arguments, check_task_names, check_vocabulary, evaluate_tasks,
                                 parse_tasks, require_lm_eval, resolve_model, resolve_tokenizer)
from gradprune.validation import Problems, check_bool, is_int

from .base import show_logs
from .monitor import add_chart_layout

log = logging.getLogger(__name__)


class TaskEvalCallback(Callback):
    """Run lm-eval tasks during fit and log their metrics as ``eval/<task>/<metric>``.

    Args:
        tasks: lm-eval task names (a list or ``"a,b"``), e.g. ``["arc_easy", "hellaswag"]``, or local tasks
            found under ``include_path``.
        every_n_val: evaluate at every n-th validation (1: each one).
        limit: items per task (int), a fraction of each task (float in (0, 1]), or None for all. A few hundred
            items keep an in-training evaluation short.
        at_pruning_events: also evaluate right after each optimizer step at which a gradual pruning callback
            (one with a ``last_event_step``) pruned.
        tokenizer: a tokenizer source ("bytes", a model directory, "smollm2"); None takes the data module's.
        batch_size: lm-eval's batch size.
        num_fewshot: in-context examples per item.
        include_path: folder(s) of local task YAMLs.
    """

    def __init__(
        self,
        tasks: Union[str, List[str]],
        every_n_val: int = 1,
        limit: Union[int, float, None] = None,
        at_pruning_events: bool = False,
        tokenizer: Optional[str] = None,
        batch_size: int = 8,
        num_fewshot: int = 0,
        include_path: Union[str, List[str], None] = None,
    ) -> None:
        names = parse_tasks(tasks)
        problems = Problems()
        check_task_arguments(problems, names, limit, batch_size, num_fewshot, include_path)
        if not is_int(every_n_val) or every_n_val < 1:
            problems.add(f"every_n_val must be an int >= 1 (evaluate at every n-th validation), got {every_n_val!r}",
                         type_error=not is_int(every_n_val))
        check_bool(problems, "at_pruning_events", at_pruning_events)
        if tokenizer is not None and not isinstance(tokenizer, str):
            problems.add(f"tokenizer must be None or a tokenizer source (str), got {tokenizer!r}", type_error=True)
        problems.raise_if_any()
        require_lm_eval()  # a missing extra and unknown task names fail here, not after training
        check_task_names(problems, names, include_path)
        problems.raise_if_any()
        self.tasks = names
        self.every_n_val = every_n_val
        self.limit = limit
        self.at_pruning_events = at_pruning_events
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.num_fewshot = num_fewshot
        self.include_path = include_path
        self.validations = 0  # validations seen (sanity checks excepted): every_n_val counts them
        self.history: list[dict] = []  # {"step", "wall_s", task: {metric: value}} per evaluation
        self._event_steps: dict[int, Any] = {}

    def state_dict(self) -> dict:
        return {"validations": self.validations, "history": self.history}

    def load_state_dict(self, state_dict: dict) -> None:
        self.validations = int(state_dict.get("validations", 0))
        self.history = list(state_dict.get("history", []))

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        show_logs()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the model and tokenizer are known now: a tokenizer the model cannot embed fails before training
        lm = resolve_model(pl_module)
        problems = Problems()
        check_vocabulary(problems, resolve_tokenizer(pl_module, lm, self.tokenizer), lm)
        problems.raise_if_any()
        self._event_steps = self._pruning_steps(trainer)
        add_chart_layout(trainer)  # accuracy and sparsity on one TensorBoard chart

    @staticmethod
    def tensorboard_charts() -> dict[str, list[str]]:
        """The chart :func:`gradprune.callbacks.monitor.chart_layout` draws for this callback: task accuracy with
        the sparsity of a SparsityMonitor and of a gradual callback."""
        return {"task accuracy and sparsity": ["^sparsity/global$", "^sparsity/achieved$", "^eval/[^/]+/acc(_norm)?$"]}

    @staticmethod
    def _pruning_steps(trainer: pl.Trainer) -> dict[int, Any]:
        return {id(c): getattr(c, "last_event_step") for c in trainer.callbacks if hasattr(c, "last_event_step")}

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.validations += 1
        if self.validations % self.every_n_val == 0:
            self._run(trainer, pl_module, on_epoch=True)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        if not self.at_pruning_events:
            return
        steps = self._pruning_steps(trainer)
        if steps != self._event_steps:
            self._event_steps = steps
            self._run(trainer, pl_module, on_epoch=False)

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, on_epoch: bool) -> None:
        """Evaluate on rank 0, broadcast, log the same numbers on every rank."""
        outcome: Any = None
        if trainer.is_global_zero:
            start = time.perf_counter()
            try:
                results = evaluate_tasks(pl_module, self.tasks, tokenizer=self.tokenizer, limit=self.limit,
                                         batch_size=self.batch_size, num_fewshot=self.num_fewshot,
                                         include_path=self.include_path)
                outcome = {"results": results, "wall_s": time.perf_counter() - start}
            except Exception as exc:  # noqa: BLE001 - the other ranks must hear of it, not wait forever
                outcome = {"error": f"{type(exc).__name__}: {exc}"}
                if trainer.world_size == 1:
                    raise
        outcome = trainer.strategy.broadcast(outcome, src=0)
        if "error" in outcome:
            raise RuntimeError(f"TaskEvalCallback: the evaluation on rank 0 failed: {outcome['error']}")
        values = {f"eval/{task}/{metric}": value for task, metrics in outcome["results"].items()
                  for metric, value in metrics.items()}
        values["eval/wall_s"] = outcome["wall_s"]
        # the same numbers on every rank: max is exact (a mean of equal floats need not be)
        pl_module.log_dict(values, on_step=not on_epoch, on_epoch=on_epoch, sync_dist=True, reduce_fx="max")
        self.history.append({"step": trainer.global_step, "wall_s": outcome["wall_s"], **outcome["results"]})
        log.info("task evaluation at step %d (%.1f s): %s", trainer.global_step, outcome["wall_s"],
                 ", ".join(f"{k[5:]}={v:.4f}" for k, v in values.items() if k != "eval/wall_s" and not k.endswith("_stderr")))
