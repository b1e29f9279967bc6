"""The examples the documentation shows (docs/examples/, included into the pages with
snippets) run here as they are, so they cannot drift from the code."""
import runpy
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "docs" / "examples").glob("*.py"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(path, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # whatever an example writes lands here
    runpy.run_path(str(path), run_name="__main__")
    if path.name == "quickstart.py":
        assert "'sparsity': 0.5}" in capsys.readouterr().out
