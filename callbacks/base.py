"""What every pruning callback shares: the model's mask registry, its enforcement, and checkpointing.

A pruning callback only decides *when* to change masks; :class:`PruningCallback` makes sure that, once
masks exist, pruned weights stay exactly zero for the rest of the run, and that the masks travel in
checkpoints bit-packed. With :class:`gradprune.MaskedAdamW` (PrunableLM's optimizer) the masks are applied
inside the optimizer's update; otherwise, and when Lightning's gradient clipping would read unmasked
gradients, they are masked in ``on_before_optimizer_step`` (which Lightning calls before clipping).
``PrunableLM`` clips by the norm of the live weights' gradients itself: it declares so with
``clips_live_gradients = True`` (the protocol of :func:`gradprune.masks.clips_live_gradients`).
Weights are re-zeroed by an optimizer step post-hook for optimizers that could move a zero weight (only
real optimizer steps fire it under gradient accumulation).

Several pruning callbacks may be used together: they share the registry of the LightningModule
(:meth:`gradprune.MaskRegistry.of`), each saves the registry's masks under its own state key, and loading
any of them restores the same masks.

Strategies: a single device, DDP and its spawn / fork variants (every rank holds the whole model), and,
for callbacks that declare ``supports_fsdp2 = True`` (GradualPruningCallback), Lightning's
ModelParallelStrategy with FSDP2 ``fully_shard`` and no tensor parallelism: weights are DTensors sharded by
rows, the registry holds each rank's rows of the masks (:mod:`gradprune.sharding`), checkpoints hold whole
masks, and a resumed run slices them back at train start (this strategy restores callbacks after
``on_fit_start``). FSDP (FSDP1), DeepSpeed and the others are refused when fit sets up, before anything is
pruned (see :func:`check_strategy`).
"""
from __future__ import annotations

import logging
import sys
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import (DDPStrategy, DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy,
                                          SingleDeviceStrategy, Strategy)

from gradprune.bits import unpack_mask
from gradprune.masks import MaskRegistry, clips_live_gradients
from gradprune.shards import local

log = logging.getLogger(__name__)

LOG_FORMAT = "[gradprune] %(message)s"


def show_logs() -> None:
    """Show gradprune's INFO messages (pruning events, one-shot timings, the report, the export) on stderr,
    the way Lightning shows its own: called when a gradprune callback is set up (and by the ``gradprune``
    command), so a fit started from Python says what it does exactly as the command does.

    Leaves logging alone where the program configured it: a level already set on the ``gradprune`` logger
    stays, and the handler is added only while neither that logger nor the root logger has one (as
    ``lightning.pytorch`` does), so with ``logging.basicConfig`` the messages go to the program's handlers."""
    logger = logging.getLogger("gradprune")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    if not logger.handlers and not logging.getLogger().hasHandlers():
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        logger.addHandler(handler)
        logger.propagate = False


def tidy_progress_bar(trainer: pl.Trainer) -> None:
    """Lightning's rich progress bar reads "Epoch 0/-2" in a run bounded by max_steps only (its max_epochs is
    -1, no epoch limit): make it read "Epoch 0" there. Called when a gradprune callback is set up."""
    from lightning.pytorch.callbacks import RichProgressBar

    bar = getattr(trainer, "progress_bar_callback", None)  # a stand-in trainer (tests) may have none
    if not isinstance(bar, RichProgressBar) or getattr(bar, "_gradprune_tidy", False):
        return
    describe = bar._get_train_description

    def train_description(current_epoch: int) -> str:
        text = describe(current_epoch)
        return text.replace(f"Epoch {current_epoch}/-2", f"Epoch {current_epoch}", 1) if trainer.max_epochs == -1 else text

    bar._get_train_description = train_description
    bar._gradprune_tidy = True


_SHARDING = (
    (DeepSpeedStrategy, "DeepSpeed partitions the optimizer state (ZeRO 1/2) or the weights (ZeRO 3) and runs its own optimizer step"),
    (FSDPStrategy, "FSDP shards every weight across ranks"),
    (ModelParallelStrategy, "it shards weights across ranks (FSDP2 / tensor parallelism)"),
)

#: What to say about FSDP2 in every refusal.
FSDP2_NOTE = ("FSDP2 (ModelParallelStrategy with fully_shard, no tensor parallelism) is supported for "
              "GradualPruningCallback only")


def tensor_parallel_size(strategy: Strategy) -> int:
    """The tensor-parallel degree of a ModelParallelStrategy (its device mesh once set up, else its argument)."""
    mesh = getattr(strategy, "_device_mesh", None)
    if mesh is not None and "tensor_parallel" in (mesh.mesh_dim_names or ()):
        return int(mesh["tensor_parallel"].size())
    size = getattr(strategy, "_tensor_parallel_size", 1)
    return size if isinstance(size, int) else 1


def check_strategy(strategy: Strategy, owner: str = "pruning", fsdp2: bool = False) -> None:
    """Raise ValueError unless every rank of ``strategy`` holds the whole model (a single device or
    :class:`DDPStrategy`: ``ddp``, ``ddp_spawn``, ``ddp_fork``, ...), or, with ``fsdp2=True`` (the callback
    prunes row-sharded weights), it is a :class:`ModelParallelStrategy` without tensor parallelism. Other
    sharded strategies would have each rank score and mask only its shard, so they are refused rather
    than pruned wrongly."""
    name = type(strategy).__name__
    if isinstance(strategy, ModelParallelStrategy) and fsdp2:
        tp = tensor_parallel_size(strategy)
        if tp == 1:
            return
        raise ValueError(
            f"{owner} does not support strategy {name} with tensor parallelism (tensor_parallel_size={tp}): tensor "
            "parallelism splits weights by columns or rows inside a layer, and masks are chosen on whole rows. "
            "Use ModelParallelStrategy(data_parallel_size=<devices>, tensor_parallel_size=1) with fully_shard in "
            "configure_model (FSDP2), or strategy='ddp'"
        )
    for kind, why in _SHARDING:
        if isinstance(strategy, kind):
            break
    else:
        if isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
            return
        why = "it is not one the pruning callbacks are tested with"
    raise ValueError(
        f"{owner} does not support strategy {name}: {why}, so masks chosen on one rank would not be the "
        f"model's. Use strategy='ddp' (or 'ddp_spawn'; every rank holds the whole model, statistics are "
        f"all-reduced and every rank gets the same masks) or a single device; {FSDP2_NOTE} (README, "
        f"Running on N GPUs)"
    )


def check_event_inputs(step: int, targets: Any, statistics: Any, trainer: Optional[pl.Trainer] = None) -> None:
    """Raise ValueError before a pruning event changes anything when a target's weights or the statistics the
    scorer reads hold NaN or inf (a diverged run, or activations that overflowed): scores would be NaN and
    the masks arbitrary. With several ranks (``trainer``), every rank raises when any finds a problem (a
    sharded weight's rows differ by rank), so none waits in a collective for the others."""
    import torch

    bad = statistics.non_finite() if statistics is not None and hasattr(statistics, "non_finite") else []
    bad += [f"{t.name} (weights)" for t in targets if not bool(torch.isfinite(local(t.weight.detach())).all())]
    if trainer is not None and trainer.world_size > 1:
        flag = torch.tensor(float(len(bad)), device=trainer.strategy.root_device)
        if float(trainer.strategy.reduce(flag, reduce_op="sum")) > 0 and not bad:
            bad = ["another rank's weights or statistics"]
    if bad:
        raise ValueError(f"pruning event at step {step}: non-finite (NaN or inf) values in {bad[:5]}"
                         f"{' ...' if len(bad) > 5 else ''}; nothing was pruned (lower the learning rate, check the "
                         "data, or resume from an earlier checkpoint)")


def apply_event(registry: MaskRegistry, targets: Any, weights: Optional[dict], masks: Optional[dict]) -> None:
    """Write an event's new ``weights`` (a reconstructing scorer's, by target name; None: unchanged) and record
    its keep-``masks`` (None: already recorded). A failure at any point puts the weights and masks back."""
    import torch

    replaced = []
    try:
        with registry.transaction():
            if weights is not None:
                with torch.no_grad():
                    for t in targets:
                        replaced.append((t, t.weight.detach().to("cpu", copy=True)))
                        t.weight.copy_(weights.pop(t.name).to(t.weight.dtype))
            if masks is not None:
                registry.update(targets, masks)
    except BaseException:
        with torch.no_grad():
            for t, old in replaced:
                t.weight.copy_(old)
        raise


class PruningCallback(Callback):
    """Base class: registry access, mask enforcement and mask checkpointing for pruning callbacks.

    Subclasses put their own resumable state in :meth:`extra_state` / :meth:`load_extra_state` and call
    ``super()`` in the Lightning hooks they override.
    """

    #: Whether the callback prunes weights sharded by FSDP2 (ModelParallelStrategy with fully_shard).
    supports_fsdp2 = False

    def __init__(self) -> None:
        self._pending_masks: Optional[dict] = None
        self._registry: Optional[MaskRegistry] = None
        self._resumed_from_other_state: Optional[str] = None  # the state key the restored masks were saved under

    # -- registry -------------------------------------------------------------------------------------
    def registry(self, pl_module: pl.LightningModule) -> MaskRegistry:
        self._registry = MaskRegistry.of(pl_module)
        return self._registry

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        show_logs()
        tidy_progress_bar(trainer)
        if stage == "fit":  # before any callback's on_fit_start (where one-shot pruning and resumed masks happen)
            check_strategy(trainer.strategy, type(self).__name__, fsdp2=self.supports_fsdp2)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        registry = self.registry(pl_module)
        self._restore_pending_masks(trainer, registry)
        registry.masked_step = None
        for optimizer in trainer.optimizers:
            registry.attach(optimizer, mask_gradients=False)  # done in on_before_optimizer_step

    def _restore_pending_masks(self, trainer: pl.Trainer, registry: MaskRegistry) -> None:
        if self._pending_masks is not None:  # resuming: weights are restored by now, masks come back too
            self.check_restored_masks(trainer, self._pending_masks)
            try:
                registry.load_state_dict(self._pending_masks)  # whole masks, sliced to the rows held here
            except ValueError as exc:  # name the file too
                raise ValueError(f"{exc} (checkpoint {trainer.ckpt_path!r})") from exc
            self._pending_masks = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Strategies that restore the checkpoint after setup (ModelParallelStrategy) load the callbacks'
        # state after on_fit_start: the masks come back here, before the first batch.
        if self._pending_masks is not None:
            self._restore_pending_masks(trainer, self.registry(pl_module))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._registry is not None:
            self._registry.detach()

    # -- enforcement ----------------------------------------------------------------------------------
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        # A MaskedAdamW applies the masks in its own update; gradients need a pass of their own only for
        # other optimizers, or when Lightning's gradient clipping (run after this hook) would read them
        # unmasked (a module that clips by the live weights' norm itself says so: clips_live_gradients).
        clipping_reads_them = trainer.gradient_clip_val and not clips_live_gradients(pl_module)
        if self._registry is not None and (clipping_reads_them or not self._registry.enforced_by(optimizer)):
            self._registry.mask_gradients_(step=trainer.global_step)  # once per step, however many callbacks

    # -- checkpointing --------------------------------------------------------------------------------
    def extra_state(self) -> dict:
        """Subclass state to save next to the masks."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        """Restore what :meth:`extra_state` saved (read keys added later with ``.get``)."""

    def state_dict(self) -> dict:
        masks = self._registry.state_dict() if self._registry is not None else self._pending_masks
        return {"masks": masks or {}, **self.extra_state()}

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        # The masks are the model's state, not a detail of one callback's arguments: when this callback's state
        # key is not in the checkpoint (its arguments changed, or another pruning callback saved it), the masks
        # another pruning callback saved there come back anyway (Lightning then calls load_state_dict only
        # for callbacks whose key it finds). Every pruning callback saves the whole registry, so any entry will do.
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states:
            return
        saved = [key for key, state in states.items() if isinstance(state, dict) and state.get("masks")]
        if saved:
            self._pending_masks = states[saved[0]]["masks"]
            self._resumed_from_other_state = saved[0]
            log.warning("%s: the checkpoint's masks (%d layers) come back from the state saved as %r; this callback's "
                        "own arguments differ (its state key %r is not in the checkpoint), so its schedule position starts "
                        "afresh from the restored masks", type(self).__name__, len(self._pending_masks), saved[0], self.state_key)

    @staticmethod
    def pending_pruned(pending: dict, names) -> tuple[int, int]:
        """(pruned weights, weights) of the ``names`` in a checkpoint's bit-packed masks (``pending``)."""
        pruned = total = 0
        for name in names:
            entry = pending.get(name)
            if isinstance(entry, dict) and "bits" in entry and "shape" in entry:
                mask = unpack_mask(entry["bits"], entry["shape"])
                pruned, total = pruned + int(mask.numel() - mask.sum()), total + mask.numel()
        return pruned, total

    def check_restored_masks(self, trainer: pl.Trainer, pending: dict) -> None:
        """Raise ValueError (before the masks are restored) when this callback cannot continue from the
        checkpoint's masks ``pending``, which were saved under other arguments: a callback with a
        ``final_sparsity`` and its ``targets`` chosen (the gradual ones) cannot go below their sparsity."""
        final, targets = getattr(self, "final_sparsity", None), getattr(self, "targets", None)
        if self._resumed_from_other_state is None or final is None or not targets:
            return
        pruned, _ = self.pending_pruned(pending, [t.name for t in targets])
        total = sum(t.numel for t in targets)
        if pruned > final * total + 0.5 * sum(t.out_features for t in targets):  # beyond rounding per row
            raise ValueError(
                f"final_sparsity={final} is below the sparsity of the masks restored from checkpoint "
                f"{trainer.ckpt_path!r} ({pruned / total:.4f} of this callback's targets); masks only grow, so this "
                f"schedule cannot continue from them: set final_sparsity >= {pruned / total:.4f}")

    def load_state_dict(self, state_dict: dict) -> None:
        # The model may not be available yet (Lightning restores callbacks before on_fit_start): keep
        # the masks until on_fit_start applies them to the restored weights.
        self._pending_masks = state_dict.get("masks") or None
        self.load_extra_state(state_dict)
