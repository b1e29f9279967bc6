"""Calibration: activation statistics of the targets' inputs, collected with forward hooks.

Two kinds of statistics, both kept as *sums and counts* (never running means) so that they can be summed
over data-parallel ranks (``reduce_`` takes e.g. an all-reduce) and combined exactly:

- :class:`ChannelStats`, per input channel ``j`` of a target: the sum of squares (Wanda's squared L2 norm
  over all tokens), the sum (for the mean), the sum of absolute values, the number of near-zero
  activations and the token count. ``mean``, ``mean_abs``, ``variance`` and ``near_zero_fraction`` are
  derived from them.
- :class:`HessianStats`, SparseGPT's ``H = 2/n X X^T`` per target: the sum ``X X^T`` in float64 (each batch's
  product is taken in the accumulation dtype, float32 by default, and added to the float64 sum) and ``n``.

Padding (``attention_mask == 0``) is excluded: before each forward the caller sets the token mask of the
batch (:meth:`ActivationHooks.tokens`), and the hooks keep only rows of the input that are real tokens.

:class:`ActivationHooks` is the single owner of the forward hooks; they are removed when its ``with``
block ends, also when the forward raises.

The module also turns user calibration data (tensors of token ids, batch dicts, lists) into batches
(:func:`as_batches`) and draws seeded random windows of text for calibration (:func:`sample_windows`).
"""
from __future__ import annotations

import contextlib
import logging
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence

import torch
from torch import nn

from .blocks import call_model, find_causal_lm
from .targets import Target, find_targets

log = logging.getLogger(__name__)

Batch = dict  # {"input_ids": LongTensor (B, T), "attention_mask": LongTensor (B, T) or None}
Reduce = Callable[[torch.Tensor], torch.Tensor]


# -- statistics ---------------------------------------------------------------------------------------
@dataclass
class ChannelStats:
    """Per-input-channel activation sums of one target (float64, on the target's device)."""

    sum_sq: torch.Tensor
    sum: torch.Tensor
    near_zero: torch.Tensor
    count: torch.Tensor  # float64 scalar: number of tokens seen
    near_zero_eps: float = 1e-6
    l2_only: bool = False  # keep only sum_sq and count (what Wanda needs; the cheapest hook)
    sum_abs: Optional[torch.Tensor] = None  # sum of |x| (None with l2_only)

    @classmethod
    def empty(cls, in_features: int, device: torch.device, near_zero_eps: float = 1e-6, l2_only: bool = False) -> "ChannelStats":
        zeros = lambda: torch.zeros(in_features, dtype=torch.float64, device=device)  # noqa: E731
        return cls(zeros(), zeros(), zeros(), torch.zeros((), dtype=torch.float64, device=device), near_zero_eps, l2_only,
                   None if l2_only else zeros())

    def add(self, x: torch.Tensor) -> None:
        """Accumulate a (tokens, in_features) batch of inputs."""
        x = x.to(torch.float32)
        self.sum_sq += x.square().sum(dim=0, dtype=torch.float64)
        self.count += x.shape[0]
        if self.l2_only:
            return
        self.sum += x.sum(dim=0, dtype=torch.float64)
        magnitude = x.abs()
        self.near_zero += (magnitude <= self.near_zero_eps).sum(dim=0).to(torch.float64)
        if self.sum_abs is not None:
            self.sum_abs += magnitude.sum(dim=0, dtype=torch.float64)

    def tensors(self) -> list[torch.Tensor]:
        return [self.sum_sq, self.sum, self.near_zero, self.count] + ([] if self.sum_abs is None else [self.sum_abs])

    def reduce_(self, fn: Reduce) -> None:
        """Replace every sum by ``fn(sum)`` (e.g. a sum over data-parallel ranks)."""
        reduced = [fn(t) for t in self.tensors()]
        self.sum_sq, self.sum, self.near_zero, self.count = reduced[:4]
        if self.sum_abs is not None:
            self.sum_abs = reduced[4]

    @property
    def l2_sq(self) -> torch.Tensor:
        """Sum over all tokens of x_j^2: Wanda's statistic."""
        return self.sum_sq

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.count.clamp(min=1)

    @property
    def mean_abs(self) -> torch.Tensor:
        """Mean of |x| over tokens (needs the full statistics, not ``l2_only``)."""
        if self.sum_abs is None:
            raise ValueError("mean_abs needs ChannelStats collected without l2_only")
        return self.sum_abs / self.count.clamp(min=1)

    @property
    def variance(self) -> torch.Tensor:
        """Population variance E[x^2] - E[x]^2 (clamped at 0 against rounding)."""
        n = self.count.clamp(min=1)
        return (self.sum_sq / n - (self.sum / n).square()).clamp(min=0)

    @property
    def near_zero_fraction(self) -> torch.Tensor:
        return self.near_zero / self.count.clamp(min=1)


@dataclass
class HessianStats:
    """SparseGPT's Hessian of one target: ``2/n X X^T`` kept as the float64 sum ``X X^T`` and ``n``."""

    xtx: torch.Tensor
    count: torch.Tensor
    dtype: torch.dtype = torch.float32

    @classmethod
    def empty(cls, in_features: int, device: torch.device, dtype: torch.dtype = torch.float32) -> "HessianStats":
        return cls(
            torch.zeros(in_features, in_features, dtype=torch.float64, device=device),
            torch.zeros((), dtype=torch.float64, device=device),
            dtype,
        )

    def add(self, x: torch.Tensor) -> None:
        self.add_product(self.product(x), x.shape[0])

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """``X^T X`` of a (tokens, in_features) batch, taken in the accumulation dtype, as float64."""
        x = x.to(self.dtype)
        return (x.t() @ x).to(torch.float64)

    def add_product(self, xtx: torch.Tensor, tokens: int) -> None:
        self.xtx += xtx
        self.count += tokens

    def tensors(self) -> list[torch.Tensor]:
        return [self.xtx, self.count]

    def reduce_(self, fn: Reduce) -> None:
        self.xtx, self.count = fn(self.xtx), fn(self.count)

    def hessian(self) -> torch.Tensor:
        """``2/n X X^T`` in float64."""
        return self.xtx * (2.0 / max(float(self.count), 1.0))


# -- hooks ----------------------------------------------------------------------------------------------
def _rows(x: torch.Tensor, tokens: Optional[torch.Tensor]) -> torch.Tensor:
    """The (tokens, in_features) rows of a Linear/Conv1D input, without padding positions."""
    if tokens is not None:
        if tuple(x.shape[:-1]) == tuple(tokens.shape):
            return x[tokens]
        if x.shape[:-1].numel() == tokens.numel():
            return x.reshape(-1, x.shape[-1])[tokens.reshape(-1)]
        log.debug("input of shape %s does not match the token mask %s; using all rows", tuple(x.shape), tuple(tokens.shape))
    return x.reshape(-1, x.shape[-1])


def non_finite_statistics(stats: Mapping[str, Any]) -> list[str]:
    """``"layer (statistic)"`` for every statistics tensor of ``stats`` (target name -> :class:`ChannelStats`
    or :class:`HessianStats`) that holds NaN or inf: the sign of activations that overflowed."""
    import dataclasses

    bad = []
    for name, entry in stats.items():
        for f in dataclasses.fields(entry):
            value = getattr(entry, f.name)
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
                bad.append(f"{name} ({'sum of squared inputs' if f.name == 'sum_sq' else 'X^T X' if f.name == 'xtx' else f.name})")
    return bad


def check_statistics_finite(stats: Mapping[str, Any], where: str = "calibration") -> None:
    """Raise ValueError naming the layers and statistics that are not finite (nothing has been changed
    from them yet)."""
    bad = non_finite_statistics(stats)
    if bad:
        raise ValueError(f"{where}: non-finite (NaN or inf) activation statistics in {bad[:5]}{' ...' if len(bad) > 5 else ''}: "
                         "the inputs of these layers overflowed or hold NaN (check the weights before them and the "
                         "calibration data, or use a wider dtype); pruning needs finite statistics")


@dataclass
class ActivationHooks:
    """Forward hooks on ``targets`` that accumulate :class:`ChannelStats` (and, with ``hessian=True``,
    :class:`HessianStats`) of their inputs. Use as a context manager; hooks are removed on exit."""

    targets: Sequence[Target]
    hessian: bool = False
    channel: bool = True
    near_zero_eps: float = 1e-6
    hessian_dtype: torch.dtype = torch.float32
    l2_only: bool = False  # channel statistics: only sum_sq and count
    stats: dict = field(default_factory=dict)
    hessians: dict = field(default_factory=dict)
    _tokens: Optional[torch.Tensor] = None
    _handles: list = field(default_factory=list)
    _last_product: Optional[tuple] = None  # (input, its X^T X): q/k/v (and gate/up) see one input, one product

    def tokens(self, attention_mask: Optional[torch.Tensor]) -> None:
        """Set the token mask (True = real token) of the next forward; None = every position counts."""
        self._tokens = None if attention_mask is None else attention_mask.to(torch.bool)
        self._last_product = None

    def _hook(self, target: Target) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            x = args[0] if args else kwargs.get("input", kwargs.get("x"))
            tokens = self._tokens if self._tokens is None else self._tokens.to(x.device)
            rows = _rows(x.detach(), tokens)
            if self.channel:
                self.stats[target.name].add(rows)
            if self.hessian:
                stats = self.hessians[target.name]
                if self._last_product is None or self._last_product[0] is not x:
                    self._last_product = (x, stats.product(rows))
                stats.add_product(self._last_product[1], rows.shape[0])

        return hook

    def __enter__(self) -> "ActivationHooks":
        try:
            for t in self.targets:
                device = t.weight.device
                if self.channel:
                    self.stats.setdefault(t.name, ChannelStats.empty(t.in_features, device, self.near_zero_eps, self.l2_only))
                if self.hessian:
                    self.hessians.setdefault(t.name, HessianStats.empty(t.in_features, device, self.hessian_dtype))
                self._handles.append(t.module.register_forward_hook(self._hook(t), with_kwargs=True))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._tokens = None
        self._last_product = None

    def reduce_(self, fn: Reduce) -> None:
        for stats in list(self.stats.values()) + list(self.hessians.values()):
            stats.reduce_(fn)


# -- calibration data -------------------------------------------------------------------------------------
def _as_batch(item: Any, index: int) -> Batch:
    if isinstance(item, Mapping):
        if "input_ids" not in item:
            raise ValueError(f"calibration item {index} is a dict without 'input_ids' (keys: {sorted(item)})")
        ids, mask = item["input_ids"], item.get("attention_mask")
    elif isinstance(item, (list, tuple)) and item and isinstance(item[0], torch.Tensor):
        ids, mask = item[0], None  # e.g. a TensorDataset batch
    elif isinstance(item, torch.Tensor):
        ids, mask = item, None
    else:
        raise TypeError(
            f"calibration item {index} must be a tensor of token ids or a dict with 'input_ids', got {type(item).__name__}"
        )
    ids = torch.as_tensor(ids)
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise TypeError(f"calibration item {index}: input_ids must be integer token ids, got {ids.dtype}")
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2:
        raise ValueError(f"calibration item {index}: input_ids must be 1-D or 2-D, got shape {tuple(ids.shape)}")
    if mask is not None:
        mask = torch.as_tensor(mask)
        if mask.dim() == 1:
            mask = mask.unsqueeze(0)
        if mask.shape != ids.shape:
            raise ValueError(
                f"calibration item {index}: attention_mask shape {tuple(mask.shape)} differs from input_ids {tuple(ids.shape)}"
            )
    if ids.shape[1] == 0 or (mask is not None and not bool(mask.bool().any(dim=1).all())):
        raise ValueError(f"calibration item {index} has a sequence with no tokens (empty or all padding)")
    return {"input_ids": ids.long(), "attention_mask": None if mask is None else mask.long()}


def as_batches(calibration: Any, min_tokens: int = 1) -> list[Batch]:
    """Materialise calibration data into a list of ``{"input_ids", "attention_mask"}`` batches.

    Accepts an iterable of token-id tensors (1-D or 2-D), of dicts with ``input_ids`` (and optionally
    ``attention_mask``), or of ``(input_ids, ...)`` tuples, or a single 2-D tensor (one row per sample).
    Raises ValueError if there is nothing, or fewer than ``min_tokens`` real tokens in all.
    """
    if calibration is None:
        raise ValueError("calibration data is required for this method (an iterable of input_ids tensors or batch dicts)")
    if isinstance(calibration, torch.Tensor):
        calibration = [calibration]
    elif isinstance(calibration, Mapping):
        calibration = [calibration]
    try:
        items = list(calibration)
    except TypeError:
        raise TypeError(f"calibration must be an iterable of tensors or batch dicts, got {type(calibration).__name__}") from None
    if not items:
        raise ValueError("calibration data is empty: give at least one sequence of token ids")
    batches = [_as_batch(item, i) for i, item in enumerate(items)]
    tokens = count_tokens(batches)
    if tokens < min_tokens:
        raise ValueError(f"calibration data is too short: {tokens} tokens, at least {min_tokens} needed")
    return batches


def count_tokens(batches: Iterable[Batch]) -> int:
    total = 0
    for b in batches:
        mask = b.get("attention_mask")
        total += int(b["input_ids"].numel() if mask is None else mask.bool().sum())
    return total


def count_samples(batches: Iterable[Batch]) -> int:
    return sum(int(b["input_ids"].shape[0]) for b in batches)


def window_fits(length: int, seqlen: int) -> bool:
    """The rule for calibration windows: a document (or stream) of ``length`` tokens gives windows of
    ``seqlen`` tokens only if it is *longer* than ``seqlen``. It is the Wanda/SparseGPT reference loaders'
    rule (``> seqlen``, then a start in ``[0, length - seqlen)``), kept so that the same documents and seed
    draw the windows the reference code draws."""
    return length > seqlen


def sample_windows(token_streams: Callable[[int], Sequence[int]], n_streams: int, nsamples: int, seqlen: int, seed: int = 0,
                   max_tries: Optional[int] = None) -> torch.Tensor:
    """``nsamples`` random windows of ``seqlen`` tokens, as in the Wanda/SparseGPT reference loaders: pick a
    random document (``token_streams(i)`` gives the token ids of document ``i``, a sequence or a 1-D tensor),
    skip it unless :func:`window_fits` (more than ``seqlen`` tokens), else take a window at a random start in
    ``[0, len - seqlen)``. Seeded, so the same seed gives the same windows. The one window sampler: the
    data module's ``calibration_batches`` and the scripts draw from it.

    Returns a (nsamples, seqlen) LongTensor. Raises ValueError if no document is long enough.
    """
    if nsamples < 1 or seqlen < 1:
        raise ValueError(f"nsamples and seqlen must be >= 1, got nsamples={nsamples}, seqlen={seqlen}")
    if n_streams < 1:
        raise ValueError("no calibration documents given")
    rng = random.Random(seed)
    windows: list[torch.Tensor] = []
    tries, max_tries = 0, max_tries or max(100, 20 * nsamples)
    cache: dict[int, Sequence[int]] = {}
    while len(windows) < nsamples:
        tries += 1
        if tries > max_tries:
            raise ValueError(
                f"calibration data is too short: found {len(windows)} of {nsamples} windows of {seqlen} tokens after "
                f"{max_tries} draws; give longer documents or a smaller seqlen"
            )
        i = rng.randrange(n_streams)
        if i not in cache:
            cache[i] = token_streams(i)
        ids = cache[i]
        if not window_fits(len(ids), seqlen):
            continue
        start = rng.randrange(len(ids) - seqlen)
        windows.append(torch.as_tensor(ids[start:start + seqlen], dtype=torch.long))
    return torch.stack(windows)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and no grad for calibration forwards; the training flag of every module is restored."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, flag in flags:
            module.training = flag


def collect_activation_stats(model: nn.Module, calibration: Any, targets: Optional[Sequence[Target]] = None,
                             near_zero_eps: float = 1e-6) -> dict[str, ChannelStats]:
    """Activation statistics of every target over a whole-model pass on ``calibration`` (no pruning).

    The metrics people ask for when choosing what to remove: per input channel ``l2_sq``, ``mean``,
    ``variance`` and ``near_zero_fraction`` of each target's inputs, padding excluded.
    """
    targets = list(targets) if targets is not None else find_targets(model)
    batches = as_batches(calibration)
    runner = find_causal_lm(model)
    with eval_mode(model), ActivationHooks(targets, near_zero_eps=near_zero_eps) as hooks:
        device = targets[0].weight.device
        for batch in batches:
            hooks.tokens(batch["attention_mask"])
            call_model(runner, batch, device)
    return hooks.stats
