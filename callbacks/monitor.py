"""SparsityMonitor: sparsity next to validation metrics in TensorBoard, and the end-of-fit report.

At every validation it logs the achieved sparsity of the targeted weights (``sparsity/global`` and
``sparsity/layer/<name>``) through ``pl_module.log``, so it lands at the same steps as ``val/ppl``; with
a TensorBoardLogger it also registers a custom-scalars layout (:func:`chart_layout`) that draws sparsity
and the validation metric on one chart (and, with a TaskEvalCallback, sparsity and task accuracy on
another). When fit ends it logs a short report (final sparsity overall and per layer type,
validation perplexity of the last dense validation and of the last one) and writes it as JSON next to
the logs.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import List, Optional, Union

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from gradprune.report import sparsity_report
from gradprune.targets import find_targets
from gradprune.validation import Problems, check_bool, check_selector

from .base import show_logs, tidy_progress_bar

log = logging.getLogger(__name__)


def chart_layout(trainer: pl.Trainer) -> dict:
    """gradprune's TensorBoard custom-scalar charts for this run: the schedule chart, and the charts of every
    callback with a ``tensorboard_charts()`` method (title -> tag regular expressions)."""
    charts = {"schedule target vs achieved": ["^sparsity/target$", "^sparsity/achieved$"]}
    for callback in trainer.callbacks:
        if callable(getattr(callback, "tensorboard_charts", None)):
            charts.update(callback.tensorboard_charts())
    return {"gradprune": {title: ["Multiline", tags] for title, tags in charts.items()}}


@rank_zero_only
def add_chart_layout(trainer: pl.Trainer) -> None:
    """Write :func:`chart_layout` to every TensorBoardLogger of the run. TensorBoard keeps the last layout a
    run wrote, so each callback that wants a chart writes the whole layout: the result is the same."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_custom_scalars(chart_layout(trainer))


class SparsityMonitor(Callback):
    """Log sparsity with the validation metric and report at the end of fit.

    Args:
        metric: the validation metric to put beside sparsity (logged by the LightningModule).
        per_layer: also log each layer's sparsity.
        include: which weights count (same forms as the pruning callbacks; default all targets).
        exclude: weights that do not count.
    """

    def __init__(
        self,
        metric: str = "val/ppl",
        per_layer: bool = True,
        include: Union[str, List[str], None] = None,
        exclude: Union[str, List[str], None] = None,
    ) -> None:
        problems = Problems()
        if not isinstance(metric, str) or not metric:
            problems.add(f"metric must be the name of a logged metric (str), got {metric!r}", type_error=True)
        check_bool(problems, "per_layer", per_layer)
        check_selector(problems, "include", include)
        check_selector(problems, "exclude", exclude)
        problems.raise_if_any()
        self.metric = metric
        self.per_layer = per_layer
        self.include = include
        self.exclude = exclude
        self.history: list[dict] = []
        self.report: Optional[dict] = None

    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict.get("history", []))

    def _sparsity(self, pl_module) -> dict:
        return sparsity_report(pl_module, find_targets(pl_module, self.include, self.exclude))

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        show_logs()  # the report at fit end is logged: show it from Python as from the command
        tidy_progress_bar(trainer)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        find_targets(pl_module, self.include, self.exclude)  # bad include/exclude fail before training
        add_chart_layout(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        problem = validation_problem(trainer)  # the loop's sizes are known from here on
        if problem:
            rank_zero_warn(
                f"SparsityMonitor: {problem}. TensorBoard will get no {self.metric} and no sparsity/global, and "
                f"the report's {self.metric} values will be null", category=UserWarning)

    def tensorboard_charts(self) -> dict[str, list[str]]:
        """The chart :func:`chart_layout` draws for this callback: sparsity with the validation metric."""
        return {"sparsity and validation metric": ["^sparsity/global$", f"^{re.escape(self.metric)}$"]}

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        report = self._sparsity(pl_module)
        # the same on every rank (so are the masks); sync_dist says so to Lightning, which otherwise warns
        # once per logged name under DDP
        pl_module.log("sparsity/global", report["global"]["sparsity"], sync_dist=True)
        if self.per_layer:
            pl_module.log_dict({f"sparsity/layer/{name}": v["sparsity"] for name, v in report["layers"].items()},
                               sync_dist=True)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.metric not in trainer.callback_metrics:
            return
        self.history.append(
            {
                "step": trainer.global_step,
                "sparsity": float(trainer.callback_metrics["sparsity/global"]),
                self.metric: float(trainer.callback_metrics[self.metric]),
            }
        )

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        report = self._sparsity(pl_module)
        dense = [h for h in self.history if h["sparsity"] == 0.0]
        self.report = {
            "global_sparsity": report["global"]["sparsity"],
            "by_type": {k: v["sparsity"] for k, v in report["by_type"].items()},
            f"{self.metric} dense": dense[-1][self.metric] if dense else None,
            f"{self.metric} final": self.history[-1][self.metric] if self.history else None,
            "history": self.history,
        }
        # trainer.log_dir is a collective under DDP (rank 0's directory is broadcast): every rank asks, only
        # rank 0 writes (asked in rank-zero code it left rank 0 waiting for the others at the end of fit)
        self._write(trainer.log_dir)

    @rank_zero_only
    def _write(self, log_dir: Optional[str]) -> None:
        r = self.report
        lines = [f"final sparsity {r['global_sparsity']:.4f} of the targeted weights"]
        lines += [f"  {kind:<12} {value:.4f}" for kind, value in r["by_type"].items()]
        before, after = r[f"{self.metric} dense"], r[f"{self.metric} final"]
        if before is not None:
            lines.append(f"{self.metric} before pruning (last dense validation): {before:.3f}")
        if after is not None:
            lines.append(f"{self.metric} after pruning (last validation): {after:.3f}")
        log.info("gradprune report\n%s", "\n".join(lines))
        if log_dir:
            path = Path(log_dir) / "gradprune_report.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(r, indent=1))


def validation_problem(trainer: pl.Trainer) -> Optional[str]:
    """Why no validation will run before this fit ends (None when one will, or when it cannot be told:
    an unbounded run, an iterable of unknown length). Needs the training loop's sizes (from on_train_start)."""
    if trainer.limit_val_batches == 0:
        return "validation is switched off (limit_val_batches=0)"
    source = getattr(getattr(trainer.fit_loop.epoch_loop, "val_loop", None), "_data_source", None)
    if source is not None and not source.is_defined():
        return "there is no validation data (no val_dataloaders, no val_dataloader() in the module or datamodule)"
    total, accumulate = trainer.estimated_stepping_batches, trainer.accumulate_grad_batches
    per_epoch, every, every_n = trainer.num_training_batches, trainer.val_check_batch, trainer.check_val_every_n_epoch
    if total == float("inf") or not isinstance(every, (int, float)) or every == float("inf"):
        return None
    batches = int(total) * accumulate  # training batches this run takes
    if every_n is None:
        first = every
    elif per_epoch == float("inf"):
        return None
    else:
        first = (every_n - 1) * per_epoch + min(every, per_epoch)
    if first <= batches:
        return None
    interval = trainer.val_check_interval
    stop = (f"max_steps={trainer.max_steps}" if trainer.max_steps not in (None, -1) else
            f"max_epochs={trainer.max_epochs}")
    return (f"validation will never run: the first comes after {int(first)} training batches "
            f"(val_check_interval={interval}, check_val_every_n_epoch={every_n}, {per_epoch} batches per epoch), "
            f"but this run stops after {batches} ({stop}{f', accumulate_grad_batches={accumulate}' if accumulate > 1 else ''}). "
            f"Set val_check_interval to at most {batches} batches"
            f"{' with check_val_every_n_epoch=None (count across epochs)' if every_n is not None else ''}, "
            f"or train longer")
