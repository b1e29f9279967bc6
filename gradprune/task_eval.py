"""Zero-shot task accuracy of the live model with EleutherAI's lm-evaluation-harness (``lm_eval``).

:func:`evaluate_tasks` wraps the in-memory causal LM in lm-eval's ``HFLM`` (no save and reload) and runs
``lm_eval.simple_evaluate``: the numbers are lm-eval's own, comparable with the pruning papers' tables
(the Wanda paper's suite: ``boolq, rte, hellaswag, winogrande, arc_easy, arc_challenge, openbookqa``,
which need the datasets from the hub) and with local tasks (a task YAML with ``dataset_path: json``;
``include_path`` names its folder). lm-eval is an optional extra: ``pip install gradprune[eval]``.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import random
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from .blocks import find_causal_lm, takes_input_ids
from .validation import Problems, close_matches, is_int, is_number

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install gradprune[eval]"
#: the zero-shot suite of the Wanda / SparseGPT papers (lm-eval task names; they download their datasets)
WANDA_SUITE = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")


def require_lm_eval():
    """The lm_eval module, or ImportError naming the extra that installs it."""
    try:
        import lm_eval
        import lm_eval.models.huggingface  # noqa: F401 - HFLM, the wrapper of a live model
    except ImportError as exc:
        raise ImportError(f"task evaluation needs EleutherAI's lm-evaluation-harness (lm-eval), an optional extra "
                          f"of gradprune: {INSTALL_HINT}") from exc
    return lm_eval


def parse_tasks(tasks: Union[str, Sequence[str], None]) -> list[str]:
    """A list of task names from a list or a comma-separated string (``"arc_easy,boolq"``); entries are
    stripped, empty ones dropped. Anything else is returned as given for :func:`check_task_arguments`."""
    if isinstance(tasks, str):
        return [t.strip() for t in tasks.split(",") if t.strip()]
    if isinstance(tasks, (list, tuple)):
        return [t.strip() if isinstance(t, str) else t for t in tasks]
    return tasks  # type: ignore[return-value]


def check_task_arguments(problems: Problems, tasks: Any, limit: Any = None, batch_size: Any = 1,
                         num_fewshot: Any = 0, include_path: Any = None) -> None:
    """The plain checks, without lm-eval: a non-empty list of task names, ``limit`` None, an int >= 1 or a
    fraction in (0, 1], ``batch_size`` >= 1, ``num_fewshot`` >= 0, ``include_path`` an existing folder (or
    a list of them)."""
    if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
        problems.add(f"tasks must be lm-eval task names (a list of str, or one str with commas), got {tasks!r}",
                     type_error=True)
    elif not [t for t in tasks if t]:
        problems.add(f"tasks must name at least one lm-eval task (e.g. ['arc_easy']), got {tasks!r}")
    if limit is not None:
        if is_int(limit):
            if limit < 1:
                problems.add(f"limit must be None (every item), an int >= 1 (items per task) or a fraction in (0, 1], got {limit!r}")
        elif is_number(limit) and not isinstance(limit, bool):
            if math.isnan(limit) or not 0 < limit <= 1:
                problems.add(f"limit must be None (every item), an int >= 1 (items per task) or a fraction in (0, 1], got {limit!r}")
        else:
            problems.add(f"limit must be None, an int >= 1 or a fraction in (0, 1], got {limit!r}", type_error=True)
    if not is_int(batch_size) or batch_size < 1:
        problems.add(f"batch_size must be an int >= 1, got {batch_size!r}", type_error=not is_int(batch_size))
    if not is_int(num_fewshot) or num_fewshot < 0:
        problems.add(f"num_fewshot must be an int >= 0, got {num_fewshot!r}", type_error=not is_int(num_fewshot))
    for path in ([] if include_path is None else include_path if isinstance(include_path, (list, tuple)) else [include_path]):
        if not isinstance(path, (str, os.PathLike)):
            problems.add(f"include_path must be None or a folder of task YAMLs (str), got {include_path!r}", type_error=True)
        elif not Path(path).is_dir():
            problems.add(f"include_path={str(path)!r} is not a folder (it should hold task YAML files)")


_MANAGERS: dict = {}


def task_manager(include_path: Any = None):
    """lm-eval's TaskManager over its own tasks and ``include_path`` (indexing thousands of task files takes
    seconds, so one is kept per include_path)."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    key = tuple(str(p) for p in include_path) if isinstance(include_path, (list, tuple)) else str(include_path)
    if key not in _MANAGERS:
        paths = [str(p) for p in include_path] if isinstance(include_path, (list, tuple)) else include_path
        _MANAGERS[key] = TaskManager(include_path=None if paths is None else (paths if isinstance(paths, list) else str(paths)))
    return _MANAGERS[key]


def check_task_names(problems: Problems, tasks: Sequence[str], include_path: Any = None) -> None:
    """Every name must be an lm-eval task, group or tag (its own or one under ``include_path``), or the path
    of a task YAML file."""
    manager = task_manager(include_path)
    known = manager.all_tasks
    for name in tasks:
        if name in manager.task_index or (name.endswith((".yaml", ".yml")) and Path(name).is_file()):
            continue
        where = f" or under include_path={include_path!r}" if include_path is not None else " (a local task: pass include_path, its folder)"
        problems.add(f"tasks: {name!r} is not an lm-eval task{where}{close_matches(name, known)}")


def resolve_model(model_or_module: nn.Module) -> nn.Module:
    """The causal LM to evaluate: the model itself, or the one inside a LightningModule (found as the
    one-shot callbacks find it, :func:`gradprune.blocks.find_causal_lm`; when that is a wrapper such as
    PrunableLM, whose own forward takes input_ids, the outermost Hugging Face model inside it). It must be a
    Hugging Face model (lm-eval's HFLM reads its ``config`` and ``device``)."""
    if not isinstance(model_or_module, nn.Module):
        raise TypeError(f"model_or_module must be a Hugging Face causal LM, a PrunableLM or a LightningModule holding "
                        f"one, got {type(model_or_module).__name__}")
    def is_hf(module: nn.Module) -> bool:
        return hasattr(module, "config") and hasattr(module, "device")

    lm = find_causal_lm(model_or_module)
    if not is_hf(lm):  # e.g. a PrunableLM, whose own forward takes input_ids: the outermost HF model inside
        lm = next((m for m in lm.modules() if m is not lm and is_hf(m) and takes_input_ids(m)), lm)
    if not is_hf(lm):
        raise ValueError(f"model_or_module: the causal LM found ({type(lm).__name__}) is not a Hugging Face model "
                         "(no config / device); lm-eval's HF wrapper needs a transformers PreTrainedModel")
    return lm


def resolve_tokenizer(model_or_module: nn.Module, lm: nn.Module, tokenizer: Any):
    """A tokenizer object: the one given; a source given (``"bytes"``, a model directory, ``"smollm2"``, a hub
    id) loaded; or, for None, the attached data module's tokenizer, the module's ``tokenizer_source``
    (PrunableLM), or the model's own directory (``config._name_or_path``)."""
    from .models import load_tokenizer  # lazy: the loaders matter only when no tokenizer object is given
    from .tokenizer import BYTES, byte_tokenizer  # lazy, as above

    if tokenizer is not None and not isinstance(tokenizer, str):
        if not callable(getattr(tokenizer, "encode", None)):
            raise TypeError(f"tokenizer must be None, a tokenizer source (str) or a Hugging Face tokenizer, got {tokenizer!r}")
        return tokenizer
    if isinstance(tokenizer, str):
        return byte_tokenizer() if tokenizer == BYTES else load_tokenizer(tokenizer)
    trainer = getattr(model_or_module, "_trainer", None)
    found = getattr(getattr(trainer, "datamodule", None), "tokenizer", None) if trainer is not None else None
    if found is not None:
        return found
    source = getattr(model_or_module, "tokenizer_source", None)
    if isinstance(source, str):
        return byte_tokenizer() if source == BYTES else load_tokenizer(source)
    path = getattr(getattr(lm, "config", None), "_name_or_path", "") or ""
    if path and os.path.isdir(os.path.expanduser(path)):
        return load_tokenizer(path)
    raise ValueError(f"tokenizer=None: cannot tell which tokenizer belongs to the {type(lm).__name__} (no data module "
                     "tokenizer, no tokenizer source, no model directory); pass tokenizer= a tokenizer object or a "
                     "source ('bytes', a model directory, 'smollm2', a hub id)")


def check_vocabulary(problems: Problems, tokenizer: Any, lm: nn.Module) -> None:
    """The tokenizer's ids must all be embeddable by the model."""
    try:
        size = lm.get_input_embeddings().num_embeddings
    except (AttributeError, NotImplementedError):
        return
    try:
        count = len(tokenizer)
    except TypeError:
        return
    if count > size:
        problems.add(f"tokenizer: its vocabulary has {count} token ids but the model ({type(lm).__name__}) embeds only "
                     f"{size}; use the tokenizer the model was trained with")


@contextlib.contextmanager
def preserved_state(lm: nn.Module):
    """The model's training flag and the random states of Python, numpy and torch (lm-eval seeds all three)
    are as before afterwards, so an evaluation inside a fit changes nothing the run would draw next."""
    import numpy as np

    was_training = lm.training
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
              torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None)
    try:
        yield
    finally:
        lm.train(was_training)
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if states[3] is not None:
            torch.cuda.set_rng_state_all(states[3])


def flatten_results(results: dict) -> dict[str, dict[str, float]]:
    """lm-eval's ``results`` section as {task: {metric: value, metric_stderr: value}}: the ``,none`` filter
    suffix dropped (other filters kept as ``metric,filter``), non-numbers (the alias) and the item count
    (``sample_len``) left out."""
    flat = {}
    for task, metrics in results.items():
        row = {}
        for key, value in metrics.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or key in ("samples", "sample_len"):
                continue
            name, _, filt = key.partition(",")
            row[name if filt in ("", "none") else key] = float(value)
        flat[task] = row
    return flat


def evaluate_tasks(model_or_module: nn.Module, tasks: Union[str, Sequence[str]], tokenizer: Any = None,
                   limit: Union[int, float, None] = None, batch_size: int = 8, num_fewshot: int = 0,
                   include_path: Union[str, Sequence[str], None] = None, bootstrap_iters: int = 1000,
                   ) -> dict[str, dict[str, float]]:
    """Run lm-eval tasks on the live model and return {task: {metric: value, metric_stderr: value}}.

    Args:
        model_or_module: a Hugging Face causal LM, a :class:`gradprune.PrunableLM`, or any LightningModule
            holding one (found as the one-shot callbacks find it).
        tasks: lm-eval task names (a list or ``"a,b"``), or paths of task YAML files.
        tokenizer: a tokenizer object or source; None takes the attached data module's, the PrunableLM's
            ``tokenizer`` / model source, or the model's directory.
        limit: items per task (int) or a fraction of each task (float in (0, 1]); None for all.
        batch_size: lm-eval's batch size.
        num_fewshot: in-context examples per item (0: zero-shot).
        include_path: folder(s) of local task YAMLs (``dataset_path: json`` tasks, for example).
        bootstrap_iters: lm-eval's bootstrap iterations for the stderr of non-mean metrics (a mean's
            stderr is computed exactly).

    Everything is checked (arguments, task names, the tokenizer against the model's embedding) before the
    model is touched; afterwards its training flag and the random states are as they were. Raises
    ImportError naming ``pip install gradprune[eval]`` when lm-eval is missing.
    """
    tasks = parse_tasks(tasks)
    problems = Problems()
    check_task_arguments(problems, tasks, limit, batch_size, num_fewshot, include_path)
    if not is_int(bootstrap_iters) or bootstrap_iters < 0:
        problems.add(f"bootstrap_iters must be an int >= 0, got {bootstrap_iters!r}")
    problems.raise_if_any()
    lm_eval = require_lm_eval()
    lm = resolve_model(model_or_module)
    check_task_names(problems, tasks, include_path)
    tok = resolve_tokenizer(model_or_module, lm, tokenizer)
    check_vocabulary(problems, tok, lm)
    problems.raise_if_any()

    from lm_eval.models.huggingface import HFLM

    with preserved_state(lm), torch.no_grad():
        wrapper = HFLM(pretrained=lm, tokenizer=tok, batch_size=batch_size)
        output = lm_eval.simple_evaluate(model=wrapper, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                         task_manager=task_manager(include_path), log_samples=False,
                                         bootstrap_iters=bootstrap_iters)
    return flatten_results(output["results"])
