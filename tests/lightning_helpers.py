"""Small pieces for Lightning tests: a tiny PrunableLM, random-token loaders, a quiet Trainer."""
import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from gradprune import PrunableLM
from tiny_models import TINY_LLAMA


def tiny_module(seed=0, **kwargs):
    pl.seed_everything(seed, verbose=False)
    kwargs.setdefault("learning_rate", 1e-2)
    kwargs.setdefault("warmup_steps", 0)
    return PrunableLM(model=dict(TINY_LLAMA), vocab_size=128, **kwargs)


def token_loader(n=40, length=16, batch_size=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (n, length), generator=generator)
    return DataLoader(TensorDataset(ids), batch_size=batch_size, shuffle=False)


def trainer(tmp_path, **kwargs):
    kwargs.setdefault("logger", False)
    kwargs.setdefault("enable_checkpointing", False)
    kwargs.setdefault("devices", 1)
    return pl.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
        **kwargs,
    )
