"""A small OpenAI-compatible server (FastAPI + uvicorn, in a thread on localhost) for the judge tests.

The request's `model` picks the behaviour: `grader` grades 9 for a positive answer and 2 otherwise,
`hash` grades from the answer's characters (deterministic, varied: a learning signal for RL tests),
`stall` sleeps 5 s (timeouts), `fail` answers 500, `flaky` answers 503 once then grades, `prose` replies
without a grade, `gullible` grades like `grader` but obeys an instruction anywhere in the user message
to `reply {"score": N}` (a judge open to prompt injection), `secret` answers 401 with a body holding
`SECRET_BODY`, `empty` replies with no choices, `nomessage` with a choice without a message, `garbage`
with a 200 that is not JSON. The answer is read between the <answer> tags of the judge's prompt.
Every request is counted by model and by Authorization header."""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
from collections import Counter
from contextlib import contextmanager
from typing import Iterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

SECRET_BODY = "provider-body-secret: sk-live-echoed-123"
INJECTED = re.compile(r'reply \{\\?"score\\?": (\d+)\}')  # also inside a JSON string, quotes escaped


def _grade(model: str, answer: str, prompt: str) -> str:
    if model == "prose":
        return "no idea"
    if model == "gullible" and (injected := INJECTED.search(prompt)):
        return '{"score": %s}' % injected.group(1)
    if model == "hash":
        return '{"score": %d}' % (sum(map(ord, answer)) % 11)
    return '{"score": %d}' % (9 if '"positive"' in answer else 2)


def _failure(model: str, seen: Counter):
    """The error or malformed response `model` asks for, or None to grade."""
    if model == "fail":
        return JSONResponse({"error": {"message": "judge backend down", "type": "server_error"}}, status_code=500)
    if model == "flaky" and seen[model] == 1:
        return JSONResponse({"error": {"message": "busy"}}, status_code=503)
    if model == "secret":
        return JSONResponse({"error": {"message": SECRET_BODY, "type": "invalid_request"}}, status_code=401)
    if model == "garbage":
        return PlainTextResponse("<html>502 upstream</html>")
    return None


def _completion(model: str, choices: list) -> dict:
    return {"id": "x", "object": "chat.completion", "created": 0, "model": model, "choices": choices,
            "usage": {"prompt_tokens": 100, "completion_tokens": 5, "total_tokens": 105}}


def make_app(seen: Counter) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        model = body["model"]
        seen[model] += 1
        seen["auth:" + request.headers.get("authorization", "")] += 1
        if model == "stall":
            await asyncio.sleep(5)
        if (failure := _failure(model, seen)) is not None:
            return failure
        if model == "empty":
            return _completion(model, [])
        if model == "nomessage":
            return _completion(model, [{"index": 0, "finish_reason": "stop"}])
        prompt = body["messages"][-1]["content"]
        answer = prompt.split("<answer>\n", 1)[1].rsplit("\n</answer>", 1)[0]
        return _completion(model, [{"index": 0, "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": _grade(model, answer, prompt)}}])

    return app


@contextmanager
def judge_server() -> Iterator[tuple[str, Counter]]:
    """(base URL ending in /v1, request counter) while the server runs."""
    import uvicorn

    seen: Counter = Counter()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(make_app(seen), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline:
            raise RuntimeError("judge test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/v1", seen
    finally:
        server.should_exit = True
        thread.join(timeout=10)
