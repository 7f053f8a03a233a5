"""Scoring generated answers, `lingtune eval` on any file, and the DVC stage `evaluate`."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from lingtune.data.formats import Record, read_jsonl
from lingtune.data.prompts import locate_entities, parse_answer
from lingtune.evaluate.metrics import Span, ner_metrics, sentiment_metrics


def predicted_spans(text: str, answer: str) -> list[Span] | None:
    """Spans of an NER answer (offset rule in prompts.locate_entities); None if it does not parse.
    An entity whose text is not in the input stays a prediction that can never match (a false positive)."""
    parsed = parse_answer("ner", answer)
    if not parsed.valid:
        return None
    located, unlocated = locate_entities(text, parsed.entities)
    return [(e.start, e.end, e.type) for e in located] + [(-1 - k, -1, t) for k, (_, t) in enumerate(unlocated)]


def score(task: str, records: list[Record], answers: list[str]) -> dict:
    if task == "sentiment":
        return sentiment_metrics([r.label for r in records], [parse_answer(task, a).label for a in answers])
    gold = [[(e.start, e.end, e.type) for e in r.entities] for r in records]
    return ner_metrics(gold, [predicted_spans(r.text, a) for r, a in zip(records, answers)])


@dataclass
class ModelRef:
    """What to evaluate: a base model folder and, for LoRA, an adapter folder on top of it."""

    base: Path
    adapter: Path | None


def adapter_base(folder: Path, backbone_dir: str) -> Path:
    """The base model an adapter folder was trained on (its adapter_config); the backbone when that
    folder does not exist here."""
    base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path") or backbone_dir
    return Path(base if Path(base).is_dir() else backbone_dir)


def resolve_model(spec: str | None, backbone_dir: str, default_dir: str,
                  tracking_uri: str = "sqlite:///mlflow.db", cache_dir: str = ".cache/registry") -> ModelRef:
    """A folder (model or LoRA adapter), or a registered version: `models:/name@alias`, `models:/name/3`
    (downloaded once to `cache_dir`; an adapter runs on the base its version's tags name)."""
    spec = spec or default_dir
    if spec.startswith("models:/"):
        from lingtune.registry import fetch

        got = fetch(spec, tracking_uri, cache_dir)
        if got.kind != "lora":
            return ModelRef(got.folder, None)
        base = got.base_model if got.base_model and Path(got.base_model).is_dir() else backbone_dir
        return ModelRef(Path(base), got.folder)
    path = Path(spec)
    if (path / "adapter_config.json").is_file():
        return ModelRef(adapter_base(path, backbone_dir), path)
    if (path / "config.json").is_file():
        return ModelRef(path, None)
    raise ValueError(f"{spec}: neither a model folder (config.json) nor a LoRA adapter (adapter_config.json)")


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


def evaluate_file(ref: ModelRef, data: Path, task: str, constrained: bool = True, engine=None) -> dict:
    from lingtune.evaluate.engine import Engine

    if task not in ("sentiment", "ner"):
        raise ValueError(f"--task must be sentiment or ner, not {task!r}")
    records = read_jsonl(data, task=task)
    if not records:
        raise ValueError(f"{data}: no {task} records")
    engine = engine or Engine(ref.base, enable_lora=ref.adapter is not None)
    started = time.time()
    answers = engine.generate(records, adapter=ref.adapter, constrained=constrained)
    metrics = score(task, records, answers)
    metrics["seconds"] = round(time.time() - started, 1)
    metrics["constrained"] = constrained
    return metrics


def _model_at(path: Path, backbone_dir: str) -> ModelRef | None:
    if (path / "adapter_config.json").is_file():
        return ModelRef(Path(backbone_dir), path)
    if (path / "config.json").is_file():
        return ModelRef(path, None)
    return None


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
    found = {"base": Variant(ModelRef(Path(backbone), None), None)}
    for name, folder, metrics in candidates:
        ref = _model_at(Path(folder), backbone)
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


def comparison_table(results: dict) -> str:
    lines = ["| variant | sentiment acc | sentiment macro-F1 | sentiment invalid | NER P | NER R | NER F1 | NER invalid |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        s, n = r["sentiment"], r["ner"]
        lines.append(f"| {name} | {s['accuracy']:.1%} | {s['macro_f1']:.1%} | {s['invalid_rate']:.1%} | "
                     f"{n['precision']:.1%} | {n['recall']:.1%} | {n['f1']:.1%} | {n['invalid_rate']:.1%} |")
    return "\n".join(lines) + "\n"


def write_plots(results: dict, out_dir: Path) -> None:
    """One file per variant in two folders that dvc.yaml declares as plots: `confusion/` (one row per
    test example, as DVC's confusion template counts rows) and `ner_per_type/` (bars per entity type)."""
    for folder in ("confusion", "ner_per_type"):
        shutil.rmtree(out_dir / folder, ignore_errors=True)
        (out_dir / folder).mkdir(parents=True)
    for name, r in results.items():
        rows = ["actual,predicted"] + [f"{row['actual']},{row['predicted']}"
                                       for row in r["sentiment"]["confusion"] for _ in range(row["count"])]
        (out_dir / "confusion" / f"{name}.csv").write_text("\n".join(rows) + "\n")
        bars = ["type,precision,recall,f1"] + [f"{etype},{m['precision']:.4f},{m['recall']:.4f},{m['f1']:.4f}"
                                              for etype, m in r["ner"]["per_type"].items()]
        (out_dir / "ner_per_type" / f"{name}.csv").write_text("\n".join(bars) + "\n")


def run_evaluate(params) -> dict:
    """DVC stage `evaluate`: every variant on the held-back test split, one vLLM engine for all
    variants that share the backbone (LoRA adapters are applied per request)."""
    from lingtune.evaluate.engine import Engine, EngineConfig

    cfg = params.evaluate
    test = Path(params.data.out_dir) / "test.jsonl"
    records = {task: read_jsonl(test, task=task)[: cfg.max_examples or None] for task in ("sentiment", "ner")}
    engine_cfg = EngineConfig(max_tokens_ner=cfg.max_tokens_ner, kv_cache_gb=cfg.kv_cache_gb,
                              cpu_threads_bind=cfg.cpu_threads_bind)
    found = variants(params)
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
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = {name: {f"{task}.{k}": v for task, m in r.items() for k, v in m.items()
                      if isinstance(v, (int, float))} for name, r in results.items()}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    (out / "details.json").write_text(json.dumps(results, indent=2))
    (out / "table.md").write_text(comparison_table(results))
    write_plots(results, out)
    log_to_mlflow(params, found, summary, out)
    return results


def log_to_mlflow(params, found: dict, summary: dict, out: Path) -> None:
    """One run per variant: the run that trained it (metrics under `test/`), or a run of its own for
    the base model; plus the stage's run holding the comparison table and plots."""
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
        mlflow.log_artifacts(str(out), "evaluation")


def _run_exists(uri: str, run_id: str) -> bool:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        MlflowClient(uri).get_run(run_id)
        return True
    except MlflowException:
        return False
