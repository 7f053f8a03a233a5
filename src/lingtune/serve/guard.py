"""Hardening in front of every route: the optional Bearer key, and body checks that vLLM's
server would not make itself (it accepts and ignores unknown fields, and allows any max_tokens
up to the context length). Rejections are OpenAI-style errors the `openai` client raises as
BadRequestError / AuthenticationError, never a 5xx.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass

from starlette.datastructures import Headers
from starlette.responses import JSONResponse

OPEN_PATHS = frozenset({"/healthz", "/livez", "/readyz", "/health"})
"""Health and readiness: probes carry no key."""
TASK_FIELDS = frozenset({"text", "texts", "model"})


@dataclass(frozen=True)
class Limits:
    max_tokens: int
    max_prompt_chars: int
    max_batch: int
    max_body_bytes: int


class Rejected(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def error_response(status: int, message: str) -> JSONResponse:
    kind = {401: "AuthenticationError", 413: "PayloadTooLarge"}.get(status, "BadRequestError")
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": status}}, status)


def _openai_fields() -> dict[str, frozenset[str]]:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    def names(model) -> frozenset[str]:
        return frozenset(n for name, f in model.model_fields.items() for n in (name, f.alias) if n)

    from lingtune.tasks import TASKS

    return {"/v1/chat/completions": names(ChatCompletionRequest), "/v1/completions": names(CompletionRequest),
            **{f"/v1/{task}": TASK_FIELDS for task in TASKS}}


def _chars(content) -> int:
    """Characters of a prompt, a message content, or a list of either (token ids count one each)."""
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(_chars(part.get("text", "") if isinstance(part, dict) else part) for part in content)
    return 1 if isinstance(content, int) else 0


def check_body(path: str, body: dict, fields: frozenset[str], limits: Limits) -> None:
    """Raise Rejected for unknown fields or a request over the configured bounds."""
    unknown = sorted(set(body) - fields)
    if unknown:
        raise Rejected(400, f"unknown field(s): {', '.join(unknown)}")
    for key in ("max_tokens", "max_completion_tokens", "n"):
        bound = limits.max_batch if key == "n" else limits.max_tokens
        if isinstance(body.get(key), int) and body[key] > bound:
            raise Rejected(400, f"{key} {body[key]} is over this server's limit of {bound}")
    if path == "/v1/chat/completions":
        messages = body.get("messages") if isinstance(body.get("messages"), list) else []
        _check_texts([[m.get("content") for m in messages if isinstance(m, dict)]], limits, "prompt")
    elif path == "/v1/completions":
        prompt = body.get("prompt")
        many = isinstance(prompt, list) and bool(prompt) and not isinstance(prompt[0], int)
        _check_texts(prompt if many else [prompt], limits, "prompts")
    else:
        texts = body.get("texts") if isinstance(body.get("texts"), list) else []
        _check_texts([body.get("text")] + texts, limits, "texts", batch=len(texts))


def _check_texts(texts: list, limits: Limits, what: str, batch: int | None = None) -> None:
    batch = len(texts) if batch is None else batch
    if batch > limits.max_batch:
        raise Rejected(400, f"{batch} {what} in one request; this server's limit is {limits.max_batch}")
    longest = max((_chars(t) for t in texts), default=0)
    if longest > limits.max_prompt_chars:
        raise Rejected(400, f"a prompt of {longest} characters; this server's limit is {limits.max_prompt_chars}")


class Guard:
    """Pure ASGI middleware (so streaming responses pass through untouched)."""

    def __init__(self, app, api_key: str | None, limits: Limits):
        self.app = app
        self.key_hash = hashlib.sha256(api_key.encode()).digest() if api_key else None
        self.limits = limits
        self.fields = _openai_fields()

    def _authorized(self, scope) -> bool:
        scheme, _, token = (Headers(scope=scope).get("authorization") or "").partition(" ")
        digest = hashlib.sha256(token.strip().encode()).digest()
        return scheme.lower() == "bearer" and secrets.compare_digest(digest, self.key_hash)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") == "OPTIONS":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if self.key_hash and path not in OPEN_PATHS and not self._authorized(scope):
            return await error_response(401, "missing or wrong API key (Authorization: Bearer ...)")(
                scope, receive, send)
        fields = self.fields.get(path) if scope["method"] == "POST" else None
        if fields is None:
            return await self.app(scope, receive, send)
        try:
            raw = await _read_body(receive, self.limits.max_body_bytes)
            check_body(path, _json_object(raw), fields, self.limits)
        except Rejected as exc:
            return await error_response(exc.status, str(exc))(scope, receive, send)
        return await self.app(scope, _replay(raw, receive), send)


def _json_object(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Rejected(400, f"malformed JSON body: {exc}") from None
    if not isinstance(body, dict):
        raise Rejected(400, f"the JSON body must be an object, not {type(body).__name__}")
    return body


async def _read_body(receive, limit: int) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise Rejected(400, "client disconnected")
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > limit:
            raise Rejected(413, f"request body over {limit} bytes")
        if not message.get("more_body"):
            return b"".join(chunks)


def _replay(raw: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        return await receive()  # later calls: disconnect notifications for streaming responses

    return replay
