"""The mask registry: one set of keep-masks per model, kept apart from the weights, and its enforcement.

Masks are bool tensors (True = kept, the torch convention) shaped like the stored weights, on the weights'
device: one extra byte per targeted parameter while training, bit-packed (one bit) in checkpoints. There
is no ``weight_orig`` re-parametrisation: pruned weights are zeroed in place.

Enforcement keeps pruned weights exactly zero through training:

- :meth:`MaskRegistry.mask_gradients_` before the optimizer step (and before gradient clipping, so the
  clipping norm only sees live weights), with :func:`zero_pruned_`, an exact integer-view multiply
  that is faster than a float x bool one;
- :meth:`MaskRegistry.apply_` after the optimizer step, because momentum and decoupled weight decay
  (AdamW) move weights whose gradient is zero.

:meth:`MaskRegistry.attach` does this through optimizer step hooks, so plain PyTorch loops, gradient
accumulation (hooks fire only on real steps) and mixed precision need nothing more. It also zeroes the
optimizer state of pruned weights whenever masks change: momentum and first moments to zero, second
moments (which Adam-like optimizers take the square root of) to a tiny normal float, written again
before it can decay into the subnormal range (:mod:`gradprune.optimizer_state`: the CPU's square root
over zeros and subnormals is several times slower). For torch's own first-order optimizers (SGD, Adam,
AdamW, ...) a zero weight with a zero gradient and that state then receives an update of exactly zero,
so the per-step re-zeroing of weights is skipped for them: the enforcement costs one pass over the
targets per step instead of two (tests check every listed optimizer keeps pruned weights exactly zero). Any other optimizer gets the re-zeroing after each step.
:class:`gradprune.MaskedAdamW` goes further: it is handed the masks and applies them inside its own
update, so no pass over the gradients is needed at all (:meth:`MaskRegistry.enforced_by`).
All pruning callbacks of a model share its registry (:meth:`MaskRegistry.of`), so a one-shot and a
gradual callback compose and enforcement runs once per step.

Weights sharded by rows across ranks (FSDP2's DTensors, :mod:`gradprune.sharding`): the registry holds the
mask of the rows each rank holds, and enforcement and optimizer-state resets act on the local shards.
:meth:`MaskRegistry.state_dict` gathers whole masks (checkpoints hold whole masks, as without sharding),
:meth:`MaskRegistry.load_state_dict` slices them back to the local rows, and :meth:`MaskRegistry.pruned_count`
counts over all shards; with sharded masks these three are collectives (every rank calls them).
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

import torch
from torch import nn

from .bits import fill_pruned_, pack_mask, unpack_mask, zero_pruned_
from .optimizer_state import SecondMomentFloors
from .shards import count_pruned, full_mask, local, local_rows, local_shape
from .targets import Target

# the bit operations are importable from here too, where they were first
__all__ = ["MaskRegistry", "ZERO_PRESERVING_OPTIMIZERS", "clips_live_gradients", "fill_pruned_", "pack_mask",
           "unpack_mask", "zero_pruned_"]

_ATTRIBUTE = "_gradprune_mask_registry"

# Optimizers whose update of a weight is exactly zero when the weight, its gradient and its state are
# zero (second moments: any positive value, see gradprune.optimizer_state): weight decay of 0 is 0,
# moment buffers stay 0, and denominators carry eps > 0.
ZERO_PRESERVING_OPTIMIZERS = (
    torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.Adamax, torch.optim.NAdam,
    torch.optim.RAdam, torch.optim.RMSprop, torch.optim.Adagrad, torch.optim.Adadelta,
)


def clips_live_gradients(module: Any) -> bool:
    """Whether ``module`` (a LightningModule) clips gradients by the norm of the kept weights' gradients
    by itself, so the pruning callbacks need not mask gradients in a pass before Lightning's clipping.

    The protocol: a class declares ``clips_live_gradients = True`` when its
    ``configure_gradient_clipping`` leaves pruned weights out of the norm (``PrunableLM`` does, with
    :meth:`gradprune.MaskedAdamW.clip_grad_norm_`). Undeclared means False."""
    return bool(getattr(module, "clips_live_gradients", False))


class MaskRegistry:
    """Keep-masks of one model's targets, by target name (module name relative to the model)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.targets: dict[str, Target] = {}
        self.masks: dict[str, torch.Tensor] = {}
        self._hooks: dict[int, list] = {}
        self._optimizers: dict[int, torch.optim.Optimizer] = {}
        self._floors = SecondMomentFloors()  # optimizers whose pruned second moments are kept at a floor
        self.masked_step: Optional[int] = None  # the last ``step`` given to mask_gradients_
        self.version = 0  # changes whenever a mask tensor is replaced, for caches keyed on it
        self._journals: list[list] = []  # open transactions: what update() zeroed, to put back on failure

    @classmethod
    def of(cls, model: nn.Module) -> "MaskRegistry":
        """The registry of ``model``, created on first use."""
        registry = model.__dict__.get(_ATTRIBUTE)
        if registry is None:
            registry = cls(model)
            model.__dict__[_ATTRIBUTE] = registry
        return registry

    @classmethod
    def existing(cls, model: nn.Module) -> Optional["MaskRegistry"]:
        """The registry of ``model`` if it has one (None otherwise; nothing is created)."""
        return model.__dict__.get(_ATTRIBUTE)

    @classmethod
    def remove_from(cls, model: nn.Module) -> None:
        """Drop ``model``'s registry, if it has one (a copy of a pruned model, such as a distillation
        teacher, must not share the original's masks). Its weights are left as they are."""
        model.__dict__.pop(_ATTRIBUTE, None)

    # -- changing masks -------------------------------------------------------------------------------
    def current(self, targets: Iterable[Target]) -> dict[str, torch.Tensor]:
        """The current masks of these targets (for :func:`gradprune.select_masks`'s ``masks`` argument)."""
        return {t.name: self.masks[t.name] for t in targets if t.name in self.masks}

    def update(self, targets: Iterable[Target], masks: Mapping[str, torch.Tensor]) -> None:
        """Record new masks (intersected with the existing ones: pruning is monotone) and zero the
        newly pruned weights. Shapes are checked for all targets before anything changes. The mask of a
        sharded weight (a DTensor) is shaped like its local rows."""
        targets = list(targets)
        for t in targets:
            if t.name not in masks:
                raise KeyError(f"no mask given for target {t.name!r}")
            if tuple(masks[t.name].shape) != local_shape(t.weight):
                held = " (the rows held here)" if local(t.weight) is not t.weight else ""
                raise ValueError(
                    f"mask for {t.name!r} has shape {tuple(masks[t.name].shape)}, weight has {local_shape(t.weight)}{held}"
                )
        old_masks, old_targets = dict(self.masks), dict(self.targets)
        zeroed = []  # (weight, newly pruned positions, their values): what apply_ changes, to put back on failure
        try:
            for t in targets:
                keep = masks[t.name].to(device=t.weight.device, dtype=torch.bool)
                if t.name in self.masks:
                    keep = keep & self.mask_of(t.name)
                weight = local(t.weight).detach()
                before = self.masks[t.name].to(weight.device) if t.name in self.masks else torch.ones_like(keep)
                newly = before & ~keep
                zeroed.append((weight, newly.cpu(), weight[newly].cpu()))  # what apply_ zeroes, kept off the device
                self.targets[t.name] = t
                self.masks[t.name] = keep.contiguous()
            self.version += 1
            names = [t.name for t in targets]
            self.apply_(names=names)
            for optimizer in self._optimizers.values():
                self.reset_optimizer_state_(optimizer, names)
        except BaseException:  # masks and weights as they were (optimizer state reset so far stays reset)
            self._put_back(old_masks, old_targets, zeroed)
            raise
        for journal in self._journals:
            journal.extend(zeroed)

    def _put_back(self, masks: dict, targets: dict, zeroed: list) -> None:
        for held, saved in ((self.masks, masks), (self.targets, targets)):
            held.clear()
            held.update(saved)
        self.version += 1
        with torch.no_grad():
            for weight, newly, values in reversed(zeroed):
                weight[newly.to(weight.device)] = values.to(weight.device)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Masks, and the weights that :meth:`update` zeroes, as they were on entry if the block raises
        (the values of newly pruned weights are kept until the block ends). Optimizer state that was reset
        stays reset; weights changed other than by the masks are the caller's to put back."""
        journal: list = []
        self._journals.append(journal)
        masks, targets = dict(self.masks), dict(self.targets)
        try:
            yield
        except BaseException:
            self._put_back(masks, targets, journal)
            raise
        finally:
            self._journals.remove(journal)

    def release(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Stop enforcing the masks of these targets and return them (weights are left as they are: a
        learned or dynamic mask mode takes over the targets while it decides their masks)."""
        released = {name: self.masks.pop(name) for name in list(names) if name in self.masks}
        for name in released:
            self.targets.pop(name, None)
        self.version += 1
        return released

    def clear(self) -> None:
        """Forget all masks (pruned weights stay zero; nothing is restored)."""
        self.targets.clear()
        self.masks.clear()
        self.version += 1

    # -- enforcement ----------------------------------------------------------------------------------
    def mask_of(self, name: str) -> torch.Tensor:
        """The keep-mask of target ``name``, on its weight's device."""
        mask, weight = self.masks[name], self.targets[name].weight
        if mask.device != weight.device:  # the module was moved (e.g. .to("cuda")) after pruning
            mask = self.masks[name] = mask.to(weight.device)
            self.version += 1
        return mask

    def weight_masks(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(weight, keep-mask on the weight's device) of every masked target."""
        return [(self.targets[name].weight, self.mask_of(name)) for name in self.masks]

    @torch.no_grad()
    def apply_(self, names: Optional[Iterable[str]] = None) -> None:
        """Zero every pruned weight in place."""
        for name in self.masks if names is None else names:
            zero_pruned_(local(self.targets[name].weight), self.mask_of(name))

    @torch.no_grad()
    def mask_gradients_(self, step: Optional[int] = None) -> None:
        """Zero the gradients of pruned weights in place (weights without a gradient are skipped).

        With ``step`` (an optimizer step count) the work is done once per step however many callers ask,
        as when several pruning callbacks share the registry."""
        if step is not None:
            if step == self.masked_step:
                return
            self.masked_step = step
        for name in self.masks:
            grad = self.targets[name].weight.grad
            if grad is not None:
                zero_pruned_(local(grad), self.mask_of(name))

    @torch.no_grad()
    def reset_optimizer_state_(self, optimizer: torch.optim.Optimizer, names: Optional[Iterable[str]] = None) -> None:
        """Reset the entries of pruned weights in every state tensor shaped like the weight, so that no
        stale state pushes a pruned weight away from zero: second moments of the optimizers
        :mod:`gradprune.optimizer_state` knows to the floor value (unless attached with
        ``floor_second_moments=False``), everything else (momentum, first moments) to zero."""
        pairs = [(self.targets[name].weight, self.mask_of(name)) for name in (self.masks if names is None else names)]
        self._floors.reset_(optimizer, pairs, every_mask=names is None)

    def _refresh_floors(self, optimizer: torch.optim.Optimizer) -> None:
        """Step post-hook: write the second-moment floors whenever they are due
        (:meth:`gradprune.optimizer_state.SecondMomentFloors.step_done`)."""
        if self._floors.step_done(optimizer):
            self.reset_optimizer_state_(optimizer)

    def attach(
        self, optimizer: torch.optim.Optimizer, mask_gradients: bool = True, remask_weights: Optional[bool] = None,
        floor_second_moments: bool = True,
    ) -> None:
        """Enforce the masks on every ``optimizer.step()``.

        Args:
            optimizer: the optimizer that updates the model's weights. Its state of pruned weights is
                zeroed now and whenever the masks change.
            mask_gradients: mask the gradients of pruned weights just before each step. With gradient
                clipping, call :meth:`mask_gradients_` before clipping instead (so the norm ignores pruned
                weights) and pass False; the Lightning callbacks do this in ``on_before_optimizer_step``.
                Not needed for an optimizer that applies the masks itself (:class:`gradprune.MaskedAdamW`:
                it is handed the masks here; see :meth:`enforced_by`).
            remask_weights: re-zero pruned weights after each step. None (default) does it unless the
                optimizer is one of ZERO_PRESERVING_OPTIMIZERS, for which it cannot change anything.
            floor_second_moments: keep the second moments of pruned weights at a tiny normal value
                instead of zero, for the optimizers :mod:`gradprune.optimizer_state` lists (faster square
                roots; updates stay exactly zero). False keeps all their state at exactly zero.

        Idempotent per optimizer.
        """
        if id(optimizer) in self._hooks:
            return
        self._optimizers[id(optimizer)] = optimizer
        floors = floor_second_moments and self._floors.track(optimizer)
        self.reset_optimizer_state_(optimizer)
        if remask_weights is None:
            remask_weights = not isinstance(optimizer, ZERO_PRESERVING_OPTIMIZERS)
        if hasattr(optimizer, "use_masks_of"):
            optimizer.use_masks_of(self)
        handles = []
        if floors:
            handles.append(optimizer.register_step_post_hook(lambda *_: self._refresh_floors(optimizer)))
        if remask_weights:
            handles.append(optimizer.register_step_post_hook(lambda *_: self.apply_()))
        if mask_gradients and not self.enforced_by(optimizer):
            handles.append(optimizer.register_step_pre_hook(lambda *_: self.mask_gradients_()))
        self._hooks[id(optimizer)] = handles

    def enforced_by(self, optimizer: torch.optim.Optimizer) -> bool:
        """Whether ``optimizer`` applies these masks inside its own step (so gradients need no masking
        pass before it, unless something such as clipping reads them first)."""
        return getattr(optimizer, "mask_registry", None) is self

    def detach(self) -> None:
        for handles in self._hooks.values():
            for handle in handles:
                handle.remove()
        for optimizer in self._optimizers.values():
            if self.enforced_by(optimizer):
                optimizer.use_masks_of(None)
        self._hooks.clear()
        self._optimizers.clear()
        self._floors.clear()

    # -- inspection and persistence -------------------------------------------------------------------
    def pruned_count(self, names: Optional[Iterable[str]] = None) -> int:
        """How many weights the masks prune (of the named targets; default all), over all shards of sharded
        weights (then a collective)."""
        names = list(self.masks) if names is None else [n for n in names if n in self.masks]
        return sum(count_pruned([(self.targets[n].weight, self.masks[n]) for n in names]))

    def sparsity(self, targets: Sequence[Target]) -> float:
        """Pruned fraction of these targets' weights (a target without a mask counts as dense)."""
        return self.pruned_count(t.name for t in targets) / sum(t.numel for t in targets)

    def numel(self) -> int:
        return sum(self.targets[name].weight.numel() for name in self.masks)  # whole tensors, sharded or not

    def state_dict(self) -> dict:
        """Bit-packed whole masks by target name (those of sharded weights gathered: a collective)."""
        state = {}
        for name, mask in self.masks.items():
            whole = full_mask(self.targets[name].weight, mask)
            state[name] = {"shape": list(whole.shape), "bits": pack_mask(whole), "transposed": self.targets[name].transposed}
        return state

    def load_state_dict(self, state: Mapping[str, Mapping]) -> None:
        """Restore masks saved by :meth:`state_dict` into this model and zero the pruned weights. Whole
        masks of weights sharded here are sliced to the local rows.

        Raises ValueError (nothing changed) if a name is not a module of the model or a shape differs.
        """
        modules = dict(self.model.named_modules())
        restored = {}
        targets = []
        for name, entry in state.items():
            module = modules.get(name)
            if module is None or getattr(module, "weight", None) is None:
                raise ValueError(f"checkpoint has a mask for {name!r}, which is not a module with a weight here")
            if tuple(module.weight.shape) != tuple(entry["shape"]):
                raise ValueError(
                    f"checkpoint mask for {name!r} has shape {tuple(entry['shape'])}, weight has {tuple(module.weight.shape)}"
                )
            bits = entry.get("bits") if isinstance(entry, Mapping) else None
            numel = module.weight.numel()
            if not isinstance(bits, torch.Tensor) or bits.dtype != torch.uint8 or bits.numel() != -(-numel // 8):
                got = f"{bits.numel()} {bits.dtype} values" if isinstance(bits, torch.Tensor) else type(bits).__name__
                raise ValueError(
                    f"checkpoint mask for {name!r} is corrupted: expected {-(-numel // 8)} uint8 bytes (bit-packed, "
                    f"{numel} weights), got {got}"
                )
            targets.append(Target(name, module, bool(entry.get("transposed", False))))
            restored[name] = local_rows(unpack_mask(bits, entry["shape"]), module.weight)
        self.clear()
        self.update(targets, restored)
