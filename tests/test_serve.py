"""The real service (`bentoml serve`, vLLM engine, tiny model + a tiny LoRA adapter) on localhost,
talked to with the official `openai` client. One service start for the whole module."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from lingtune.config import ConfigError
from lingtune.errors import ModelError

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key-123"
LIMITS = {"max_tokens": 48, "max_prompt_tokens": 240, "max_batch": 4, "max_body_bytes": 4096, "max_concurrency": 4}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tiny_adapter(model_dir: Path, out: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])).save_pretrained(out)
    return out


def _wait_ready(url: str, proc: subprocess.Popen, log: Path, seconds: int = 300) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"service exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"service not ready in {seconds} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("serve")
    adapter, ner = _tiny_adapter(tiny_model_dir, work / "sft"), _tiny_adapter(tiny_model_dir, work / "ner")
    port = _free_port()
    params = {"serve": {"model": str(tiny_model_dir), "task_model": {"sentiment": "sft", "ner": "ner"},
                        "adapters": {"sft": str(adapter), "ner": str(ner), "rl": str(work / "none")},
                        "host": "127.0.0.1", "port": port, "kv_cache_gb": 1, "max_model_len": 512, **LIMITS}}
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    (work / "bentofile.yaml").write_text((ROOT / "bentofile.yaml").read_text())
    env = {**os.environ, "LINGTUNE_API_KEY": KEY}  # params.yaml of the working directory, as documented
    for name in ("LD_PRELOAD", "LINGTUNE_PARAMS"):
        env.pop(name, None)
    log = work / "serve.log"
    with open(log, "w") as out:  # the README's command: `bentoml serve` next to bentofile.yaml
        proc = subprocess.Popen([sys.executable, "-m", "bentoml", "serve"],
                                cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc, log)
        yield {"url": url, "proc": proc, "log": log}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server['url']}/v1", api_key=KEY, max_retries=0, timeout=120)


def _raw(server, path: str, content: bytes, key: str | None = KEY) -> httpx.Response:
    headers = {"content-type": "application/json", **({"authorization": f"Bearer {key}"} if key else {})}
    return httpx.post(f"{server['url']}{path}", content=content, headers=headers, timeout=60)


def test_models_lists_base_and_existing_adapters(client):
    models = client.models.list().data
    assert {m.id for m in models} == {"lingtune", "sft", "ner"}  # `rl`: a missing folder, skipped, not fatal
    assert all(getattr(m, "root", m.id) == m.id for m in models)  # no local folder paths


def test_chat_completion(client):
    reply = client.chat.completions.create(model="lingtune", messages=[{"role": "user", "content": "你好"}],
                                           max_tokens=8, temperature=0)
    assert reply.choices[0].message.content
    assert reply.usage.completion_tokens == 8


def test_chat_streaming(client):
    chunks = list(client.chat.completions.create(model="lingtune", messages=[{"role": "user", "content": "北京"}],
                                                 max_tokens=6, temperature=0, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) >= 6 and text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_completions_and_adapter_by_model_name(client):
    base = client.completions.create(model="lingtune", prompt="江泽民", max_tokens=5, temperature=0)
    lora = client.completions.create(model="sft", prompt="江泽民", max_tokens=5, temperature=0)
    assert base.choices[0].text and lora.choices[0].text and lora.model == "sft"


def test_task_usage_reports_prefix_cache_hits(client):
    """Every task prompt starts with the same template: from the second request on, its first KV blocks
    come from the prefix cache, and usage says how many tokens (OpenAI's prompt_tokens_details)."""
    client.post("/sentiment", body={"text": "质量不错"}, cast_to=object)
    usage = client.post("/sentiment", body={"text": "物流太慢了"}, cast_to=object)["usage"]
    assert 32 <= usage["prompt_tokens_details"]["cached_tokens"] < usage["prompt_tokens"]  # whole 32-token blocks


def test_sentiment_single_and_batch(client):
    one = client.post("/sentiment", body={"text": "这本书很好看"}, cast_to=object)
    assert one["label"] in ("positive", "negative")
    assert one["usage"]["completion_tokens"] == 1 and one["usage"]["prompt_tokens"] > len("这本书很好看")  # one step
    many = client.post("/sentiment", body={"texts": ["很好", "太差了"], "model": "lingtune"}, cast_to=object)
    assert [r["label"] in ("positive", "negative") for r in many["results"]] == [True, True]
    assert many["usage"]["completion_tokens"] == 2


def test_each_task_endpoint_answers_with_its_own_default_model(client):
    """Per-task adapters side by side (`serve.task_model: {sentiment: sft, ner: ner}`): a request without
    `model` is answered by its task's adapter, and the reply says which model answered."""
    assert client.post("/sentiment", body={"text": "很好"}, cast_to=object)["model"] == "sft"
    assert client.post("/ner", body={"texts": ["李鹏"]}, cast_to=object)["model"] == "ner"
    assert client.post("/ner", body={"text": "李鹏", "model": "lingtune"}, cast_to=object)["model"] == "lingtune"


def test_ner_endpoint_answers_every_text_in_the_documented_shape(client):
    """Constrained decoding: every answer parses (no `error`), one result per text. The tiny random-weight
    model may well name no entity: the offsets of those it names are checked here, the answer-to-offsets
    mapping itself by test_ner_result_maps_answers_to_offsets."""
    texts = ["江泽民在北京会见新华社记者", "李鹏"]
    body = client.post("/ner", body={"texts": texts}, cast_to=object)
    assert [sorted(item) for item in body["results"]] == [["entities", "unlocated"]] * 2
    assert body["usage"]["completion_tokens"] >= 2 and body["usage"]["prompt_tokens"] > sum(map(len, texts))
    for text, item in zip(texts, body["results"]):
        for entity in item["entities"]:
            assert text[entity["start"]:entity["end"]] == entity["text"] and entity["type"] in ("PER", "LOC", "ORG")
        assert all(entity["type"] in ("PER", "LOC", "ORG") for entity in item["unlocated"])


@pytest.mark.parametrize("task, text", [("sentiment", "这本书很好看"), ("ner", "江泽民在北京会见新华社记者")])
def test_structured_outputs_return_the_task_schema(client, task, text):
    """OpenAI structured outputs: `response_format` json_schema (strict) with the task's answer schema,
    through the official client; the reply is JSON of exactly that schema, even from random weights."""
    from lingtune import tasks

    spec = tasks.get(task)
    reply = client.chat.completions.create(model="sft", max_tokens=48, temperature=0,
                                           messages=[{"role": "user", "content": spec.user_prompt(text)}],
                                           response_format=spec.response_format())
    choice = reply.choices[0]
    assert choice.finish_reason == "stop", choice
    assert spec.exact_schema(json.loads(choice.message.content)), choice.message.content


def test_ner_result_maps_answers_to_offsets():
    """What /v1/ner returns for a known answer: each entity at the first occurrence after the previous one
    (a repeated name gets its next occurrence), else the first free one anywhere, else unlocated."""
    from lingtune.serve.tasks import to_result

    text = "江泽民在北京会见李鹏，李鹏说北京很好"
    answer = json.dumps({"entities": [{"text": t, "type": k} for t, k in [
        ("江泽民", "PER"), ("北京", "LOC"), ("李鹏", "PER"), ("李鹏", "PER"), ("李鹏", "PER"), ("上海", "LOC"),
        ("北京", "LOC")]]}, ensure_ascii=False)
    assert to_result("ner", text, answer) == {
        "entities": [{"start": 0, "end": 3, "type": "PER", "text": "江泽民"},
                     {"start": 4, "end": 6, "type": "LOC", "text": "北京"},
                     {"start": 8, "end": 10, "type": "PER", "text": "李鹏"},
                     {"start": 11, "end": 13, "type": "PER", "text": "李鹏"},
                     {"start": 14, "end": 16, "type": "LOC", "text": "北京"}],
        "unlocated": [{"text": "李鹏", "type": "PER"}, {"text": "上海", "type": "LOC"}]}  # a third 李鹏; not in the text
    backwards = json.dumps({"entities": [{"text": "北京", "type": "LOC"}, {"text": "江泽民", "type": "PER"}]},
                           ensure_ascii=False)
    assert [(e["text"], e["start"], e["end"]) for e in to_result("ner", text, backwards)["entities"]] == \
        [("北京", 4, 6), ("江泽民", 0, 3)]
    cut = to_result("ner", text, '{"entities": [{"text": "江泽')  # max_tokens reached mid-answer
    assert set(cut) == {"error"} and cut["error"].startswith("the answer did not parse")
    assert to_result("sentiment", text, '{"label": "positive"}') == {"label": "positive"}


def test_api_key_required_everywhere_but_health(server, client):
    wrong = openai.OpenAI(base_url=f"{server['url']}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    with pytest.raises(openai.AuthenticationError):
        wrong.post("/sentiment", body={"text": "很好"}, cast_to=object)
    assert _raw(server, "/v1/ner", b'{"text": "x"}', key=None).status_code == 401
    for path in ("/metrics", "/v1/models", "/docs.json"):
        assert httpx.get(f"{server['url']}{path}").status_code == 401, path
    assert httpx.post(f"{server['url']}/tokenize", json={"prompt": "x"}).status_code == 401
    for path in ("/healthz", "/livez", "/readyz", "/health"):
        assert httpx.get(f"{server['url']}{path}").status_code == 200, path


CHAT_HI = '"model": "lingtune", "messages": [{"role": "user", "content": "hi"}]'


@pytest.mark.parametrize("path, body, status, message", [
    ("/v1/chat/completions", b'{"model": "lingtune", "messages": [', 400, "malformed JSON"),
    ("/v1/sentiment", b'{"text": ', 400, "malformed JSON"),
    ("/v1/ner", b'["not", "an", "object"]', 400, "must be an object"),
    ("/v1/chat/completions", b'{%s, "tempreature": 0}' % CHAT_HI.encode(), 400, "unknown field(s): tempreature"),
    ("/v1/sentiment", b'{"text": "hi", "lable": "x"}', 400, "unknown field(s): lable"),
    ("/v1/chat/completions", b'{%s, "max_tokens": 49}' % CHAT_HI.encode(), 400, "limit of 1..48"),
    ("/v1/completions", b'{"model": "lingtune", "prompt": "hi", "max_tokens": 100000}', 400, "limit of 1..48"),
    ("/v1/chat/completions", b'{%s, "n": 5}' % CHAT_HI.encode(), 400, "limit of 1..4"),
    ("/v1/chat/completions", b'{%s, "n": "3"}' % CHAT_HI.encode(), 400, "n must be a JSON integer"),
    ("/v1/chat/completions", b'{%s, "n": 2.0}' % CHAT_HI.encode(), 400, "n must be a JSON integer"),
    ("/v1/completions", b'{"model": "lingtune", "prompt": "hi", "max_tokens": 1e9}', 400, "max_tokens must be"),
    ("/v1/chat/completions", ('{"model": "lingtune", "messages": [{"role": "user", "content": "%s"}]}' % ("长" * 241)
                              ).encode(), 400, "limit is 240"),
    ("/v1/chat/completions", ('{"model": "lingtune", "messages": [{"role": "user", "content": "hi", "name": "%s"}]}'
                              % ("x" * 241)).encode(), 400, "limit is 240"),
    ("/v1/completions", b'{"model": "lingtune", "prompt": ["a", "b", "c", "d", "e"]}', 400, "limit is 4"),
    ("/v1/sentiment", ('{"text": "%s"}' % ("长" * 241)).encode(), 400, "limit is 240"),
    ("/v1/ner", ('{"text": "%s"}' % ("长" * 235)).encode(), 400, "answer tokens exceed the model's context of 512"),
    ("/v1/ner", b'{"texts": ["a", "b", "c", "d", "e"]}', 400, "limit is 4"),
    ("/v1/sentiment", b'{"text": "a", "texts": ["b"]}', 400, "exactly one"),
    ("/v1/sentiment", b'{}', 400, "exactly one"),
    ("/v1/ner", b'{"texts": []}', 400, "at least 1"),
    ("/v1/sentiment", b'{"text": 5}', 400, "valid string"),
    ("/v1/chat/completions", b'{"model": "nope", "messages": [{"role": "user", "content": "hi"}]}', 404, "nope"),
    ("/v1/sentiment", b'{"text": "hi", "model": "nope"}', 404, "unknown model 'nope'"),
    ("/v1/chat/completions", b'{"model": "lingtune", "messages": "hi"}', 400, "messages"),
    ("/v1/chat/completions", b'{%s, "max_tokens": -1}' % CHAT_HI.encode(), 400, "max_tokens"),
    ("/v1/ner", b'{"text": "' + b"x" * 5000 + b'"}', 413, "over 4096 bytes"),
    ("/tokenize", b'{"prompt": "' + b"x" * 9000 + b'"}', 413, "over 4096 bytes"),
    ("/v1/chat/completions", b"[" * 4000, 400, "nests deeper"),
    ("/v1/chat/completions", b'{%s, "x": %s}' % (CHAT_HI.encode(), b"[" * 600 + b"]" * 600), 400, "nests deeper"),
    ("/invocations", b'{%s, "n": 2000}' % CHAT_HI.encode(), 404, "no route /invocations"),
    ("/v1/responses", b'{"model": "lingtune", "input": "hi"}', 404, "no route"),
    ("/v1/messages", b'{"model": "lingtune", "max_tokens": 5, "messages": []}', 404, "no route"),
    ("/generative_scoring", b'{}', 404, "no route"),
])
def test_bad_input_is_a_clear_4xx(server, path, body, status, message):
    response = _raw(server, path, body)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]["message"]


def test_openai_client_sees_bad_requests_as_4xx_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="unknown field"):
        client.chat.completions.create(model="lingtune", messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"top_kk": 3})
    with pytest.raises(openai.BadRequestError, match="limit of 1..48"):
        client.chat.completions.create(model="lingtune", messages=[{"role": "user", "content": "hi"}], max_tokens=500)


def test_server_stays_up_after_requests_vllm_refuses(server, client):
    """Bodies the guard lets through and vLLM's own validation refuses: still a 4xx, and the engine lives."""
    for body in (b'{%s, "logprobs": true, "top_logprobs": 50}' % CHAT_HI.encode(),
                 b'{"model": "lingtune", "messages": [{"role": "user", "content": {"deep": [[[[1]]]]}}]}',
                 b'{"model": "lingtune", "prompt": [999999999], "max_tokens": 2}',
                 b'{"model": "lingtune", "prompt": "hi", "temperature": -3}'):
        path = "/v1/completions" if b'"prompt"' in body else "/v1/chat/completions"
        response = _raw(server, path, body)
        assert 400 <= response.status_code < 500, (body, response.status_code, response.text[:300])
    assert server["proc"].poll() is None
    assert httpx.get(f"{server['url']}/readyz").status_code == 200
    assert client.chat.completions.create(model="sft", messages=[{"role": "user", "content": "hi"}], max_tokens=2)


HOSTILE = [("POST", "/v1/chat/completions", b"[" * 3000), ("POST", "/invocations", b'{"n": 2000}'),
           ("POST", "/v1/chat/completions", b'{%s, "n": "64"}' % CHAT_HI.encode()),
           ("POST", "/tokenize", b"x" * 20000), ("GET", "/v1/models", None),  # no key
           ("POST", "/v1/ner", b'{"text": "' + "北京".encode() * 200 + b'"}'), ("GET", "/openapi.json", None)]


async def _hostile(url: str, rounds: int, statuses: list) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        for i in range(rounds):
            method, path, body = HOSTILE[i % len(HOSTILE)]
            keyed = {"authorization": f"Bearer {KEY}"} if body is not None else {}
            response = await http.request(method, path, content=body, headers=keyed)
            statuses.append(response.status_code)
        try:  # a client that asks for four NER answers and hangs up at once
            await http.post("/v1/ner", json={"texts": ["江泽民在北京"] * 4}, timeout=0.05,
                            headers={"authorization": f"Bearer {KEY}"})
        except httpx.TimeoutException:
            pass


async def _normal(url: str, rounds: int, statuses: list) -> list:
    http = httpx.AsyncClient(timeout=120, event_hooks={"response": [lambda r: _record(r, statuses)]})
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=20, http_client=http)
    answers = []
    for i in range(rounds):
        reply = await client.chat.completions.create(model="lingtune", max_tokens=4,
                                                     messages=[{"role": "user", "content": f"你好 {i}"}])
        answers.append(reply.choices[0].message.content)
        answers.append((await client.post("/sentiment", body={"text": "很好"}, cast_to=object))["label"])
    await http.aclose()
    return answers


async def _record(response, statuses: list) -> None:
    statuses.append(response.status_code)


def test_hostile_and_normal_clients_together(server, client):
    """Eight well-behaved openai clients beside eight hostile ones, with max_concurrency 4: every
    normal request is answered (429s are retried by the client after Retry-After), no 5xx anywhere."""
    import asyncio

    async def run():
        normal, hostile = [], []
        answers = await asyncio.gather(*(_normal(server["url"], 3, normal) for _ in range(8)),
                                       *(_hostile(server["url"], 14, hostile) for _ in range(8)))
        return answers[:8], normal, hostile

    answers, normal, hostile = asyncio.run(run())
    assert all(len(a) == 6 and all(a) for a in answers)
    assert [s for s in normal if s not in (200, 429)] == []
    assert hostile and all(400 <= s < 500 for s in hostile), sorted(set(hostile))
    assert server["proc"].poll() is None and httpx.get(f"{server['url']}/readyz").status_code == 200


def test_engine_process_has_the_preloaded_libraries(server):
    import psutil

    from lingtune.serve.runtime import preload_libraries

    wanted = preload_libraries()
    assert wanted, "no tcmalloc/libiomp5 found: the venv ships libiomp5 (intel-openmp)"
    children = psutil.Process(server["proc"].pid).children(recursive=True)
    maps = [Path(f"/proc/{p.pid}/maps").read_text() for p in children if "EngineCore" in " ".join(p.cmdline()) or
            "EngineCore" in p.name()]
    assert maps, [p.name() for p in children]
    assert all(os.path.basename(lib) in maps[0] for lib in wanted)


def test_lingtune_serve_rejects_bad_params_before_starting(tmp_path):
    (tmp_path / "params.yaml").write_text("serve:\n  max_batch: 0\n  prot: 1\n")
    done = subprocess.run([sys.executable, "-m", "lingtune.cli", "serve", "--params", str(tmp_path / "params.yaml")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "serve.max_batch" in done.stderr and "serve.prot: unknown key" in done.stderr


def test_plan_serves_an_adapter_model_under_the_served_name(tiny_model_dir, tmp_path):
    from lingtune.config import parse_params
    from lingtune.serve.runtime import resolve_plan

    adapter = _tiny_adapter(tiny_model_dir, tmp_path / "champion")
    params = parse_params({"serve": {"model": str(adapter), "adapters": {"rl": str(tmp_path / "missing")},
                                     "merge_adapter": False}})
    plan = resolve_plan(params)
    assert (plan.base, plan.base_name) == (tiny_model_dir, "lingtune-base")
    assert plan.adapters == {"lingtune": adapter} and plan.task_model == {"sentiment": "lingtune", "ner": "lingtune"}
    assert plan.skipped == (f"rl ({tmp_path / 'missing'}: no adapter_config.json)",)
    with pytest.raises(ValueError, match="neither a model folder"):
        resolve_plan(parse_params({"serve": {"model": str(tmp_path)}}))


def test_plan_routes_each_task_to_its_own_served_adapter(tiny_model_dir, tmp_path):
    """Every model `serve.task_model` names (one for all tasks, or one per task) must be served; a skipped
    adapter is a refusal to start, never a task answered by the untrained base."""
    from lingtune.config import parse_params
    from lingtune.serve.runtime import resolve_plan

    sentiment = _tiny_adapter(tiny_model_dir, tmp_path / "sentiment")
    serve = {"model": str(tiny_model_dir), "task_model": {"sentiment": "sentiment", "ner": "ner"},
             "adapters": {"sentiment": str(sentiment), "ner": str(tmp_path / "gone")}}
    with pytest.raises(ModelError, match=r"task_model: \{'ner': 'ner'\} not served .* skipped: ner \("):
        resolve_plan(parse_params({"serve": serve}))
    with pytest.raises(ModelError, match=r"task_model: \{'sentiment': 'ner', 'ner': 'ner'\} not served"):
        resolve_plan(parse_params({"serve": {**serve, "task_model": "ner"}}))  # one name: the same rule
    _tiny_adapter(tiny_model_dir, tmp_path / "gone")
    assert resolve_plan(parse_params({"serve": serve})).task_model == {"sentiment": "sentiment", "ner": "ner"}
    plan = resolve_plan(parse_params({"serve": {**serve, "task_model": None}}))
    assert plan.task_model == {"sentiment": "lingtune", "ner": "lingtune"}  # null: the served model
    with pytest.raises(ConfigError, match="one model for each of sentiment, ner"):
        parse_params({"serve": {**serve, "task_model": {"ner": "ner"}}})


def test_plan_falls_back_while_the_registry_has_no_champion(tiny_model_dir, tmp_path):
    from lingtune.config import parse_params
    from lingtune.registry import RegistryError
    from lingtune.serve.runtime import resolve_plan

    serve = {"model": "models:/lingtune@champion", "fallback_model": str(tiny_model_dir), "adapters": {}}
    params = {"tracking": {"uri": f"sqlite:///{tmp_path / 'none.db'}"}, "serve": serve}
    plan = resolve_plan(parse_params(params))
    assert plan.base == tiny_model_dir and "no MLflow model registry" in plan.fallback
    with pytest.raises(RegistryError, match="no MLflow model registry"):
        resolve_plan(parse_params({**params, "serve": {**serve, "fallback_model": None}}))


def test_plan_skips_adapters_trained_on_another_base(tiny_model_dir, tmp_path):
    from lingtune.config import parse_params
    from lingtune.serve.runtime import resolve_plan

    ours = _tiny_adapter(tiny_model_dir, tmp_path / "ours")
    other, orphan = _tiny_adapter(tiny_model_dir, tmp_path / "other"), _tiny_adapter(tiny_model_dir, tmp_path / "orphan")
    other_base = tmp_path / "other-base"
    other_base.mkdir()
    (other_base / "config.json").write_text("{}")
    for adapter, base in ((other, other_base), (orphan, tmp_path / "gone")):
        config = json.loads((adapter / "adapter_config.json").read_text())
        (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(base)}))
    plan = resolve_plan(parse_params({"serve": {"model": str(tiny_model_dir), "adapters": {
        "ours": str(ours), "other": str(other), "orphan": str(orphan)}}}))
    assert plan.adapters == {"ours": ours}
    assert plan.skipped[0] == f"other ({other}: trained on {other_base}, not on the served {tiny_model_dir})"
    assert plan.skipped[1].startswith(f"orphan ({orphan}: {orphan}: trained on the base model {tmp_path / 'gone'}, "
                                      "which is not a model folder here")


def test_plan_merges_an_adapter_model_once(tiny_model_dir, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lingtune.config import parse_params
    from lingtune.serve.runtime import resolve_plan

    adapter = _tiny_adapter(tiny_model_dir, tmp_path / "champion")
    with torch.no_grad():  # a non-zero delta, so that merged and base weights differ
        lora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter)
        for name, weight in lora.named_parameters():
            if "lora_B" in name:
                weight.fill_(0.01)
        lora.save_pretrained(adapter)
    params = parse_params({"serve": {"model": str(adapter), "adapters": {"sft": str(adapter)},
                                     "merge_cache_dir": str(tmp_path / "cache")}})
    plan = resolve_plan(params)
    assert plan.base.parent == tmp_path / "cache" and (plan.base / "config.json").is_file()
    assert (plan.base_name, plan.adapters) == ("lingtune", {}) and set(plan.task_model.values()) == {"lingtune"}
    with pytest.raises(ModelError, match=r"not served .* serve.merge_adapter serves .* merged, without LoRA"):
        resolve_plan(parse_params({"serve": {**params.serve.model_dump(), "task_model": {"sentiment": "sft",
                                                                                         "ner": "sft"}}}))
    assert plan.skipped and "merged" in plan.skipped[0]
    written = (plan.base / "config.json").stat().st_mtime_ns
    assert resolve_plan(params).base == plan.base and (plan.base / "config.json").stat().st_mtime_ns == written
    ids = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        expected = lora.merge_and_unload()(ids).logits
        served = AutoModelForCausalLM.from_pretrained(plan.base, dtype=torch.float32)(ids).logits
    assert torch.allclose(expected, served, atol=0.05)


@pytest.mark.slow
def test_benchmark_reports_every_documented_key(tiny_model_dir, tmp_path):
    serve = {"model": str(tiny_model_dir), "adapters": {}, "kv_cache_gb": 1,
             "max_tokens_ner": 32}  # random weights answer NER up to the limit, here and in the naive server
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"serve": serve}))
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serve.py"), "--params", str(tmp_path / "params.yaml"),
                           "--data", str(ROOT / "tests" / "data" / "train.jsonl"), "--task", "mix", "--clients", "4",
                           "--requests", "8", "--single-requests", "2", "--naive-requests", "2", "--naive-threads", "1",
                           "--more-data", "--json"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    for key in ("req_per_s", "mean_latency_ms", "p95_latency_ms", "p99_latency_ms", "single_client_latency_ms",
                "roofline_fraction", "speedup_vs_naive", "errors", "output_tok_per_s", "peak_flops", "peak_spread",
                "mean_cached_prompt_tokens"):
        assert isinstance(report[key], (int, float)), key
    assert 0 < report["roofline_fraction"] <= 1 and report["peak_spread"] >= 1
    from lingtune.env import vllm_dtype  # the ceiling is the peak of the dtype the engine computes in

    assert report["peak_dtype"] == ("float32" if vllm_dtype(model_dir=tiny_model_dir) == "float32" else "bfloat16")
    assert 0 < report["mean_cached_prompt_tokens"] < report["mean_prompt_tokens"]  # the template, shared
    assert report["errors"] == 0 and report["naive"]["errors"] == 0 and report["requests"] == 8
    assert report["repeated_prompts"] == 0  # a prompt sent twice is a prefix-cache hit: each phase takes new ones


def test_benchmark_refuses_a_roofline_fraction_above_one():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from serve import roofline

    assert roofline(10.0, 1e9, 20e9) == 0.5
    with pytest.raises(SystemExit, match="roofline_fraction 1.500 > 1"):
        roofline(30.0, 1e9, 20e9)

