"""The SFT stage on a tiny model: loss goes down, kill -9 and resume is bit-identical, DDP with two
gloo processes, nf4 (QLoRA), full fine-tuning, MLflow read-back, and a non-finite loss."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml
from safetensors.torch import load_file

from conftest import make_sft_project
from lingtune.config import CostConfig

BASE_SFT = {"max_steps": 30, "batch_size": 4, "lr": 0.01, "warmup_steps": 2, "val_every_n_steps": 10,
            "val_batches": 2, "checkpoint_every_n_steps": 5, "log_every_n_steps": 1, "max_seq_len": 160,
            "lora": {"dropout": 0.1},  # dropout on: resume must also reproduce the masks
            "compile": "none"}  # on a tiny model, compiling `layers` costs minutes of CI and saves nothing;
# the compiled layers are tested where they matter: the loss they give (test_golden.py) and the stage with the
# shipped params (test_pipeline_e2e.py).


def make_project(root: Path, tmp: Path, **sft) -> Path:
    return make_sft_project(root, tmp, {**BASE_SFT, **sft})


def sft_command():
    return [sys.executable, "-m", "lingtune.cli", "sft"]


def run_sft(project: Path, timeout=600) -> subprocess.CompletedProcess:
    result = subprocess.run(sft_command(), cwd=project, capture_output=True, text=True, timeout=timeout)
    return result


def metrics(project: Path) -> dict:
    return json.loads((project / "reports" / "sft.json").read_text())


def adapter(project: Path) -> dict:
    return load_file(project / "models" / "sft" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(root, tmp_path_factory):
    project = make_project(root, tmp_path_factory.mktemp("sft-a"))
    result = run_sft(project)
    assert result.returncode == 0, result.stderr[-3000:]
    return project


@pytest.fixture
def finished_copy(uninterrupted, tmp_path) -> Path:
    """This test's own copy of the finished project, for a test that changes it: the module's project
    stays as it was trained, whatever order the tests run in. The copy gets a fresh MLflow store (the
    original's experiment records an absolute artifact folder inside the original project)."""
    project = tmp_path / "copy"
    shutil.copytree(uninterrupted, project, ignore=shutil.ignore_patterns("mlflow.db", "mlruns"))
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["tracking"]["uri"] = f"sqlite:///{project}/mlflow.db"
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    return project


def test_a_few_steps_lower_the_loss(uninterrupted):
    m = metrics(uninterrupted)
    assert m["steps"] == 30 and m["method"] == "lora"
    curve = (uninterrupted / "reports" / "sft_loss.csv").read_text().splitlines()
    assert curve[0] == "step,loss" and len(curve) == 31
    assert m["final_loss"] < m["first_loss"] - 0.25  # measured here: 7.55 -> 7.09
    assert (uninterrupted / "models" / "sft" / "adapter_config.json").is_file()


def test_mlflow_run_reads_back(uninterrupted):
    run_id = metrics(uninterrupted)["mlflow_run_id"]
    client = mlflow.MlflowClient(f"sqlite:///{uninterrupted}/mlflow.db")
    run = client.get_run(run_id)
    assert run.data.tags["lingtune.stage"] == "sft" and "data.train.sha256" in run.data.tags
    assert run.data.params["sft.lora.r"] == "8" and run.data.params["sft.max_steps"] == "30"
    assert len(client.get_metric_history(run_id, "train/loss")) >= 20
    assert "val/loss" in run.data.metrics
    assert any(key.startswith("system/") for key in run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run_id, "adapter")}
    assert "adapter/adapter_model.safetensors" in artifacts
    m = metrics(uninterrupted)  # on the CPU: machine-hours at the CPU price, the stage's wall time
    assert run.data.metrics["compute_hours"] == m["compute_hours"] > 0
    assert m["compute_hours"] == pytest.approx(m["wall_seconds_this_run"] / 3600, abs=1e-4)
    assert run.data.metrics["cost_usd"] == m["cost_usd"] == pytest.approx(
        m["compute_hours"] * CostConfig().usd_per_cpu_hour, abs=1e-6)


def test_sigkill_then_resume_is_bit_identical(root, tmp_path, uninterrupted):
    project = make_project(root, tmp_path / "b")
    process = subprocess.Popen(sft_command(), cwd=project, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = project / "models" / "sft_checkpoints" / "last.ckpt"
    deadline = time.time() + 600
    while not checkpoint.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.02)
    assert checkpoint.exists(), "no checkpoint was written before the deadline (machine too busy?)"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (project / "models" / "sft").exists(), "the run finished before it could be killed"
    resumed = run_sft(project)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    a, b = adapter(uninterrupted), adapter(project)
    assert a and a.keys() == b.keys()
    assert all((a[k] == b[k]).all() for k in a), "resumed adapter differs from the uninterrupted one"
    assert metrics(project)["mlflow_run_id"] == json.loads(
        (project / "models" / "sft_checkpoints" / "lingtune_run.json").read_text())["mlflow_run_id"]


def test_changed_config_does_not_resume_old_checkpoints(uninterrupted, finished_copy):
    params = yaml.safe_load((finished_copy / "params.yaml").read_text())
    params["sft"]["lr"] = 0.005
    (finished_copy / "params.yaml").write_text(yaml.safe_dump(params))
    result = run_sft(finished_copy)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "checkpoints of another configuration; starting afresh" in result.stdout
    assert metrics(finished_copy)["steps"] == 30
    old, new = adapter(uninterrupted), adapter(finished_copy)
    assert any(not (old[k] == new[k]).all() for k in old), "the new learning rate was not trained"


def test_ddp_with_two_gloo_processes(root, tmp_path):
    project = make_project(root, tmp_path, strategy="ddp", devices=2, max_steps=6, checkpoint_every_n_steps=3)
    result = run_sft(project)
    assert result.returncode == 0, result.stderr[-3000:]
    m = metrics(project)
    assert m["steps"] == 6
    assert "distributed_backend=gloo" in result.stderr + result.stdout


def test_qlora_path(root, tmp_path):
    project = make_project(root, tmp_path, max_steps=8, quantization="nf4", compile="loss")
    result = run_sft(project)
    assert result.returncode == 0, result.stderr[-3000:]
    m = metrics(project)
    assert m["final_loss"] < m["first_loss"] and m["quantization"] == "nf4"
    assert "adapter_model.safetensors" in {p.name for p in (project / "models" / "sft").iterdir()}


def test_full_baseline_trains_beside_the_adapter(root, tmp_path):
    """`lingtune sft --full` (stage sft_full): the sft recipe with sft_full's overrides, own folders."""
    project = make_project(root, tmp_path, max_steps=8)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["sft_full"] = {"lr": 0.001, "max_steps": 8}  # the full baseline has its own lr and step budget
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    result = subprocess.run(sft_command() + ["--full"], cwd=project, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    m = json.loads((project / "reports" / "sft_full.json").read_text())
    assert m["method"] == "full" and m["steps"] == 8 and m["final_loss"] < m["first_loss"]
    assert m["trainable_parameters"] > 30_000
    assert "model.safetensors" in {p.name for p in (project / "models" / "sft_full").iterdir()}
    assert not (project / "models" / "sft").exists()  # the LoRA variant's folders are untouched


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_non_finite_loss_never_writes_weights(root, tmp_path, policy):
    project = make_project(root, tmp_path, max_steps=8, lr=1e30, on_nonfinite=policy, precision="32-true")
    result = run_sft(project)
    assert result.returncode == 2
    assert "error:" in result.stderr and ("non-finite" in result.stderr or "NaN/inf" in result.stderr)
    assert "Traceback" not in result.stderr
    assert not (project / "models" / "sft").exists()


def test_the_optimizer_is_fused_adamw_over_trainable_weights_only():
    """The fused kernel is what keeps full fine-tuning's update cheap (benchmarks/train_speed.py
    `fused_adamw_speedup_full`: `full` against `full-unfused`); torch's default AdamW would train the same,
    only slower, so only this test notices."""
    import torch

    from lingtune.config import SFTConfig
    from lingtune.train.sft import build_optimizer

    model = torch.nn.Linear(4, 4)
    model.bias.requires_grad_(False)
    cfg = SFTConfig(lr=3e-4, weight_decay=0.05)
    optimizer = build_optimizer(model, cfg)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"] is True
    assert [p for group in optimizer.param_groups for p in group["params"]] == [model.weight]
    assert optimizer.defaults["lr"] == 3e-4 and optimizer.defaults["weight_decay"] == 0.05
    model(torch.randn(2, 4)).sum().backward()
    before = model.weight.detach().clone()
    optimizer.step()
    assert not torch.equal(before, model.weight)


def test_gradients_are_clipped_with_the_fused_optimizer():
    """Lightning's own clipping refuses fused optimizers under mixed precision; SFTModule clips itself
    (bf16 has no gradient scaler), so the norm after the hook is at most the Trainer's clip value."""
    from types import SimpleNamespace

    import torch

    from lingtune.config import SFTConfig
    from lingtune.train.sft import SFTModule, build_optimizer

    model = torch.nn.Linear(8, 8)
    optimizer = build_optimizer(model, SFTConfig(precision="bf16-mixed"))
    (1000 * model(torch.randn(4, 8))).sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])) > 10
    module = SimpleNamespace(cfg=SFTConfig(precision="bf16-mixed"))
    SFTModule.configure_gradient_clipping(module, optimizer, 1.0, "norm")
    assert torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])) <= 1.0 + 1e-5


def test_a_per_task_adapter_sees_only_its_task(root, tmp_path):
    """`sft.tasks: [ner]`: the run trains and validates on NER rows only, and says so in its metrics."""
    project = make_project(root, tmp_path, max_steps=4, tasks=["ner"], max_seq_len=512,  # sentences run longer
                           out_dir="models/sft_ner")  # not the folder the later stages take for every task
    result = run_sft(project)
    assert result.returncode == 0, result.stderr[-3000:]
    m = metrics(project)
    curve = json.loads((project / "models" / "sft_snapshots" / "curve.json").read_text())
    rows = [json.loads(line) for line in (project / "data/processed/train.jsonl").read_text().splitlines()]
    ner_rows = sum(1 for row in rows if "entities" in row)
    assert m["tasks"] == ["ner"] and 0 < ner_rows < len(rows)
    assert curve["train_examples"] + m["dropped_long_examples"] == ner_rows


def test_a_listed_task_without_rows_is_an_error(tmp_path):
    from conftest import write_jsonl
    from lingtune.errors import DataError
    from lingtune.train.sft import task_rows

    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "很好", "task": "sentiment", "label": "positive"}])
    assert [record.label for record in task_rows(path, ["sentiment"])] == ["positive"]
    with pytest.raises(DataError, match="no ner rows, but sft.tasks lists"):
        task_rows(path, ["sentiment", "ner"])
