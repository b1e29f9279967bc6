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


def test_the_readmes_links_lead_somewhere():
    """The README is short and points into docs/: every relative link names a file that exists, and a link's
    #anchor a heading of that file (GitHub's slugs)."""
    import re

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    bad = []
    for target in re.findall(r"\]\(([^)#]+)(?:#([^)]+))?\)", readme):
        path, anchor = target
        if path.startswith(("http://", "https://")):
            continue
        file = root / path
        if not file.exists():
            bad.append(path)
        elif anchor:
            slugs = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
                     for h in re.findall(r"^#+ (.*)$", file.read_text(), re.MULTILINE)}
            if anchor not in slugs:
                bad.append(f"{path}#{anchor}")
    assert not bad, f"README links to nothing: {bad}"
