"""The ``gradprune`` command: LightningCLI over PrunableLM and TextDataModule.

    gradprune fit --config configs/quickstart.yaml
    gradprune validate --config configs/quickstart.yaml
    gradprune fit --config configs/quickstart.yaml --print_config

Callbacks (GradualPruningCallback, the one-shot callbacks, SparsityMonitor) are given in YAML by
class_path under ``trainer.callbacks``. The data module's vocabulary size is linked into the model.
"""
from __future__ import annotations

import logging
import sys

from lightning.pytorch.cli import LightningCLI

from .data import TextDataModule
from .lightning_module import PrunableLM


class GradpruneCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")


def _show_gradprune_logs() -> None:
    logger = logging.getLogger("gradprune")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[gradprune] %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def run_cli(args=None) -> GradpruneCLI:
    """Run the CLI (``args`` like the command line's, default sys.argv) and return it, e.g. for tests."""
    _show_gradprune_logs()
    return GradpruneCLI(PrunableLM, TextDataModule, save_config_kwargs={"overwrite": True}, args=args)


def main(args=None) -> None:
    """The ``gradprune`` console script (returns nothing, so the exit status is 0 on success)."""
    run_cli(args)


if __name__ == "__main__":
    main()
