"""gradprune.callbacks comes from the top-level callbacks/ folder: check a real wheel install has it."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_callbacks_subpackage_importable_here():
    import gradprune.callbacks

    assert Path(gradprune.callbacks.__file__).resolve().parent.name in {"callbacks"}


def test_regular_install_ships_callbacks_subpackage(tmp_path):
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(ROOT)],
        check=True,
        capture_output=True,
    )
    assert (site / "gradprune" / "callbacks" / "__init__.py").is_file()
    code = "import gradprune, gradprune.callbacks; print(gradprune.__file__); print(gradprune.callbacks.__file__)"
    env = dict(os.environ, PYTHONPATH=str(site))
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True, capture_output=True, text=True)
    files = out.stdout.split()
    assert all(f.startswith(str(site)) for f in files), files
