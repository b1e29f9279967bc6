"""The ``gradprune`` command's subcommands and its debug switch, in a module of their own: both the light
entry point (:mod:`gradprune.cli`, no torch for ``--help``) and the LightningCLI behind it
(:mod:`gradprune.lightning_cli`) read them, and neither imports the other at module level."""

DEBUG_ENV = "GRADPRUNE_DEBUG"  # set to 1 for the full traceback of a bad value / the whole parse error

#: The subcommands of ``gradprune`` and the line ``gradprune --help`` shows for each (the ones that work:
#: LightningCLI's test and predict need steps PrunableLM does not have).
SUBCOMMANDS = {
    "fit": "train with the configured pruning callbacks; validate, report and export",
    "validate": "one pass over the validation set: perplexity and sparsity of the configured model",
    "evaluate": "lm-eval tasks on a model or export: gradprune evaluate --model DIR --tasks arc_easy,boolq",
}

#: subcommands answered by gradprune itself, not by LightningCLI
OWN_SUBCOMMANDS = ("evaluate",)
