"""What a pruning method is: one :class:`Method` entry, read by the one-shot pipeline and by the gradual
callback, and the core mask rule that turns its scores into masks (:func:`prune_by_scores`).

A method module holds its maths as pure functions plus one ``Method`` entry, registered in
:mod:`gradprune.methods.registry`. One-shot (on calibration data): a score-based method gives ``score``
and gets the core rule (exact counts per layer / global / row, N:M, monotone); a method with a rule of
its own, or one that also changes the weights (SparseGPT), gives ``prune``. Train-time (the gradual
callback, on statistics of a training window): ``train_score``, or ``train_prune`` for a rule that also
changes the weights. Masks are keep-masks throughout (True = kept, the torch convention).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, MutableMapping, Optional, Sequence

import torch

from ..calibration import ActivationHooks
from ..masks import MaskRegistry
from ..selection import SCOPES, Rounding, select_masks_unchecked
from ..targets import Target
from ..validation import Problems, check_choice

Statistics = Literal["none", "channel", "hessian", "gradient"]
STATISTICS = ("none", "channel", "hessian", "gradient")
# what each kind of statistics is called by the gradual callback (``Scorer.needs``)
NEEDS = {"none": "weights", "channel": "activations", "hessian": "hessians", "gradient": "gradients"}
NM = Optional[tuple[int, int]]
# Per-batch X X^T dtypes of the "hessian" statistics (an option of every Hessian method; sums are float64).
HESSIAN_DTYPES = {"float32": torch.float32, "float64": torch.float64}
# Options every method accepts: "reduce" (a callable summing a statistics tensor over data-parallel ranks),
# "progress" (progress bars: True, False, or None = only on a terminal), and the layer budgets: "allocation"
# ("uniform", or "owl": OWL's outlier-weighted budgets, methods with calibration only) with OWL's
# "owl_lambda" (half-width of the budget range) and "owl_m" (outlier threshold, times the mean score).
COMMON_OPTIONS = {"reduce": None, "progress": None, "allocation": "uniform", "owl_lambda": 0.08, "owl_m": 5.0}
ALLOCATIONS = ("uniform", "owl")


@dataclass(frozen=True)
class Job:
    """One checked one-shot pruning call, as a method sees it (options include the defaults)."""

    method: "Method"
    sparsity: float
    pattern: str
    nm: NM
    options: Mapping[str, Any]
    registry: MaskRegistry
    progress: Optional[bool] = None  # progress bars: True, False, or None = only on a terminal
    counts: Optional[Mapping[str, int]] = None  # per-target prune counts (layer budgets) instead of sparsity

    @property
    def hide_progress(self) -> Optional[bool]:
        """tqdm's ``disable`` for this job's progress bars."""
        return None if self.progress is None else not self.progress


# score(target, the target's statistics or None) -> scores shaped like the stored weight; low = pruned first
ScoreFn = Callable[[Target, Any], torch.Tensor]
# prune(job, targets, statistics by target name): records keep-masks in job.registry (and may change weights)
PruneFn = Callable[[Job, Sequence[Target], MutableMapping[str, Any]], None]
# check(problems, options with defaults, parsed N:M or None, pattern): the method's own argument checks
CheckFn = Callable[[Problems, Mapping[str, Any], NM, str], None]
# train-time: train_score(target, statistic) -> scores shaped like the stored weight; the statistic is None
# ("none"), the target's float64 per-input-channel sum of x^2 ("channel") or its accumulated |W * G| ("gradient")
TrainScoreFn = Callable[[Target, Optional[torch.Tensor]], torch.Tensor]
# train-time: train_prune(target, hessian, count, keep) -> (new weight, keep-mask), both shaped like the
# stored weight: exactly ``count`` pruned, monotone with ``keep`` ("hessian")
TrainPruneFn = Callable[[Target, torch.Tensor, int, Optional[torch.Tensor]], tuple]


def no_checks(problems: Problems, options: Mapping[str, Any], nm: NM, pattern: str) -> None:
    """A method without options of its own to check."""


def prune_by_scores(job: Job, targets: Sequence[Target], stats: Mapping[str, Any], rounding: Rounding = "nearest") -> None:
    """The default ``prune``: keep-masks from ``job.method.score`` by the core rule (option ``scope``,
    default "layer"), monotone with the targets' current masks, recorded in the registry."""
    score = job.method.score
    masks = select_masks_unchecked(
        targets, job.sparsity, lambda t: score(t, stats.get(t.name)), job.options.get("scope", "layer"), job.nm,
        job.registry.current(targets), rounding, job.counts,
    )
    job.registry.update(targets, masks)


@dataclass(frozen=True)
class Method:
    """A pruning method, as the one-shot pipeline and the gradual callback read it.

    Attributes:
        name: what ``prune_oneshot(method=...)``, ``GradualPruningCallback(scorer=...)`` and the scripts
            call it.
        statistics: what it needs besides the weights: "none", "channel" (per-input-channel sums,
            :class:`gradprune.calibration.ChannelStats`), "hessian" (``X X^T``,
            :class:`~gradprune.calibration.HessianStats`) or "gradient" (``|W * G|`` summed over training
            steps: train-time only).
        options: its own one-shot options and their defaults (``reduce`` and ``progress`` are common to all).
        score: how it scores a target one-shot (see ``ScoreFn``); used by the default ``prune``.
        prune: how it prunes a group of targets one-shot (see ``PruneFn``); None = :func:`prune_by_scores`.
        check: its own argument checks (see ``CheckFn``).
        changes_weights: whether ``prune`` also rewrites kept weights (SparseGPT): the pipeline then keeps a
            copy of the weights until it returns, to put back on failure.
        train_score: how it scores a target during training (see ``TrainScoreFn``).
        train_prune: how it prunes a target during training when it also changes the weights (see
            ``TrainPruneFn``); then no ``train_score``.

    A method with ``score`` or ``prune`` is a one-shot method (:data:`gradprune.methods.METHODS`); one with
    ``train_score`` or ``train_prune`` a train-time scorer (:func:`gradprune.scorers.get_scorer`).
    """

    name: str
    statistics: Statistics = "none"
    options: Mapping[str, Any] = field(default_factory=dict)
    score: Optional[ScoreFn] = None
    prune: Optional[PruneFn] = None
    check: CheckFn = no_checks
    changes_weights: bool = False  # its prune also rewrites kept weights (SparseGPT), not only masks
    train_score: Optional[TrainScoreFn] = None
    train_prune: Optional[TrainPruneFn] = None

    def __post_init__(self) -> None:
        if self.statistics not in STATISTICS:
            raise ValueError(f"statistics must be one of {list(STATISTICS)}, got {self.statistics!r}")
        if not self.one_shot and not self.train_time:
            raise ValueError(f"method {self.name!r} needs a score or a prune function (one-shot), or a train_score "
                             "or a train_prune function (train-time)")
        if self.statistics == "gradient" and self.one_shot:
            raise ValueError(f"method {self.name!r}: gradient statistics exist only during training, so it can "
                             "have train_score but no one-shot score or prune")
        if self.train_score is not None and self.train_prune is not None:
            raise ValueError(f"method {self.name!r} gives train_score and train_prune: give one")
        for name in ("score", "prune", "check", "train_score", "train_prune"):
            value = getattr(self, name)
            if value is not None and not callable(value):
                raise TypeError(f"method {self.name!r}: {name} must be callable, got {value!r}")

    @property
    def one_shot(self) -> bool:
        """Whether ``prune_oneshot`` can run it (it has ``score`` or ``prune``)."""
        return self.score is not None or self.prune is not None

    @property
    def train_time(self) -> bool:
        """Whether the gradual callback can run it (it has ``train_score`` or ``train_prune``)."""
        return self.train_score is not None or self.train_prune is not None

    @property
    def needs(self) -> str:
        """Its statistics as the gradual callback names them: "weights", "activations", "hessians" or
        "gradients"."""
        return NEEDS[self.statistics]

    def resolve_options(self, given: Mapping[str, Any], problems: Problems) -> dict:
        """The options with defaults filled in; unknown names, a bad ``scope`` or ``reduce`` go to ``problems``."""
        allowed = {**self.options, **COMMON_OPTIONS}
        unknown = sorted(set(given) - set(allowed))
        if unknown:
            problems.add(f"unknown option(s) {unknown} for method {self.name!r}; allowed: {sorted(allowed)}")
        options = {**allowed, **{k: v for k, v in given.items() if k in allowed}}
        if "scope" in options:
            check_choice(problems, "scope", options["scope"], SCOPES)
        if options["reduce"] is not None and not callable(options["reduce"]):
            problems.add(f"reduce must be a callable (tensor -> summed tensor) or None, got {options['reduce']!r}")
        check_choice(problems, "allocation", options["allocation"], ALLOCATIONS)
        if options["allocation"] == "owl":
            if self.statistics == "none":
                problems.add(f"allocation='owl' ranks blocks by Wanda scores of calibration data, which method "
                             f"{self.name!r} does not collect; use wanda, ria or sparsegpt")
            if options.get("scope") == "global":
                problems.add("allocation='owl' gives each layer its own budget: use scope 'layer' or 'row', not 'global'")
        m = options["owl_m"]  # checked whatever the allocation: an option is checked whether it is used or not
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 < m < float("inf"):
            problems.add(f"owl_m must be a finite number > 0, got {m!r}")
        return options

    def hooks(self, targets: Sequence[Target], options: Mapping[str, Any]) -> ActivationHooks:
        """Forward hooks collecting this method's statistics of ``targets`` (a context manager)."""
        if self.statistics == "hessian":
            dtype = HESSIAN_DTYPES[options.get("hessian_dtype", "float32")]
            return ActivationHooks(list(targets), hessian=True, channel=False, hessian_dtype=dtype)
        return ActivationHooks(list(targets), hessian=False, channel=True)

    def statistics_of(self, hooks: ActivationHooks) -> MutableMapping[str, Any]:
        """The collected statistics by target name (what ``score`` and ``prune`` receive)."""
        return hooks.hessians if self.statistics == "hessian" else hooks.stats

    def run(self, job: Job, targets: Sequence[Target], stats: MutableMapping[str, Any]) -> None:
        """Prune ``targets`` (keep-masks into ``job.registry``)."""
        (self.prune or prune_by_scores)(job, targets, stats)
