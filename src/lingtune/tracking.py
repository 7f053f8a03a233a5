"""MLflow set-up shared by all stages: one store (a local sqlite file by default), one experiment,
one run per stage execution, tagged with the stage name and the git commit; and the cost metrics
(`compute_hours`, `cost_usd`) every training, reward and evaluation run logs."""

from __future__ import annotations

import logging
import subprocess
from contextlib import contextmanager
from typing import Iterator

from lingtune.config import CostConfig, TrackingConfig


def flatten(prefix: str, value: object) -> dict[str, object]:
    """{"a": {"b": 1}} -> {"a.b": 1}, for logging nested config sections as MLflow params."""
    if isinstance(value, dict):
        out: dict[str, object] = {}
        for key, sub in value.items():
            out.update(flatten(f"{prefix}.{key}" if prefix else str(key), sub))
        return out
    return {prefix: value}


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


@contextmanager
def stage_run(cfg: TrackingConfig, stage: str, params: dict | None = None, tags: dict | None = None,
              run_name: str | None = None, run_id: str | None = None) -> Iterator:
    """A new run of `stage` (params logged), or, with run_id, the interrupted run a resumed stage continues."""
    import mlflow

    logging.getLogger("alembic").setLevel(logging.WARNING)
    mlflow.set_tracking_uri(cfg.uri)
    mlflow.set_experiment(cfg.experiment)
    if run_id:
        with mlflow.start_run(run_id=run_id) as run:
            yield run
        return
    all_tags = {"lingtune.stage": stage, **({"git_commit": c} if (c := git_commit()) else {}), **(tags or {})}
    with mlflow.start_run(run_name=run_name or stage, tags=all_tags) as run:
        if params:
            mlflow.log_params(flatten("", params))
        yield run


def run_cost(cfg: CostConfig, seconds: float, gpus: int = 0, judge_usd: float = 0.0) -> dict[str, float]:
    """`compute_hours` and `cost_usd` of one stage run, for its MLflow metrics and its JSON report.

    compute_hours: the run's wall seconds / 3600, machine-hours of this machine (the other nodes of a
    multi-node run are not counted). cost_usd: those hours at `gpus` x usd_per_gpu_hour when the run used
    CUDA devices, else at usd_per_cpu_hour, plus what the judge's API requests cost (judge stats cost_usd).
    """
    hours = round(seconds / 3600, 6)  # 3.6 ms: finer than any stage's timing
    rate = gpus * cfg.usd_per_gpu_hour if gpus else cfg.usd_per_cpu_hour
    return {"compute_hours": hours, "cost_usd": round(hours * rate + judge_usd, 6)}
