"""gradprune.callbacks comes from the top-level callbacks/ folder: check a real wheel install has it."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_callbacks_subpackage_importable_here():
    import gradprune.callbacks

    assert Path(gradprune.callbacks.__file__).resolve().parent.name in {"callbacks"}


def test_regular_install_ships_callbacks_subpackage(tmp_path):
    site, source_copy = tmp_path / "site", tmp_path / "source"
    # from a copy: setuptools reuses a build/ folder in the tree, which could hold packages setup.cfg no longer lists
    shutil.copytree(ROOT, source_copy, ignore=shutil.ignore_patterns(".venv", ".git", "build", "runs", "*.egg-info",
                                                                      "__pycache__", "lightning_logs"))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(source_copy)],
        check=True,
        capture_output=True,
    )
    assert (site / "gradprune" / "callbacks" / "__init__.py").is_file()
    # every subpackage of the source tree is in the install (an editable install elsewhere on the path could
    # otherwise hide a missing one from the import below)
    source = sorted(str(p.parent.relative_to(ROOT)) for p in (ROOT / "gradprune").rglob("__init__.py"))
    assert source and all((site / package / "__init__.py").is_file() for package in source), source
    code = "import gradprune, gradprune.callbacks; print(gradprune.__file__); print(gradprune.callbacks.__file__)"
    env = dict(os.environ, PYTHONPATH=str(site))
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True, capture_output=True, text=True)
    files = out.stdout.split()
    assert all(f.startswith(str(site)) for f in files), files
