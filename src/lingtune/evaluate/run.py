"""Scoring generated answers, `lingtune eval` on any file, and the DVC stage `evaluate`.

The stage scores every variant on the test split (the table: test numbers only report), on the
validation split (`val/` keys in metrics.json, and each example's answer in `validation/`, which the
registry gate compares; lingtune.gate) and on the out-of-domain set the team wrote (`ood/` keys, a
breakdown per sector in ood.json, each answer in `ood/`; it only reports, like test). The registry's
champion is scored on validation too when its content is none of the variants' (a version from an
earlier run), so the gate compares the candidate with it on the same examples.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lingtune import tasks
from lingtune.artifacts import content_hash, publishing, write_json, write_jsonl, write_text
from lingtune.config import CostConfig
from lingtune.errors import DataError
from lingtune.formats import describe_ignored, read_jsonl, read_user_jsonl
from lingtune.models import ModelRef, folder_ref, merged_model
from lingtune.predictions import ScoredModel, example_rows, write_validation
from lingtune.records import Record

VAL = "val/"
"""Prefix of validation-split metrics in metrics.json and MLflow (test metrics have none / `test/`)."""
OOD = "ood/"
"""Prefix of the out-of-domain set's metrics in metrics.json and MLflow."""
UNSPECIFIED = "unspecified"
"""The sector of an out-of-domain record without a `sector` key."""


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


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
                  engine_cfg=None, predictions: Path | None = None, log=_stderr) -> dict:
    """`lingtune eval`: a user's file, whose keys beyond the neutral format are dropped (and named in the
    log); with `predictions`, one error-analysis line per example goes there (lingtune.predictions)."""
    from lingtune.engine import Engine, EngineConfig

    tasks.get(task)  # an unknown task fails before the engine starts
    loaded = read_user_jsonl(data, task=task)
    if note := describe_ignored(data, loaded.ignored):
        log(f"note: {note}")
    records = loaded.records
    if not records:
        raise DataError(f"{data}: no {task} records")
    engine = engine or Engine(ref.base, engine_cfg or EngineConfig(), enable_lora=ref.adapter is not None)
    started = time.time()
    answers = engine.generate(records, adapter=ref.adapter, constrained=constrained)
    metrics = score(task, records, answers)
    metrics["seconds"] = round(time.time() - started, 1)
    metrics["constrained"] = constrained
    if predictions is not None:
        write_jsonl(predictions, example_rows(records, answers))
        log(f"predictions: {len(records)} lines in {predictions}")
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


def summarise(results: dict, cost: CostConfig, gpus: int, validation: dict | None = None,
              ood: dict | None = None) -> dict:
    """metrics.json: per variant, every numeric test metric as `task.key`, validation metric as
    `val/task.key` and out-of-domain metric as `ood/task.key`, plus the `compute_hours` and `cost_usd` of
    its generation and scoring on all three (the sum of the seconds; the engine's start-up, shared by the
    variants, is in the stage run's cost only)."""
    from lingtune.tracking import run_cost

    summary = {}
    for name, r in results.items():
        val, outside = (validation or {}).get(name, {}), (ood or {}).get(name, {})
        seconds = sum(m["seconds"] for m in (*r.values(), *val.values(), *outside.values()))
        summary[name] = {**_flat(r), **_flat(val, VAL), **_flat(outside, OOD), **run_cost(cost, seconds, gpus)}
    return summary


def _flat(per_task: dict, prefix: str = "") -> dict:
    return {f"{prefix}{task}.{k}": v for task, m in per_task.items() for k, v in m.items()
            if isinstance(v, (int, float))}


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


def split_records(path: Path, limit: int) -> dict[str, list[Record]]:
    """Each task's records of a split, the first `limit` of each (0: all)."""
    return {task: read_jsonl(path, task=task)[: limit or None] for task in tasks.TASKS}


@dataclass
class OodSet:
    records: dict[str, list[Record]]
    sectors: dict[str, list[str]]
    """Per task, each record's sector, in the order of `records`."""


def ood_set(path: Path, limit: int) -> OodSet:
    """The out-of-domain set per task, the first `limit` of each (0: all). Read with the user-file reader
    on purpose: its records carry a `sector` key, which the pipeline's strict format does not define and
    the breakdown needs."""
    if not path.is_file():
        raise DataError(f"{path}: no out-of-domain set (`lingtune ood` builds it)")
    records, sectors = {}, {}
    for task in tasks.TASKS:
        loaded = read_user_jsonl(path, task=task)
        records[task] = loaded.records[: limit or None]
        sectors[task] = [str(extra.get("sector", UNSPECIFIED)) for extra in loaded.extras][: limit or None]
    return OodSet(records, sectors)


def runnable(found: dict[str, Variant]) -> tuple[dict[str, Variant], dict[str, str]]:
    """The variants vLLM can run here, and the reason for each it cannot (said in the log and in the table)."""
    from lingtune.models import unsupported_here

    skipped = {name: reason for name, v in found.items() if (reason := unsupported_here(v.ref.base))}
    for name, reason in skipped.items():
        _stderr(f"evaluate {name}: skipped: {reason}")
    return {name: v for name, v in found.items() if name not in skipped}, skipped


def scoring_ref(ref: ModelRef, cfg) -> ModelRef:
    """What vLLM runs to score `ref`: with `evaluate.merge_adapters`, an adapter merged into its base (the
    model the service serves by default), else `ref` itself."""
    if ref.adapter is None or not cfg.merge_adapters:
        return ref
    return ModelRef(merged_model(Path(ref.base), Path(ref.adapter), Path(cfg.merge_cache_dir)))


class Engines:
    """One vLLM engine per base model, started on first use, with LoRA support only where some model
    on that base is an adapter; `release` stops the engines no model still to come needs (each holds
    its weights and `kv_cache_gb` of KV cache)."""

    def __init__(self, cfg, refs: list[ModelRef]):
        self.cfg, self.lora = cfg, {str(r.base) for r in refs if r.adapter is not None}
        self.started: dict[str, object] = {}

    def get(self, ref: ModelRef):
        from lingtune.engine import Engine

        key = str(ref.base)
        if key not in self.started:
            self.started[key] = Engine(ref.base, self.cfg, enable_lora=key in self.lora)
        return self.started[key]

    def release(self, still_needed: list[ModelRef]) -> None:
        import gc

        for key in set(self.started) - {str(r.base) for r in still_needed}:
            del self.started[key]
        gc.collect()


def answer_split(engines: Engines, label: str, ref: ModelRef, records: dict[str, list[Record]],
                 constrained: bool) -> tuple[dict, dict[str, list[str]]]:
    """A model's metrics per task (with the seconds generation and scoring took) and its answers per task."""
    metrics, answers = {}, {}
    for task, recs in records.items():
        started = time.time()
        answers[task] = engines.get(ref).generate(recs, adapter=ref.adapter, constrained=constrained)
        metrics[task] = {**score(task, recs, answers[task]), "seconds": round(time.time() - started, 1)}
        _stderr(f"evaluate {label} {task}: {len(recs)} examples in {metrics[task]['seconds']:.0f} s")
    return metrics, answers


def run_split(engines: Engines, label: str, ref: ModelRef, records: dict[str, list[Record]],
              constrained: bool) -> tuple[dict, list[dict]]:
    """A model's metrics per task and one row per example."""
    metrics, answers = answer_split(engines, label, ref, records, constrained)
    return metrics, [row for task, recs in records.items() for row in example_rows(recs, answers[task])]


def run_ood(engines: Engines, label: str, ref: ModelRef, ood: OodSet, constrained: bool) -> tuple[dict, list[dict]]:
    """A model's metrics per task on the out-of-domain set, each with a `sectors` breakdown, and one row
    per example with its sector."""
    metrics, answers = answer_split(engines, f"{label} out-of-domain", ref, ood.records, constrained)
    rows = []
    for task, recs in ood.records.items():
        metrics[task]["sectors"] = sector_metrics(task, recs, answers[task], ood.sectors[task])
        rows += [{**row, "sector": sector} for row, sector in zip(example_rows(recs, answers[task]), ood.sectors[task])]
    return metrics, rows


def sector_metrics(task: str, records: list[Record], answers: list[str], sectors: list[str]) -> dict[str, dict]:
    """Each sector's count, summary metrics and invalid rate, scored as the whole set is."""
    keys = ("n", *tasks.get(task).summary_keys, "invalid_rate")
    breakdown = {}
    for sector in dict.fromkeys(sectors):
        picked = [i for i, s in enumerate(sectors) if s == sector]
        metrics = score(task, [records[i] for i in picked], [answers[i] for i in picked])
        breakdown[sector] = {k: metrics[k] for k in keys}
    return breakdown


def model_hash(ref: ModelRef) -> str:
    """The content hash `lingtune register` tags a version of this folder with."""
    return content_hash(ref.adapter or ref.base)


@dataclass
class Champion:
    ref: ModelRef
    uri: str
    version: str
    content_sha256: str


def champion_to_score(params, scored_hashes: set[str]) -> Champion | None:
    """The registry's champion, to score on validation beside the variants; None when there is none, when
    its content is a variant's (scored already), or when it cannot be scored here (the gate then says so)."""
    from lingtune.models import resolve, unsupported_here
    from lingtune.registry import CONTENT_TAG, alias_version, client, store_exists

    reg, uri = params.register_, params.tracking.uri
    found = alias_version(client(uri), reg.model_name, reg.champion_alias) if store_exists(uri) else None
    if found is None or found.tags.get(CONTENT_TAG) in scored_hashes:
        return None
    label = f"champion v{found.version}"
    if not found.tags.get(CONTENT_TAG):  # the gate finds answers by this tag: without it they would go unused
        _stderr(f"evaluate {label}: skipped: the version has no {CONTENT_TAG} tag")
        return None
    spec = f"models:/{reg.model_name}/{found.version}"  # the version looked up, even if the alias moves meanwhile
    ref = resolve(spec, uri, reg.cache_dir)
    if reason := unsupported_here(ref.base):
        _stderr(f"evaluate {label}: skipped: {reason}")
        return None
    return Champion(ref, spec, str(found.version), found.tags[CONTENT_TAG])


def run_evaluate(params) -> dict:
    """DVC stage `evaluate`: every variant on the held-back test split and on the validation split, and
    the registry's champion on validation (module docstring)."""
    from lingtune.engine import gpus
    from lingtune.tracking import run_cost

    started = time.time()
    cfg = params.evaluate
    test, val = (split_records(Path(params.data.out_dir) / f"{split}.jsonl", cfg.max_examples)
                 for split in ("test", "val"))
    ood = ood_set(Path(params.ood.out), cfg.max_examples)
    found, skipped = runnable(variants(params))
    hashes = {name: model_hash(v.ref) for name, v in found.items()}
    champion = champion_to_score(params, set(hashes.values()))
    runs = {name: scoring_ref(v.ref, cfg) for name, v in found.items()}
    champion_run = [scoring_ref(champion.ref, cfg)] if champion else []
    engines = Engines(engine_config(params), [*runs.values(), *champion_run])
    results, validation, outside, scored, ood_rows = {}, {}, {}, [], {}
    for i, (name, variant) in enumerate(found.items()):
        ref = runs[name]
        results[name], _ = run_split(engines, name, ref, test, cfg.constrained)
        validation[name], rows = run_split(engines, f"{name} validation", ref, val, cfg.constrained)
        outside[name], ood_rows[name] = run_ood(engines, name, ref, ood, cfg.constrained)
        scored.append(ScoredModel(name, str(variant.ref.adapter or variant.ref.base), hashes[name], rows))
        engines.release([*list(runs.values())[i + 1 :], *champion_run])
    if champion:
        _, rows = run_split(engines, f"champion v{champion.version} validation", champion_run[0], val,
                            cfg.constrained)
        scored.append(ScoredModel("champion", champion.uri, champion.content_sha256, rows, champion.version))
    out = Path(cfg.out_dir)
    summary = summarise(results, params.cost, gpus(), validation, outside)
    write_reports(out, results, summary, skipped, outside)
    write_answers(out / "ood", ood_rows)
    write_validation(out / "validation", str(Path(params.data.out_dir) / "val.jsonl"), scored)
    log_to_mlflow(params, found, summary, out, run_cost(params.cost, time.time() - started, gpus()))
    return results


def write_reports(out: Path, results: dict, summary: dict, skipped: dict[str, str], ood: dict | None = None) -> None:
    """metrics.json (all splits), details.json, table.md and the plots (the test split), ood.json (the
    out-of-domain metrics with their sector breakdown; table.md shows them below the test table)."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", summary)
    write_json(out / "details.json", results)
    costs = {name: m["cost_usd"] for name, m in summary.items()}
    table = comparison_table(results, costs) + "".join(
        f"\nNot evaluated on this machine: {name} ({reason}).\n" for name, reason in skipped.items())
    if ood:
        write_json(out / "ood.json", ood)
        table += "\nOut of domain (the team-written set, `lingtune ood`):\n\n" + comparison_table(ood, costs)
    write_text(out / "table.md", table)
    write_plots(results, out)


def write_answers(folder: Path, rows: dict[str, list[dict]]) -> None:
    """One file of per-example rows per model, the folder replaced whole (no file of an earlier run stays)."""
    with publishing(folder) as staging:
        for name, model_rows in rows.items():
            write_jsonl(staging / f"{name}.jsonl", model_rows)


def log_to_mlflow(params, found: dict, summary: dict, out: Path, cost: dict[str, float]) -> None:
    """One run per variant: the run that trained it (test metrics under `test/`, so `test/cost_usd` sits
    beside the training's own `cost_usd`; validation metrics under `val/`, out-of-domain ones under
    `ood/`), or a run of its own for the base model; plus the stage's run holding the comparison table and
    plots, with the whole stage's `cost` (`compute_hours`, `cost_usd`)."""
    import mlflow

    from lingtune.tracking import stage_run

    mlflow.set_tracking_uri(params.tracking.uri)
    for name, variant in found.items():
        metrics = {k if k.startswith((VAL, OOD)) else f"test/{k}": v for k, v in summary[name].items()}
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
