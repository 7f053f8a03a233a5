"""The default DVC remote moves data and models between checkouts: push from one clone, pull into a
fresh one, and `dvc status` is clean there. The remote's path is set per machine in one place,
`dvc remote modify --local storage url PATH` (.dvc/config.local, not in git)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DVC = [sys.executable, "-m", "dvc"]


def run(cmd: list[str], cwd: Path, timeout: int = 600) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "LINGTUNE_PARAMS": str(cwd / "params.yaml"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}"}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return done.stdout


def clone(source: Path, dest: Path, remote: Path) -> Path:
    run(["git", "clone", "-q", str(source), str(dest)], cwd=source.parent)
    run([*DVC, "remote", "modify", "--local", "storage", "url", str(remote)], cwd=dest)
    return dest


def test_the_default_remote_lies_outside_the_checkout():
    name, url = run([*DVC, "remote", "list"], cwd=ROOT).split()[:2]
    assert (name, Path(url)) == ("storage", ROOT.parent / "lingtune-dvc-storage")  # beside the checkout
    assert "remote = storage" in (ROOT / ".dvc" / "config").read_text()
    assert "config.local" in (ROOT / ".dvc" / ".gitignore").read_text()


@pytest.mark.slow
def test_push_then_pull_into_a_fresh_clone(tmp_path):
    """`dvc repro prepare` in one clone, `dvc push`; a second clone of the same commit pulls the data and
    `dvc status` reports nothing to do."""
    remote = tmp_path / "remote"
    first = clone(ROOT, tmp_path / "first", remote)
    run([*DVC, "repro", "prepare"], cwd=first)
    if run(["git", "status", "--porcelain", "dvc.lock"], cwd=first).strip():  # main's lock may be behind its code
        run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "lock", "dvc.lock"], cwd=first)
    pushed = run([*DVC, "push", "prepare"], cwd=first)
    assert "pushed" in pushed
    second = clone(first, tmp_path / "second", remote)
    assert not (second / "data" / "processed" / "train.jsonl").exists()
    run([*DVC, "pull", "prepare"], cwd=second)
    for name in ("train.jsonl", "val.jsonl", "test.jsonl"):
        assert (second / "data" / "processed" / name).read_bytes() == (first / "data" / "processed" / name).read_bytes()
    assert "up to date" in run([*DVC, "status", "prepare"], cwd=second)
