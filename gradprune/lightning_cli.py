"""The LightningCLI behind the ``gradprune`` command (gradprune/cli.py): PrunableLM and TextDataModule, the
subcommands of :data:`gradprune.cli.SUBCOMMANDS`, gradprune's callbacks by short name, and parse errors cut
to the lines that matter.

Callbacks (GradualPruningCallback, the one-shot callbacks, StructuredPruningCallback,
GradualStructuredPruningCallback, SparsityMonitor) are given in YAML under ``trainer.callbacks``, by
``class_path: GradualPruningCallback`` or the dotted ``gradprune.callbacks.GradualPruningCallback``. The data
module's vocabulary size is linked into the model.

A bad key or value in a config file or on the command line prints a short error (:func:`short_error`: the
file, the key, the closest allowed key and the allowed keys) and exits with status 2; ``GRADPRUNE_DEBUG=1``
prints jsonargparse's whole message instead.
"""
from __future__ import annotations

import difflib
import inspect
import logging
import os
import re
import sys
import textwrap
from typing import Optional, Sequence

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from gradprune import callbacks as gradprune_callbacks  # imported so that short class names resolve

from .checkpoints import check_checkpoint_file
from .subcommands import DEBUG_ENV, OWN_SUBCOMMANDS, SUBCOMMANDS

log = logging.getLogger(__name__)


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


def callback_names() -> list[str]:
    """gradprune's callbacks a config can name (the concrete Lightning callbacks of gradprune.callbacks)."""
    from lightning.pytorch.callbacks import Callback

    return [name for name in gradprune_callbacks.__all__ if name != "PruningCallback"
            and isinstance(getattr(gradprune_callbacks, name), type) and issubclass(getattr(gradprune_callbacks, name), Callback)]


# -- short parse errors ------------------------------------------------------------------------------------
def _parameters(class_path: str) -> list[str]:
    """The keyword arguments of the class at ``class_path`` (empty if it cannot be imported)."""
    from jsonargparse._typehints import import_object  # the importer jsonargparse used for the class path

    try:
        cls = import_object(class_path)
        params = inspect.signature(cls.__init__).parameters.values()
    except Exception:  # noqa: BLE001 - only for the message
        return []
    return [p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _parser_keys(parser) -> list[str]:
    """Every dotted key a (sub)command parser accepts."""
    keys = []
    for action in parser._actions:
        dest = getattr(action, "dest", None)
        if dest and dest not in ("help", "config", "print_config", "print_shtab") and not dest.endswith(".help") and dest != "==SUPPRESS==":
            keys.append(dest)
    return keys


def _where(key: str, args: Sequence[str], value: bool = False) -> str:
    """Which config file holds ``key`` (its last component; with ``value=True`` anywhere, as a value), or 'the
    command line'."""
    files = [args[i + 1] for i, arg in enumerate(args[:-1]) if arg in ("-c", "--config")]
    files += [arg.split("=", 1)[1] for arg in args if arg.startswith("--config=")]
    last = key.rsplit(".", 1)[-1]
    pattern = rf"\b{re.escape(key)}\b" if value else rf"(^|[\s{{,]){re.escape(last)}\s*:"
    for path in files:
        try:
            with open(path, encoding="utf-8") as handle:
                if re.search(pattern, handle.read(), re.MULTILINE):
                    return f"file {path}"
        except OSError:
            continue
    return "the command line"


def _allowed(names: Sequence[str], width: int = 100, max_lines: int = 4) -> list[str]:
    lines = textwrap.wrap("allowed keys: " + ", ".join(names), width, subsequent_indent="    ")
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] += " ..."
    return ["  " + line for line in lines]


def _closest(word: str, names: Sequence[str]) -> Optional[str]:
    match = difflib.get_close_matches(word, list(names), n=1, cutoff=0.6)
    return match[0] if match else None


def _unknown_key_lines(key: str, where_key: str, names: Sequence[str], owner: str, args: Sequence[str]) -> list[str]:
    lines = [f"unknown key {key!r}{owner} ({_where(where_key, args)})"]
    close = _closest(key.rsplit(".", 1)[-1], names)
    if close:
        lines.append(f"  did you mean {close}?")
    return lines + _allowed(names)


def short_error(message: str, parser, args: Sequence[str]) -> list[str]:
    """jsonargparse's error ``message`` as a few lines: the key, where it is, the closest allowed key and
    the allowed keys; a bad value as its own line without the union-type noise."""
    # an unknown option of a class given by class_path (a callback, the logger, ...)
    found = re.search(r"Problem with given class_path '([\w.]+)':\s*\n\s*(?:Key|Option) '([\w.]+)' is not (?:accepted|expected)",
                      message)
    if found:
        class_path, key = found.groups()
        owner = f" for {class_path}"
        return _unknown_key_lines(key, key, _parameters(class_path), owner, args)
    # an unknown key of the command's own arguments (model.*, data.*, trainer.*, top level)
    group = re.search(r"Group '([\w.]+)' does not accept option '([\w.]+)'", message)
    found = (re.search(r"does not accept option '([\w.]+)'", message) or re.search(r"Key '([\w.]+)' is not expected", message)
             or re.search(r"unrecognized arguments: --([\w.]+)", message))
    if found:
        key = ".".join(group.groups()) if group else found.group(1)
        keys = _parser_keys(parser)
        parts = key.split(".")
        for depth in range(len(parts) - 1, -1, -1):  # the longest prefix that exists: its children are the choices
            prefix = ".".join(parts[:depth])
            children = sorted({k[len(prefix) + 1 if prefix else 0:].split(".")[0] for k in keys
                               if not prefix or k.startswith(prefix + ".")})
            if depth == 0 or children:
                break
        bad = parts[depth] if depth < len(parts) else parts[-1]
        owner = f" under {prefix!r}" if prefix else ""
        return _unknown_key_lines(bad, key, children, owner, args)
    # a bad value of a class's argument
    found = re.search(r"Problem with given class_path '([\w.]+)':\s*\n\s*Parser key \"([\w.]+)\":\s*\n\s*(.+)", message)
    if found:
        class_path, key, problem = found.groups()
        return [f"bad value of {key!r} for {class_path} ({_where(key, args)}): {problem.strip()}"]
    # an unknown class name
    found = re.search(r"Expected a dot import path string: ([\w.]+)", message)
    if found:
        name = found.group(1)
        names = callback_names()
        lines = [f"unknown class {name!r} ({_where(name, args, value=True)})"]
        close = _closest(name.rsplit(".", 1)[-1], names)
        if close:
            lines.append(f"  did you mean {close}?")
        lines += ["  " + line for line in textwrap.wrap("gradprune's callbacks: " + ", ".join(names) +
                                                        "; others by their dotted class path", 100,
                                                        subsequent_indent="    ")]
        return lines
    # anything else: the message without the lines about union types and the given value
    keep, skipping = [], False
    for line in message.splitlines():
        text = line.strip()
        if text.startswith(("Subtypes:", "Given value type:", "Given value:", "Does not validate against any of",
                            "- Expected a <class 'NoneType'>")) or text == "Errors:":
            continue
        if text.startswith("- Not a valid subclass of"):
            skipping = True
            continue
        if skipping and (text.startswith("Subclass types expect") or text.startswith("- a ")):
            continue
        skipping = False
        keep.append(line)
    return keep[:12] + (["  ..."] if len(keep) > 12 else [])


class GradpruneParser(LightningArgumentParser):
    """LightningCLI's parser, with errors cut short by :func:`short_error` (jsonargparse's ``error`` hook)."""

    #: the arguments being parsed (set by GradpruneCLI.parse_arguments), to find the file a bad key is in
    args: Sequence[str] = ()

    def __init__(self, *args, **kwargs) -> None:
        # argparse would take --model.learning_rat for --model.learning_rate: a misspelt option is an error
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Optional[Exception] = None):
        if not self.exit_on_error or os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes"):
            return super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        try:
            lines = short_error(message, parser, self.args)
        except Exception:  # noqa: BLE001 - never hide the error behind a bug in the summary
            log.debug("could not shorten the parse error", exc_info=True)
            lines = message.splitlines()
        sys.stderr.write(f"{prog}: error: " + "\n".join(lines) + "\n")
        sys.stderr.write(f"(`{prog} --help` lists the options; {DEBUG_ENV}=1 prints the whole message)\n")
        self.exit(2)


def _callbacks_help(action) -> None:
    """Put gradprune's callbacks first in the help of ``--trainer.callbacks`` (and leave them out of the list
    of other known subclasses that jsonargparse appends)."""
    names = ", ".join(callback_names())
    action.help = (f"Add a callback or list of callbacks. gradprune's callbacks (short names work, e.g. "
                   f"class_path: GradualPruningCallback; --trainer.callbacks.help GradualPruningCallback shows one's "
                   f"arguments): {names}")
    known = action.extra_help

    def extra_help() -> str:
        text = known()
        head, sep, paths = text.partition("known subclasses: ")
        others = [path for path in paths.split(", ") if path and not path.startswith("gradprune.")]
        return f"{head}{sep.replace('known', 'other known')}{', '.join(others)}" if sep else text

    action.extra_help = extra_help


class GradpruneCLI(LightningCLI):
    def __init__(self, *args, **kwargs) -> None:
        _yaml_12_ints()  # before any YAML is read
        kwargs.setdefault("parser_class", GradpruneParser)
        super().__init__(*args, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """The subcommands that work here (:data:`gradprune.cli.SUBCOMMANDS`); LightningCLI's test and
        predict need a test_step / predict_step PrunableLM does not have."""
        return {name: skip for name, skip in LightningCLI.subcommands().items()
                if name in SUBCOMMANDS and name not in OWN_SUBCOMMANDS}

    def parse_arguments(self, parser, args) -> None:
        given = sys.argv[1:] if args is None else args  # args may also be a dict or a Namespace: no files then
        GradpruneParser.args = [str(a) for a in given] if isinstance(given, (list, tuple)) else []
        super().parse_arguments(parser, args)

    def instantiate_trainer(self, **kwargs):
        try:
            return super().instantiate_trainer(**kwargs)
        except MisconfigurationException as exc:  # Lightning's own check of a trainer argument: a bad value,
            raise ValueError(f"trainer: {exc}") from exc  # said by gradprune's handler without a traceback

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads --ckpt_path here (for its hyperparameters), first of all: a truncated or foreign
        # file is named before torch or Lightning fail on it
        subcommand = self.config.get("subcommand")
        if subcommand:
            check_checkpoint_file(self.config[subcommand].get("ckpt_path"))
        super()._parse_ckpt_path()

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")
        for action in parser._actions:
            if action.dest == "trainer.callbacks":
                _callbacks_help(action)
