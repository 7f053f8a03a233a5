"""The MLflow model registry round trip on a temporary sqlite store: register, aliases, the promotion
gate (refuses a candidate better only by noise, accepts a clearly better one, reads the validation split
only), loading `models:/name@alias`, a failing store (an error, never "no champion"), and the download
cache (checked against the registered content). The gate's own cases: tests/test_gate.py."""

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from lingtune.config import parse_params
from lingtune.artifacts import content_hash
from lingtune.models import resolve as resolve_model
from lingtune.register import model_card, promote, run_register
from lingtune.errors import ModelError
from lingtune.predictions import ScoredModel, write_validation
from lingtune.registry import CONTENT_TAG, RegistryError, RegistryMissing, alias_version, client
from test_gate import CHAMPION, answers_for


def make_adapter(base: Path, out: Path, seed: int, std: float = 0.02) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    for name, weight in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: give every adapter its own non-trivial weights
            torch.nn.init.normal_(weight, std=std)
    model.save_pretrained(out)
    return out


def write_metrics(path: Path, sentiment_f1: float, ner_f1: float, test: tuple[float, float] | None = None,
                  variant: str = "sft", others: dict | None = None) -> None:
    """reports/eval/metrics.json: `val/` (validation) scores, and test scores (the same unless `test` says)."""
    test_s, test_n = test or (sentiment_f1, ner_f1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"base": {"sentiment.macro_f1": 0.3, "ner.f1": 0.0, "val/sentiment.macro_f1": 0.3,
                                         "val/ner.f1": 0.0},
                                variant: {"sentiment.macro_f1": test_s, "ner.f1": test_n,
                                          "val/sentiment.macro_f1": sentiment_f1, "val/ner.f1": ner_f1},
                                **(others or {})}))


def write_answers(root: Path, **rows_of: list[dict]) -> None:
    """reports/eval/validation/ as `lingtune evaluate` writes it: folder or content hash -> validation rows."""
    scored = [ScoredModel(f"m{i}", key, content_hash(root / key) if (root / key).is_dir() else key, rows)
              for i, (key, rows) in enumerate(rows_of.items())]
    write_validation(root / "reports/eval/validation", "val.jsonl", scored)


@pytest.fixture
def project(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.chdir(tmp_path)
    raw = {"tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "t"},
           "backbone": {"out_dir": str(tiny_model_dir)},
           "register": {"variants": {"sft": "models/sft", "int4": "models/int4"}, "margin": 0.01}}
    (tmp_path / "params.yaml").write_text(json.dumps(raw))
    return tmp_path, parse_params(raw)


def test_register_gate_and_load_by_alias(project, tiny_model_dir):
    root, params = project
    adapter = root / "models/sft"
    make_adapter(tiny_model_dir, adapter, seed=1)
    v1 = content_hash(adapter)
    write_metrics(root / "reports/eval/metrics.json", 0.80, 0.40)
    write_answers(root, **{v1: CHAMPION})
    first = run_register(params, log=lambda m: None)
    assert first["versions"] == {"sft": "1"} and first["candidate"] == "sft" and first["promoted"]
    assert "no champion yet" in first["reason"]

    again = run_register(params, log=lambda m: None)  # unchanged folder: no new version
    assert again["versions"] == {"sft": "1"} and not again["promoted"] and "already the champion" in again["reason"]

    make_adapter(tiny_model_dir, adapter, seed=2)
    write_metrics(root / "reports/eval/metrics.json", 0.80, 0.405)
    write_answers(root, **{v1: CHAMPION, "models/sft": answers_for((set(range(12)) - {0, 1}) | {40}, set(range(6)))})
    worse = run_register(params, log=lambda m: None)  # ahead by one review in sixty: noise
    assert worse["versions"] == {"sft": "2"} and not worse["promoted"]
    assert "may be the validation set's noise" in worse["reason"]
    mlflow_client = client(params.tracking.uri)
    assert str(mlflow_client.get_model_version_by_alias("lingtune", "champion").version) == "1"
    assert str(mlflow_client.get_model_version_by_alias("lingtune", "candidate").version) == "2"

    make_adapter(tiny_model_dir, adapter, seed=3)
    write_metrics(root / "reports/eval/metrics.json", 0.85, 0.45)
    write_answers(root, **{v1: CHAMPION, "models/sft": answers_for({0, 1}, {0})})
    better = run_register(params, log=lambda m: None)
    assert better["versions"] == {"sft": "3"} and better["promoted"] and better["champion_before"] == "1"
    assert str(mlflow_client.get_model_version_by_alias("lingtune", "champion").version) == "3"

    version = mlflow_client.get_model_version("lingtune", "3")
    for key in ("git_commit", "params_sha256", "data.train_md5", "eval.sentiment.macro_f1", "eval.ner.f1",
                "lingtune.base_model", "lingtune.content_sha256"):
        assert key in version.tags, key
    assert version.tags["lingtune.kind"] == "lora" and version.description == model_card("sft", version.tags, params,
                                                                                         "lingtune")
    assert "## Use it" in version.description and "models:/lingtune@champion" in version.description

    ref = resolve_model("models:/lingtune@champion", params.tracking.uri, str(root / "cache"))
    assert version.tags["lingtune.base_model"] == "models:/lingtune-base/1"  # the base, from the registry
    assert ref.base.is_relative_to(root / "cache/lingtune-base/1")
    assert content_hash(ref.base) == content_hash(tiny_model_dir)
    stored = sorted(p.name for p in ref.adapter.iterdir())
    assert stored == sorted(p.name for p in adapter.iterdir())  # the adapter only, no base weights
    assert content_hash(adapter) == version.tags["lingtune.content_sha256"]
    old = resolve_model("models:/lingtune/1", params.tracking.uri, str(root / "cache"))
    assert old.adapter.is_relative_to(root / "cache/lingtune/1")


def test_the_candidate_and_the_gate_read_the_validation_split_only(project, tiny_model_dir):
    """Test-split scores that disagree with validation change neither the candidate nor the decision."""
    root, params = project
    params = params.model_copy(update={"register_": params.register_.model_copy(
        update={"variants": {"sft": "models/sft", "rl": "models/rl"}})})
    make_adapter(tiny_model_dir, root / "models/sft", seed=1)
    make_adapter(tiny_model_dir, root / "models/rl", seed=2)
    v1 = content_hash(root / "models/sft")
    write_metrics(root / "reports/eval/metrics.json", 0.9, 0.6, test=(0.5, 0.2),
                  others={"rl": {"sentiment.macro_f1": 0.99, "ner.f1": 0.99, "val/sentiment.macro_f1": 0.8,
                                 "val/ner.f1": 0.5}})
    write_answers(root, **{"models/sft": CHAMPION, "models/rl": answers_for(set(range(20)), set(range(9)))})
    first = run_register(params, log=lambda m: None)
    assert first["candidate"] == "sft" and first["promoted"]  # the best on validation, the worst on test
    assert first["scores"] == {"sft": pytest.approx(0.75), "rl": pytest.approx(0.65)}

    make_adapter(tiny_model_dir, root / "models/sft", seed=3)  # far ahead on test, level on validation
    write_metrics(root / "reports/eval/metrics.json", 0.9, 0.6, test=(0.99, 0.99))
    write_answers(root, **{v1: CHAMPION, "models/sft": CHAMPION})
    level = run_register(params, log=lambda m: None)
    assert level["candidate"] == "sft" and not level["promoted"] and "lead +0.0000" in level["reason"]

    make_adapter(tiny_model_dir, root / "models/sft", seed=4)  # far behind on test, clearly ahead on validation
    write_metrics(root / "reports/eval/metrics.json", 0.99, 0.9, test=(0.1, 0.1))
    write_answers(root, **{v1: CHAMPION, "models/sft": answers_for(set(), set())})
    ahead = run_register(params, log=lambda m: None)
    assert ahead["promoted"] and ahead["champion"] == ahead["candidate_version"]


def test_bad_registry_uris(project):
    root, params = project
    with pytest.raises(RegistryError, match="no MLflow model registry"):
        resolve_model("models:/lingtune@champion", params.tracking.uri, str(root / "cache"))
    with pytest.raises(RegistryError, match="expected models:/<name>@<alias>"):
        resolve_model("models:/lingtune", params.tracking.uri, str(root / "cache"))
    with pytest.raises(RegistryError, match="no MLflow model registry"):
        promote(params)
    assert not (root / "mlflow.db").exists()  # a look-up creates no store
    with pytest.raises(ModelError, match="nothing to register"):
        run_register(params, log=lambda m: None)


def locked(*args, **kwargs):
    """What MLflow raises when sqlite stays locked past its busy timeout (`dvc repro` writing mlflow.db)."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE

    raise MlflowException("(sqlite3.OperationalError) database is locked", error_code=TEMPORARILY_UNAVAILABLE)


def with_store(params, db: Path):
    return params.model_copy(update={"tracking": params.tracking.model_copy(update={"uri": f"sqlite:///{db}"})})


def assert_failure_not_missing(call, match: str) -> None:
    with pytest.raises(RegistryError, match=match) as raised:
        call()
    assert not isinstance(raised.value, RegistryMissing), raised.value


def test_a_failing_registry_is_an_error_never_a_missing_model(project, tiny_model_dir, monkeypatch):
    """Only a store, model, alias or version that does not exist is RegistryMissing (what serving may
    answer with its fallback); a corrupt file, another schema or a locked database is a RegistryError."""
    from mlflow import MlflowClient

    root, params = project
    cache = str(root / "cache")
    garbage = root / "garbage.db"  # a new path per store: MLflow caches a store per URI in-process
    garbage.write_bytes(b"this is not an sqlite database\n" * 200)
    assert_failure_not_missing(lambda: resolve_model("models:/lingtune@champion", f"sqlite:///{garbage}", cache),
                               "database")
    assert_failure_not_missing(lambda: promote(with_store(params, garbage)), "database")

    client(f"sqlite:///{root / 'fresh.db'}")  # an up-to-date store, copied and marked with another schema
    shutil.copy(root / "fresh.db", root / "other-schema.db")
    with sqlite3.connect(root / "other-schema.db") as db:
        db.execute("UPDATE alembic_version SET version_num = 'deadbeef0000'")
    assert_failure_not_missing(lambda: resolve_model("models:/lingtune@champion",
                                                     f"sqlite:///{root / 'other-schema.db'}", cache), "schema")

    make_adapter(tiny_model_dir, root / "models/sft", seed=1)
    write_metrics(root / "reports/eval/metrics.json", 0.8, 0.4)
    run_register(params, log=lambda m: None)
    monkeypatch.setattr(MlflowClient, "get_model_version_by_alias", locked)
    assert_failure_not_missing(lambda: resolve_model("models:/lingtune@champion", params.tracking.uri, cache),
                               "database is locked")
    assert_failure_not_missing(lambda: alias_version(client(params.tracking.uri), "lingtune", "champion"),
                               "TEMPORARILY_UNAVAILABLE")
    make_adapter(tiny_model_dir, root / "models/sft", seed=2)
    write_metrics(root / "reports/eval/metrics.json", 0.9, 0.5)
    assert_failure_not_missing(lambda: run_register(params, log=lambda m: None), "database is locked")  # the gate
    monkeypatch.setattr(MlflowClient, "get_registered_model", locked)
    assert_failure_not_missing(lambda: run_register(params, log=lambda m: None), "database is locked")


def test_registry_cache_serves_the_registered_content(project, tiny_model_dir):
    """The cache of `models:/lingtune/1` is reused only for the same source, run and content hash: a
    recreated store whose version 1 is another adapter, or an edited cached folder, is downloaded again;
    a download that does not hash to the version's tag is refused."""
    root, params = project
    uri, cache = params.tracking.uri, str(root / "cache")
    adapter = make_adapter(tiny_model_dir, root / "models/sft", seed=1)
    write_metrics(root / "reports/eval/metrics.json", 0.8, 0.4)
    run_register(params, log=lambda m: None)
    first = resolve_model("models:/lingtune/1", uri, cache).adapter
    assert content_hash(first) == content_hash(adapter)

    (root / "mlflow.db").unlink()  # a new store (at a new path: MLflow caches a store per URI in-process)
    params = with_store(params, root / "new.db")
    make_adapter(tiny_model_dir, adapter, seed=2)
    assert run_register(params, log=lambda m: None)["versions"] == {"sft": "1"}
    store = client(params.tracking.uri)
    store.delete_model_version_tag("lingtune", "1", CONTENT_TAG)  # as registered by hand: the record alone decides
    second = resolve_model("models:/lingtune/1", params.tracking.uri, cache).adapter
    assert second == first and content_hash(second) == content_hash(adapter)  # the new content, same folder

    store.set_model_version_tag("lingtune", "1", CONTENT_TAG, content_hash(adapter))
    weights = resolve_model("models:/lingtune/1", params.tracking.uri, cache).adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64] + bytes(64))  # the cached folder edited in place
    assert content_hash(weights.parent) != content_hash(adapter)
    again = resolve_model("models:/lingtune/1", params.tracking.uri, cache).adapter
    assert content_hash(again) == content_hash(adapter)
    (again.parents[1] / "MLmodel").write_text("not yaml: [")  # a cached MLmodel that no longer says where
    fresh = resolve_model("models:/lingtune/1", params.tracking.uri, cache).adapter
    assert content_hash(fresh) == content_hash(adapter)

    store.set_model_version_tag("lingtune", "1", CONTENT_TAG, "0" * 64)
    with pytest.raises(RegistryError, match="not what was registered") as raised:
        resolve_model("models:/lingtune/1", params.tracking.uri, str(root / "other-cache"))
    assert not isinstance(raised.value, RegistryMissing)
    assert not (root / "other-cache/lingtune/1").exists()
    assert not list((root / "other-cache/lingtune").iterdir())  # no staging folder left behind


def test_promote_cli_gate_and_force(project, tiny_model_dir):
    root, params = project
    make_adapter(tiny_model_dir, root / "models/sft", seed=1)
    v1 = content_hash(root / "models/sft")
    write_metrics(root / "reports/eval/metrics.json", 0.9, 0.5)
    write_answers(root, **{v1: answers_for(set(), set())})
    run_register(params, log=lambda m: None)
    make_adapter(tiny_model_dir, root / "models/sft", seed=2)
    write_metrics(root / "reports/eval/metrics.json", 0.5, 0.1)
    write_answers(root, **{v1: answers_for(set(), set()), "models/sft": CHAMPION})
    run_register(params, log=lambda m: None)

    def promote(*args):
        return subprocess.run([sys.executable, "-m", "lingtune.cli", "promote", *args], capture_output=True,
                              text=True, cwd=root, timeout=300)

    refused = promote()
    assert refused.returncode == 0 and "not promoted: candidate v2 scores 0.8" in refused.stdout
    assert "on validation, champion v1 1.0000: lead -0.1" in refused.stdout
    forced = promote("--version", "2", "--force")
    assert forced.returncode == 0 and "v2 is champion (forced" in forced.stdout
    missing = promote("--version", "9")
    assert missing.returncode == 2 and "no version 9" in missing.stderr and "Traceback" not in missing.stderr


@pytest.mark.slow
def test_lingtune_eval_loads_the_champion(project, tiny_model_dir, root):
    """`lingtune eval --model models:/lingtune@champion`: the registered adapter, on its base, through vLLM."""
    tmp, params = project
    make_adapter(tiny_model_dir, tmp / "models/sft", seed=1)
    write_metrics(tmp / "reports/eval/metrics.json", 0.8, 0.4)
    write_answers(tmp, **{"models/sft": CHAMPION})
    assert run_register(params, log=lambda m: None)["promoted"]
    result = subprocess.run([sys.executable, "-m", "lingtune.cli", "eval", "--model", "models:/lingtune@champion",
                             "--data", str(root / "tests/data/val.jsonl"), "--task", "sentiment", "--json"],
                            capture_output=True, text=True, cwd=tmp, timeout=900,
                            env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads(result.stdout[result.stdout.index("{"):])
    assert metrics["n"] > 0 and metrics["invalid_rate"] == 0
    assert (tmp / ".cache/registry/lingtune/1/artifacts/sft/adapter_config.json").is_file()


def test_mlproject_has_an_entry_point_per_dvc_stage(root):
    """`mlflow run . -e <stage>` runs the same command as `dvc repro <stage>`."""
    import yaml

    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    entries = yaml.safe_load((root / "MLproject").read_text())["entry_points"]
    for name, stage in stages.items():
        assert name in entries, f"MLproject lacks an entry point for stage {name}"
        assert entries[name]["command"] == f"{stage['cmd']} --params {{params}}", name
