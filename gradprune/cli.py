"""The ``gradprune`` command: LightningCLI over PrunableLM and TextDataModule.

    gradprune fit --config configs/quickstart.yaml
    gradprune validate --config configs/quickstart.yaml
    gradprune fit --config configs/quickstart.yaml --print_config

Callbacks (GradualPruningCallback, the one-shot callbacks, StructuredPruningCallback,
GradualStructuredPruningCallback, SparsityMonitor) are given in YAML by
class_path under ``trainer.callbacks``. The data module's vocabulary size is linked into the model.
"""
from __future__ import annotations

import logging
import os
import re
import sys

from lightning.pytorch.cli import LightningCLI

from .data import TextDataModule
from .lightning_module import PrunableLM


log = logging.getLogger(__name__)

DEBUG_ENV = "GRADPRUNE_DEBUG"  # set to 1 for the full traceback of a bad value


def _yaml_12_ints() -> None:
    """Read YAML integers as YAML 1.2 does: no base-60, so an unquoted ``pattern: 2:4`` stays the string
    '2:4' (YAML 1.1, PyYAML's default, reads it as the integer 124). Installed as jsonargparse's yaml
    loader for the gradprune command; everything else loads as before."""
    import yaml
    from jsonargparse import get_loader, set_loader
    from jsonargparse._loaders_dumpers import get_yaml_default_loader, yaml_load

    if getattr(get_loader("yaml"), "_gradprune", False):
        return
    base = get_yaml_default_loader()

    class Loader(base):
        pass

    Loader.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:int"]
        for first, resolvers in base.yaml_implicit_resolvers.items()
    }
    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:int",
        re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
        list("-+0123456789"),
    )

    def load(stream):
        import jsonargparse._loaders_dumpers as loaders

        saved = loaders.yaml_default_loader
        loaders.yaml_default_loader = Loader
        try:
            return yaml_load(stream)
        finally:
            loaders.yaml_default_loader = saved

    load._gradprune = True
    set_loader("yaml", load, exceptions=(yaml.YAMLError,))


class GradpruneCLI(LightningCLI):
    def __init__(self, *args, **kwargs) -> None:
        _yaml_12_ints()  # before any YAML is read
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads --ckpt_path here (for its hyperparameters), first of all: a truncated or foreign
        # file is named before torch or Lightning fail on it
        from .lightning_module import check_checkpoint_file

        subcommand = self.config.get("subcommand")
        if subcommand:
            check_checkpoint_file(self.config[subcommand].get("ckpt_path"))
        super()._parse_ckpt_path()


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
    """The ``gradprune`` console script (returns nothing, so the exit status is 0 on success).

    A bad value (ValueError/TypeError while the CLI builds the model, data or callbacks) prints its
    message and a usage hint, not a traceback; the traceback is logged at debug level, and
    ``GRADPRUNE_DEBUG=1`` re-raises it."""
    try:
        run_cli(args)
    except (ValueError, TypeError) as exc:
        if os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes"):
            raise
        log.debug("traceback of the error below", exc_info=True)
        sys.stderr.write(f"gradprune: error: {exc}\n(see `gradprune fit --help`; set {DEBUG_ENV}=1 for the traceback)\n")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
