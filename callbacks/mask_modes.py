# Over 400 lines on purpose: the two modes share the freeze check, the flip logging and this docstring.
"""How GradualPruningCallback chooses masks while training decides them: the ``mode`` strategies.

With ``mode=None`` the callback grows masks monotonically, picked by its scorer at every event (the
default). A :class:`MaskMode` instead lets training change which weights are kept until the schedule's
``end_step``, the *freeze step*:

- :class:`LearnedMasks` (MaskLLM): per-group logits over the N:M candidates, sampled with Gumbel-softmax
  in every training forward, learned by their own Adam from the loss gradient, started from a prior mask;
- :class:`DynamicMasks` (SR-STE): dense weights kept, the forward uses the masked weight, the gradient
  reaches every weight straight through, pruned weights decay, and the masks are chosen afresh by the
  callback's scorer at every event.

In both, the targets' masks live in the mode, not in the model's :class:`gradprune.MaskRegistry`, until the
freeze step: there the final masks go to the registry, pruned weights become exactly zero and stay so, as
after any other pruning. Every mode answers the same calls from the callback as the default strategies do
(:class:`~gradprune.callbacks.strategies.MaskMode`, :mod:`gradprune.callbacks.strategies`): ``check``
(construction), ``setup`` (before the optimizer exists), ``start`` (fit start), ``ready`` and ``event`` (each
schedule event), ``before_optimizer_step``, ``stop`` and ``state_dict`` / ``load_state_dict`` (checkpoints).

Logged (``pl_module.log``, so TensorBoard shows them next to ``val/ppl``): ``masks/flip_rate`` (the fraction
of mask positions that changed since the previous event), per layer ``masks/flip_rate/<target>``,
``masks/temperature`` and ``masks/logit_scale`` (learned), and the callback's ``sparsity/achieved``.
"""
from __future__ import annotations

import copy
import logging
import math
from typing import TYPE_CHECKING, Literal, Optional, Tuple

import lightning.pytorch as pl
import torch

from gradprune.learned_masks import (MaskedForward, flip_fraction, groups, hard_mask, linear_anneal, nm_candidates,
                                     prior_logits, sample_mask, sr_decay_, straight_through, ungroup)
from gradprune.masks import MaskRegistry, pack_mask, unpack_mask
from gradprune.oneshot import prune_oneshot
from gradprune.scorers import get_scorer, scorer_names
from gradprune.selection import select_masks
from gradprune.targets import Target
from gradprune.validation import Problems, is_int, is_number, parse_pattern

from .strategies import MaskMode

if TYPE_CHECKING:
    from .gradual import GradualPruningCallback

log = logging.getLogger(__name__)

PRIORS = ("masks", "sparsegpt", "wanda", "magnitude")
LOGIT_ADAM_EPS = 1e-12


def _pruned_fraction(masks: dict[str, torch.Tensor]) -> Optional[float]:
    if not masks:
        return None
    return sum(int((~keep).sum()) for keep in masks.values()) / sum(keep.numel() for keep in masks.values())


def _check_freeze(callback: "GradualPruningCallback", trainer: pl.Trainer, name: str) -> None:
    total = trainer.estimated_stepping_batches
    end = callback.resolved_end_step
    if total != float("inf") and end is not None and end > total:
        raise ValueError(f"{name} freezes the masks at end_step {end}, after this run's last optimizer step "
                         f"({int(total)}): the masks would never be final; lower end_step or raise max_steps")


def _log_flips(pl_module: pl.LightningModule, flips: dict[str, float], sizes: dict[str, int]) -> float:
    total = sum(flips[n] * sizes[n] for n in flips) / max(sum(sizes[n] for n in flips), 1)
    pl_module.log("masks/flip_rate", total, on_step=True, on_epoch=False)
    for name, value in flips.items():
        pl_module.log(f"masks/flip_rate/{name}", value, on_step=True, on_epoch=False)
    return total


def _logit_adam(logits: list[torch.Tensor], lr: float) -> torch.optim.Adam:
    """Adam for the logits, with torch's fused kernel where it has one for their device (CUDA; CPU from torch
    2.4): several times faster than the default loop, and there are as many logits as targeted weights and
    half again at 2:4. Its eps is far below Adam's 1e-8: a logit's gradient is the loss gradient times a
    softmax slope, 1e-9 and less on an LLM, and an eps above it would freeze every logit."""
    try:
        return torch.optim.Adam(logits, lr=lr, eps=LOGIT_ADAM_EPS, fused=True)
    except RuntimeError:  # no fused kernel for this device in this torch
        return torch.optim.Adam(logits, lr=lr, eps=LOGIT_ADAM_EPS)


def _candidates_first(state: dict) -> dict:
    """A LearnedMasks checkpoint state with its logits (and their Adam moments) candidate-first; checkpoints
    written before gradprune stored them candidate-last, ``(out, in // m, C)``, and carry no ``layout``."""
    if state.get("layout") == "candidates-first":
        return state
    state = dict(state, logits={name: value.movedim(-1, 0).contiguous() for name, value in state["logits"].items()})
    optimizer = copy.deepcopy(state["optimizer"])
    for moments in optimizer["state"].values():
        for key in ("exp_avg", "exp_avg_sq"):
            moments[key] = moments[key].movedim(-1, 0).contiguous()
    return dict(state, optimizer=optimizer, layout="candidates-first")


class LearnedMasks(MaskMode):
    """Learned N:M masks (MaskLLM) for GradualPruningCallback(pattern="N:M", final_sparsity=N/M, mode=...).

    From ``start_step`` to ``end_step`` (the freeze step) every group of M consecutive input weights carries
    logits over its candidate masks; each training forward samples a mask per group (Gumbel-softmax), and
    the logits learn from the loss by their own Adam. A forward without grad (validation) uses every group's
    most likely mask. At
    ``end_step`` that mask is applied and held: exactly N:M on every target. Events in between log how many
    mask positions changed since the previous one.

    Args:
        prior: where the logits start: "masks" (the targets' current masks, e.g. from a one-shot callback;
            weights they pruned start at zero) or a one-shot method run at the first event on the
            callback's calibration batches ("sparsegpt", "wanda", "magnitude"): its mask, on the dense weights
            (as in MaskLLM). SparseGPT's weight updates are not kept while masks are learned: they compensate for
            exactly the weights it pruned, so after a mask change the weight brought back and the compensation
            for its loss would both be in the model (the recovery benchmark's learned 2:4 row built that way
            ended at 212 held-out perplexity, against 21.16 for one-shot SparseGPT + KD). ``reconstruct``
            runs SparseGPT's update again for the final masks.
        prior_strength: logit of the prior's candidate (candidates sharing part of it get that share), in
            [0, inf]; inf keeps the prior (the model then equals the one-shot method's).
        temperature: Gumbel-softmax temperature at the start and at the end of learning (linear), > 0.
        logit_scale: factor on the logits at the start and at the end (linear), > 0; rising, it makes the
            sampling settle. At the start with strength 3 a group draws another candidate than the prior's
            with probability about 4 exp(-1.5 scale) at temperature 1: 17% at scale 2, 1% at scale 4 (the
            default; on SmolLM2 at 2:4 the 17% tripled the first steps' training loss).
        logit_lr: Adam learning rate of the logits, > 0. Adam gives every logit a step of about this size
            whatever its gradient, so noise moves a logit about ``logit_lr * sqrt(steps)``; it should stay below
            the prior's margin (``prior_strength / 2`` between the prior and a candidate sharing half of it)
            unless the run is long enough for the gradients to carry a signal. On SmolLM2 at 2:4 with 70
            learning steps of 512 tokens, 0.1 flipped 13% of positions and ended at 382 held-out perplexity,
            0.03 (the default) flipped almost none and ended at 22.0 (one-shot SparseGPT + KD: 21.2).
        hard: sample exact N:M masks in the forward (straight-through gradient); False: soft masks.
        train_weights: also train the targets' weights (False: they are frozen for the whole run, set
            before the optimizer and DDP see them; the rest of the model trains as configured).
        reconstruct: at the freeze step, run SparseGPT's weight update with the learned masks on the
            calibration batches (the kept weights absorb the error of the pruned ones, as in one-shot
            SparseGPT); None (default): when the prior is "sparsegpt". With an infinite prior strength and
            frozen weights the model is then exactly one-shot SparseGPT's.
        seed: seed of the Gumbel noise (the same on every rank, so every rank samples the same masks).
    """

    def __init__(self, prior: Literal["masks", "sparsegpt", "wanda", "magnitude"] = "sparsegpt",
                 prior_strength: float = 3.0, temperature: Tuple[float, float] = (1.0, 0.5),
                 logit_scale: Tuple[float, float] = (4.0, 12.0), logit_lr: float = 0.03, hard: bool = True,
                 train_weights: bool = True, reconstruct: Optional[bool] = None, seed: int = 0) -> None:
        problems = Problems()
        if prior not in PRIORS:
            problems.add(f"prior must be one of {list(PRIORS)}, got {prior!r}")
        if not is_number(prior_strength) or math.isnan(prior_strength) or prior_strength < 0:
            problems.add(f"prior_strength must be a number in [0, inf], got {prior_strength!r}")
        for name, pair in (("temperature", temperature), ("logit_scale", logit_scale)):
            if (not isinstance(pair, (tuple, list)) or len(pair) != 2
                    or not all(is_number(v) and 0 < v < math.inf for v in pair)):
                problems.add(f"{name} must be two finite numbers > 0 (start, end), got {pair!r}")
        if not is_number(logit_lr) or not 0 < logit_lr < math.inf:
            problems.add(f"logit_lr must be a finite number > 0, got {logit_lr!r}")
        for name, value in (("hard", hard), ("train_weights", train_weights)):
            if not isinstance(value, bool):
                problems.add(f"{name} must be True or False, got {value!r}", type_error=True)
        if reconstruct is not None and not isinstance(reconstruct, bool):
            problems.add(f"reconstruct must be True, False or None, got {reconstruct!r}", type_error=True)
        elif reconstruct and prior != "sparsegpt":
            problems.add(f"reconstruct=True runs SparseGPT's weight update at the freeze step: it needs "
                         f"prior='sparsegpt' (its calibration batches), got prior={prior!r}")
        if not is_int(seed):
            problems.add(f"seed must be an int, got {seed!r}", type_error=True)
        problems.raise_if_any()
        self.reconstruct = prior == "sparsegpt" if reconstruct is None else reconstruct
        self.prior, self.prior_strength = prior, float(prior_strength)
        self.temperature, self.logit_scale = tuple(map(float, temperature)), tuple(map(float, logit_scale))
        self.logit_lr, self.hard, self.train_weights, self.seed = float(logit_lr), hard, train_weights, int(seed)
        self.needs_calibration = prior in ("sparsegpt", "wanda")
        self.follows_schedule = False  # exactly N:M from the first event on
        self._targets: list[Target] = []
        self._nm: Optional[tuple[int, int]] = None
        self._candidates: Optional[torch.Tensor] = None
        self._logits: dict[str, torch.Tensor] = {}
        self._optimizer: Optional[torch.optim.Adam] = None
        self._generator: Optional[torch.Generator] = None
        self._previous: dict[str, torch.Tensor] = {}  # hard masks at the previous event (flip rate)
        self._forward: Optional[MaskedForward] = None
        self._progress = 0.0
        self._pending: Optional[dict] = None
        self._reduce = None  # mean of the logits' gradients over data-parallel ranks

    def __repr__(self) -> str:
        return (f"LearnedMasks(prior={self.prior!r}, prior_strength={self.prior_strength}, temperature={self.temperature}, "
                f"logit_scale={self.logit_scale}, logit_lr={self.logit_lr}, hard={self.hard}, "
                f"train_weights={self.train_weights}, reconstruct={self.reconstruct}, seed={self.seed})")

    # -- the callback's calls ---------------------------------------------------------------------------
    def check(self, problems: Problems, callback: "GradualPruningCallback") -> None:
        try:
            nm = parse_pattern(callback.pattern)
        except ValueError:
            return  # the callback names a bad pattern already
        if nm is None:
            problems.add("mode LearnedMasks learns N:M masks: give pattern='N:M' (e.g. '2:4'), got 'unstructured'")
        elif is_number(callback.final_sparsity) and abs(callback.final_sparsity - nm[0] / nm[1]) > 1e-9:
            problems.add(f"mode LearnedMasks ends exactly N:M: final_sparsity must be {nm[0] / nm[1]:g} for pattern "
                         f"{callback.pattern!r}, got {callback.final_sparsity!r}")
        if callback.allocation != "uniform":
            problems.add(f"mode LearnedMasks needs allocation 'uniform', got {callback.allocation!r}")
        self._nm = nm

    def setup(self, targets: list[Target]) -> None:
        """Before the optimizer and DDP exist: freeze the targets' weights if asked."""
        if not self.train_weights:
            for t in targets:
                t.weight.requires_grad_(False)

    def start(self, callback, trainer, pl_module) -> None:
        _check_freeze(callback, trainer, "mode LearnedMasks")
        m = self._nm[1]
        odd = [t.name for t in callback.targets if t.out_in(t.weight).shape[1] % m]
        if odd:
            raise ValueError(f"pattern {callback.pattern!r} groups {m} consecutive inputs, but these targets' input "
                             f"sizes are not multiples of {m}: {odd[:3]}")
        self._targets = list(callback.targets)
        self._reduce = ((lambda t: trainer.strategy.reduce(t, reduce_op="mean")) if trainer.world_size > 1 else None)
        if self._pending is not None:  # resumed inside the learning phase
            pending, self._pending = _candidates_first(self._pending), None
            device = {t.name: t.weight.device for t in self._targets}
            self._begin({name: value.to(device[name]) for name, value in pending["logits"].items() if name in device})
            self._optimizer.load_state_dict(pending["optimizer"])
            self._generator.set_state(pending["generator"])
            self._previous = {name: unpack_mask(p["bits"], p["shape"]).to(self._logits[name].device)
                              for name, p in pending["previous"].items()}
            self._progress = pending["progress"]

    def event(self, callback, trainer, pl_module, step, target) -> None:
        schedule = callback.schedule
        self._progress = schedule.progress(step)
        if not self._logits:
            self._begin(self._prior_logits(callback, trainer, pl_module))
        masks = {t.name: hard_mask(self._logits[t.name].detach(), self._candidates) for t in self._targets}
        flips = {name: flip_fraction(self._previous[name], mask) for name, mask in masks.items() if name in self._previous}
        self._previous = masks
        if flips:
            rate = _log_flips(pl_module, flips, {t.name: t.numel for t in self._targets})
            if trainer.is_global_zero:
                log.info("step %d: learned masks, %.4f of positions changed since the last event", step, rate)
        pl_module.log("masks/temperature", self._temperature(), on_step=True, on_epoch=False)
        pl_module.log("masks/logit_scale", self._scale(), on_step=True, on_epoch=False)
        if step >= schedule.last_step:  # the freeze step: the most likely masks, applied and held
            final = {t.name: ungroup(t, masks[t.name]) for t in self._targets}
            self.stop()
            self._logits, self._optimizer, self._previous = {}, None, {}
            if self.reconstruct:
                self._reconstruct(callback, trainer, pl_module, final)
            else:
                MaskRegistry.of(pl_module).update(self._targets, final)

    def before_optimizer_step(self, trainer) -> None:
        if self._optimizer is None:
            return
        for logits in self._logits.values():
            if logits.grad is not None and self._reduce is not None:
                logits.grad.copy_(self._reduce(logits.grad))
        self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)

    def stop(self) -> None:
        if self._forward is not None:
            self._forward.remove()
            self._forward = None

    def state_dict(self) -> dict:
        if not self._logits:
            return {}
        return {
            "logits": {name: value.detach().cpu() for name, value in self._logits.items()},
            "optimizer": self._optimizer.state_dict(),
            "generator": self._generator.get_state(),
            "previous": {name: {"shape": list(mask.shape), "bits": pack_mask(mask)} for name, mask in self._previous.items()},
            "progress": self._progress,
            "layout": "candidates-first",
        }

    def load_state_dict(self, state: dict) -> None:
        self._pending = state or None

    def sparsity(self) -> Optional[float]:
        return _pruned_fraction(self._previous)

    # -- the learning phase -----------------------------------------------------------------------------
    def _temperature(self) -> float:
        return linear_anneal(*self.temperature, self._progress)

    def _scale(self) -> float:
        return linear_anneal(*self.logit_scale, self._progress)

    def _prior_logits(self, callback, trainer, pl_module) -> dict[str, torch.Tensor]:
        """The prior keep-masks turned into logits; with a one-shot prior the targets keep their dense weights
        (only the method's mask is used)."""
        n, m = self._nm
        registry = MaskRegistry.of(pl_module)
        if self.prior != "masks":
            dense = {t.name: t.weight.detach().clone() for t in self._targets}
            options = {} if callback._combine is None or self.prior == "magnitude" else {"reduce": callback._combine}
            prune_oneshot(pl_module, self.prior, n / m, callback.pattern,
                          callback.event_calibration() if self.prior != "magnitude" else None, sequential=True,
                          include=[t.name for t in self._targets], lm=callback.lm,
                          progress=None if trainer.is_global_zero else False, **options)
        keep = registry.release([t.name for t in self._targets])
        if self.prior != "masks":  # the method's mask on the dense weights (see the class docstring)
            with torch.no_grad():
                for t in self._targets:
                    t.weight.copy_(dense.pop(t.name))
        device = self._targets[0].weight.device
        self._candidates = nm_candidates(n, m, device)
        logits = {}
        for t in self._targets:
            prior = keep.get(t.name)
            if prior is None:
                prior = torch.ones_like(t.weight, dtype=torch.bool)
            grouped = groups(t, prior.to(device), m)
            if math.isinf(self.prior_strength):  # beyond any Gumbel draw (at most ~46) at any scale
                logits[t.name] = prior_logits(grouped, self._candidates, 1.0) * 1e6
            else:
                logits[t.name] = prior_logits(grouped, self._candidates, self.prior_strength)
        return logits

    def _reconstruct(self, callback, trainer, pl_module, final: dict[str, torch.Tensor]) -> None:
        """SparseGPT's weight update for the learned masks (the freeze step with ``reconstruct``): the masks
        are recorded and the weights they prune get their values back, so that one-shot SparseGPT on the
        calibration batches prunes exactly those (the lowest scores, since a weight outside the current mask
        always goes first) and spreads the error of removing them over the kept weights, block by block."""
        n, m = self._nm
        values = {t.name: t.weight.detach().clone() for t in self._targets}
        MaskRegistry.of(pl_module).update(self._targets, final)
        with torch.no_grad():
            for t in self._targets:
                t.weight.copy_(values.pop(t.name))
        options = {} if callback._combine is None else {"reduce": callback._combine}
        prune_oneshot(pl_module, "sparsegpt", n / m, callback.pattern, callback.event_calibration(), sequential=True,
                      include=[t.name for t in self._targets], lm=callback.lm,
                      progress=None if trainer.is_global_zero else False, **options)

    def _begin(self, logits: dict[str, torch.Tensor]) -> None:
        n, m = self._nm
        device = self._targets[0].weight.device
        if self._candidates is None:
            self._candidates = nm_candidates(n, m, device)
        self._logits = {name: value.detach().float().clone().requires_grad_(True) for name, value in logits.items()}
        self._optimizer = _logit_adam(list(self._logits.values()), self.logit_lr)
        self._generator = torch.Generator(device=device)
        self._generator.manual_seed(self.seed)
        self._forward = MaskedForward(self._targets, self._masked_weight)

    def _masked_weight(self, target: Target) -> torch.Tensor:
        logits = self._logits[target.name]
        # sample where the loss will be differentiated (a training step), not by the module's train flag: a
        # model from from_pretrained stays in eval mode under Lightning, and validation runs without grad
        if torch.is_grad_enabled():
            grouped = sample_mask(logits, self._candidates, self._temperature(), self._scale(), self.hard,
                                  self._generator)
        else:
            grouped = hard_mask(logits.detach(), self._candidates)
        weight = target.weight
        return weight * ungroup(target, grouped).to(weight.dtype)


class DynamicMasks(MaskMode):
    """Dynamic masks with straight-through gradients (SR-STE) for GradualPruningCallback(mode=...).

    At every schedule event from ``start_step`` the callback's scorer chooses the masks afresh from the
    dense weights (and its statistics), at exactly the schedule's sparsity in the callback's pattern and
    scope; weights pruned at one event may come back at the next. Between events the forward uses the
    masked weight, the gradient reaches every weight, and pruned weights get ``decay * W`` added to their
    gradient. At ``end_step`` (the freeze step) the last masks go to the model's registry: pruned weights
    are zeroed and stay zero, as in the default mode.

    Args:
        decay: SR-STE's decay of the pruned weights (lambda_W), >= 0 (the paper: 2e-4 with SGD).
    """

    def __init__(self, decay: float = 2e-4) -> None:
        if not is_number(decay) or not 0 <= decay < math.inf:
            raise ValueError(f"decay must be a finite number >= 0, got {decay!r}")
        self.decay = float(decay)
        self._targets: list[Target] = []
        self._keep: dict[str, torch.Tensor] = {}
        self._forward: Optional[MaskedForward] = None
        self._pending: Optional[dict] = None

    def __repr__(self) -> str:
        return f"DynamicMasks(decay={self.decay})"

    def check(self, problems: Problems, callback: "GradualPruningCallback") -> None:
        if callback.scorer in scorer_names() and get_scorer(callback.scorer).prune is not None:
            problems.add(f"mode DynamicMasks chooses masks from scores; scorer {callback.scorer!r} rewrites weights: "
                         "use 'magnitude', 'wanda', 'ria' or 'taylor'")
        if callback.statistics != "window":
            problems.add(f"mode DynamicMasks scores from the training window: statistics must be 'window', got "
                         f"{callback.statistics!r}")
        if callback.allocation != "uniform":
            problems.add(f"mode DynamicMasks needs allocation 'uniform', got {callback.allocation!r}")

    def start(self, callback, trainer, pl_module) -> None:
        _check_freeze(callback, trainer, "mode DynamicMasks")
        self._targets = list(callback.targets)
        if self._pending is not None:  # resumed between two events
            pending, self._pending = self._pending, None
            self._keep = {t.name: unpack_mask(pending[t.name]["bits"], pending[t.name]["shape"]).to(t.weight.device)
                          for t in self._targets if t.name in pending}
            if self._keep:
                self._forward = MaskedForward(self._targets, self._masked_weight)

    def event(self, callback, trainer, pl_module, step, target) -> None:
        registry = MaskRegistry.of(pl_module)
        earlier = registry.release([t.name for t in self._targets]) if not self._keep else {}
        new = select_masks(self._targets, target, callback.window.score_fn(), callback.scope, callback.pattern)
        flips = {name: flip_fraction(self._keep[name], keep) for name, keep in new.items() if name in self._keep}
        if earlier:  # a one-shot callback pruned these targets: its zeros are where the masks start from
            flips = {name: flip_fraction(earlier[name], keep) for name, keep in new.items() if name in earlier}
        self._keep = new
        if flips:
            rate = _log_flips(pl_module, flips, {t.name: t.numel for t in self._targets})
            if trainer.is_global_zero:
                log.info("step %d: dynamic masks, %.4f of positions changed since the last event", step, rate)
        if step >= callback.schedule.last_step:  # the freeze step
            self.stop()
            final, self._keep = self._keep, {}
            registry.update(self._targets, final)
        elif self._forward is None:
            self._forward = MaskedForward(self._targets, self._masked_weight)

    def before_optimizer_step(self, trainer) -> None:
        if self._forward is None:
            return
        for t in self._targets:
            sr_decay_(t.weight, self._keep[t.name], self.decay)

    def stop(self) -> None:
        if self._forward is not None:
            self._forward.remove()
            self._forward = None

    def state_dict(self) -> dict:
        return {name: {"shape": list(keep.shape), "bits": pack_mask(keep)} for name, keep in self._keep.items()}

    def load_state_dict(self, state: dict) -> None:
        self._pending = state or None

    def sparsity(self) -> Optional[float]:
        return _pruned_fraction(self._keep)

    def _masked_weight(self, target: Target) -> torch.Tensor:
        return straight_through(target.weight, self._keep[target.name])
