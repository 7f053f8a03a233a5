"""The evaluate stage's bookkeeping without a model: which variants exist, and where their
metrics go in MLflow (the run that trained each variant, or a run of its own)."""

import json
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from lingtune.config import parse_params
from lingtune.errors import ModelError
from lingtune.evaluate.run import comparison_table, default_model, log_to_mlflow, summarise, variants


def fake_model(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text("{}")
    return folder


def fake_adapter(folder, base):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base)}))
    return folder


def make_params(tmp_path):
    return parse_params({
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db"},
        "backbone": {"out_dir": str(tmp_path / "backbone")},
        "sft": {"out_dir": str(tmp_path / "sft"), "metrics": str(tmp_path / "sft.json")},
        "sft_full": {"out_dir": str(tmp_path / "sft_full"), "metrics": str(tmp_path / "sft_full.json")},
        "rl": {"out_dir": str(tmp_path / "rl"), "metrics": str(tmp_path / "rl.json")},
        "quantize": {"out_dir": str(tmp_path / "int4")},
        "evaluate": {"out_dir": str(tmp_path / "eval")},
    })


def test_variants_are_the_folders_that_exist(tmp_path):
    params = make_params(tmp_path)
    assert list(variants(params)) == ["base"]
    fake_adapter(tmp_path / "sft", fake_model(tmp_path / "backbone"))
    (tmp_path / "sft.json").write_text(json.dumps({"mlflow_run_id": "abc"}))
    (tmp_path / "sft_full").mkdir()  # a folder without weights is not a variant
    found = variants(params)
    assert list(found) == ["base", "sft"]
    assert found["sft"].ref.adapter == tmp_path / "sft" and str(found["sft"].ref.base) == str(tmp_path / "backbone")
    assert found["sft"].training_run_id == "abc" and found["base"].training_run_id is None
    (tmp_path / "sft_full" / "config.json").write_text("{}")
    found = variants(params)
    assert list(found) == ["base", "sft", "sft-full"]
    assert found["sft-full"].ref.adapter is None and found["sft-full"].ref.base == tmp_path / "sft_full"


def test_an_adapter_runs_on_the_base_it_was_trained_on_or_not_at_all(tmp_path):
    params = make_params(tmp_path)
    fake_model(tmp_path / "backbone")
    other = fake_model(tmp_path / "other-base")
    fake_adapter(tmp_path / "rl", other)
    assert variants(params)["rl"].ref.base == other  # not params.backbone.out_dir
    fake_adapter(tmp_path / "rl", tmp_path / "gone")
    with pytest.raises(ModelError, match="trained on the base model .*gone, which is not a model folder here"):
        variants(params)


def test_metrics_go_to_each_variants_run(tmp_path):
    params = make_params(tmp_path)
    mlflow.set_tracking_uri(params.tracking.uri)
    mlflow.set_experiment(params.tracking.experiment)
    with mlflow.start_run(run_name="sft-lora") as training:
        mlflow.log_metric("train/loss", 0.1)
    fake_adapter(tmp_path / "sft", fake_model(tmp_path / "backbone"))
    (tmp_path / "sft.json").write_text(json.dumps({"mlflow_run_id": training.info.run_id}))
    summary = {"base": {"sentiment.macro_f1": 0.33, "ner.recall": 0.0, "cost_usd": 0.002},
               "sft": {"sentiment.macro_f1": 0.87, "ner.recall": 0.4, "cost_usd": 0.003}}
    out = tmp_path / "eval"
    out.mkdir()
    (out / "table.md").write_text("| variant |\n")
    log_to_mlflow(params, variants(params), summary, out, {"compute_hours": 0.1, "cost_usd": 0.01})
    client = MlflowClient(params.tracking.uri)
    trained = client.get_run(training.info.run_id).data
    assert trained.metrics["test/sentiment.macro_f1"] == 0.87 and trained.metrics["train/loss"] == 0.1
    assert trained.metrics["test/cost_usd"] == 0.003  # beside, not over, the training's own cost_usd
    runs = {r.info.run_name: r for r in client.search_runs(client.get_experiment_by_name("lingtune").experiment_id)}
    assert runs["evaluate-base"].data.metrics["test/sentiment.macro_f1"] == 0.33
    assert runs["evaluate-base"].data.tags["lingtune.variant"] == "base"
    stage = runs["evaluate"]
    assert stage.data.metrics["sft.ner.recall"] == 0.4 and stage.data.tags["lingtune.variants"] == "base,sft"
    assert (stage.data.metrics["compute_hours"], stage.data.metrics["cost_usd"]) == (0.1, 0.01)
    assert [a.path for a in client.list_artifacts(stage.info.run_id, "evaluation")] == ["evaluation/table.md"]


def test_comparison_table_shows_poor_scores_as_they_are():
    zero = {"accuracy": 0.5, "macro_f1": 1 / 3, "invalid_rate": 0.0}
    ner = {"precision": 0.004, "recall": 0.002, "f1": 0.003, "invalid_rate": 0.015}
    table = comparison_table({"base": {"sentiment": zero, "ner": ner}})
    assert "| base | 50.0% | 33.3% | 0.0% | 0.4% | 0.2% | 0.3% | 1.5% |" in table


def test_each_variant_costs_its_generation_time():
    """metrics.json and the table carry each variant's cost: its tasks' seconds at the CPU or GPU price."""
    params = parse_params({"cost": {"usd_per_cpu_hour": 0.2, "usd_per_gpu_hour": 3.0}})
    sentiment = {"accuracy": 0.5, "macro_f1": 1 / 3, "invalid_rate": 0.0, "seconds": 1800.0}
    ner = {"precision": 0.0, "recall": 0.0, "f1": 0.0, "invalid_rate": 0.0, "seconds": 1800.0}
    results = {"base": {"sentiment": sentiment, "ner": ner}}
    summary = summarise(results, params.cost, gpus=0)["base"]
    assert summary["sentiment.seconds"] == 1800.0 and summary["compute_hours"] == 1.0
    assert summary["cost_usd"] == pytest.approx(summary["compute_hours"] * 0.2)
    assert summarise(results, params.cost, gpus=1)["base"]["cost_usd"] == pytest.approx(3.0)
    table = comparison_table(results, {"base": summary["cost_usd"]})
    assert table.splitlines()[0].endswith("| cost USD |") and "| 0.0% | 0.2000 |" in table


def test_default_model_is_the_champion_else_the_latest_variant(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = parse_params({"tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db"}})
    assert default_model(params) == "models/sft"  # nothing trained yet: the SFT folder (a clear error later)
    (tmp_path / "models" / "sft").mkdir(parents=True)
    assert default_model(params) == "models/sft"
    (tmp_path / "models" / "rl").mkdir()
    assert default_model(params) == "models/rl"
    client = MlflowClient(params.tracking.uri, registry_uri=params.tracking.uri)
    client.create_registered_model("lingtune")
    version = client.create_model_version("lingtune", source=str(tmp_path / "models" / "rl"))
    assert default_model(params) == "models/rl"  # registered, but no champion yet
    client.set_registered_model_alias("lingtune", "champion", version.version)
    assert default_model(params) == "models:/lingtune@champion"


def test_engine_is_built_from_params_evaluate(tmp_path):
    from lingtune.evaluate.run import engine_config

    params = parse_params({"sft": {"lora": {"r": 16}},
                           "evaluate": {"max_lora_rank": 16, "max_model_len": 512, "kv_cache_gb": 3,
                                        "max_tokens_ner": 99, "cpu_threads_bind": "0"}})
    cfg = engine_config(params)
    assert (cfg.max_lora_rank, cfg.max_model_len, cfg.kv_cache_gb, cfg.max_tokens_ner, cfg.cpu_threads_bind) == \
        (16, 512, 3, 99, "0")


def test_validation_metrics_are_val_keys_and_cost_counts_both_splits():
    params = parse_params({"cost": {"usd_per_cpu_hour": 0.2}})
    test = {"sentiment": {"macro_f1": 0.9, "seconds": 1800.0}, "ner": {"f1": 0.5, "seconds": 0.0}}
    val = {"sentiment": {"macro_f1": 0.8, "seconds": 1800.0, "per_class": {}}, "ner": {"f1": 0.4, "seconds": 0.0}}
    summary = summarise({"sft": test}, params.cost, gpus=0, validation={"sft": val})["sft"]
    assert summary["sentiment.macro_f1"] == 0.9 and summary["val/sentiment.macro_f1"] == 0.8
    assert summary["val/ner.f1"] == 0.4 and "val/sentiment.per_class" not in summary
    assert summary["compute_hours"] == 1.0 and summary["cost_usd"] == pytest.approx(0.2)


def test_out_of_domain_metrics_are_ood_keys_and_cost_counts_them():
    params = parse_params({"cost": {"usd_per_cpu_hour": 0.2}})
    test = {"sentiment": {"macro_f1": 0.9, "seconds": 1800.0}, "ner": {"f1": 0.5, "seconds": 0.0}}
    ood = {"sentiment": {"macro_f1": 0.7, "seconds": 1800.0, "sectors": {"bank": {"n": 2, "accuracy": 0.5}}},
           "ner": {"f1": 0.3, "seconds": 0.0, "sectors": {}}}
    summary = summarise({"sft": test}, params.cost, gpus=0, ood={"sft": ood})["sft"]
    assert summary["sentiment.macro_f1"] == 0.9 and summary["ood/sentiment.macro_f1"] == 0.7
    assert summary["ood/ner.f1"] == 0.3 and not any("sectors" in key for key in summary)
    assert summary["compute_hours"] == 1.0 and summary["cost_usd"] == pytest.approx(0.2)


def test_the_gate_reads_validation_never_the_out_of_domain_set():
    from lingtune.gate import gate_score

    keys = ["sentiment.macro_f1", "ner.f1"]
    metrics = {"val/sentiment.macro_f1": 0.8, "val/ner.f1": 0.6, "ood/sentiment.macro_f1": 0.1, "ood/ner.f1": 0.0,
               "sentiment.macro_f1": 0.9, "ner.f1": 0.9}
    assert gate_score(metrics, keys) == pytest.approx(0.7)
    assert gate_score({"ood/sentiment.macro_f1": 1.0, "ood/ner.f1": 1.0}, keys) is None  # OOD alone: unscored


def test_a_missing_out_of_domain_set_names_the_stage_that_builds_it(tmp_path):
    from lingtune.errors import DataError
    from lingtune.evaluate.run import ood_set

    with pytest.raises(DataError, match="lingtune ood"):
        ood_set(tmp_path / "ood.jsonl", 0)


class FakeEngine:
    """Stands in for the vLLM engine: each model answers by its own rule."""

    def __init__(self, ref):
        self.ref = ref

    def generate(self, records, adapter=None, constrained=True):
        from lingtune import tasks

        if self.ref.adapter is not None:  # the trained variant: always right
            return [tasks.get(r.task).answer(r) for r in records]
        if self.ref.base.name == "backbone":  # zero-shot: one label, no entities
            return ['{"label": "positive"}' if r.task == "sentiment" else '{"entities": []}' for r in records]
        return [tasks.get(r.task).answer(r) if r.task == "sentiment" else '{"entities": []}' for r in records]


def stage_project(tmp_path, root):
    params = parse_params({
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db"},
        "data": {"out_dir": str(tmp_path / "data")},
        "backbone": {"out_dir": str(tmp_path / "backbone")},
        "sft": {"out_dir": str(tmp_path / "sft"), "metrics": str(tmp_path / "sft.json")},
        "sft_full": {"out_dir": str(tmp_path / "sft_full")}, "rl": {"out_dir": str(tmp_path / "rl")},
        "quantize": {"out_dir": str(tmp_path / "int4")},
        "evaluate": {"out_dir": str(tmp_path / "eval"), "merge_adapters": False},  # FakeEngine tells models by ref
        "register": {"cache_dir": str(tmp_path / "cache"), "validation_dir": str(tmp_path / "eval" / "validation")},
        "ood": {"out": str(tmp_path / "data" / "ood.jsonl")},
    })
    (tmp_path / "data").mkdir()
    for split in ("test", "val"):
        (tmp_path / "data" / f"{split}.jsonl").write_text((root / "tests/data/val.jsonl").read_text())
    rows = [json.loads(line) for line in (root / "tests/data/val.jsonl").read_text().splitlines()]
    with open(tmp_path / "data" / "ood.jsonl", "w", encoding="utf-8") as handle:  # as `lingtune ood` writes it
        for i, row in enumerate(rows):
            sector = ("bank", "hotel_travel")[i % 2] if row["task"] == "sentiment" else ("tech_news", "bank_notice")[i % 2]
            handle.write(json.dumps({**row, "sector": sector}, ensure_ascii=False) + "\n")
    fake_adapter(tmp_path / "sft", fake_model(tmp_path / "backbone"))
    return params


def register_version(params, folder, champion: bool) -> str:
    """`folder` as a whole-model version, registered as `lingtune register` does (an MLflow model)."""
    import mlflow

    from lingtune.register import Evaluation, lineage_tags, register_variant
    from lingtune.registry import client, ensure_model

    mlflow.set_tracking_uri(params.tracking.uri)
    mlflow.set_experiment(params.tracking.experiment)
    mlflow_client = client(params.tracking.uri)
    ensure_model(mlflow_client, params.register_.model_name, description="test")
    unscored = Evaluation({}, None, params.register_.gate_metrics)
    version, _ = register_variant(mlflow_client, params, "old", folder, lineage_tags(params), unscored, None)
    if champion:
        mlflow_client.set_registered_model_alias(params.register_.model_name, "champion", version)
    return version


def test_the_stage_scores_validation_and_the_registry_champion_for_the_gate(tmp_path, root, monkeypatch):
    """metrics.json gains `val/` keys, reports/eval/validation holds each model's answer to every validation
    example, the registry's champion (a version no variant folder holds) is scored there too, and the gate
    finds both by content hash."""
    from lingtune.evaluate import run
    from lingtune.gate import gate
    from lingtune.registry import client

    params = stage_project(tmp_path, root)
    old = fake_model(tmp_path / "old-champion")
    (old / "weights.bin").write_bytes(b"an earlier model")
    register_version(params, old, champion=True)
    monkeypatch.setattr(run.Engines, "get", lambda self, ref: FakeEngine(ref))
    run.run_evaluate(params)

    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["sft"]["val/ner.f1"] == 1.0 and metrics["sft"]["ner.f1"] == 1.0
    assert metrics["base"]["val/ner.f1"] == 0.0 and "champion" not in metrics  # the table lists variants only
    index = json.loads((tmp_path / "eval" / "validation" / "index.json").read_text())
    assert set(index["models"]) == {"base", "sft", "champion"}
    assert index["models"]["champion"]["version"] == "1" and index["models"]["champion"]["model"] == "models:/lingtune/1"
    rows = [json.loads(line) for line in (tmp_path / "eval" / "validation" / "champion.jsonl").read_text().splitlines()]
    assert len(rows) == 40 and {"missed", "spurious", "wrong_type"} <= set(next(r for r in rows if r["task"] == "ner"))

    candidate = register_version(params, tmp_path / "sft", champion=False)
    decision = gate(client(params.tracking.uri), params.register_, candidate, seed=0)
    assert decision.promoted and "champion v1" in decision.reason, decision.reason

    mlflow_client = MlflowClient(params.tracking.uri)
    runs = {r.info.run_name: r for r in mlflow_client.search_runs(
        mlflow_client.get_experiment_by_name("lingtune").experiment_id)}
    logged = runs["evaluate-base"].data.metrics
    assert logged["val/sentiment.macro_f1"] == metrics["base"]["val/sentiment.macro_f1"]
    assert "test/sentiment.macro_f1" in logged and "test/val/sentiment.macro_f1" not in logged

    run.run_evaluate(params)  # sft is champion now: its answers are scored once, as the variant
    index = json.loads((tmp_path / "eval" / "validation" / "index.json").read_text())
    assert set(index["models"]) == {"base", "sft"}


def test_the_stage_scores_the_out_of_domain_set_beside_test_and_per_sector(tmp_path, root, monkeypatch):
    """Every variant gets `ood/` metrics, ood.json breaks each task down by sector (scored as the whole set),
    every answer is kept with its sector, MLflow gets `ood/` keys (not `test/ood/`), and the validation
    answers the gate compares stay the validation split's alone."""
    from lingtune.evaluate import run

    params = stage_project(tmp_path, root)
    monkeypatch.setattr(run.Engines, "get", lambda self, ref: FakeEngine(ref))
    run.run_evaluate(params)

    out = tmp_path / "eval"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["sft"]["ood/sentiment.macro_f1"] == 1.0 and metrics["sft"]["ood/ner.f1"] == 1.0
    assert metrics["base"]["ood/ner.recall"] == 0.0 and metrics["base"]["ood/sentiment.n"] == 23
    assert metrics["sft"]["sentiment.macro_f1"] == 1.0  # the test split's keys are unchanged

    ood = json.loads((out / "ood.json").read_text())
    sectors = ood["base"]["sentiment"]["sectors"]
    assert set(sectors) == {"bank", "hotel_travel"} and sum(s["n"] for s in sectors.values()) == 23
    rows = [json.loads(line) for line in (out / "ood" / "base.jsonl").read_text().splitlines()]
    for sector, m in sectors.items():  # base answers `positive` to everything: accuracy = the share of positives
        labels = [r["gold"] for r in rows if r["task"] == "sentiment" and r["sector"] == sector]
        assert m["accuracy"] == pytest.approx(labels.count("positive") / len(labels)) and m["n"] == len(labels)
    assert set(ood["sft"]["ner"]["sectors"]) == {"tech_news", "bank_notice"}
    assert all(s["f1"] == 1.0 for s in ood["sft"]["ner"]["sectors"].values())
    assert len(rows) == 40 and {r["sector"] for r in rows} == {"bank", "hotel_travel", "tech_news", "bank_notice"}
    assert "Out of domain" in (out / "table.md").read_text()

    index = json.loads((out / "validation" / "index.json").read_text())
    assert index["split"].endswith("val.jsonl") and index["models"]["sft"]["examples"] == 40
    client = MlflowClient(params.tracking.uri)
    runs = {r.info.run_name: r for r in client.search_runs(client.get_experiment_by_name("lingtune").experiment_id)}
    logged = runs["evaluate-base"].data.metrics
    assert logged["ood/sentiment.accuracy"] == metrics["base"]["ood/sentiment.accuracy"]
    assert not any(key.startswith("test/ood/") for key in logged)


def test_lora_variants_are_scored_merged_into_their_base_once_per_content(tmp_path, tiny_model_dir):
    """`evaluate.merge_adapters`: vLLM runs the adapter merged into its base (as served), one merged folder
    per adapter content; with the option off, the adapter itself on the base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lingtune.config import EvaluateConfig
    from lingtune.evaluate.run import scoring_ref
    from lingtune.models import ModelRef

    adapter = tmp_path / "adapter"
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                   LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM")).save_pretrained(adapter)
    ref = ModelRef(Path(tiny_model_dir), adapter)
    cfg = EvaluateConfig(merge_cache_dir=str(tmp_path / "merged"))
    merged = scoring_ref(ref, cfg)
    assert merged.adapter is None and (merged.base / "config.json").is_file()
    assert merged.base.parent == tmp_path / "merged"
    assert scoring_ref(ref, cfg) == merged  # cached: merged once
    assert scoring_ref(ref, cfg.model_copy(update={"merge_adapters": False})) == ref
    assert scoring_ref(ModelRef(Path(tiny_model_dir)), cfg) == ModelRef(Path(tiny_model_dir))


def test_engines_no_later_model_needs_are_released():
    from lingtune.evaluate.run import Engines
    from lingtune.models import ModelRef

    engines = Engines(None, [])
    engines.started = {"a": object(), "b": object()}
    engines.release([ModelRef(Path("b"))])
    assert list(engines.started) == ["b"]


def test_the_stage_hands_the_engine_merged_variants_and_keeps_the_adapters_content_hash(tmp_path, root, monkeypatch):
    """With `merge_adapters` the engine gets the merged folder (no adapter), while the validation answers the
    gate reads stay filed under the adapter's content hash (the one `lingtune register` tags)."""
    from lingtune.evaluate import run
    from lingtune.models import ModelRef

    params = stage_project(tmp_path, root)
    params = params.model_copy(update={"evaluate": params.evaluate.model_copy(update={"merge_adapters": True})})
    merged = fake_model(tmp_path / "merged-sft")
    monkeypatch.setattr(run, "merged_model", lambda base, adapter, cache: merged)
    seen = []

    def engine(self, ref):
        seen.append(ref)
        return FakeEngine(ModelRef(ref.base, tmp_path / "sft") if ref.base == merged else ref)

    monkeypatch.setattr(run.Engines, "get", engine)
    run.run_evaluate(params)
    assert {r.adapter for r in seen} == {None} and merged in {r.base for r in seen}
    index = json.loads((tmp_path / "eval" / "validation" / "index.json").read_text())
    assert index["models"]["sft"]["content_sha256"] == run.model_hash(ModelRef(tmp_path / "backbone", tmp_path / "sft"))
