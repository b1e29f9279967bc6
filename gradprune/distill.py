"""Knowledge distillation from a dense teacher: the options and the loss, as pure functions.

    loss = alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))
           [+ hidden_weight * hidden term]

The hidden term (on ``hidden_layers``) is one of
    "mse":        mean over the layers of MSE(norm(h_student), norm(h_teacher)) (norm = layer norm, optional)
    "squarehead": sum over the layers of MSE(h_student, h_teacher) / MSE(h_teacher, 0)  (Kurtic et al. 2023)

Every term is averaged over non-padding target tokens. T^2 keeps the gradient scale of the soft term
independent of the temperature (Hinton et al. 2015).

:class:`Distiller` holds the teacher itself for :class:`gradprune.PrunableLM`: it loads or snapshots it,
freezes it, checks it against the student, pairs their hidden states and computes the loss of a batch.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import List, Literal, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .losses import next_token_loss
from .masks import MaskRegistry
from .models import DTYPES, load_causal_lm
from .validation import Problems, check_model_source, is_int, is_number, options_dataclass

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
    return options_dataclass("distill", Distillation, value)


def token_mean(values: torch.Tensor, weight: Optional[torch.Tensor]) -> torch.Tensor:
    """The mean of per-token ``values`` over the counted tokens: weighted by ``weight`` (1 for a counted
    token, 0 for padding; the sum of weights floored at 1), or over all tokens without one."""
    if weight is None:
        return values.mean()
    return (values * weight).sum() / weight.sum().clamp_min(1)

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
    return temperature**2 * token_mean(per_token, _target_weight(student_logits, attention_mask))


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
        weight = None if attention_mask is None else attention_mask.to(per_token.dtype)
        total = total + token_mean(per_token, weight)
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
        total = total + token_mean(error, weight) / token_mean(energy, weight).clamp_min(eps)
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


class Distiller:
    """The frozen dense teacher of a distilling student, and how the two are compared.

    It loads the teacher (a model source) or snapshots it (``"self"``: a copy of the student's weights before
    any pruning), freezes it (eval mode, no gradients), checks it against the student (vocabulary, hidden
    sizes, the hidden states ``hidden_layers`` asks for), pairs their hidden states (also after decoder
    layers were removed from the student) and computes the distillation loss of a batch.

    It is not an ``nn.Module``, so the teacher stays out of the student's module tree: never in the
    optimizer, in checkpoints or in exports.
    """

    def __init__(self, options: Distillation, student: nn.Module) -> None:
        self.options = options
        self.model: Optional[nn.Module] = None  # the teacher, once loaded or snapshot
        self.hidden_indices: list[int] = []  # distill.hidden_layers resolved ("all" -> 1..L)
        self.teacher_hidden: Optional[dict[int, int]] = None  # student hidden index -> teacher's, after layer removal
        num_layers = getattr(getattr(student, "config", None), "num_hidden_layers", None)
        if options.hidden_layers:
            if num_layers is None:
                raise ValueError(
                    f"distill.hidden_layers={options.hidden_layers!r} needs a model that returns hidden states "
                    f"(a Hugging Face model with config.num_hidden_layers and output_hidden_states), got "
                    f"{type(student).__name__}; use hidden_layers=[] for logit distillation only"
                )
            options.check_hidden_layers(num_layers)
            self.hidden_indices = options.layer_indices(num_layers)

    def load(self, student: nn.Module) -> None:
        """Load a teacher given by its source (not ``"self"``), so a wrong teacher fails before training."""
        self.set(load_causal_lm(self.options.teacher, DTYPES[self.options.teacher_dtype]), student)

    def snapshot(self, student: nn.Module, lora: bool = False) -> None:
        """The ``"self"`` teacher: a copy of ``student`` as it is now (dense, before the pruning callbacks),
        with ``lora`` the base model without the adapters."""
        teacher = copy.deepcopy(student)
        if lora:
            teacher = teacher.unload()
        self.set(teacher.to(DTYPES[self.options.teacher_dtype]), student)

    def set(self, teacher: nn.Module, student: nn.Module) -> None:
        """Freeze ``teacher`` and check it against ``student``; ValueError if they cannot be compared."""
        options = self.options
        MaskRegistry.remove_from(teacher)  # a copied model must not share the student's masks
        teacher.eval().requires_grad_(False)
        student_vocab = _logit_size(student)
        teacher_vocab = _logit_size(teacher)
        if student_vocab is not None and teacher_vocab is not None and student_vocab != teacher_vocab:
            raise ValueError(
                f"the teacher {options.teacher!r} has a vocabulary of {teacher_vocab} tokens, the student "
                f"{student_vocab}: distillation needs the same tokenizer"
            )
        if options.hidden_layers:
            sizes = [getattr(getattr(m, "config", None), "hidden_size", None) for m in (student, teacher)]
            if sizes[0] != sizes[1]:
                raise ValueError(f"hidden-state distillation needs equal hidden sizes, student {sizes[0]}, teacher {sizes[1]}")
            teacher_layers = teacher.config.num_hidden_layers
            student_layers = student.config.num_hidden_layers
            if options.hidden_layers == "all" and teacher_layers != student_layers:
                raise ValueError(
                    f"distill.hidden_layers='all' pairs every block of the student with the teacher's, but the "
                    f"student has {student_layers} blocks and the teacher {teacher_layers}: list the indices instead"
                )
            options.check_hidden_layers(teacher_layers)
            _check_hidden_states(student, "model", options.hidden_layers, self.hidden_indices)
            if options.teacher != "self":  # "self" is a copy of the model just checked
                _check_hidden_states(teacher, "teacher", options.hidden_layers, self.hidden_indices)
        self.model = teacher

    def check_layer_removal(self) -> None:
        """Raise ValueError if decoder layers cannot be removed from the student: hidden-state distillation
        with a list of block indices (they name blocks of the unpruned model)."""
        layers = self.options.hidden_layers
        if layers and layers != "all":
            raise ValueError(
                f"distill.hidden_layers={layers!r} lists blocks of the unpruned model, so decoder "
                f"layers cannot be removed: use hidden_layers='all' (each kept block is paired with the teacher block it "
                f"came from) or [] (logit distillation only)"
            )

    def map_hidden_layers(self, removed: list[int]) -> None:
        """Decoder layers ``removed`` (indices of the teacher's blocks) were dropped from the student: pair
        each student hidden state with the teacher's of the block it came from (the last, after the final
        norm, with the teacher's last). Nothing to do without hidden terms."""
        if not self.options.hidden_layers:
            return
        self.check_layer_removal()
        total = self.model.config.num_hidden_layers if self.model is not None else len(self.hidden_indices)
        kept = [i for i in range(total) if i not in set(removed)]
        self.hidden_indices = list(range(1, len(kept) + 1))
        self.teacher_hidden = {j + 1: kept[j] + 1 for j in range(len(kept))}
        self.teacher_hidden[len(kept)] = total  # the final norm's output on both sides

    def _paired_teacher_hidden(self, states):
        if self.teacher_hidden is None:
            return states
        return [states[self.teacher_hidden.get(i, i)] for i in range(max(self.teacher_hidden) + 1)]

    def outputs(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]):
        """The teacher's outputs on a batch (no grad; the teacher follows the batch to its device)."""
        teacher = self.model
        if teacher is None:
            raise RuntimeError("distill is set but the teacher is missing: was setup() called?")
        first = next(teacher.parameters())
        if first.device != input_ids.device:
            teacher.to(input_ids.device)
        with torch.no_grad():
            return teacher(input_ids=input_ids, attention_mask=attention_mask,
                           output_hidden_states=bool(self.options.hidden_layers))

    def loss(self, student: nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> dict:
        """The terms of one batch: ``{"loss", "ce", "kd"}`` and, with hidden layers, ``"hidden"``; ``loss``
        is ``alpha * ce + (1 - alpha) * kd [+ hidden_weight * hidden]``."""
        options = self.options
        hidden = bool(options.hidden_layers)
        teacher_out = self.outputs(input_ids, attention_mask)
        student_out = student(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=hidden)
        parts = distillation_loss(student_out.logits, teacher_out.logits, input_ids, attention_mask,
                                  options.alpha, options.temperature)
        if hidden:
            parts["hidden"] = hidden_state_loss(options.hidden_loss, student_out.hidden_states,
                                                self._paired_teacher_hidden(teacher_out.hidden_states),
                                                self.hidden_indices, options.normalize_hidden, attention_mask)
            parts["loss"] = parts["loss"] + options.hidden_weight * parts["hidden"]
        return parts


def _check_hidden_states(model: nn.Module, role: str, hidden_layers, indices: list[int]) -> None:
    """One forward of two tokens (eval mode, no_grad, so no dropout draws from the RNG) to make sure the
    model returns the hidden states that distill.hidden_layers asks for, before any weight changes."""
    first = next(model.parameters(), None)
    if first is None or first.device.type == "meta":
        return
    ids = torch.zeros(1, 2, dtype=torch.long, device=first.device)
    modes = [(module, module.training) for module in model.modules()]  # restored one by one below
    try:
        model.eval()
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True)
        states = getattr(out, "hidden_states", None)
    except TypeError as error:  # forward has no output_hidden_states argument
        states, cause = None, error
    else:
        cause = None
    finally:
        for module, training in modes:
            module.training = training
    if states is None or len(states) <= max(indices, default=0):
        got = "none" if states is None else f"{len(states)}"
        raise ValueError(
            f"distill.hidden_layers={hidden_layers!r} needs hidden states {indices} from the {role} "
            f"({type(model).__name__}), but its forward(output_hidden_states=True) returned {got}; use a model "
            f"that returns hidden states, or hidden_layers=[] for logit distillation only"
        ) from cause


def _logit_size(model: nn.Module) -> Optional[int]:
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if head is not None and getattr(head, "weight", None) is not None:
        return head.weight.shape[0]
    return getattr(getattr(model, "config", None), "vocab_size", None)
