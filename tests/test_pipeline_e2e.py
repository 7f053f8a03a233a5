"""`dvc repro` of the whole pipeline (backbone -> prepare -> validate, ood -> sft, sft_full -> reward -> rl ->
quantize -> evaluate -> register) in a scratch copy of the project (SmolLM2, small data, a few steps of
everything): it runs, a second run skips everything, and a validation failure stops the pipeline before
a downstream stage writes anything."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow


def run(cmd, cwd, env):
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)


@pytest.fixture(scope="module")
def project(root, tmp_path_factory):
    work = tmp_path_factory.mktemp("project")
    for item in ("dvc.yaml", "params.yaml", "src", "requirements", "data/ood/source.txt"):
        (work / item).parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if (root / item).is_dir() else shutil.copy)(root / item, work / item)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["backbone"].update(name="smollm2-135m", verify_tokens=6)
    params["data"]["sentiment"]["total"] = 200
    params["data"]["ner"].update(characters=3000, train_extra_characters=3000)  # the train-only extras run too
    params["sft"].update(max_steps=4, batch_size=2, val_batches=1, checkpoint_every_n_steps=2, val_every_n_steps=2)
    params["sft_full"].update(max_steps=2)
    # Untrained answers run to the NER token limit: 256 tokens made evaluate 7 of the test's 14 minutes.
    params["evaluate"].update(max_examples=8, max_tokens_ner=32)
    params["reward"].update(prompts_per_task=2, samples=2, max_new_tokens=24)
    params["rl"].update(max_steps=2, prompts_per_step=1, num_generations=2, max_completion_length=24, save_steps=1)
    # RTN needs no calibration; SmolLM2's 576-wide layers take groups of 64. The quantize env is the
    # project's own (created once by the stage), not a new one per scratch copy.
    params["quantize"].update(method="rtn", group_size=64, env_dir=str(root / ".venv-quant"))
    (work / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "config", "core.analytics", "false"]):
        assert run(cmd, work, env).returncode == 0
    return work, env


def test_repro_runs_then_skips(root, project):
    """`make pipeline`'s command: dvc repro through scripts/timed_repro.py, which times each stage."""
    work, env = project
    timed_repro = [sys.executable, str(root / "scripts" / "timed_repro.py")]
    first = run(timed_repro, work, env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert (work / "models/backbone/model.safetensors").is_file()
    assert (work / "data/processed/test.jsonl").is_file()
    assert (work / "reports/validation.json").is_file()
    stages = ("backbone", "prepare", "validate", "ood", "sft", "sft_full", "reward", "rl", "quantize", "evaluate",
              "register")
    timed = json.loads((work / "reports/pipeline.json").read_text())
    assert timed["returncode"] == 0 and {row["stage"] for row in timed["stages"]} == set(stages)
    assert all(row["status"] == "ran" and row["seconds"] > 0 for row in timed["stages"]), timed
    assert timed["stages_seconds"] <= timed["total_seconds"]
    second = run(timed_repro, work, env)
    assert second.returncode == 0
    assert all(row["status"] == "skipped" for row in json.loads((work / "reports/pipeline.json").read_text())["stages"])
    assert (work / "models/sft/adapter_model.safetensors").is_file()
    assert (work / "reports/sft.json").is_file()
    table = (work / "reports/eval/table.md").read_text()
    from lingtune.engine import unsupported_here

    int4_here = unsupported_here(work / "models/int4") is None  # vLLM's AVX2 build has no INT4 kernel
    assert ("| int4 |" in table) == int4_here and ("Not evaluated on this machine: int4" in table) != int4_here
    for variant in ("base", "sft", "sft-full", "rl"):
        assert f"| {variant} |" in table
    metrics = json.loads((work / "reports/eval/metrics.json").read_text())
    assert {"ood/sentiment.macro_f1", "ood/ner.f1"} <= set(metrics["sft"])  # the out-of-domain set, beside test
    assert (work / "models/rl/adapter_model.safetensors").is_file()
    assert (work / "models/int4/config.json").is_file()
    assert "champion" in (work / "reports/register.json").read_text()
    for stage in stages:
        assert f"Stage '{stage}' didn't change, skipping" in second.stdout
    stats = run(["lingtune", "data", "stats", "--json"], work, env)
    assert '"total": 200' in stats.stdout


def test_validation_failure_stops_downstream(project):
    work, env = project
    pipeline = yaml.safe_load((work / "dvc.yaml").read_text())
    pipeline["stages"]["downstream"] = {"cmd": "echo trained > downstream.txt",
                                        "deps": ["reports/validation.json"], "outs": ["downstream.txt"]}
    (work / "dvc.yaml").write_text(yaml.safe_dump(pipeline))
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["validate"]["positive_share"] = [0.9, 1.0]  # the balanced data now breaks the contract
    (work / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True))
    result = run(["dvc", "repro"], work, env)
    assert result.returncode != 0
    assert "positive_share" in result.stderr and "train.jsonl" in result.stderr
    assert not (work / "downstream.txt").exists()
