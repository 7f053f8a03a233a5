"""Every registered version is an MLflow model (lingtune.pyfunc) on a real sqlite store: the base registered
once and named by `models:/` URI, scores as metrics of the version's run, the card as its description, the
evaluation dataset as its run's input; a base or weights not as registered refuse to load (never another
base); `mlflow.pyfunc.load_model("models:/lingtune@champion").predict(df)` answers as the service's task
endpoints (checked against `bentoml serve` of the same champion; unmerged, against `lingtune eval`'s
engine), from several threads as one at a time, and `mlflow models serve` answers /invocations with the
same rows."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager, suppress
from pathlib import Path

import httpx
import pandas as pd
import pytest
import yaml
from mlflow.exceptions import MlflowException
from test_register import make_adapter, write_metrics

from lingtune.artifacts import content_hash
from lingtune.config import parse_params
from lingtune.errors import ModelError, RegistryError, RegistryMissing
from lingtune.models import resolve as resolve_model
from lingtune.register import logged_model_id, model_card, run_register
from lingtune.registry import BASE_SHA_TAG, BASE_TAG, FORMAT_TAG, client

ROOT = Path(__file__).resolve().parents[1]
VAL = [json.loads(line) for line in (ROOT / "tests/data/val.jsonl").read_text(encoding="utf-8").splitlines()]
SENTIMENT = [r["text"] for r in VAL if r.get("task", "sentiment") == "sentiment"]
NER = [r["text"] for r in VAL if r.get("task") == "ner"]
FRAME = pd.DataFrame({"task": ["sentiment"] * len(SENTIMENT) + ["ner"] * len(NER), "text": SENTIMENT + NER})
TEST_ROWS = 30


def make_project(root: Path, base: Path) -> dict:
    """params of a scratch project: its own store, the tiny base, a test split of TEST_ROWS rows."""
    (root / "data/processed").mkdir(parents=True, exist_ok=True)
    lines = (ROOT / "tests/data/val.jsonl").read_text(encoding="utf-8").splitlines()[:TEST_ROWS]
    (root / "data/processed/test.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"tracking": {"uri": f"sqlite:///{root}/mlflow.db", "experiment": "t"},
            "backbone": {"out_dir": str(base)}, "data": {"out_dir": str(root / "data/processed")},
            "register": {"variants": {"sft": "models/sft"}, "margin": 0.01, "cache_dir": str(root / "cache")},
            "serve": {"kv_cache_gb": 1, "merge_cache_dir": str(root / "merged")}}


@pytest.fixture
def project(tmp_path, monkeypatch, tiny_model_dir):
    import mlflow

    monkeypatch.chdir(tmp_path)
    params = parse_params(make_project(tmp_path, tiny_model_dir))
    mlflow.set_tracking_uri(params.tracking.uri)
    mlflow.set_registry_uri(params.tracking.uri)  # registry downloads set it process-wide (lingtune.registry)
    make_adapter(tiny_model_dir, tmp_path / "models/sft", seed=1)
    write_metrics(tmp_path / "reports/eval/metrics.json", 0.8, 0.4)
    monkeypatch.setattr("lingtune.register.gate", promote_unconditionally)
    return tmp_path, params


def promote_unconditionally(mlflow_client, cfg, version: str, seed: int):
    """These tests are about what a version is, not about the gate (tests/test_gate.py): the candidate
    becomes champion, as `lingtune promote --force` would make it."""
    from lingtune.gate import GateDecision
    from lingtune.registry import alias_version, set_alias

    before = alias_version(mlflow_client, cfg.model_name, cfg.champion_alias)
    set_alias(mlflow_client, cfg.model_name, cfg.champion_alias, version)
    return GateDecision(True, "promoted by the test", version, str(before.version) if before else None)


def quiet(message: str) -> None:
    pass


# -- what a version is, without an engine ---------------------------------------------------------------
def test_versions_are_mlflow_models_on_a_base_registered_once(project, tiny_model_dir):
    import mlflow

    root, params = project
    run_register(params, log=quiet)
    run_register(params, log=quiet)  # unchanged: no new version of either model
    make_adapter(tiny_model_dir, root / "models/sft", seed=2)
    assert run_register(params, log=quiet)["versions"] == {"sft": "2"}
    store = client(params.tracking.uri)
    assert [v.version for v in store.search_model_versions("name='lingtune-base'")] == [1]  # the base, once
    for version in store.search_model_versions("name='lingtune'"):
        assert version.tags[BASE_TAG] == "models:/lingtune-base/1" and version.tags[FORMAT_TAG] == "pyfunc"
        assert version.tags[BASE_SHA_TAG] == content_hash(tiny_model_dir)
        assert store.get_logged_model(logged_model_id(version)).name == "sft"  # a logged MLflow model, no bare folder

    info = mlflow.models.get_model_info("models:/lingtune/2")
    pyfunc = info.flavors["python_function"]
    assert pyfunc["loader_module"] == "mlflow.pyfunc.loaders.code_model"  # models from code: nothing unpickled
    assert [c.name for c in info.signature.inputs.inputs] == ["task", "text"]
    assert pyfunc["config"]["kind"] == "lora" and pyfunc["config"]["base_model"] == "models:/lingtune-base/1"
    files = Path(mlflow.artifacts.download_artifacts("models:/lingtune/2", dst_path=str(root / "v2")))
    assert sorted(p.name for p in (files / pyfunc["artifacts"]["weights"]["path"]).iterdir()) == \
        sorted(p.name for p in (root / "models/sft").iterdir())  # the adapter, no base weights
    code = {p.relative_to(files / "code").as_posix() for p in (files / "code").rglob("*.py")}
    assert {"lingtune/pyfunc.py", "lingtune/engine.py", "lingtune/tasks/ner.py"} <= code
    assert not any(p.startswith(("lingtune/serve", "lingtune/cli")) for p in code)  # what it imports, no more


def test_scores_are_metrics_the_card_is_the_description_the_test_split_an_input(project):
    root, params = project
    run_register(params, log=quiet)
    store = client(params.tracking.uri)
    version = store.get_model_version("lingtune", "1")
    assert version.description == model_card("sft", version.tags, params, "lingtune")
    run = store.get_run(version.run_id)
    assert run.data.metrics["test/sentiment.macro_f1"] == 0.8 and run.data.metrics["test/ner.f1"] == 0.4
    assert run.data.metrics["val/sentiment.macro_f1"] == 0.8 and "test/val/sentiment.macro_f1" not in run.data.metrics
    assert run.data.metrics["val/gate_score"] == pytest.approx(0.6)  # the gate decides on validation
    linked = {m.key: m for m in store.get_logged_model(logged_model_id(version)).metrics}
    assert linked["test/ner.f1"].value == 0.4 and linked["test/ner.f1"].dataset_name == "test"

    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.name == "test" and {t.key: t.value for t in dataset_input.tags} == {
        "mlflow.data.context": "evaluation"}
    assert json.loads(dataset_input.dataset.source)["uri"].endswith("data/processed/test.jsonl")
    assert json.loads(dataset_input.dataset.profile)["num_rows"] == TEST_ROWS
    base = store.get_model_version("lingtune-base", "1")
    assert store.get_run(base.run_id).data.metrics["test/sentiment.macro_f1"] == 0.3  # the `base` variant's

    write_metrics(root / "reports/eval/metrics.json", 0.9, 0.4)  # re-evaluated, same adapter: same version
    assert run_register(params, log=quiet)["versions"] == {"sft": "1"}
    assert store.get_run(version.run_id).data.metrics["test/sentiment.macro_f1"] == 0.9


def test_a_base_that_is_gone_or_changed_is_an_error_never_a_fallback(project, tiny_model_dir):
    """An adapter runs on the base it was trained on or not at all: a base version whose URI is not there,
    not a models:/ URI, or not of the recorded content is a RegistryError (never RegistryMissing, which
    serving answers with its fallback model)."""
    from lingtune.serve.runtime import resolve_plan

    root, params = project
    run_register(params, log=quiet)
    store = client(params.tracking.uri)
    uri, cache = params.tracking.uri, str(root / "cache")

    def refused(match: str, spec: str = "models:/lingtune@champion") -> None:
        with pytest.raises(RegistryError, match=match) as raised:
            resolve_model(spec, uri, cache)
        assert not isinstance(raised.value, RegistryMissing), raised.value

    store.set_model_version_tag("lingtune", "1", BASE_SHA_TAG, "0" * 64)
    refused("was trained on a base with lingtune.content_sha256 000000000000")
    store.set_model_version_tag("lingtune", "1", BASE_SHA_TAG, content_hash(tiny_model_dir))
    store.set_model_version_tag("lingtune", "1", BASE_TAG, str(tiny_model_dir))  # a path, as registered before
    refused("not a models:/ URI of its base")
    store.set_model_version_tag("lingtune", "1", BASE_TAG, "models:/lingtune-base/1")
    assert resolve_model("models:/lingtune@champion", uri, cache).adapter is not None

    store.delete_model_version_tag("lingtune", "1", FORMAT_TAG)  # a version of an older lingtune
    refused("not an MLflow model lingtune can load")
    upgraded = run_register(params, log=quiet)
    assert upgraded["versions"] == {"sft": "2"}  # the same adapter, now a real MLflow model, and the champion:
    assert upgraded["champion"] == "2"  # the gate's rule for an older lingtune's champion: tests/test_gate.py

    store.delete_model_version("lingtune-base", "1")
    refused("its base model is not in the registry", "models:/lingtune/2")
    serving = params.model_copy(update={"serve": params.serve.model_copy(update={
        "model": "models:/lingtune/2", "fallback_model": str(tiny_model_dir), "adapters": {}})})
    with pytest.raises(RegistryError, match="its base model is not in the registry") as raised:
        resolve_plan(serving)
    assert not isinstance(raised.value, RegistryMissing)


def test_loading_refuses_weights_or_a_base_not_as_registered(project):
    """What the pyfunc model checks before it starts an engine (model_config overridden at load, as MLflow
    allows, stands for a registry whose files changed)."""
    import mlflow

    _, params = project
    run_register(params, log=quiet)
    with pytest.raises(RegistryError, match="not what was registered"):
        mlflow.pyfunc.load_model("models:/lingtune@champion", model_config={"weights_sha256": "0" * 64})
    with pytest.raises(RegistryError, match="was trained on a base"):
        mlflow.pyfunc.load_model("models:/lingtune@champion", model_config={"base_sha256": "0" * 64})
    client(params.tracking.uri).delete_model_version("lingtune-base", "1")
    with pytest.raises(RegistryError, match="its base model is not in the registry"):
        mlflow.pyfunc.load_model("models:/lingtune@champion")


def test_an_adapter_on_a_changed_base_is_a_new_version(project, tiny_model_dir):
    """A version names its base version: the same adapter registered on a base whose content changed is a new
    version on the new base version, not the old one retagged (whose model_config names the old base)."""
    import shutil

    root, params = project
    base = Path(shutil.copytree(tiny_model_dir, root / "base"))
    make_adapter(base, root / "models/sft", seed=1)
    assert run_register(params, log=quiet)["base_models"] == {str(base): "models:/lingtune-base/1"}
    (base / "generation_config.json").write_text('{"do_sample": false}')
    again = run_register(params, log=quiet)
    assert again["base_models"] == {str(base): "models:/lingtune-base/2"} and again["versions"] == {"sft": "2"}
    assert client(params.tracking.uri).get_model_version("lingtune", "2").tags[BASE_TAG] == "models:/lingtune-base/2"


def test_registering_an_adapter_whose_base_is_not_here_fails(project):
    root, params = project
    config = root / "models/sft/adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "base_model_name_or_path": str(root / "gone")}))
    with pytest.raises(ModelError, match="which is not a model folder here"):
        run_register(params, log=quiet)  # not registered on params.backbone.out_dir instead


def test_a_version_that_is_not_a_lingtune_mlflow_model_is_refused(project):
    """A version created by hand from a bare folder, tagged as if lingtune had registered it; a version whose
    weights the artifact store lost."""
    import shutil

    import mlflow

    root, params = project
    run_register(params, log=quiet)
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(root / "models/sft"), "bare")
    store = client(params.tracking.uri)
    store.create_model_version("lingtune", f"{run.info.artifact_uri}/bare", run.info.run_id,
                               tags={FORMAT_TAG: "pyfunc", "lingtune.kind": "model"})
    with pytest.raises(RegistryError, match="not a lingtune MLflow model"):
        resolve_model("models:/lingtune/2", params.tracking.uri, str(root / "cache"))
    weights = mlflow.models.get_model_info("models:/lingtune/1").flavors["python_function"]["artifacts"]["weights"]
    stored = Path(store.get_logged_model(logged_model_id(store.get_model_version("lingtune", "1"))).artifact_location)
    shutil.rmtree(stored / weights["path"])  # the artifact store lost the version's weights
    with pytest.raises(RegistryError, match="names the artifact 'weights' at .*which is not there"):
        resolve_model("models:/lingtune/1", params.tracking.uri, str(root / "cache"))


def test_served_adapters_on_the_registered_base_are_kept(project, tiny_model_dir):
    """serve.merge_adapter false: the champion runs through LoRA on the base downloaded from the registry,
    and a local adapter trained on the same base (another folder, the same content) is served beside it."""
    from lingtune.serve.runtime import resolve_plan

    root, params = project
    run_register(params, log=quiet)
    other = make_adapter(tiny_model_dir, root / "other", seed=5)
    plan = resolve_plan(params.model_copy(update={"serve": params.serve.model_copy(update={
        "model": "models:/lingtune@champion", "merge_adapter": False, "adapters": {"other": str(other)}})}))
    assert plan.base.is_relative_to(root / "cache/lingtune-base/1") and plan.skipped == ()
    assert set(plan.adapters) == {"lingtune", "other"}


# -- the champion answering, through an engine ---------------------------------------------------------------
@pytest.fixture(scope="module")
def champion(tiny_model_dir, tmp_path_factory):
    """A registry whose champion is a LoRA adapter with large random weights (its answers differ from text to
    text, so equal answers mean something), registered from a scratch project."""
    import mlflow

    root = tmp_path_factory.mktemp("champion")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        params = parse_params(make_project(root, tiny_model_dir))
        make_adapter(tiny_model_dir, root / "models/sft", seed=2, std=0.3)
        write_metrics(root / "reports/eval/metrics.json", 0.8, 0.4)
        patch.setattr("lingtune.register.gate", promote_unconditionally)
        run_register(params, log=quiet)
    mlflow.set_tracking_uri(params.tracking.uri)
    mlflow.set_registry_uri(params.tracking.uri)
    return root, params


@pytest.fixture(scope="module")
def model(champion):
    import mlflow

    return mlflow.pyfunc.load_model("models:/lingtune@champion")


@pytest.fixture(scope="module")
def predicted(model) -> list[dict]:
    return model.predict(FRAME).to_dict(orient="records")


def test_predict_answers_one_row_per_input(predicted):
    assert len(predicted) == len(FRAME) and all(set(row) == {"label", "entities", "unlocated", "error"}
                                                 for row in predicted)
    sentiment, ner = predicted[:len(SENTIMENT)], predicted[len(SENTIMENT):]
    assert all(row["label"] in ("positive", "negative") and row["entities"] is None for row in sentiment)
    assert {row["label"] for row in sentiment} == {"positive", "negative"}  # answers that depend on the text
    for text, row in zip(NER, ner):
        assert row["label"] is None and (row["error"] is None) == isinstance(row["entities"], list)
        for entity in row["entities"] or []:
            assert text[entity["start"]:entity["end"]] == entity["text"]
    assert any(row["unlocated"] for row in ner)


def served_rows(predicted: list[dict]) -> list[dict]:
    """The rows as the task endpoints write results: only the keys of the row's task."""
    return [{key: value for key, value in row.items() if value is not None} for row in predicted]


def test_predict_equals_the_task_endpoints_of_the_service(champion, predicted, tiny_model_dir):
    """`bentoml serve` of the same champion (merged, as the service serves an adapter by default):
    /v1/sentiment and /v1/ner answer every text as predict does."""
    root, params = champion
    work = root / "service"
    work.mkdir()
    port = free_port()
    serve = {"model": "models:/lingtune@champion", "adapters": {}, "host": "127.0.0.1", "port": port,
             "kv_cache_gb": 1, "merge_cache_dir": str(root / "service-merged")}
    (work / "params.yaml").write_text(yaml.safe_dump({"tracking": {"uri": params.tracking.uri, "experiment": "t"},
                                                      "register": {"cache_dir": str(root / "service-cache")},
                                                      "serve": serve}))
    (work / "bentofile.yaml").write_text((ROOT / "bentofile.yaml").read_text())
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "LINGTUNE_PARAMS", "LINGTUNE_API_KEY")}
    url = f"http://127.0.0.1:{port}"
    with running([sys.executable, "-m", "bentoml", "serve"], work, env) as (proc, log):
        wait_ready(f"{url}/readyz", proc, log)
        answers = []
        for task, texts in (("sentiment", SENTIMENT), ("ner", NER)):
            response = httpx.post(f"{url}/v1/{task}", json={"texts": texts}, timeout=120)
            assert response.status_code == 200, response.text
            answers += response.json()["results"]
    assert answers == served_rows(predicted)


def test_mlflow_models_serve_answers_invocations(champion, predicted, tmp_path):
    """The documented command, from an empty directory, with the registry named by MLFLOW_TRACKING_URI."""
    _, params = champion
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": params.tracking.uri,
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}  # `uvicorn` of this environment
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/lingtune@champion",
               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    url = f"http://127.0.0.1:{port}"
    with running(command, tmp_path, env) as (proc, log):
        wait_ready(f"{url}/ping", proc, log)
        body = {"dataframe_split": FRAME.to_dict(orient="split", index=False)}
        response = httpx.post(f"{url}/invocations", json=body, timeout=120)
        assert response.status_code == 200, response.text
        assert response.json()["predictions"] == predicted
        bad = httpx.post(f"{url}/invocations", json={"dataframe_records": [{"task": "intent", "text": "x"}]})
        assert bad.status_code == 400 and "unknown task 'intent'" in bad.json()["message"]


@pytest.fixture(scope="module")
def eval_engine(champion):
    """The engine `lingtune eval --model models:/lingtune@champion` runs: the registered base with the adapter
    through LoRA, from params.evaluate. Module-scoped like `model`: a vLLM in-process engine tears down
    process-wide state when it is freed, which would break the engines still in use."""
    from lingtune.engine import Engine
    from lingtune.evaluate.run import engine_config

    root, params = champion
    ref = resolve_model("models:/lingtune@champion", params.tracking.uri, str(root / "eval-cache"))
    return Engine(ref.base, engine_config(params), enable_lora=True), ref.adapter


@pytest.fixture(scope="module")
def unmerged(champion):
    """The champion with `merge_adapter` false (serve.merge_adapter at registration, or model_config at load)."""
    import mlflow

    return mlflow.pyfunc.load_model("models:/lingtune@champion", model_config={"merge_adapter": False})


def test_unmerged_the_model_answers_as_lingtune_eval(unmerged, eval_engine):
    """Unmerged, the adapter runs through vLLM's LoRA on the registered base, as `lingtune eval` runs it: the
    same answers."""
    from lingtune import tasks

    assert unmerged.unwrap_python_model().adapter is not None
    rows = unmerged.predict(FRAME).to_dict(orient="records")
    engine, adapter = eval_engine
    records = [tasks.get(task).placeholder(text) for task, text in zip(FRAME["task"], FRAME["text"])]
    answers = engine.generate(records, adapter=adapter)
    assert served_rows(rows) == [tasks.to_result(r.task, r.text, a) for r, a in zip(records, answers)]


@pytest.mark.parametrize("frame, message", [
    (pd.DataFrame({"task": ["intent"], "text": ["x"]}), "unknown task 'intent'; lingtune knows sentiment, ner"),
    (pd.DataFrame({"task": ["sentiment", "ner"], "text": ["很好", " "]}), "text 1 is empty"),
    # a prompt that fits the context of 1024, and an answer budget (max_tokens_ner 256) that does not
    (pd.DataFrame({"task": ["ner"], "text": ["长" * 800]}), "text 0 is too long: \\d+ prompt tokens \\+ 256 answer"),
    (pd.DataFrame({"text": ["x"]}), "missing inputs \\['task'\\]"),
])
def test_bad_input_is_an_invalid_parameter(model, frame, message):
    with pytest.raises(MlflowException, match=message) as raised:
        model.predict(frame)
    assert raised.value.error_code == "INVALID_PARAMETER_VALUE"


def test_concurrent_predicts_answer_as_one_at_a_time(model, predicted):
    """`mlflow models serve` predicts in a thread per request; vLLM's offline engine takes one call at a time."""
    results, errors = [None] * 4, []

    def predict(i: int) -> None:
        try:
            results[i] = model.predict(FRAME).to_dict(orient="records")
        except Exception as exc:  # noqa: BLE001 (reported below, with the others)
            errors.append(exc)

    threads = [threading.Thread(target=predict, args=(i,), daemon=True) for i in range(4)]  # a hang fails, not blocks
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "predict calls hang when run at once"
    assert not errors and results == [predicted] * 4


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running(command: list[str], cwd: Path, env: dict):
    """A server for the length of a `with` block: (process, its log file). It runs in a process group of its
    own, which is stopped as a whole (a server's engine runs in a child process)."""
    log = cwd / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc, log
    finally:
        for sig, wait_s in ((signal.SIGTERM, 60), (signal.SIGKILL, 30)):
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            with suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=wait_s)
                break


def wait_ready(url: str, proc: subprocess.Popen, log: Path, seconds: int = 300) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        with suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(1)
    raise RuntimeError(f"server not ready in {seconds} s:\n{log.read_text()[-3000:]}")
