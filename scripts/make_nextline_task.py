"""A local lm-eval multiple-choice task that needs no download: the true next line of a Python function.

Each item shows the start of a function from the Python standard library (its ``def`` line through some
line of its body) and four candidate next lines: the true one and three lines drawn from elsewhere in the
same file, outside that function, with the same indentation (so the indentation gives nothing away). The
model picks by log-likelihood (lm-eval's ``multiple_choice``: ``acc``, and ``acc_norm``, the likelihood per
byte). Chance is 25%.

    python scripts/make_nextline_task.py --out tasks/nextline            # 500 items, seed 0
    python -m lm_eval --model hf --model_args pretrained=DIR --include_path tasks/nextline --tasks stdlib_nextline
    gradprune evaluate --model DIR --tasks stdlib_nextline --include-path tasks/nextline --limit 200

Only the standard library's *validation* files (``gradprune.corpus.split_files`` with ``--split-seed``, 5%
of the files) are used, so a model fine-tuned by ``TextDataModule(sources="stdlib", seed=<split seed>)``, as
the recovery benchmark's seed 0 rows are, never trained on the functions it is asked about. The items are a
deterministic function of ``--seed``, ``--split-seed``, ``--items`` and the Python version (its stdlib);
the task YAML names the JSON Lines file by its absolute path.
"""
from __future__ import annotations

import argparse
import ast
import json
import random
from pathlib import Path

from gradprune.corpus import VAL_FRACTION, read_text, split_files, stdlib_files, stdlib_root

TASK = "stdlib_nextline"
MAX_CONTEXT_LINES = 24  # the context is the def line plus at most this many lines before the answer
MIN_LINE_CHARS = 12  # candidate lines shorter than this (after the indentation) are too generic: "return x"


def indentation(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]


def usable(line: str) -> bool:
    """A candidate answer: code (not blank, not a comment, not a lone bracket) long enough to tell apart."""
    text = line.strip()
    return len(text) >= MIN_LINE_CHARS and not text.startswith(("#", '"""', "'''", ")", "]", "}"))


def functions(source: str) -> list[tuple[int, int]]:
    """(first line, last line) of every function in ``source``, 0-based and inclusive."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    spans = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno is not None:
            first = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
            spans.append((first, node.end_lineno - 1))
    return spans


def file_items(path: Path, rng: random.Random, per_file: int) -> list[dict]:
    """Up to ``per_file`` items from one file (at most one per function)."""
    source = read_text(path)
    lines = source.splitlines()
    spans = functions(source)
    rng.shuffle(spans)
    items = []
    for first, last in spans:
        if len(items) >= per_file:
            break
        body = [i for i in range(first + 2, last + 1) if usable(lines[i])]
        if not body:
            continue
        answer_at = rng.choice(body)
        answer = lines[answer_at].rstrip()
        indent = indentation(answer)
        seen = set(line.rstrip() for line in lines[first:last + 1])  # no line of this function is a distractor
        pool = sorted({lines[i].rstrip() for i in range(len(lines)) if not first <= i <= last
                       and usable(lines[i]) and indentation(lines[i]) == indent} - seen)
        if len(pool) < 3:
            continue
        choices = rng.sample(pool, 3) + [answer]
        rng.shuffle(choices)
        start = max(first, answer_at - MAX_CONTEXT_LINES)
        head = lines[first:first + 1] if start > first else []  # the def line always, then the lines before
        context = "\n".join(head + lines[start:answer_at]) + "\n"
        items.append({"context": context, "choices": choices, "label": choices.index(answer),
                      "file": str(path.relative_to(stdlib_root())), "line": answer_at + 1})
    return items


def make_items(n: int, seed: int = 0, split_seed: int = 0, per_file: int = 16) -> list[dict]:
    """``n`` items from the stdlib's validation files, deterministic in the arguments."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"items must be a positive int, got {n!r}")
    _, files = split_files(stdlib_files(), VAL_FRACTION, seed=split_seed)
    rng = random.Random(seed)
    files = sorted(files)
    rng.shuffle(files)
    items = []
    for path in files:
        items += file_items(path, random.Random(f"{seed}:{path.relative_to(stdlib_root())}"), per_file)
        if len(items) >= n:
            return items[:n]
    raise ValueError(f"items={n}: the {len(files)} validation files of the stdlib give only {len(items)} items "
                     f"at {per_file} per file; ask for fewer or raise per_file")


def task_yaml(data_file: Path, task: str = TASK) -> str:
    """An lm-eval task definition reading ``data_file`` (JSON Lines: context, choices, label)."""
    return "\n".join([
        f"task: {task}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(str(data_file.resolve()))}",
        "test_split: test",
        "output_type: multiple_choice",
        "doc_to_text: context",
        "doc_to_choice: choices",
        "doc_to_target: label",
        'target_delimiter: ""',
        "metric_list:",
        "  - metric: acc",
        "    aggregation: mean",
        "    higher_is_better: true",
        "  - metric: acc_norm",
        "    aggregation: mean",
        "    higher_is_better: true",
        "metadata:",
        "  version: 1.0",
        "",
    ])


def write_task(out: Path, n: int, seed: int = 0, split_seed: int = 0, task: str = TASK) -> Path:
    """Write ``<task>.jsonl`` and ``<task>.yaml`` into ``out``; returns the YAML's path."""
    items = make_items(n, seed, split_seed)
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"{task}.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in items))
    path = out / f"{task}.yaml"
    path.write_text(task_yaml(data, task))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the task YAML and its JSON Lines data")
    parser.add_argument("--items", type=int, default=500, help="number of items (default 500)")
    parser.add_argument("--seed", type=int, default=0, help="picks the functions, answer lines and distractors")
    parser.add_argument("--split-seed", type=int, default=0,
                        help="the TextDataModule seed whose validation files the items come from (default 0)")
    parser.add_argument("--task", default=TASK, help=f"the task's name (default {TASK})")
    args = parser.parse_args()
    if args.items < 1:
        parser.error(f"--items must be a positive number, got {args.items}")
    path = write_task(args.out, args.items, args.seed, args.split_seed, args.task)
    print(f"wrote {path} ({args.items} items)")


if __name__ == "__main__":
    main()
