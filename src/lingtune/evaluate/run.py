"""Scoring generated answers, `lingtune eval` on any file, and the DVC stage `evaluate`."""

from __future__ import annotations

import json
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


def resolve_model(spec: str | None, backbone_dir: str, default_dir: str) -> ModelRef:
    spec = spec or default_dir
    if spec.startswith("models:/"):
        raise ValueError(f"{spec}: the MLflow model registry is not part of lingtune yet (issue: registry); "
                         "pass a model or adapter folder")
    path = Path(spec)
    if (path / "adapter_config.json").is_file():
        base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path") or backbone_dir
        return ModelRef(Path(base if Path(base).is_dir() else backbone_dir), path)
    if (path / "config.json").is_file():
        return ModelRef(path, None)
    raise ValueError(f"{spec}: neither a model folder (config.json) nor a LoRA adapter (adapter_config.json)")


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


def variants(backbone_dir: str, sft_dir: str) -> dict[str, ModelRef]:
    """Every variant that exists: base (zero-shot) always, then the SFT output (adapter or full)."""
    found = {"base": ModelRef(Path(backbone_dir), None)}
    sft = Path(sft_dir)
    if (sft / "adapter_config.json").is_file():
        found["sft"] = ModelRef(Path(backbone_dir), sft)
    elif (sft / "config.json").is_file():
        found["sft-full"] = ModelRef(sft, None)
    return found


def comparison_table(results: dict) -> str:
    lines = ["| variant | sentiment acc | sentiment macro-F1 | sentiment invalid | NER P | NER R | NER F1 | NER invalid |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        s, n = r["sentiment"], r["ner"]
        lines.append(f"| {name} | {s['accuracy']:.1%} | {s['macro_f1']:.1%} | {s['invalid_rate']:.1%} | "
                     f"{n['precision']:.1%} | {n['recall']:.1%} | {n['f1']:.1%} | {n['invalid_rate']:.1%} |")
    return "\n".join(lines) + "\n"


def write_plots(results: dict, out_dir: Path) -> None:
    confusion = ["variant,actual,predicted,count"] + [
        f"{name},{row['actual']},{row['predicted']},{row['count']}"
        for name, r in results.items() for row in r["sentiment"]["confusion"]]
    per_type = ["variant,type,precision,recall,f1"] + [
        f"{name},{etype},{m['precision']:.4f},{m['recall']:.4f},{m['f1']:.4f}"
        for name, r in results.items() for etype, m in r["ner"]["per_type"].items()]
    (out_dir / "confusion.csv").write_text("\n".join(confusion) + "\n")
    (out_dir / "ner_per_type.csv").write_text("\n".join(per_type) + "\n")


def run_evaluate(params) -> dict:
    """DVC stage `evaluate`: every variant on the held-back test split, one vLLM engine for all
    variants that share the backbone (LoRA adapters are applied per request)."""
    from lingtune.evaluate.engine import Engine, EngineConfig
    from lingtune.tracking import stage_run

    cfg = params.evaluate
    test = Path(params.data.out_dir) / "test.jsonl"
    records = {task: read_jsonl(test, task=task)[: cfg.max_examples or None] for task in ("sentiment", "ner")}
    engine_cfg = EngineConfig(max_tokens_ner=cfg.max_tokens_ner, kv_cache_gb=cfg.kv_cache_gb)
    results, engines = {}, {}
    for name, ref in variants(params.backbone.out_dir, params.sft.out_dir).items():
        key = str(ref.base)
        engine = engines.get(key) or engines.setdefault(key, Engine(ref.base, engine_cfg))
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
    with stage_run(params.tracking, "evaluate", {"evaluate": cfg.model_dump()}) as _:
        import mlflow

        mlflow.log_metrics({f"{name}.{k}": v for name, m in summary.items() for k, v in m.items()})
        mlflow.log_artifacts(str(out), "evaluation")
    return results
