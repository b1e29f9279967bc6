"""One-shot structured pruning in Lightning: :class:`StructuredPruningCallback` removes MLP neurons, attention head
groups and decoder layers once at fit start, before fine-tuning or distillation. It only decides when; the core
(:func:`gradprune.prune_structured`) decides what.

After the removal the weights are new, smaller tensors, so the optimizers are built again
(``trainer.strategy.setup_optimizers``; under DDP the model is wrapped again first, so gradient sync sees the
new parameters), and the model's mask registry is attached to the new optimizers.

Distillation from the dense teacher (``PrunableLM(distill=...)``, teacher ``"self"``: the copy taken at setup,
before this callback runs) works with the narrower student: the logit term always (the vocabulary is kept);
hidden-state terms compare ``hidden_size`` vectors, which neuron and head removal keep. Layer removal changes
the number of hidden states: with ``hidden_layers="all"`` the student's block ``j`` is paired with the teacher
block it came from (and the last, normed, hidden state with the teacher's last); an explicit list of indices
is an error (it named blocks of the unpruned model).

List it before any other pruning callback of the run (they choose their weights at fit start, and removal
replaces weights); the other order is refused at fit start.

Resuming a run pruned by this callback is not supported yet: the checkpoint's weights have the smaller shapes,
the freshly built model the original ones. The callback raises a clear error when fit resumes from a checkpoint;
load the exported (smaller) model and fine-tune it instead.

:class:`~gradprune.callbacks.GradualStructuredPruningCallback` (:mod:`gradprune.callbacks.gradual_structured`)
masks units along a schedule instead.
"""
from __future__ import annotations

import logging
from typing import Literal, Optional, Union

import lightning.pytorch as pl
from lightning.pytorch.strategies import DDPStrategy

from gradprune.blocks import find_causal_lm
from gradprune.structured.prune import check_arguments, prune_structured
from gradprune.validation import Problems, is_int

from .base import PruningCallback
from .calibration import CalibrationDraw
# its former home: recipes written before the split record gradprune.callbacks.structured.GradualStructuredPruningCallback
from .gradual_structured import GradualStructuredPruningCallback  # noqa: F401

log = logging.getLogger(__name__)


class StructuredPruningCallback(CalibrationDraw, PruningCallback):
    """Remove whole MLP neurons, attention head groups and decoder layers at fit start, by activation
    importance over calibration data (see :func:`gradprune.prune_structured` for every argument).

    Args:
        mlp: MLP neurons to remove per layer: a fraction in [0, 1] or an int count.
        heads: query heads to remove per layer, in whole GQA groups (9q/3kv: 3 or 1/3 -> 6q/2kv).
        layers: decoder layers to remove (fraction or count), lowest block influence first.
        metric: MLP neuron importance: "l2", "mean_abs", "variance", "near_zero", "combined" or "wanda".
        scope: "layer" or "global".
        metric_weights: weights of the "combined" metric, e.g. {"l2": 1.0, "near_zero": 0.5}.
        near_zero_eps: |activation| at or below this counts as near zero.
        nsamples: calibration sequences (the datamodule's calibration_batches, else the train loader).
        seqlen: tokens per calibration sequence.
        lm: dotted name of the causal LM inside the LightningModule (default: found).
    """

    def __init__(
        self,
        mlp: Union[float, int, None] = None,
        heads: Union[float, int, None] = None,
        layers: Union[float, int, None] = None,
        metric: Literal["l2", "mean_abs", "variance", "near_zero", "combined", "wanda"] = "l2",
        scope: Literal["layer", "global"] = "layer",
        metric_weights: Optional[dict[str, float]] = None,
        near_zero_eps: float = 1e-2,
        nsamples: int = 128,
        seqlen: int = 512,
        lm: Optional[str] = None,
    ) -> None:
        super().__init__()
        problems = Problems()
        for name, value in (("nsamples", nsamples), ("seqlen", seqlen)):
            if not is_int(value) or value < 1:
                problems.add(f"{name} must be a positive integer, got {value!r}")
        problems.raise_if_any()
        check_arguments(mlp, heads, layers, metric, scope, metric_weights, near_zero_eps)
        self.options = dict(mlp=mlp, heads=heads, layers=layers, metric=metric, scope=scope,
                            metric_weights=metric_weights, near_zero_eps=near_zero_eps)
        self.nsamples, self.seqlen, self.lm = nsamples, seqlen, lm
        self.done = False
        self.report: Optional[dict] = None
        self._combine = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(**{k: v for k, v in self.options.items() if k != "metric_weights"})

    def extra_state(self) -> dict:
        return {"done": self.done, "report": self.report}

    def load_extra_state(self, state: dict) -> None:
        self.done = bool(state.get("done", False))
        self.report = state.get("report")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and trainer.ckpt_path:
            raise ValueError(f"{type(self).__name__} cannot resume from a checkpoint ({trainer.ckpt_path!r}) yet: the "
                             "checkpoint holds the smaller model, fit builds the original one. Export the pruned model "
                             "(PrunableLM export_dir) and fine-tune it without this callback")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if self.done:
            return
        earlier = [type(c).__name__ for c in trainer.callbacks[: trainer.callbacks.index(self)] if isinstance(c, PruningCallback)]
        if earlier:  # they chose their weights at fit start already; removal replaces those weights
            raise ValueError(f"{type(self).__name__} must come before the other pruning callbacks in Trainer(callbacks="
                             f"[...]), but {earlier} come first: they chose the weights they prune at fit start, and "
                             "removing units replaces those weights. Put it first")
        find_causal_lm(pl_module, self.lm)  # fails before any data is read
        check = getattr(pl_module, "check_layer_removal", None)
        if self.options["layers"] and callable(check):
            check()
        self._combine = None
        calibration = self.calibration(trainer)
        report = prune_structured(pl_module, calibration, lm=self.lm, reduce=self._combine,
                                  progress=None if trainer.is_global_zero else False, **self.options)
        self._after_removal(trainer, pl_module, report)
        self.done = True
        self.report = report
        if trainer.is_global_zero:
            log.info("%s: %s -> %s, parameters %d -> %d", type(self).__name__, report["sizes_before"],
                     report["sizes_after"], report["parameters_before"], report["parameters_after"])

    def _after_removal(self, trainer: pl.Trainer, pl_module: pl.LightningModule, report: dict) -> None:
        removed_layers = report["removed"]["layers"]
        if removed_layers:
            remap = getattr(pl_module, "map_hidden_layers", None)
            if callable(remap):
                remap(removed_layers)
        strategy = trainer.strategy
        if isinstance(strategy, DDPStrategy) and strategy.model is not pl_module:  # the DDP wrapper holds the old parameters
            strategy.model = strategy._setup_model(pl_module)
            strategy._register_ddp_hooks()
        registry = self.registry(pl_module)
        registry.detach()
        strategy.setup_optimizers(trainer)
        for optimizer in trainer.optimizers:
            registry.attach(optimizer, mask_gradients=False)
