"""The ``gradprune`` command: LightningCLI over PrunableLM and TextDataModule.

    gradprune fit --config configs/quickstart.yaml
    gradprune validate --config configs/quickstart.yaml
    gradprune fit --config configs/quickstart.yaml --print_config

This module imports nothing heavy: ``gradprune --help`` is answered from :data:`SUBCOMMANDS` without
torch or Lightning (well under a second, against 15-20 s for LightningCLI's own help on a loaded machine),
and everything else goes to :class:`gradprune.lightning_cli.GradpruneCLI`. A new subcommand is an entry in
:data:`SUBCOMMANDS` plus its implementation there.
"""
from __future__ import annotations

import logging
import os
import sys

from .subcommands import DEBUG_ENV, SUBCOMMANDS  # a leaf module, shared with gradprune.lightning_cli

log = logging.getLogger(__name__)


USAGE = "usage: gradprune [-h] [-c CONFIG] {" + ",".join(SUBCOMMANDS) + "} ..."


def help_text() -> str:
    width = max(len(name) for name in SUBCOMMANDS) + 2
    lines = [USAGE, "", "Train-time pruning of Hugging Face causal LMs with Lightning.", "", "subcommands:"]
    lines += [f"  {name:<{width}}{text}" for name, text in SUBCOMMANDS.items()]
    lines += [
        "",
        "options:",
        "  -h, --help       show this help message and exit",
        "  -c, --config     a YAML config (e.g. configs/quickstart.yaml); also after the subcommand",
        "",
        "`gradprune fit --help` lists every option (gradprune's callbacks first);",
        "`gradprune fit --trainer.callbacks.help GradualPruningCallback` one callback's arguments.",
        "Example: gradprune fit --config configs/quickstart.yaml",
    ]
    return "\n".join(lines) + "\n"


def run_cli(args=None):
    """Run the CLI (``args`` like the command line's, default sys.argv) and return it, e.g. for tests."""
    from gradprune.callbacks.base import show_logs  # lazy: `gradprune --help` must not import torch

    from .data import TextDataModule  # (lazy, as above)
    from .lightning_cli import GradpruneCLI  # (lazy, as above)
    from .lightning_module import PrunableLM  # (lazy, as above)

    show_logs()
    return GradpruneCLI(PrunableLM, TextDataModule, save_config_kwargs={"overwrite": True}, args=args)


def __getattr__(name):
    if name == "GradpruneCLI":  # imported on first use: it needs Lightning
        from .lightning_cli import GradpruneCLI  # lazy: this module must not import Lightning

        return GradpruneCLI
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main(args=None) -> None:
    """The ``gradprune`` console script (returns nothing, so the exit status is 0 on success).

    ``gradprune``, ``gradprune -h`` / ``--help`` print :func:`help_text` without importing torch. A bad value
    (ValueError/TypeError while the CLI builds the model, data or callbacks) prints its message and a usage
    hint, not a traceback; the traceback is logged at debug level, and ``GRADPRUNE_DEBUG=1`` re-raises it."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv in ([], ["-h"], ["--help"]):
        (sys.stdout if argv else sys.stderr).write(help_text())
        if not argv:
            sys.stderr.write("gradprune: error: choose a subcommand: " + ", ".join(SUBCOMMANDS) + "\n")
        raise SystemExit(0 if argv else 2)
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
