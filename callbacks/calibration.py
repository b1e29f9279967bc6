"""How the calibrating callbacks (one-shot, structured, and gradual with ``statistics="calibration"``) draw
their calibration data, and how the statistics of several data-parallel ranks are combined.

Calibration: ``trainer.datamodule.calibration_batches(nsamples, seqlen)`` when the datamodule has it,
otherwise the first training batches (``nsamples`` sequences, cut to ``seqlen`` tokens). Under DDP each
rank calibrates on its share (every world_size-th window of the datamodule's; the first batches of its
own part of the training data) and the statistics are summed over ranks before any mask is chosen, so
every rank gets the same masks, those of all the calibration data together. The windows need not divide
evenly (a rank may get one more). A rank left with none (fewer windows than ranks, or a data loader that
gave this rank nothing) does not stall the others: the ranks first exchange how many batches each holds;
if any has none, the batches are pooled and dealt out again, and with fewer batches than ranks every rank
runs them all and takes rank 0's statistics. No batch on any rank is an error on every rank.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import lightning.pytorch as pl
import torch
import torch.distributed as dist

from gradprune.calibration import as_batches
from gradprune.validation import Problems, is_int

log = logging.getLogger(__name__)


class CalibrationDraw:
    """How a callback draws calibration data (shared by the one-shot, structured and gradual callbacks).
    Needs ``self.nsamples`` and ``self.seqlen``; sets ``self._combine`` (how statistics are summed over ranks)."""

    @staticmethod
    def check_calibration_arguments(problems: Problems, nsamples: Any, seqlen: Any, lm: Any) -> None:
        """``nsamples`` and ``seqlen`` positive ints, ``lm`` a dotted submodule name or None."""
        for name, value in (("nsamples", nsamples), ("seqlen", seqlen)):
            if not is_int(value) or value < 1:
                problems.add(f"{name} must be a positive integer, got {value!r}")
        if lm is not None and (not isinstance(lm, str) or not lm):
            problems.add(f"lm must be the dotted name of the causal LM inside the LightningModule (e.g. 'model') or None, got {lm!r}")

    # -- calibration ----------------------------------------------------------------------------------
    def calibration(self, trainer: pl.Trainer) -> list:
        """This rank's calibration batches: its share of the datamodule's ``calibration_batches`` or of the
        first training batches (see the module notes for DDP). Sets how statistics are combined over ranks."""
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None and callable(getattr(datamodule, "calibration_batches", None)):
            windows, same_on_every_rank = list(datamodule.calibration_batches(self.nsamples, self.seqlen)), True
        else:
            windows, same_on_every_rank = self._first_train_batches(trainer), False  # each rank its own data
        batches, self._combine = spread_over_ranks(trainer, windows, same_on_every_rank, type(self).__name__)
        return batches

    def _first_train_batches(self, trainer: pl.Trainer) -> list:
        trainer.fit_loop.setup_data()  # Lightning sets the train dataloader up after fit start; now it is ready
        loader = trainer.train_dataloader
        if loader is None:
            raise ValueError(
                f"{type(self).__name__} needs calibration data: give the datamodule a calibration_batches(nsamples, "
                f"seqlen) method or the trainer a train dataloader"
            )
        batches, samples = [], 0
        for item in loader:
            batch = as_batches([item])[0]
            take = min(self.nsamples - samples, batch["input_ids"].shape[0])
            mask = batch["attention_mask"]
            batches.append({"input_ids": batch["input_ids"][:take, : self.seqlen],
                            "attention_mask": None if mask is None else mask[:take, : self.seqlen]})
            samples += take
            if samples >= self.nsamples:
                break
        shortest = min((b["input_ids"].shape[1] for b in batches), default=self.seqlen)
        if shortest < self.seqlen:  # the loader's blocks are shorter than asked: a silent shorter calibration would surprise
            log.warning("%s: seqlen=%d, but the train dataloader's sequences have only %d tokens: calibrating on "
                        "%d-token sequences", type(self).__name__, self.seqlen, shortest, shortest)
        if samples < self.nsamples:
            log.warning("%s: the train dataloader gave only %d of %d calibration sequences", type(self).__name__, samples, self.nsamples)
        return batches


def spread_over_ranks(trainer: pl.Trainer, batches: list, same_on_every_rank: bool,
                      owner: str = "calibration") -> tuple[list, Optional[Callable[[torch.Tensor], torch.Tensor]]]:
    """This rank's share of the calibration ``batches`` and how to combine statistics over ranks.

    ``same_on_every_rank``: every rank holds the same list (seeded windows), so rank r takes every
    world_size-th from r; otherwise each rank holds its own part. Returns (batches, combine): combine is
    None on one process, a sum over ranks when every rank calibrates on its own batches, or rank 0's
    statistics broadcast when every rank runs the same batches (fewer batches than ranks). Every rank
    makes the same decision (the batch counts are exchanged first), so none waits on a collective the
    others skip; no batch anywhere raises ValueError on every rank.
    """
    world, rank = trainer.world_size, trainer.global_rank
    if world == 1:
        return batches, None
    strategy = trainer.strategy
    counts = [int(c) for c in strategy.all_gather(torch.tensor([len(batches)], device=strategy.root_device)).reshape(-1).tolist()]
    if same_on_every_rank and len(set(counts)) == 1:
        pooled = batches
    elif min(counts) > 0:
        return batches, _sum_over_ranks(strategy)  # every rank has its own part: sum the statistics
    else:  # some rank got nothing: pool all the batches and deal them out again
        gathered: list = [None] * world
        dist.all_gather_object(gathered, _on_cpu(batches))
        pooled = [b for part in gathered for b in part]
        log.info("%s: rank batch counts %s; pooled %d batches and dealt them out again", owner, counts, len(pooled))
    if not pooled:
        raise ValueError(f"{owner}: no rank got a calibration batch (counts per rank {counts}); give the datamodule "
                         f"a calibration_batches(nsamples, seqlen) method that returns windows, or a non-empty train dataloader")
    if len(pooled) >= world:
        return pooled[rank::world], _sum_over_ranks(strategy)
    # fewer batches than ranks: every rank runs all of them and uses rank 0's statistics (exactly one pass's)
    return pooled, from_rank_zero


def _on_cpu(item: Any) -> Any:
    if isinstance(item, torch.Tensor):
        return item.cpu()
    if isinstance(item, dict):
        return {k: _on_cpu(v) for k, v in item.items()}
    if isinstance(item, (list, tuple)):
        return type(item)(_on_cpu(v) for v in item)
    return item


def _sum_over_ranks(strategy) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda t: strategy.reduce(t, reduce_op="sum")


def from_rank_zero(tensor: torch.Tensor) -> torch.Tensor:
    """The combine of calibration with fewer batches than ranks: every rank ran the same batches, rank 0's
    statistics are used everywhere."""
    dist.broadcast(tensor, src=0)
    return tensor
