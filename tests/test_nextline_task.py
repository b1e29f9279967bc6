"""scripts/make_nextline_task.py: deterministic items whose label points at the true next line of the file."""
import importlib.util
import json
from pathlib import Path

import pytest

from gradprune.corpus import VAL_FRACTION, read_text, split_files, stdlib_files, stdlib_root

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_nextline_task.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("make_nextline_task", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_items_are_deterministic_true_and_from_held_out_files_only(script, tmp_path):
    items = script.make_items(40, seed=3)
    assert items == script.make_items(40, seed=3) and items != script.make_items(40, seed=4)
    _, held_out = split_files(stdlib_files(), VAL_FRACTION, seed=0)
    held_out = {str(p.relative_to(stdlib_root())) for p in held_out}
    labels = set()
    for item in items:
        assert item["file"] in held_out
        lines = read_text(stdlib_root() / item["file"]).splitlines()
        assert item["choices"][item["label"]] == lines[item["line"] - 1].rstrip()  # the true next line
        assert item["context"].endswith(lines[item["line"] - 2] + "\n")  # ... right after the context
        assert len(set(item["choices"])) == 4
        indents = {c[: len(c) - len(c.lstrip())] for c in item["choices"]}
        assert len(indents) == 1  # the indentation gives nothing away
        labels.add(item["label"])
    assert labels == {0, 1, 2, 3}

    path = script.write_task(tmp_path, 20, seed=3)
    rows = [json.loads(line) for line in (tmp_path / "stdlib_nextline.jsonl").read_text().splitlines()]
    assert rows == items[:20] and "dataset_path: json" in path.read_text()


def test_a_bad_item_count_is_named(script):
    with pytest.raises(ValueError, match=r"items must be a positive int, got 0"):
        script.make_items(0)
