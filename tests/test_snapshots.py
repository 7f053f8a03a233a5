"""Adapter snapshots of the SFT stage (lingtune.train.snapshots) on the tiny model: the folders and curve.json
of an uninterrupted run, the same curve after kill -9 and resume, and the config's refusals."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import make_sft_project
from lingtune.config import ConfigError, parse_params
from lingtune.models import folder_ref
from lingtune.train.snapshots import AdapterSnapshots, snapshot_name

SNAPSHOT_SFT = {"max_steps": 6, "batch_size": 4, "lr": 0.01, "warmup_steps": 1, "val_every_n_steps": 3,
                "val_batches": 1, "checkpoint_every_n_steps": 2, "log_every_n_steps": 1, "max_seq_len": 160,
                "compile": "none", "snapshot_every_n_steps": 2}
"""Eager (compiling would cost more than the six steps); validation at step 3 and 6, between snapshots."""


def sft(project: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lingtune.cli", "sft"], cwd=project, capture_output=True, text=True,
                          timeout=600)


def curve(project: Path) -> dict:
    return json.loads((project / "models" / "sft_snapshots" / "curve.json").read_text())


def weights(folder: Path) -> dict:
    return load_file(folder / "adapter_model.safetensors")


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


@pytest.fixture(scope="module")
def trained(root, tmp_path_factory) -> Path:
    project = make_sft_project(root, tmp_path_factory.mktemp("snapshots"), SNAPSHOT_SFT)
    done = sft(project)
    assert done.returncode == 0, done.stderr[-3000:]
    return project


def test_snapshots_every_n_steps_with_their_curve(trained):
    c = curve(trained)
    points = c["snapshots"]
    assert [p["step"] for p in points] == [2, 4, 6]
    assert c["examples_per_step"] == 4 and c["world_size"] == 1  # batch 4 x accumulate 1 x one process
    assert [p["examples_seen"] for p in points] == [8, 16, 24]
    assert c["train_examples"] > 0 and c["recipe"]["snapshot_every_n_steps"] == 2
    seconds = [p["train_seconds"] for p in points]
    assert 0 < seconds[0] < seconds[1] < seconds[2]
    assert all(p["train_loss"] > 0 for p in points)
    assert points[0]["val_loss"] is None and points[1]["val_step"] == 3 and points[2]["val_step"] == 6
    assert [p["path"] for p in points] == [snapshot_name(s) for s in (2, 4, 6)]


def test_a_snapshot_loads_like_the_stage_output(trained, monkeypatch):
    """The last snapshot is the final adapter, with the same files; each is an adapter on the backbone."""
    snapshots, final = trained / "models" / "sft_snapshots", trained / "models" / "sft"
    assert {p.name for p in (snapshots / "step-00006").iterdir()} == {p.name for p in final.iterdir()}
    assert same(weights(snapshots / "step-00006"), weights(final))
    assert not same(weights(snapshots / "step-00002"), weights(final))
    monkeypatch.chdir(trained)  # adapters record the backbone as the stage saw it, relative to the project
    ref = folder_ref(snapshots / "step-00002")
    assert ref.adapter == snapshots / "step-00002" and ref.base == Path("models/backbone")


def test_kill_and_resume_keeps_the_curve(root, tmp_path, trained):
    project = make_sft_project(root, tmp_path, SNAPSHOT_SFT)
    process = subprocess.Popen([sys.executable, "-m", "lingtune.cli", "sft"], cwd=project,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint, deadline = project / "models" / "sft_checkpoints" / "last.ckpt", time.time() + 600
    while not checkpoint.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL and not (project / "models" / "sft").exists(), "not killed mid-run"
    done = sft(project)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed, whole = curve(project)["snapshots"], curve(trained)["snapshots"]
    assert [(p["step"], p["examples_seen"]) for p in resumed] == [(p["step"], p["examples_seen"]) for p in whole]
    assert [p["train_loss"] for p in resumed] == pytest.approx([p["train_loss"] for p in whole], rel=1e-6)
    seconds = [p["train_seconds"] for p in resumed]
    assert seconds == sorted(seconds) and seconds[0] > 0
    assert same(weights(project / "models" / "sft_snapshots" / "step-00006"), weights(trained / "models" / "sft"))


class _Trainer:
    is_global_zero, world_size, global_step = True, 1, 0


def test_a_resumed_run_drops_later_snapshots_and_a_fresh_run_empties_the_folder(tmp_path):
    folder = tmp_path / "snapshots"
    for step in (2, 4):
        (folder / snapshot_name(step)).mkdir(parents=True)
    header = {"recipe": {"batch_size": 2, "accumulate_grad_batches": 3}}
    resumed = AdapterSnapshots(folder, 2, save=None, header=header)
    resumed.load_state_dict({"train_seconds": 10.0, "points": [{"step": 2, "path": snapshot_name(2)}], "val": None})
    resumed.on_train_start(_Trainer(), None)
    assert sorted(p.name for p in folder.iterdir()) == ["curve.json", "step-00002"]
    written = json.loads((folder / "curve.json").read_text())
    assert [p["step"] for p in written["snapshots"]] == [2] and written["examples_per_step"] == 6
    assert resumed.train_seconds() >= 10.0 and resumed.state_dict()["train_seconds"] >= 10.0

    AdapterSnapshots(folder, 2, save=None, header=header).on_train_start(_Trainer(), None)
    assert sorted(p.name for p in folder.iterdir()) == ["curve.json"]


def test_config_refuses_bad_snapshot_settings():
    with pytest.raises(ConfigError, match=r"sft\.snapshot_every_n_steps"):
        parse_params({"sft": {"snapshot_every_n_steps": -1}})
    with pytest.raises(ConfigError, match=r"snapshot_every_n_steps needs method lora.*540 MB"):
        parse_params({"sft": {"method": "full"}})
    assert parse_params({"sft": {"method": "full", "snapshot_every_n_steps": 0}}).sft.method == "full"
    params = parse_params({"sft": {"snapshot_every_n_steps": 7}})
    assert params.sft_full.snapshot_every_n_steps == 0  # the full baseline never snapshots unless it says so
    assert params.sft_full.snapshot_dir != params.sft.snapshot_dir
