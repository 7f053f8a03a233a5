"""scripts/timed_repro.py (`make pipeline`): stage times from dvc's own lines, a report on failure too, dvc's
exit status. A stand-in `dvc` on PATH prints what dvc prints, with pauses."""

import json
import os
import stat
import subprocess
import sys

FAKE_DVC = """#!/bin/sh
echo "Stage 'backbone' didn't change, skipping"
echo "Running stage 'sft':"
echo "> lingtune sft"
sleep 0.6
echo "Running stage 'rl':"
sleep 0.3
[ "$1 $2" = "repro --fail" ] && { echo "ERROR: failed to reproduce 'rl'" >&2; exit 3; }
echo "Updating lock file 'dvc.lock'"
"""


def run_with_fake_dvc(root, tmp_path, *args):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    dvc = bin_dir / "dvc"
    dvc.write_text(FAKE_DVC)
    dvc.chmod(dvc.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run([sys.executable, str(root / "scripts" / "timed_repro.py"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    return done, json.loads((tmp_path / "reports" / "pipeline.json").read_text())


def test_each_stage_is_timed_from_its_line_to_the_next(root, tmp_path):
    done, report = run_with_fake_dvc(root, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "> lingtune sft" in done.stdout  # dvc's output passes through
    stages = {row["stage"]: row for row in report["stages"]}
    assert list(stages) == ["backbone", "sft", "rl"]
    assert stages["backbone"] == {"stage": "backbone", "status": "skipped", "seconds": 0.0}
    assert stages["sft"]["status"] == "ran" and 0.5 <= stages["sft"]["seconds"] < 3
    assert stages["rl"]["status"] == "ran" and 0.2 <= stages["rl"]["seconds"] < 3
    assert report["returncode"] == 0 and report["command"] == "dvc repro"
    assert report["stages_seconds"] <= report["total_seconds"]
    assert report["machine"]["cpus"] >= 1


def test_a_failed_stage_is_reported_and_the_status_is_dvcs(root, tmp_path):
    done, report = run_with_fake_dvc(root, tmp_path, "--fail")
    assert done.returncode == 3
    assert report["returncode"] == 3 and report["command"] == "dvc repro --fail"
    assert report["stages"][-1]["stage"] == "rl" and report["stages"][-1]["status"] == "failed"
    assert report["stages"][1]["status"] == "ran"
