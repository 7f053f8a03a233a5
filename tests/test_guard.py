"""The guard in front of the service, driven through ASGI with a stand-in app behind it (the real
service with vLLM behind the same guard: test_serve.py). Each test names the defence it proves;
removing that defence makes it fail."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from lingtune.serve.guard import Guard
from lingtune.serve.limits import Limits

KEY = "k-123"
LIMITS = Limits(max_tokens=48, max_prompt_tokens=20, max_batch=4, max_body_bytes=4096, max_concurrency=2,
                body_timeout_s=0.5)
CHAT = "/v1/chat/completions"


class Backend:
    """Records every request it is handed and answers 200; `hold` makes chat requests wait."""

    def __init__(self):
        self.seen: list[tuple[str, bytes]] = []
        self.hold: asyncio.Event | None = None

    async def __call__(self, scope, receive, send):
        message = await receive()
        self.seen.append((scope["path"], message.get("body", b"")))
        if self.hold is not None and scope["path"] == CHAT:
            await self.hold.wait()
        body = (json.dumps({"object": "list", "data": [{"id": "sft", "root": "/home/me/models/sft"}]})
                if scope["path"] == "/v1/models" else '{"ok": true}').encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)  # one token per character


def make(tokenizer, key: str | None = KEY, allow_anonymous: bool = False, limits: Limits = LIMITS,
         loaded: bool = True):
    backend = Backend()
    guard = Guard(backend, api_key=key, limits=limits, allow_anonymous=allow_anonymous,
                  tokenizer=lambda: tokenizer if loaded else None)
    return guard, backend


def client(guard, host: str = "127.0.0.1", key: str | None = KEY) -> httpx.AsyncClient:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=guard, client=(host, 5555)),
                             base_url="http://lingtune", headers=headers)


def call(guard, method: str, path: str, content: bytes | str | None = None, **kw) -> httpx.Response:
    async def go():
        async with client(guard, **kw) as c:
            return await c.request(method, path, content=content, headers={"content-type": "application/json"})

    return asyncio.run(go())


def chat(**fields) -> str:
    return json.dumps({"model": "lingtune", "messages": [{"role": "user", "content": "hi"}], **fields})


def message_of(response: httpx.Response) -> str:
    return response.json()["error"]["message"]


@pytest.mark.parametrize("path", ["/invocations", "/v1/responses", "/v1/messages", "/generative_scoring",
                                  "/openapi.json", "/docs", "/v1/embeddings", "/pooling", "/v1/load_lora_adapter"])
def test_undocumented_routes_do_not_exist(tokenizer, path):
    guard, backend = make(tokenizer)
    response = call(guard, "POST", path, chat(n=2000))
    assert response.status_code == 404 and "no route" in message_of(response)
    assert backend.seen == []


def test_a_wrong_method_is_a_405(tokenizer):
    guard, backend = make(tokenizer)
    assert call(guard, "GET", CHAT).status_code == 405
    assert call(guard, "DELETE", "/v1/models").status_code == 405 and backend.seen == []


def test_websockets_are_closed_before_accept(tokenizer):
    guard, backend = make(tokenizer)
    sent = []

    async def receive():
        return {"type": "websocket.connect"}

    async def send(message):
        sent.append(message)

    asyncio.run(guard({"type": "websocket", "path": "/v1/realtime", "headers": [], "client": ("127.0.0.1", 1)},
                      receive, send))
    assert sent == [{"type": "websocket.close", "code": 1008}] and backend.seen == []


@pytest.mark.parametrize("path", ["/v1/models", "/metrics", "/docs.json", "/tokenize", CHAT, "/v1/ner"])
def test_the_key_protects_every_route_but_the_probes(tokenizer, path):
    guard, backend = make(tokenizer)
    method = "POST" if path in ("/tokenize", CHAT, "/v1/ner") else "GET"
    assert call(guard, method, path, "{}", key=None).status_code == 401
    assert call(guard, method, path, "{}", key="wrong").status_code == 401
    assert backend.seen == []
    assert call(guard, "GET", "/readyz", key=None).status_code == 200


def test_without_a_key_only_local_clients_are_served(tokenizer):
    guard, _ = make(tokenizer, key=None)
    assert call(guard, "GET", "/v1/models", key=None, host="127.0.0.1").status_code == 200
    remote = call(guard, "GET", "/v1/models", key=None, host="10.1.2.3")
    assert remote.status_code == 403 and "local clients only" in message_of(remote)
    assert call(guard, "GET", "/healthz", key=None, host="10.1.2.3").status_code == 403
    anonymous, _ = make(tokenizer, key=None, allow_anonymous=True)
    assert call(anonymous, "GET", "/v1/models", key=None, host="10.1.2.3").status_code == 200


def test_a_key_serves_remote_clients(tokenizer):
    guard, _ = make(tokenizer)
    assert call(guard, "GET", "/v1/models", host="10.1.2.3").status_code == 200


def test_the_service_binds_loopback_without_a_key():
    from lingtune.config import parse_params
    from lingtune.serve.runtime import access_summary, bind_host

    cfg = parse_params({"serve": {"host": "0.0.0.0"}}).serve
    assert bind_host(cfg, None) == "127.0.0.1" and "local clients only" in access_summary(cfg, None)
    assert bind_host(cfg, "key") == "0.0.0.0"
    anonymous = parse_params({"serve": {"host": "0.0.0.0", "allow_anonymous": True}}).serve
    assert bind_host(anonymous, None) == "0.0.0.0" and "WITHOUT an API key" in access_summary(anonymous, None)


@pytest.mark.parametrize("field, value", [("n", "64"), ("n", 64.0), ("n", True), ("max_tokens", 1e9),
                                          ("max_tokens", "8"), ("max_completion_tokens", 2.5), ("n", 0),
                                          ("max_tokens", 0), ("max_tokens", 49), ("n", 5), ("min_tokens", "3"),
                                          ("top_logprobs", 2.0)])
def test_counts_are_json_integers_in_range(tokenizer, field, value):
    guard, backend = make(tokenizer)
    response = call(guard, "POST", CHAT, chat(**{field: value}))
    assert response.status_code == 400 and field in message_of(response)
    assert backend.seen == []


def test_integers_in_range_pass_and_the_body_is_replayed_unchanged(tokenizer):
    guard, backend = make(tokenizer)
    body = chat(n=4, max_tokens=48, min_tokens=1)
    assert call(guard, "POST", CHAT, body).status_code == 200
    assert backend.seen == [(CHAT, body.encode())]


@pytest.mark.parametrize("body", ["[" * 200_000, '{"a": ' + "[" * 600 + "]" * 600 + "}",
                                  chat(messages=[{"role": "user", "content": [{"type": "text", "text": "x",
                                                                              "extra": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}]}])])
def test_deep_nesting_is_a_400(tokenizer, body):
    guard, _ = make(tokenizer, limits=Limits(**{**LIMITS.__dict__, "max_body_bytes": 1_000_000}))
    response = call(guard, "POST", CHAT, body)
    assert response.status_code == 400 and "nests deeper" in message_of(response)


@pytest.mark.parametrize("method, path", [("POST", "/tokenize"), ("POST", "/detokenize"), ("GET", "/v1/models"),
                                          ("GET", "/metrics"), ("POST", "/v1/sentiment")])
def test_every_route_caps_its_body(tokenizer, method, path):
    guard, backend = make(tokenizer)

    async def chunks():  # chunked: no content-length to refuse it by
        for _ in range(5):
            yield b"x" * 1000

    async def go():
        async with client(guard) as c:
            return await c.request(method, path, content=chunks())

    response = asyncio.run(go())
    assert response.status_code == 413 and backend.seen == []


def test_a_declared_oversize_body_is_refused_before_it_is_read(tokenizer):
    guard, backend = make(tokenizer)
    received = []

    async def receive():
        received.append(1)
        return {"type": "http.request", "body": b"{}", "more_body": True}

    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/tokenize", "client": ("127.0.0.1", 1),
             "headers": [(b"authorization", f"Bearer {KEY}".encode()), (b"content-length", b"9000000")]}
    asyncio.run(guard(scope, receive, send))
    assert sent[0]["status"] == 413 and received == []


def test_a_body_that_never_finishes_times_out(tokenizer):
    guard, backend = make(tokenizer)
    sent = []

    async def receive():
        await asyncio.sleep(0.2)  # a trickle: one byte at a time, never the last
        return {"type": "http.request", "body": b" ", "more_body": True}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": CHAT, "client": ("127.0.0.1", 1),
             "headers": [(b"authorization", f"Bearer {KEY}".encode())]}
    asyncio.run(asyncio.wait_for(guard(scope, receive, send), 10))
    assert sent[0]["status"] == 408 and backend.seen == []


def test_prompt_limit_is_in_tokens_and_counts_every_field_of_a_conversation(tokenizer):
    guard, backend = make(tokenizer)
    assert call(guard, "POST", CHAT, chat(messages=[{"role": "user", "content": "长" * 18}])).status_code == 200
    for body in (chat(messages=[{"role": "user", "content": "长" * 21}]),
                 chat(messages=[{"role": "user", "content": "hi", "name": "x" * 30}]),
                 chat(tools=[{"type": "function", "function": {"name": "f", "description": "d" * 30}}]),
                 json.dumps({"model": "lingtune", "prompt": [1] * 21}),
                 json.dumps({"model": "lingtune", "prompt": ["ok", "长" * 21]})):
        path = CHAT if "messages" in body else "/v1/completions"
        response = call(guard, "POST", path, body)
        assert response.status_code == 400 and "limit is 20" in message_of(response), body


def test_task_and_tokenize_texts_are_limited_too(tokenizer):
    guard, _ = make(tokenizer)
    assert call(guard, "POST", "/v1/ner", json.dumps({"texts": ["北京"] * 5})).status_code == 400
    assert call(guard, "POST", "/v1/ner", json.dumps({"text": "京" * 21})).status_code == 400
    assert call(guard, "POST", "/tokenize", json.dumps({"model": "lingtune", "prompt": "京" * 21})).status_code == 400
    assert call(guard, "POST", "/detokenize", json.dumps({"model": "lingtune", "tokens": [5] * 21})).status_code == 400
    assert call(guard, "POST", "/v1/ner", json.dumps({"text": "京" * 20})).status_code == 200


def test_model_requests_wait_for_the_model(tokenizer):
    guard, backend = make(tokenizer, loaded=False)
    response = call(guard, "POST", CHAT, chat())
    assert response.status_code == 503 and response.headers["retry-after"] and backend.seen == []


def test_models_listing_hides_local_folders(tokenizer):
    guard, _ = make(tokenizer)
    listing = call(guard, "GET", "/v1/models").json()
    assert listing["data"] == [{"id": "sft", "root": "sft"}]


def test_concurrency_beyond_the_limit_is_a_429_with_retry_after(tokenizer):
    guard, backend = make(tokenizer)

    async def go():
        backend.hold = asyncio.Event()
        async with client(guard) as c:
            first = [asyncio.create_task(c.post(CHAT, content=chat())) for _ in range(LIMITS.max_concurrency)]
            while len(backend.seen) < LIMITS.max_concurrency:
                await asyncio.sleep(0.01)
            over = await asyncio.wait_for(c.post(CHAT, content=chat()), 10)
            probe = await c.get("/readyz")  # probes and listings are not model work: never refused
            backend.hold.set()
            done = await asyncio.gather(*first)
            after = await c.post(CHAT, content=chat())
        return over, probe, done, after

    over, probe, done, after = asyncio.run(go())
    assert over.status_code == 429 and over.headers["retry-after"] == "1" and "limit is 2" in message_of(over)
    assert probe.status_code == 200
    assert [r.status_code for r in done] == [200, 200] and after.status_code == 200


# -- the task routes' own defences ---------------------------------------------------------------------
def test_a_task_text_whose_answer_cannot_fit_is_a_400(tokenizer):
    from fastapi import HTTPException

    from lingtune.decoding import TaskDecoder
    from lingtune.serve.tasks import fitting_prompts

    decode = TaskDecoder(tokenizer, max_tokens_ner=64)
    template = len(decode.prompt("ner", "京")["prompt_token_ids"]) - 1
    fits = "京" * (256 - template - 64)
    assert len(fitting_prompts(decode, "ner", [fits], max_model_len=256)[0]["prompt_token_ids"]) == 256 - 64
    with pytest.raises(HTTPException, match="text 1 is too long") as raised:
        fitting_prompts(decode, "ner", [fits, fits + "京"], max_model_len=256)
    assert raised.value.status_code == 400


class _Request:
    """What run_task needs of a starlette Request: a client that hangs up after `after_s`."""

    url = type("Url", (), {"path": "/v1/ner"})()

    def __init__(self, after_s: float):
        self.gone_at = asyncio.get_running_loop().time() + after_s

    async def is_disconnected(self) -> bool:
        return asyncio.get_running_loop().time() >= self.gone_at


def test_generations_are_cancelled_when_the_client_goes_away():
    from fastapi import HTTPException

    from lingtune.serve.tasks import unless_disconnected

    cancelled = []

    async def generation(i):
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(i)
            raise

    async def go():
        started = asyncio.get_running_loop().time()
        with pytest.raises(HTTPException) as raised:
            await unless_disconnected(_Request(after_s=0.2), [generation(i) for i in range(3)])
        await asyncio.sleep(0)  # let the cancellations land
        return raised.value.status_code, asyncio.get_running_loop().time() - started

    status, waited = asyncio.run(go())
    assert status == 499 and sorted(cancelled) == [0, 1, 2] and waited < 5


def test_answers_come_back_while_the_client_stays():
    from lingtune.serve.tasks import unless_disconnected

    async def answer(i):
        await asyncio.sleep(0.05)
        return i

    async def go():
        return await unless_disconnected(_Request(after_s=60), [answer(i) for i in range(3)])

    assert asyncio.run(go()) == [0, 1, 2]


@pytest.mark.parametrize("key, anonymous, host", [(None, False, "127.0.0.1"), ("k", False, "0.0.0.0"),
                                                  (None, True, "0.0.0.0")])
def test_the_bento_service_is_declared_with_the_safe_host(tmp_path, key, anonymous, host):
    """What `bentoml serve` binds: the service's own http config, as imported from params.yaml."""
    import os
    import subprocess
    import sys

    (tmp_path / "params.yaml").write_text(f"serve:\n  host: 0.0.0.0\n  allow_anonymous: {str(anonymous).lower()}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("LINGTUNE_API_KEY", "LD_PRELOAD")}
    env.update({"LINGTUNE_PARAMS": str(tmp_path / "params.yaml"), **({"LINGTUNE_API_KEY": key} if key else {})})
    done = subprocess.run([sys.executable, "-c", "import lingtune.serve.service as s; print(s.LingTune.config['http']['host'])"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == host


def test_a_fallback_model_is_never_ready():
    from lingtune.serve.app import Gateway

    gateway = Gateway()
    gateway.app, gateway.engine = object(), type("Engine", (), {"errored": False})()
    assert gateway.ready()
    gateway.fallback = True
    assert not gateway.ready()


@pytest.mark.parametrize("key, host", [(None, "127.0.0.1"), ("k", "0.0.0.0")])
def test_lingtune_serve_binds_loopback_without_a_key(tmp_path, monkeypatch, key, host):
    import os

    from typer.testing import CliRunner

    from lingtune import cli

    (tmp_path / "params.yaml").write_text("serve:\n  host: 0.0.0.0\n")
    monkeypatch.delenv("LINGTUNE_API_KEY", raising=False)
    if key:
        monkeypatch.setenv("LINGTUNE_API_KEY", key)
    started = []
    monkeypatch.setattr(os, "execve", lambda path, argv, env: started.append(argv))
    result = CliRunner().invoke(cli.app, ["serve", "--params", str(tmp_path / "params.yaml")])
    assert result.exit_code == 0, result.output
    argv = started[0]
    assert argv[argv.index("--host") + 1] == host
