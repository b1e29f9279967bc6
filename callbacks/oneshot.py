"""One-shot pruning callbacks: prune once at fit start (before the first optimizer step), then keep the
masks for the rest of training.

When: in ``on_fit_start``, after :class:`PruningCallback` has restored any masks of a resumed run. A
resumed run (``done`` is in the checkpoint) does not prune again. What: :func:`gradprune.prune_oneshot`
on the LightningModule itself, so target names are relative to it and the masks land in
``MaskRegistry.of(pl_module)``, the registry every pruning callback shares. A
:class:`GradualPruningCallback` in the same run starts its schedule from the sparsity found there.

Calibration: drawn by :class:`gradprune.callbacks.calibration.CalibrationDraw` (see there; DDP included).

Modules without ``forward(input_ids)`` (a LightningModule holding ``self.model`` and calling it in
``training_step``): calibration batches run through the causal LM found inside
(:func:`gradprune.blocks.find_causal_lm`), or the one named by ``lm``.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Literal, Optional, Union

import lightning.pytorch as pl
import torch

from gradprune.blocks import find_causal_lm
from gradprune.oneshot import prune_oneshot, report_json
from gradprune.oneshot_plan import check_arguments
from gradprune.validation import Problems, check_selector

from .base import PruningCallback
from .calibration import CalibrationDraw

log = logging.getLogger(__name__)


class OneShotPruningCallback(CalibrationDraw, PruningCallback):
    """Base of the one-shot callbacks: the arguments every method shares. A subclass sets ``method`` (a
    name in :data:`gradprune.methods.METHODS`) and adds only the method's own options as keyword
    arguments, passing the rest on with ``**kwargs`` (LightningCLI follows them here).

    Args:
        sparsity: fraction of each comparison group to prune, in [0, 1); N/M for an N:M pattern.
        pattern: "unstructured" or "N:M" (e.g. "2:4", "4:8") along the input dimension.
        nsamples: calibration sequences (from the datamodule's calibration_batches, else the train
            loader); unused by magnitude.
        seqlen: tokens per calibration sequence; unused by magnitude.
        sequential: calibrate block by block on the outputs of the already-pruned blocks (the reference
            protocol); False: one dense pass over the whole model. Unused by magnitude.
        include: target modules (regex, or list of names / name suffixes); default every Linear but the
            head, and for calibrated methods in sequential mode the Linears inside the block stack.
        exclude: modules to leave dense.
        allocation: "uniform" (every layer at ``sparsity``) or "owl": OWL's outlier-weighted layer budgets
            (per decoder block within [sparsity - owl_lambda, sparsity + owl_lambda], exact total; calibrated
            methods, unstructured only).
        owl_lambda: half-width of OWL's budget range, in [0, min(sparsity, 1 - sparsity)].
        lm: dotted name of the causal LM inside the LightningModule that calibration batches are run
            through (e.g. "model"); default: the module itself if its forward takes input_ids, else the
            submodule that owns the decoder blocks (or the one child whose forward takes input_ids).
    """

    method: str = ""

    def __init__(
        self,
        sparsity: float = 0.5,
        pattern: str = "unstructured",
        nsamples: int = 128,
        seqlen: int = 512,
        sequential: bool = True,
        include: Union[str, list[str], None] = None,
        exclude: Union[str, list[str], None] = None,
        allocation: Literal["uniform", "owl"] = "uniform",
        owl_lambda: float = 0.08,
        lm: Optional[str] = None,
        **method_options: Any,
    ) -> None:
        super().__init__()
        problems = Problems()
        self.check_calibration_arguments(problems, nsamples, seqlen, lm)
        check_selector(problems, "include", include)
        check_selector(problems, "exclude", exclude)
        problems.raise_if_any()
        method_options = {**method_options, "allocation": allocation, "owl_lambda": owl_lambda}
        check_arguments(self.method, sparsity, pattern, sequential, **method_options)
        self.sparsity = sparsity
        self.pattern = pattern
        self.nsamples = nsamples
        self.seqlen = seqlen
        self.sequential = sequential
        self.include = include
        self.exclude = exclude
        self.lm = lm
        self.method_options = method_options
        self.done = False
        self.report: Optional[dict] = None
        self._combine: Optional[Callable[[torch.Tensor], torch.Tensor]] = None  # set by calibration()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(method=self.method, sparsity=self.sparsity, pattern=self.pattern)

    # -- state ----------------------------------------------------------------------------------------
    def extra_state(self) -> dict:
        return {"done": self.done, "report": self.report}

    def load_extra_state(self, state: dict) -> None:
        self.done = bool(state.get("done", False))
        self.report = state.get("report")

    # -- lifecycle ------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)  # a resumed run gets its masks back here
        if self.done:
            log.info("%s: already pruned (restored from the checkpoint); not pruning again", type(self).__name__)
            return
        calibrated = self.method != "magnitude"
        if calibrated:  # a module with nothing to run the batches through fails here, before any data is read
            find_causal_lm(pl_module, self.lm)
        self._combine = None
        calibration = self.calibration(trainer) if calibrated else None
        options = dict(self.method_options)
        if calibrated and self._combine is not None:
            options["reduce"] = self._combine
        options.setdefault("progress", None if trainer.is_global_zero else False)
        report = prune_oneshot(pl_module, self.method, self.sparsity, self.pattern, calibration,
                               sequential=self.sequential, include=self.include, exclude=self.exclude,
                               lm=self.lm if calibrated else None, **options)
        self.done = True
        self.report = report_json(report)
        if trainer.is_global_zero:
            log.info("%s: pruned %d layers to global sparsity %.4f (calibration %.1fs, pruning %.1fs)", type(self).__name__,
                     len(report["layers"]), report["global"]["sparsity"], report["time"]["calibration_s"], report["time"]["pruning_s"])


class MagnitudePruningCallback(OneShotPruningCallback):
    """Prune once at fit start by weight magnitude |W| (no calibration data).

    Args:
        scope: comparison group: "layer" (default), "global" or "row".
    """

    method = "magnitude"

    def __init__(self, *args: Any, scope: Literal["layer", "global", "row"] = "layer", **kwargs: Any) -> None:
        super().__init__(*args, scope=scope, **kwargs)


class WandaPruningCallback(OneShotPruningCallback):
    """Prune once at fit start with Wanda: score |W_ij| * ||X_j||_2 over calibration activations.

    Args:
        scope: comparison group: "row" (default, the reference), "layer", or "global" (needs sequential=False).
        adaptive: Wanda's adaptive variant (one alpha per layer, found by bisection).
    """

    method = "wanda"

    def __init__(self, *args: Any, scope: Literal["row", "layer", "global"] = "row", adaptive: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(*args, scope=scope, adaptive=adaptive, **kwargs)


class RIAPruningCallback(OneShotPruningCallback):
    """Prune once at fit start with RIA: (|W_ij| / sum_i |W_ij| + |W_ij| / sum_j |W_ij|) * ||X_j||_2 ** a.

    Args:
        scope: comparison group: "row" (default), "layer", or "global" (needs sequential=False).
        a: exponent of the activation norm (0.5, the paper's).
    """

    method = "ria"

    def __init__(self, *args: Any, scope: Literal["row", "layer", "global"] = "row", a: float = 0.5,
                 **kwargs: Any) -> None:
        super().__init__(*args, scope=scope, a=a, **kwargs)


class SparseGPTPruningCallback(OneShotPruningCallback):
    """Prune once at fit start with SparseGPT (OBS weight updates from the layer Hessians 2/n X X^T).

    Args:
        blocksize: columns processed together (a multiple of M for N:M).
        percdamp: Hessian damping as a fraction of its mean diagonal.
        hessian_dtype: dtype of the per-batch X X^T products: "float32" or "float64" (sums are float64).
    """

    method = "sparsegpt"

    def __init__(self, *args: Any, blocksize: int = 128, percdamp: float = 0.01,
                 hessian_dtype: Literal["float32", "float64"] = "float32", **kwargs: Any) -> None:
        super().__init__(*args, blocksize=blocksize, percdamp=percdamp, hessian_dtype=hessian_dtype, **kwargs)


__all__ = ["MagnitudePruningCallback", "OneShotPruningCallback", "RIAPruningCallback", "SparseGPTPruningCallback",
           "WandaPruningCallback"]
