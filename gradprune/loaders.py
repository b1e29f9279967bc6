"""Torch-only datasets and loaders over packed token streams (no Lightning).

:class:`TokenStream` holds one side of a corpus as a 1-D tensor of token ids with each document's span;
:class:`BlockDataset` cuts it into fixed-length blocks; :class:`ResumableDataLoader` resumes mid-epoch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset


@dataclass
class TokenStream:
    """The documents of one side as one 1-D tensor of token ids (each document followed by EOS) and
    the ``(start, end)`` span of every document's own tokens inside it."""

    ids: torch.Tensor
    spans: list[tuple[int, int]]

    def __len__(self) -> int:
        return int(self.ids.numel())


class BlockDataset(Dataset):
    """Consecutive, non-overlapping blocks of ``block_size`` tokens of a stream (a shorter tail is dropped)."""

    def __init__(self, ids: torch.Tensor, block_size: int) -> None:
        self.ids = ids
        self.block_size = block_size

    def __len__(self) -> int:
        return self.ids.numel() // self.block_size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"block {index} out of range for {len(self)} blocks")
        start = index * self.block_size
        block = self.ids[start : start + self.block_size].long()
        return {"input_ids": block, "attention_mask": torch.ones_like(block)}


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position inside an epoch survives a checkpoint.

    Lightning saves ``state_dict()`` with the fit loop and calls ``load_state_dict()`` on resume; the
    batches already consumed in the interrupted epoch are then skipped, so a resumed run sees the same
    batches in the same order as an uninterrupted one. The epoch's order comes from a
    :class:`~torch.utils.data.DistributedSampler` (seeded, ``set_epoch`` called by Lightning)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._consumed = 0
        self._epoch = self._sampler_epoch()
        self._restored: Optional[tuple[int, int]] = None

    def _sampler_epoch(self) -> int:
        return int(getattr(self.sampler, "epoch", 0))

    def __iter__(self) -> Iterator[Any]:
        return self._batches()

    def _batches(self) -> Iterator[Any]:
        epoch = self._sampler_epoch()
        skip = 0
        if self._restored is not None:
            restored_epoch, consumed = self._restored
            self._restored = None
            if restored_epoch == epoch and consumed < len(self):
                skip = consumed
        self._epoch, self._consumed = epoch, 0
        for batch in super().__iter__():
            self._consumed += 1
            if self._consumed <= skip:
                continue
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "consumed": self._consumed}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._restored = (int(state_dict.get("epoch", 0)), int(state_dict.get("consumed", 0)))
