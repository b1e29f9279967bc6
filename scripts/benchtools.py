"""Small measuring tools and the set-up shared by the benchmark scripts (run them as
`python scripts/<bench>.py`)."""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
import time
import warnings

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback


def quiet(threads: int) -> None:
    """The benchmarks' process set-up: ``threads`` torch threads, warnings off, and only errors from
    Lightning's and transformers' loggers, so the tables are all that is printed."""
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)


def recovery_data(steps: int, batch_size: int, block_size: int, val_tokens: int, seed: int = 0,
                  split_seed: int | None = None):
    """The stdlib corpus with SmolLM2's tokenizer, twice the training tokens ``steps`` batches read, set up
    for fit: the data of every recovery run (distillation, recovery, structured + KD). ``split_seed`` fixes
    which files are held out (and read for training); ``None`` lets ``seed`` pick them."""
    from gradprune import TextDataModule

    dm = TextDataModule(sources="stdlib", tokenizer="smollm2", block_size=block_size, batch_size=batch_size,
                        max_train_tokens=steps * batch_size * block_size * 2, max_val_tokens=val_tokens, seed=seed,
                        split_seed=split_seed)
    dm.setup("fit")
    return dm


def recovery_trainer(steps: int, callbacks) -> pl.Trainer:
    """The Trainer of a recovery run: CPU, ``steps`` optimizer steps, gradient clipping at 1.0, no logger,
    checkpoints, progress bar or validation."""
    return pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      limit_val_batches=0, gradient_clip_val=1.0, callbacks=callbacks)


def validation_ppl(module, dm) -> float:
    """The module's perplexity on the data module's validation set (``val/ppl``)."""
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    return float(trainer.validate(module, datamodule=dm, verbose=False)[0]["val/ppl"])


def return_freed_memory_to_os() -> bool:
    """Make glibc serve every allocation of 128 KiB or more with its own mmap (M_MMAP_THRESHOLD fixed at
    128 KiB instead of growing with freed chunks), so freed tensors leave the resident set at once and the
    resident size tracks the memory in use. Returns False where glibc's mallopt is not available."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        return bool(ctypes.CDLL(name).mallopt(-3, 128 * 1024))  # M_MMAP_THRESHOLD = -3
    except (OSError, AttributeError):
        return False


def rss_mb() -> float:
    """Resident memory of this process in MiB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


class PeakRSS:
    """Peak resident memory while a ``with`` block runs, sampled every ``interval`` seconds in a thread.

    After the block: ``before``, ``peak`` (MiB) and ``extra_mb = peak - before``."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval

    def __enter__(self) -> "PeakRSS":
        self.before = self.peak = rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_mb())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())
        self.extra_mb = self.peak - self.before


class StepTimer(Callback):
    """Wall time of every training batch (forward, backward, optimizer step and the hooks around them),
    from ``from_epoch`` on."""

    def __init__(self, from_epoch: int = 0) -> None:
        self.from_epoch = from_epoch
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch >= self.from_epoch:
            self.times.append(time.perf_counter() - self._start)
