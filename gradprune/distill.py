"""Knowledge distillation from a dense teacher: the options and the loss, as pure functions.

    loss = alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))
           [+ hidden_weight * hidden term]

The hidden term (on ``hidden_layers``) is one of
    "mse":        mean over the layers of MSE(norm(h_student), norm(h_teacher)) (norm = layer norm, optional)
    "squarehead": sum over the layers of MSE(h_student, h_teacher) / MSE(h_teacher, 0)  (Kurtic et al. 2023)

Every term is averaged over non-padding target tokens. T^2 keeps the gradient scale of the soft term
independent of the temperature (Hinton et al. 2015).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Literal, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .losses import next_token_loss
from .models import DTYPES
from .validation import Problems, check_model_source, is_int, is_number

HIDDEN_LOSSES = ("mse", "squarehead")
#: Guard of SquareHead's denominator: a teacher layer whose mean square is below this counts as this.
SQUAREHEAD_EPS = 1e-8


@dataclass
class Distillation:
    """How the student learns from its teacher.

    Args:
        teacher: "self" = a frozen copy of the model's dense weights, taken when fit sets up, before any
            pruning callback changes them; or a model source (local directory, ``.gguf`` file,
            ``"smollm2"``, hub id).
        alpha: weight of the hard-label cross entropy; 1 - alpha goes to the distillation term.
        temperature: softmax temperature T of the distillation term (> 0).
        hidden_layers: hidden states to match: a list of indices into the model's ``hidden_states``
            (0 = embeddings output, i = output of block i), or ``"all"`` = every decoder block's output,
            1..L for a model of L blocks (the embeddings, 0, are not included: SquareHead matches the
            decoder layers' outputs). Hugging Face models return the last block's output after the final
            norm, so index L is the representation the LM head reads. Empty = no hidden term.
        hidden_weight: weight of the hidden-state term.
        hidden_loss: ``"mse"`` = mean over ``hidden_layers`` of the per-token MSE (after layer
            normalisation if ``normalize_hidden``); ``"squarehead"`` = SquareHead (Kurtic et al. 2023):
            the *sum* over ``hidden_layers`` of MSE(h_student, h_teacher) / MSE(h_teacher, 0), each over
            non-padding tokens, the denominator floored at 1e-8. It needs ``hidden_layers`` (usually
            ``"all"``) and ignores ``normalize_hidden``: dividing by the teacher's energy is its normalisation.
        normalize_hidden: layer-normalise both hidden states (no affine) before the "mse" term.
        teacher_dtype: "float32", or "bfloat16" / "float16" to halve the teacher's memory.
    """

    teacher: str = "self"
    alpha: float = 0.5
    temperature: float = 2.0
    hidden_layers: Union[List[int], Literal["all"]] = field(default_factory=list)
    hidden_weight: float = 1.0
    hidden_loss: Literal["mse", "squarehead"] = "mse"
    normalize_hidden: bool = True
    teacher_dtype: str = "float32"

    def __post_init__(self) -> None:
        problems = Problems()
        if not is_number(self.alpha) or math.isnan(self.alpha) or not 0 <= self.alpha <= 1:
            problems.add(f"distill.alpha must be in [0, 1], got {self.alpha!r}")
        if not is_number(self.temperature) or not 0 < self.temperature < math.inf:
            problems.add(f"distill.temperature must be > 0 and finite, got {self.temperature!r}")
        if not is_number(self.hidden_weight) or not 0 <= self.hidden_weight < math.inf:
            problems.add(f"distill.hidden_weight must be >= 0 and finite, got {self.hidden_weight!r}")
        layers = self.hidden_layers
        if isinstance(layers, str) or not isinstance(layers, (list, tuple)) or not all(
            is_int(i) for i in layers
        ):
            if layers != "all":
                problems.add(f"distill.hidden_layers must be 'all' or a list of integers (indices of hidden states, "
                             f"0 = embeddings output, i = output of block i), got {layers!r}")
        elif any(i < 0 for i in layers):
            problems.add(f"distill.hidden_layers must be >= 0 (0 = embeddings output, i = output of block i), got {list(layers)!r}")
        if self.hidden_loss not in HIDDEN_LOSSES:
            problems.add(f"distill.hidden_loss must be one of {list(HIDDEN_LOSSES)}, got {self.hidden_loss!r}")
        elif self.hidden_loss == "squarehead" and isinstance(layers, (list, tuple)) and not layers:
            problems.add("distill.hidden_loss='squarehead' needs hidden_layers: 'all' (every decoder block, as in "
                         "the paper) or a list of block indices, got []")
        if self.teacher_dtype not in DTYPES:
            problems.add(f"distill.teacher_dtype must be one of {list(DTYPES)}, got {self.teacher_dtype!r}")
        if not isinstance(self.teacher, str) or not self.teacher:
            problems.add(f"distill.teacher must be 'self' or a model source, got {self.teacher!r}")
        else:  # a missing local path fails now, not after hub retries
            check_model_source(problems, "distill.teacher", self.teacher, special=("self", "smollm2"))
        problems.raise_if_any()

    def layer_indices(self, num_layers: int) -> List[int]:
        """The indices into ``hidden_states`` to match: ``"all"`` -> 1..num_layers, else hidden_layers."""
        if self.hidden_layers == "all":
            return list(range(1, num_layers + 1))
        return list(self.hidden_layers)

    def check_hidden_layers(self, num_layers: int) -> None:
        """hidden_layers index hidden_states, which has num_layers + 1 entries."""
        bad = [i for i in self.layer_indices(num_layers) if not 0 <= i <= num_layers]
        if bad:
            raise ValueError(
                f"distill.hidden_layers {bad} do not exist: the model has {num_layers} blocks, so hidden states "
                f"0..{num_layers} (0 = embeddings output)"
            )



def distill_options(value: Union["Distillation", dict, None]) -> Optional["Distillation"]:
    """``distill`` as PrunableLM takes it: a :class:`Distillation`, or the dict of its fields (as saved in a
    checkpoint's hyperparameters, so ``PrunableLM.load_from_checkpoint`` rebuilds it), or None."""
    if value is None or isinstance(value, Distillation):
        return value
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(Distillation.__dataclass_fields__))
        if unknown:
            raise ValueError(f"distill has unknown keys {unknown}; allowed: {sorted(Distillation.__dataclass_fields__)}")
        return Distillation(**value)
    raise TypeError(f"distill must be a gradprune.distill.Distillation or a dict of its fields, got {type(value).__name__}")

def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    attention_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), summed over the vocabulary and averaged over
    the positions that predict a non-padding token (the same positions as the cross entropy)."""
    s = F.log_softmax(student_logits[:, :-1].float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits[:, :-1].float() / temperature, dim=-1)
    per_token = (t.exp() * (t - s)).sum(-1)
    weight = _target_weight(student_logits, attention_mask)
    return temperature**2 * (per_token * weight).sum() / weight.sum().clamp_min(1)


def hidden_loss(
    student_hidden: Sequence[torch.Tensor],
    teacher_hidden: Sequence[torch.Tensor],
    layers: Sequence[int],
    normalize: bool,
    attention_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Mean over ``layers`` of the per-token MSE between hidden states (over non-padding tokens)."""
    total = student_hidden[0].new_zeros((), dtype=torch.float32)
    for i in layers:
        s, t = student_hidden[i].float(), teacher_hidden[i].float()
        if normalize:
            s, t = F.layer_norm(s, s.shape[-1:]), F.layer_norm(t, t.shape[-1:])
        per_token = (s - t).pow(2).mean(-1)
        if attention_mask is None:
            total = total + per_token.mean()
        else:
            weight = attention_mask.to(per_token.dtype)
            total = total + (per_token * weight).sum() / weight.sum().clamp_min(1)
    return total / max(1, len(layers))


def squarehead_loss(
    student_hidden: Sequence[torch.Tensor],
    teacher_hidden: Sequence[torch.Tensor],
    layers: Sequence[int],
    attention_mask: Optional[torch.Tensor] = None,
    eps: float = SQUAREHEAD_EPS,
) -> torch.Tensor:
    """SquareHead (Kurtic et al. 2023): sum over ``layers`` of MSE(h_student, h_teacher) / MSE(h_teacher, 0).

    Each MSE is the mean over features and over the non-padding tokens (``attention_mask != 0``; all
    tokens without a mask) of the [B, T, H] hidden states, in float32. The denominator is floored at
    ``eps``, so a teacher layer of zeros gives MSE / eps, never a division by zero.
    """
    total = student_hidden[0].new_zeros((), dtype=torch.float32)
    weight = None if attention_mask is None else (attention_mask != 0).to(torch.float32)
    for i in layers:
        s, t = student_hidden[i].float(), teacher_hidden[i].float()
        error, energy = (s - t).pow(2).mean(-1), t.pow(2).mean(-1)  # per token
        if weight is None:
            error, energy = error.mean(), energy.mean()
        else:
            count = weight.sum().clamp_min(1)
            error, energy = (error * weight).sum() / count, (energy * weight).sum() / count
        total = total + error / energy.clamp_min(eps)
    return total


def hidden_state_loss(
    kind: str,
    student_hidden: Sequence[torch.Tensor],
    teacher_hidden: Sequence[torch.Tensor],
    layers: Sequence[int],
    normalize: bool,
    attention_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The hidden term chosen by ``Distillation.hidden_loss``: ``"mse"`` (:func:`hidden_loss`) or
    ``"squarehead"`` (:func:`squarehead_loss`, which ignores ``normalize``)."""
    if kind == "squarehead":
        return squarehead_loss(student_hidden, teacher_hidden, layers, attention_mask)
    if kind == "mse":
        return hidden_loss(student_hidden, teacher_hidden, layers, normalize, attention_mask)
    raise ValueError(f"distill.hidden_loss must be one of {list(HIDDEN_LOSSES)}, got {kind!r}")


def _target_weight(logits: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
    if attention_mask is None:
        return logits.new_ones(logits.shape[0], logits.shape[1] - 1, dtype=torch.float32)
    return (attention_mask[:, 1:] != 0).float()


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    alpha: float,
    temperature: float,
) -> dict[str, torch.Tensor]:
    """{"loss", "ce", "kd"}: loss = alpha * ce + (1 - alpha) * kd."""
    ce = next_token_loss(student_logits, input_ids, attention_mask)
    kd = kd_loss(student_logits, teacher_logits, temperature, attention_mask)
    return {"loss": alpha * ce + (1 - alpha) * kd, "ce": ce, "kd": kd}

