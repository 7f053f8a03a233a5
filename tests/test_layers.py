"""The import layering of pyproject.toml's import-linter contract holds: the CLI on top, serving next,
the stages side by side (none imports another), the shared modules below them, errors at the bottom."""

import subprocess
import sys
from pathlib import Path

LINT = Path(sys.executable).with_name("lint-imports")


def lint(root, *args) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--no-cache", *args], cwd=root, capture_output=True, text=True, timeout=300)


def test_imports_point_down_only(root):
    done = lint(root)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "1 kept, 0 broken" in done.stdout


def test_a_stage_importing_another_stage_breaks_the_contract(root, tmp_path):
    """The same contract on a copy of the package with one upward import added must fail."""
    import shutil

    package = tmp_path / "src" / "lingtune"
    shutil.copytree(root / "src" / "lingtune", package, ignore=shutil.ignore_patterns("__pycache__"))
    models = package / "models.py"
    models.write_text(models.read_text() + "\n\ndef _upward():\n    from lingtune.train import sft  # noqa: F401\n")
    shutil.copy(root / "pyproject.toml", tmp_path / "pyproject.toml")
    done = subprocess.run([str(LINT), "--no-cache"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(tmp_path / "src"), "PATH": "/usr/bin:/bin"})
    assert done.returncode != 0 and "lingtune.models -> lingtune.train.sft" in done.stdout, done.stdout[-2000:]
