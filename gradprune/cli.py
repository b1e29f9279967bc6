"""The ``gradprune`` command: LightningCLI over PrunableLM and TextDataModule.

    gradprune fit --config configs/quickstart.yaml
    gradprune validate --config configs/quickstart.yaml
    gradprune fit --config configs/quickstart.yaml --print_config
    gradprune evaluate --model exports/run1 --tasks arc_easy,hellaswag --limit 200

This module imports nothing heavy: ``gradprune --help`` is answered from :data:`SUBCOMMANDS` without
torch or Lightning (well under a second, against 15-20 s for LightningCLI's own help on a loaded machine),
``gradprune evaluate`` (lm-eval tasks, :func:`evaluate_main`) is answered here with argparse, and everything
else goes to :class:`gradprune.lightning_cli.GradpruneCLI`. A new subcommand is an entry in
:data:`SUBCOMMANDS` plus its implementation there.
"""
from __future__ import annotations

import logging
import os
import sys

from .subcommands import DEBUG_ENV, OWN_SUBCOMMANDS, SUBCOMMANDS  # a leaf module, shared with gradprune.lightning_cli

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


def evaluate_parser():
    import argparse

    parser = argparse.ArgumentParser(
        prog="gradprune evaluate",
        description="Run lm-eval tasks on a model and print {task: {metric: value}} (needs pip install gradprune[eval]).")
    parser.add_argument("--model", required=True,
                        help="a gradprune export or Hugging Face model directory (any export format), a .gguf file, "
                             "'smollm2', or a hub id (needs network)")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task names, e.g. arc_easy,hellaswag")
    parser.add_argument("--limit", type=float, default=None,
                        help="items per task (an integer >= 1) or a fraction of each task (in (0, 1)); default all")
    parser.add_argument("--tokenizer", default=None, help="tokenizer source (default: the model's own)")
    parser.add_argument("--include-path", default=None, help="a folder of local task YAMLs")
    parser.add_argument("--batch-size", type=int, default=8, help="lm-eval's batch size (default 8)")
    parser.add_argument("--num-fewshot", type=int, default=0, help="in-context examples per item (default 0)")
    parser.add_argument("--output", default=None, help="also write the results as JSON to this file")
    return parser


def evaluate_main(argv) -> dict:
    """``gradprune evaluate``: check the arguments and the task names, load the model, run
    :func:`gradprune.evaluate_tasks`, print the results as JSON (and write them to ``--output``)."""
    import json

    parser = evaluate_parser()
    args = parser.parse_args(argv)
    # lazy: `gradprune --help` must not import torch or lm-eval
    from .task_eval import (check_task_arguments, check_task_names, evaluate_tasks,  # lazy, as said above
                            parse_tasks, require_lm_eval)
    from .validation import Problems  # lazy, with the line above

    limit = args.limit
    if limit is not None and limit >= 1:
        if limit != int(limit):
            parser.error(f"argument --limit: a count of items must be a whole number, got {args.limit}")
        limit = int(limit)
    tasks = parse_tasks(args.tasks)
    problems = Problems()
    check_task_arguments(problems, tasks, limit, args.batch_size, args.num_fewshot, args.include_path)
    problems.raise_if_any()
    require_lm_eval()
    check_task_names(problems, tasks, args.include_path)  # before the model is loaded
    problems.raise_if_any()
    model, tokenizer = _load_for_evaluation(args.model, args.tokenizer)
    results = evaluate_tasks(model, tasks, tokenizer=tokenizer, limit=limit, batch_size=args.batch_size,
                             num_fewshot=args.num_fewshot, include_path=args.include_path)
    text = json.dumps(results, indent=2)
    sys.stdout.write(text + "\n")
    if args.output:
        with open(args.output, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
    return results


def _load_for_evaluation(source: str, tokenizer):
    """(model in eval mode, tokenizer): a local directory through :func:`gradprune.load` (every export format),
    anything else through :func:`gradprune.models.load_causal_lm`."""
    from .models import load_causal_lm, load_tokenizer  # lazy: torch and transformers only when a model is loaded

    if os.path.isdir(os.path.expanduser(source)):
        from .loading import load  # lazy, as above

        model = load(os.path.expanduser(source))
    else:
        model = load_causal_lm(source)
    return model.eval(), load_tokenizer(tokenizer if tokenizer is not None else source)


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
        if argv and argv[0] in OWN_SUBCOMMANDS:
            evaluate_main(argv[1:])
        else:
            run_cli(args)
    except ImportError as exc:
        if os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes") or "gradprune[" not in str(exc):
            raise
        sys.stderr.write(f"gradprune: error: {exc}\n")
        raise SystemExit(2) from None
    except (ValueError, TypeError) as exc:
        if os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes"):
            raise
        log.debug("traceback of the error below", exc_info=True)
        command = argv[0] if argv and argv[0] in OWN_SUBCOMMANDS else "fit"
        sys.stderr.write(f"gradprune: error: {exc}\n(see `gradprune {command} --help`; set {DEBUG_ENV}=1 for the traceback)\n")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
