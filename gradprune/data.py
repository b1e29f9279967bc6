"""TextDataModule: a text corpus as packed blocks of token ids for Lightning, and calibration windows.

The pieces it puts together live in their own modules: which documents the ``sources`` name and the
train/validation split (:mod:`gradprune.corpus`), the byte tokenizer (:mod:`gradprune.tokenizer`), and the
torch-only token streams, block dataset and resumable loader (:mod:`gradprune.loaders`).

Documents are tokenised, each followed by the EOS token, concatenated in a seeded order and cut into
blocks of ``block_size`` tokens (labels = input_ids; the model shifts them). Tokenising is lazy (first
use), stops as soon as ``max_train_tokens`` / ``max_val_tokens`` are reached, and is cached in memory.
"""
from __future__ import annotations

import logging
import time
from itertools import islice
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, DistributedSampler

from .calibration import sample_windows, window_fits
from .corpus import VAL_FRACTION, Plan, documents, is_local, local_missing, plan_documents
from .loaders import BlockDataset, ResumableDataLoader, TokenStream
from .models import load_tokenizer
from .tokenizer import BYTES, byte_tokenizer
from .validation import TOKENIZER_SOURCE_FORMS, Problems, check_model_source, is_int, is_number

log = logging.getLogger(__name__)

#: seconds between the progress lines of a long tokenisation
TOKENIZE_LOG_SECONDS = 30.0


class TextDataModule(pl.LightningDataModule):
    """Packed blocks of token ids from a text corpus, for causal language modelling with Lightning.

    Batches are dicts ``{"input_ids": LongTensor[B, T], "attention_mask": ones}`` with ``T = block_size``;
    labels are the input ids (the model shifts them). The train loader shuffles in a seeded order that is
    a pure function of ``seed`` and the epoch (and resumes mid-epoch from a checkpoint); the validation
    loader goes through every full block of the validation side in order.

    Args:
        sources: What to read. ``"stdlib"`` (the Python standard library's source, split by file; the
            default, needs no network); local files, directories and glob patterns (split by file);
            ``.jsonl``/``.json`` files (records read with the ``datasets`` json loader, text from
            ``text_field``, split by record); or a Hugging Face dataset name such as ``"wikitext"`` or
            ``"c4"`` (needs network; its own validation split). A list mixes several.
        tokenizer: ``"bytes"`` for the built-in byte-level tokenizer (258 ids, no download), or anything
            :func:`gradprune.models.load_tokenizer` accepts: a local Hugging Face directory, a ``.gguf``
            file, ``"smollm2"``, or a hub id.
        block_size: Tokens per training/validation block (the sequence length T).
        batch_size: Blocks per batch.
        val_fraction: Share of files (or records) held out for validation, in (0, 1). Ignored for hub
            datasets that have a validation split.
        seed: Seed of the training order and the calibration windows, and of the file order and the record
            split unless ``split_seed`` is given.
        split_seed: Seed of the file order and the record split alone (which text is held out, and which
            files a capped training side reads); ``None`` (the default) uses ``seed``. Fix it to compare runs
            of different ``seed`` on the same held-out text.
        text_field: Field holding the text in JSON Lines records and hub datasets (e.g. ``"code"``).
        dataset_config: Configuration of a hub dataset, e.g. ``"wikitext-2-raw-v1"`` for ``"wikitext"``.
        max_train_tokens: Use at most this many training tokens (documents are tokenised only until the
            cap is reached); ``None`` uses the whole training side.
        max_val_tokens: Use at most this many validation tokens; ``None`` uses the whole validation side.
        num_workers: DataLoader worker processes (0 loads in the main process).
    """

    # Over 60 lines on purpose: every argument is checked in one pass, so one error lists every problem
    # before anything is stored (the checks are most of the body).
    def __init__(
        self,
        sources: Union[str, list[str]] = "stdlib",
        tokenizer: str = "bytes",
        block_size: int = 256,
        batch_size: int = 8,
        val_fraction: float = VAL_FRACTION,
        seed: int = 0,
        split_seed: Optional[int] = None,
        text_field: str = "text",
        dataset_config: Optional[str] = None,
        max_train_tokens: Optional[int] = None,
        max_val_tokens: Optional[int] = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        problems = Problems()
        entries = [sources] if isinstance(sources, str) else sources
        if not isinstance(entries, (list, tuple)) or not entries:
            problems.add(
                f"sources must be 'stdlib', a path/glob/.jsonl file, a hub dataset name or a non-empty list of "
                f"them, got {sources!r}",
                type_error=not isinstance(entries, (list, tuple)),
            )
            entries = []
        for entry in entries:
            if not isinstance(entry, str) or not entry:
                problems.add(f"sources entries must be non-empty strings, got {entry!r} in sources={sources!r}", type_error=True)
            elif is_local(entry) and local_missing(entry):
                problems.add(
                    f"sources entry {entry!r} looks like a local path but no file or directory matches it "
                    "(allowed: 'stdlib', existing files/directories/globs, .jsonl files, hub dataset names)"
                )
        if not isinstance(tokenizer, str) or not tokenizer:
            problems.add(f"tokenizer must be 'bytes' or a model directory / .gguf file / 'smollm2' / hub id, got {tokenizer!r}", type_error=True)
        else:  # a missing local path fails now, not after hub retries
            check_model_source(problems, "tokenizer", tokenizer, special=(BYTES, "smollm2"), allowed=TOKENIZER_SOURCE_FORMS)
        for name, value in (("block_size", block_size), ("batch_size", batch_size)):
            if not is_int(value):
                problems.add(f"{name} must be a positive integer, got {value!r} ({type(value).__name__})", type_error=True)
            elif value < 1:
                problems.add(f"{name} must be a positive integer (>= 1), got {value!r}")
        if not is_number(val_fraction):
            problems.add(f"val_fraction must be a number in (0, 1), got {val_fraction!r}", type_error=True)
        elif not 0.0 < val_fraction < 1.0:
            problems.add(f"val_fraction must be in (0, 1) (the share of files held out), got {val_fraction!r}")
        if not is_int(seed):
            problems.add(f"seed must be an integer, got {seed!r} ({type(seed).__name__})", type_error=True)
        elif seed < 0:
            problems.add(f"seed must be a non-negative integer, got {seed!r}")
        if split_seed is not None and not is_int(split_seed):
            problems.add(f"split_seed must be None or an integer, got {split_seed!r} ({type(split_seed).__name__})", type_error=True)
        elif split_seed is not None and split_seed < 0:
            problems.add(f"split_seed must be None (use seed) or a non-negative integer, got {split_seed!r}")
        if not isinstance(text_field, str) or not text_field:
            problems.add(f"text_field must be a non-empty field name such as 'text' or 'code', got {text_field!r}", type_error=True)
        if dataset_config is not None and (not isinstance(dataset_config, str) or not dataset_config):
            problems.add(f"dataset_config must be None or a config name such as 'wikitext-2-raw-v1', got {dataset_config!r}", type_error=True)
        for name, value in (("max_train_tokens", max_train_tokens), ("max_val_tokens", max_val_tokens)):
            if value is None:
                continue
            if not is_int(value):
                problems.add(f"{name} must be None or an integer >= block_size, got {value!r} ({type(value).__name__})", type_error=True)
            elif is_int(block_size) and value < max(block_size, 1):
                problems.add(f"{name} must be None or at least block_size={block_size} (one block), got {value!r}")
        if not is_int(num_workers):
            problems.add(f"num_workers must be a non-negative integer, got {num_workers!r} ({type(num_workers).__name__})", type_error=True)
        elif num_workers < 0:
            problems.add(f"num_workers must be a non-negative integer (0 = main process), got {num_workers!r}")
        problems.raise_if_any()

        self.sources = list(entries)
        self.tokenizer_name = tokenizer
        self.block_size = block_size
        self.batch_size = batch_size
        self.val_fraction = float(val_fraction)
        self.seed = seed
        self.split_seed = seed if split_seed is None else split_seed
        self.text_field = text_field
        self.dataset_config = dataset_config
        self.max_train_tokens = max_train_tokens
        self.max_val_tokens = max_val_tokens
        self.num_workers = num_workers

        self.tokenizer = self._load_tokenizer(tokenizer)
        self._eos_id = self.tokenizer.eos_token_id
        if self._eos_id is None:
            self._eos_id = getattr(self.tokenizer, "sep_token_id", None)
            if self._eos_id is None:
                log.warning("tokenizer %r has no EOS or SEP token: documents are joined without a separator", tokenizer)
        self._dtype = torch.int16 if len(self.tokenizer) <= 2**15 else torch.int32
        self._plan: Optional[Plan] = None
        self._streams: dict[str, TokenStream] = {}

    # ---- tokenizer -------------------------------------------------------------------------------
    @staticmethod
    def _load_tokenizer(name: str):
        if name == BYTES:
            return byte_tokenizer()
        try:
            return load_tokenizer(name)
        except Exception as exc:
            raise ValueError(
                f"tokenizer={name!r} could not be loaded ({type(exc).__name__}: {exc}); allowed: 'bytes' "
                "(built in), a local Hugging Face directory, a .gguf file, 'smollm2', or a hub id (needs network)"
            ) from exc

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer can produce (``len(tokenizer)``, special tokens included)."""
        return len(self.tokenizer)

    def _encode(self, texts: list[str]) -> list[torch.Tensor]:
        if self.tokenizer_name == BYTES:
            # identical to byte_tokenizer().encode(text) except that a literal "<|endoftext|>" inside a
            # document stays bytes instead of becoming the special token: data is never control
            return [torch.frombuffer(bytearray(t.encode("utf-8")), dtype=torch.uint8).to(self._dtype) for t in texts]
        encoded = self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        return [torch.tensor(ids, dtype=self._dtype) for ids in encoded]

    # ---- planning and tokenising -----------------------------------------------------------------
    def _make_plan(self) -> Plan:
        return plan_documents(self.sources, self.val_fraction, self.split_seed, self.text_field, self.dataset_config)

    def _tokenize(self, items: Iterable[Any], cap: Optional[int]) -> TokenStream:
        pieces: list[torch.Tensor] = []
        spans: list[tuple[int, int]] = []
        total = 0
        eos = None if self._eos_id is None else torch.tensor([self._eos_id], dtype=self._dtype)
        chunk_size = 1 if self.tokenizer_name == BYTES else 32
        texts = (text for text in documents(items) if text)
        done = False
        start = last = time.perf_counter()
        while not done:
            chunk = list(islice(texts, chunk_size))
            if not chunk:
                break
            if time.perf_counter() - last >= TOKENIZE_LOG_SECONDS:  # a long tokenisation is never silent
                last = time.perf_counter()
                log.info("tokenising %s: %d tokens%s, %d documents in %.0fs", self.sources, total,
                         "" if cap is None else f" of at most {cap}", len(spans), last - start)
            for ids in self._encode(chunk):
                spans.append((total, total + ids.numel()))
                pieces.append(ids)
                total += ids.numel()
                if eos is not None:
                    pieces.append(eos)
                    total += 1
                if cap is not None and total >= cap:
                    done = True
                    break
        ids = torch.cat(pieces) if pieces else torch.empty(0, dtype=self._dtype)
        if cap is not None and ids.numel() > cap:
            ids = ids[:cap]
            spans = [(s, min(e, cap)) for s, e in spans if s < cap]
        return TokenStream(ids, spans)

    def _ensure_streams(self, *sides: str) -> None:
        """Tokenise the named sides ("train", "val") unless already cached."""
        if all(side in self._streams for side in sides):
            return
        if self._plan is None:
            self._plan = self._make_plan()
        plan = self._plan
        before = set(self._streams)
        if plan.position_split:
            cap = None
            if self.max_train_tokens is not None and self.max_val_tokens is not None:
                cap = self.max_train_tokens + self.max_val_tokens
            whole = self._tokenize(plan.train, cap)
            n_val = max(1, round(len(whole) * self.val_fraction)) if len(whole) > 1 else 0
            cut = len(whole) - n_val
            train_end = cut if self.max_train_tokens is None else min(cut, self.max_train_tokens)
            val_end = len(whole) if self.max_val_tokens is None else min(len(whole), cut + self.max_val_tokens)
            self._streams["train"] = TokenStream(
                whole.ids[:train_end], [(s, min(e, train_end)) for s, e in whole.spans if s < train_end]
            )
            self._streams["val"] = TokenStream(
                whole.ids[cut:val_end], [(max(s, cut) - cut, min(e, val_end) - cut) for s, e in whole.spans if e > cut and s < val_end]
            )
        else:
            for side in sides:
                if side not in self._streams:
                    items, cap = (plan.train, self.max_train_tokens) if side == "train" else (plan.val, self.max_val_tokens)
                    self._streams[side] = self._tokenize(items, cap)
        for side in sides:
            stream = self._streams[side]
            if len(stream) < self.block_size:
                raise ValueError(
                    f"the {side} side of sources={self.sources!r} has {len(stream)} tokens, fewer than "
                    f"block_size={self.block_size}: use a smaller block_size or more data"
                )
        for side in sorted(set(self._streams) - before):
            stream = self._streams[side]
            log.info("tokenised %s side of %s: %d tokens, %d documents", side, self.sources, len(stream), len(stream.spans))

    # ---- Lightning hooks -------------------------------------------------------------------------
    def setup(self, stage: Optional[str] = None) -> None:
        """Tokenise what the stage needs: both sides for ``fit`` (and ``None``), the validation side for
        ``validate``/``test``/``predict``. Cached: later calls are free."""
        self._ensure_streams(*(("train", "val") if stage in (None, "fit") else ("val",)))

    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return int(trainer.world_size), int(trainer.global_rank)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_world_size(), torch.distributed.get_rank()
        return 1, 0

    def train_dataloader(self) -> DataLoader:
        self._ensure_streams("train")
        dataset = BlockDataset(self._streams["train"].ids, self.block_size)
        world_size, rank = self._world()
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=self.seed)
        return ResumableDataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            drop_last=False,
        )

    def val_dataloader(self) -> DataLoader:
        self._ensure_streams("val")
        dataset = BlockDataset(self._streams["val"].ids, self.block_size)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    # ---- for scripts and one-shot pruning --------------------------------------------------------
    def split_files(self) -> tuple[list[Path], list[Path]]:
        """(train, validation) files of the file-based sources, in the order they are read (JSON records
        and hub datasets are not files and are not listed). No file is on both sides."""
        if self._plan is None:
            self._plan = self._make_plan()
        return (
            [item for item in self._plan.train if isinstance(item, Path)],
            [item for item in self._plan.val if isinstance(item, Path)],
        )

    def train_ids(self) -> torch.Tensor:
        """The training token stream (after ``max_train_tokens``) as one 1-D LongTensor."""
        self._ensure_streams("train")
        return self._streams["train"].ids.long()

    def heldout_ids(self) -> torch.Tensor:
        """The whole validation token stream (after ``max_val_tokens``, tail included) as one 1-D
        LongTensor, for perplexity evaluation with any window/stride."""
        self._ensure_streams("val")
        return self._streams["val"].ids.long()

    def calibration_batches(self, nsamples: int = 128, seqlen: int = 512, seed: Optional[int] = None) -> list[torch.Tensor]:
        """``nsamples`` seeded random windows of ``seqlen`` tokens from the training side, each a
        LongTensor ``[1, seqlen]``, drawn by :func:`gradprune.calibration.sample_windows` (the Wanda
        reference's recipe: a random training document of more than ``seqlen`` tokens, then a random offset
        in it). If no single document is long enough, windows are taken from the packed training stream.
        ``seed`` defaults to the module's ``seed``."""
        problems = Problems()
        for name, value in (("nsamples", nsamples), ("seqlen", seqlen)):
            if not is_int(value):
                problems.add(f"{name} must be a positive integer, got {value!r} ({type(value).__name__})", type_error=True)
            elif value <= 0:
                problems.add(f"{name} must be a positive integer (>= 1), got {value!r}")
        if seed is not None and not is_int(seed):
            problems.add(f"seed must be None or an integer, got {seed!r}", type_error=True)
        problems.raise_if_any()
        self._ensure_streams("train")
        stream = self._streams["train"]
        spans = [(s, e) for s, e in stream.spans if window_fits(e - s, seqlen)]
        if not spans:
            if not window_fits(len(stream), seqlen):
                longest = max((e - s for s, e in stream.spans), default=0)
                raise ValueError(
                    f"seqlen={seqlen} is longer than every training document (longest {longest} tokens) and than "
                    f"the whole training stream ({len(stream)} tokens) can give: a window needs more than seqlen "
                    f"tokens; use a smaller seqlen or more training data (max_train_tokens={self.max_train_tokens})"
                )
            log.info("no training document has more than %d tokens: calibration windows span document boundaries", seqlen)
            spans = [(0, len(stream))]
        windows = sample_windows(lambda i: stream.ids[spans[i][0] : spans[i][1]], len(spans), nsamples, seqlen,
                                 self.seed if seed is None else seed)
        return list(windows.split(1))
