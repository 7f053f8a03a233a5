"""Scoring generated answers, `lingtune eval` on any file, and the DVC stage `evaluate`."""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lingtune import tasks
from lingtune.artifacts import write_json, write_text
from lingtune.config import CostConfig
from lingtune.formats import evaluation_records, read_jsonl
from lingtune.errors import DataError
from lingtune.models import ModelRef, folder_ref
from lingtune.records import Record


def score(task: str, records: list[Record], answers: list[str]) -> dict:
    return tasks.get(task).metrics(records, answers)


def engine_config(params):
    """The vLLM engine of evaluation, from params.evaluate (LoRA rank from the SFT recipe)."""
    from lingtune.engine import EngineConfig

    cfg = params.evaluate
    return EngineConfig(max_model_len=cfg.max_model_len, max_lora_rank=cfg.max_lora_rank,
                        kv_cache_gb=cfg.kv_cache_gb, max_tokens_ner=cfg.max_tokens_ner,
                        cpu_threads_bind=cfg.cpu_threads_bind)


def default_model(params) -> str:
    """What `lingtune eval` scores without --model: the registry's champion once there is one,
    else the pipeline's latest trained variant (RL, then LoRA SFT)."""
    from lingtune.registry import alias_version, client, store_exists

    reg = params.register_
    if store_exists(params.tracking.uri) and alias_version(client(params.tracking.uri), reg.model_name,
                                                           reg.champion_alias) is not None:
        return f"models:/{reg.model_name}@{reg.champion_alias}"
    for folder in (params.rl.out_dir, params.sft.out_dir):
        if Path(folder).is_dir():
            return folder
    return params.sft.out_dir


def evaluate_file(ref: ModelRef, data: Path, task: str, constrained: bool = True, engine=None,
                  engine_cfg=None) -> dict:
    from lingtune.engine import Engine, EngineConfig

    tasks.get(task)  # an unknown task fails before the engine starts
    records = read_jsonl(data, task=task)
    if not records:
        raise DataError(f"{data}: no {task} records")
    engine = engine or Engine(ref.base, engine_cfg or EngineConfig(), enable_lora=ref.adapter is not None)
    started = time.time()
    answers = engine.generate(records, adapter=ref.adapter, constrained=constrained)
    metrics = score(task, records, answers)
    metrics["seconds"] = round(time.time() - started, 1)
    metrics["constrained"] = constrained
    return metrics


@dataclass
class Variant:
    ref: ModelRef
    training_run_id: str | None
    """The MLflow run that produced the weights; its evaluation is logged there too."""


def variants(params) -> dict[str, Variant]:
    """Every variant that exists, in pipeline order: base (zero-shot with the same template), the
    LoRA SFT, the full-parameter baseline, RL on top of SFT, and the INT4 model."""
    backbone = params.backbone.out_dir
    candidates = [("sft", params.sft.out_dir, params.sft.metrics),
                  ("sft-full", params.sft_full.out_dir, params.sft_full.metrics)]
    if hasattr(params, "rl"):
        candidates.append(("rl", params.rl.out_dir, params.rl.metrics))
    if hasattr(params, "quantize"):
        candidates.append(("int4", params.quantize.out_dir, None))
    found = {"base": Variant(ModelRef(Path(backbone)), None)}
    for name, folder, metrics in candidates:
        ref = folder_ref(folder)
        if ref is not None:
            found[name] = Variant(ref, _training_run_id(metrics))
    return found


def _training_run_id(metrics_file: str | None) -> str | None:
    if not metrics_file or not Path(metrics_file).is_file():
        return None
    try:
        return json.loads(Path(metrics_file).read_text()).get("mlflow_run_id")
    except (ValueError, AttributeError):
        return None


def comparison_table(results: dict, costs: dict[str, float] | None = None) -> str:
    """One row per variant: each task's summary metrics and its invalid-answer rate, in percent, and
    what its evaluation cost (`cost_usd` of `summarise`; – where not given)."""
    costs = costs or {}
    columns = [(task, key) for task, spec in tasks.TASKS.items() for key in (*spec.summary_keys, "invalid_rate")]
    lines = ["| variant | " + " | ".join(f"{task} {key.replace('_rate', '')}" for task, key in columns)
             + " | cost USD |", "|---|" + "---:|" * (len(columns) + 1)]
    for name, r in results.items():
        cost = f"{costs[name]:.4f}" if name in costs else "–"
        lines.append(f"| {name} | " + " | ".join(f"{r[task][key]:.1%}" for task, key in columns) + f" | {cost} |")
    return "\n".join(lines) + "\n"


def summarise(results: dict, cost: CostConfig, gpus: int) -> dict:
    """metrics.json: per variant, every numeric metric as `task.key`, plus the `compute_hours` and
    `cost_usd` of its generation and scoring (the sum of its tasks' seconds; the engine's start-up,
    shared by the variants, is in the stage run's cost only)."""
    from lingtune.tracking import run_cost

    summary = {}
    for name, r in results.items():
        seconds = sum(m["seconds"] for m in r.values())
        summary[name] = {**{f"{task}.{k}": v for task, m in r.items() for k, v in m.items()
                            if isinstance(v, (int, float))}, **run_cost(cost, seconds, gpus)}
    return summary


def write_plots(results: dict, out_dir: Path) -> None:
    """One file per variant in two folders that dvc.yaml declares as plots: `confusion/` (the
    classification task's rows, one per test example, as DVC's confusion template counts rows) and
    `ner_per_type/` (bars per entity type)."""
    for folder in ("confusion", "ner_per_type"):
        shutil.rmtree(out_dir / folder, ignore_errors=True)
        (out_dir / folder).mkdir(parents=True)
    for name, r in results.items():
        for metrics in r.values():
            if "confusion" in metrics:
                rows = ["actual,predicted"] + [f"{row['actual']},{row['predicted']}"
                                               for row in metrics["confusion"] for _ in range(row["count"])]
                write_text(out_dir / "confusion" / f"{name}.csv", "\n".join(rows) + "\n")
            if "per_type" in metrics:
                bars = ["type,precision,recall,f1"] + [f"{t},{m['precision']:.4f},{m['recall']:.4f},{m['f1']:.4f}"
                                                      for t, m in metrics["per_type"].items()]
                write_text(out_dir / "ner_per_type" / f"{name}.csv", "\n".join(bars) + "\n")


def run_evaluate(params) -> dict:
    """DVC stage `evaluate`: every variant on the held-back test split, one vLLM engine for all
    variants that share the backbone (LoRA adapters are applied per request)."""
    from lingtune.engine import Engine, gpus, unsupported_here
    from lingtune.tracking import run_cost

    started = time.time()
    cfg = params.evaluate
    test = Path(params.data.out_dir) / "test.jsonl"
    records = evaluation_records(test, cfg.max_examples)
    engine_cfg = engine_config(params)
    found, skipped = variants(params), {}
    for name, variant in list(found.items()):
        if reason := unsupported_here(variant.ref.base):  # said in the log and in details.json, not hidden
            print(f"evaluate {name}: skipped: {reason}", file=sys.stderr, flush=True)
            skipped[name] = reason
            del found[name]
    results, engines = {}, {}
    for name, variant in found.items():
        ref = variant.ref
        key = str(ref.base)
        if key not in engines:  # LoRA support only where some variant on this base needs it
            needs_lora = any(v.ref.adapter is not None for v in found.values() if str(v.ref.base) == key)
            engines[key] = Engine(ref.base, engine_cfg, enable_lora=needs_lora)
        engine = engines[key]
        results[name] = {}
        for task, recs in records.items():
            started = time.time()
            answers = engine.generate(recs, adapter=ref.adapter, constrained=cfg.constrained)
            results[name][task] = {**score(task, recs, answers), "seconds": round(time.time() - started, 1)}
            print(f"evaluate {name} {task}: {len(recs)} examples in {results[name][task]['seconds']:.0f} s",
                  file=sys.stderr, flush=True)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(results, params.cost, gpus())
    write_json(out / "metrics.json", summary)
    write_json(out / "details.json", results)
    costs = {name: m["cost_usd"] for name, m in summary.items()}
    write_text(out / "table.md", comparison_table(results, costs) + "".join(
        f"\nNot evaluated on this machine: {name} ({reason}).\n" for name, reason in skipped.items()))
    write_plots(results, out)
    log_to_mlflow(params, found, summary, out, run_cost(params.cost, time.time() - started, gpus()))
    return results


def log_to_mlflow(params, found: dict, summary: dict, out: Path, cost: dict[str, float]) -> None:
    """One run per variant: the run that trained it (metrics under `test/`, so `test/cost_usd` sits beside
    the training's own `cost_usd`), or a run of its own for the base model; plus the stage's run holding
    the comparison table and plots, with the whole stage's `cost` (`compute_hours`, `cost_usd`)."""
    import mlflow

    from lingtune.tracking import stage_run

    mlflow.set_tracking_uri(params.tracking.uri)
    for name, variant in found.items():
        metrics = {f"test/{k}": v for k, v in summary[name].items()}
        tags = {"lingtune.variant": name}
        if variant.training_run_id and _run_exists(params.tracking.uri, variant.training_run_id):
            with mlflow.start_run(run_id=variant.training_run_id):
                mlflow.log_metrics(metrics)
                mlflow.set_tags({"lingtune.evaluated": "true"})
        else:
            with stage_run(params.tracking, f"evaluate-{name}", {"evaluate": params.evaluate.model_dump()}, tags):
                mlflow.log_metrics(metrics)
    with stage_run(params.tracking, "evaluate", {"evaluate": params.evaluate.model_dump()},
                   {"lingtune.variants": ",".join(found)}):
        mlflow.log_metrics({f"{name}.{k}": v for name, m in summary.items() for k, v in m.items()})
        mlflow.log_metrics(cost)
        mlflow.log_artifacts(str(out), "evaluation")


def _run_exists(uri: str, run_id: str) -> bool:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        MlflowClient(uri).get_run(run_id)
        return True
    except MlflowException:
        return False
