"""The middleware in front of every route: closed by default, bounded everywhere.

* Deny by default: only the routes lingtune documents exist (ROUTES); anything else is a 404, a
  wrong method a 405, a websocket is closed (1008). vLLM's app also carries /invocations,
  /v1/responses, /v1/messages, /generative_scoring, ... with handlers that skip these checks.
* The Bearer key protects every route but the health probes (models, tokenize, metrics and the
  OpenAPI document included). Without a key the server answers loopback clients only, unless
  `serve.allow_anonymous` says otherwise (the service also binds 127.0.0.1 then).
* Bounded load: at most `max_concurrency` model requests at once; beyond that a 429 with
  Retry-After, which the `openai` client retries by itself.
* Every body is read with a size cap and a deadline, then checked (lingtune.serve.limits) and
  replayed to the app. Rejections are OpenAI-style errors the `openai` client raises as
  BadRequestError / AuthenticationError / NotFoundError, never a 5xx.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
from dataclasses import dataclass
from typing import Callable

from starlette.datastructures import Headers
from starlette.responses import JSONResponse

from lingtune.serve.limits import (Limits, Rejected, check_fields, check_numbers, check_prompt_tokens, parse_object,
                                   prompt_batch)
from lingtune.tasks import TASKS

log = logging.getLogger("lingtune.serve")
LOOPBACK = frozenset({"127.0.0.1", "::1"})


@dataclass(frozen=True)
class Route:
    methods: frozenset[str]
    open: bool = False
    """Health and readiness: probes carry no key."""
    model_work: bool = False
    """Runs the model or its tokenizer: counts against max_concurrency."""


_PROBE, _GET, _POST = frozenset({"GET", "HEAD"}), frozenset({"GET"}), frozenset({"POST"})
ROUTES = {
    **{path: Route(_PROBE, open=True) for path in ("/healthz", "/livez", "/readyz", "/health")},
    "/v1/models": Route(_GET), "/metrics": Route(_GET), "/docs.json": Route(_GET),
    **{path: Route(_POST, model_work=True) for path in
       ("/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize", *(f"/v1/{t}" for t in TASKS))},
}
"""The documented routes (docs/serving.md); everything else is a 404."""

ERROR_TYPES = {401: "AuthenticationError", 403: "PermissionDeniedError", 404: "NotFoundError",
               405: "MethodNotAllowed", 408: "RequestTimeout", 413: "PayloadTooLarge", 429: "RateLimitError",
               503: "ServiceUnavailable"}


def error_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    kind = ERROR_TYPES.get(status, "BadRequestError")
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": status}}, status,
                        headers=headers)


class Guard:
    """Pure ASGI middleware (streaming responses pass through untouched).

    `tokenizer()` is the served model's tokenizer, None until the engine runs (model requests then
    get a 503: there is no model to answer them anyway)."""

    def __init__(self, app, api_key: str | None, limits: Limits, allow_anonymous: bool = False,
                 tokenizer: Callable[[], object | None] = lambda: None):
        self.app = app
        self.key_hash = hashlib.sha256(api_key.encode()).digest() if api_key else None
        self.loopback_only = self.key_hash is None and not allow_anonymous
        self.limits = limits
        self.tokenizer = tokenizer
        self.rules = None  # vLLM's request models, imported on first use (not at `bentoml build`)
        self.active = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await self.app(scope, receive, send)
        if scope["type"] != "http":  # websockets: none documented; closing before accept is a 403
            return await send({"type": "websocket.close", "code": 1008})
        try:
            route = self._route(scope)
            self._admit(scope, route)
        except Rejected as exc:
            return await self._reject(scope, receive, send, exc)
        if scope["method"] == "OPTIONS" or not route.model_work:
            return await self._forward(scope, receive, send)
        if self.active >= self.limits.max_concurrency:
            return await self._reject(scope, receive, send, Rejected(429, (
                f"{self.active} requests in progress, this server's limit is {self.limits.max_concurrency}; "
                "retry shortly")), {"Retry-After": "1"})
        self.active += 1
        try:
            return await self._checked(scope, receive, send)
        finally:
            self.active -= 1

    def _route(self, scope) -> Route:
        route = ROUTES.get(scope["path"])
        if route is None:
            raise Rejected(404, f"no route {scope['path']} on this server")
        if scope["method"] not in route.methods and scope["method"] != "OPTIONS":
            raise Rejected(405, f"{scope['method']} {scope['path']}: use {' or '.join(sorted(route.methods))}")
        return route

    def _admit(self, scope, route: Route) -> None:
        if self.loopback_only and (scope.get("client") or ("",))[0] not in LOOPBACK:
            raise Rejected(403, "this server has no API key and answers local clients only "
                                "(set the key's environment variable, or serve.allow_anonymous: true)")
        if self.key_hash and not route.open and scope["method"] != "OPTIONS" and not self._authorized(scope):
            raise Rejected(401, "missing or wrong API key (Authorization: Bearer ...)")

    def _authorized(self, scope) -> bool:
        scheme, _, token = (Headers(scope=scope).get("authorization") or "").partition(" ")
        digest = hashlib.sha256(token.strip().encode()).digest()
        return scheme.lower() == "bearer" and secrets.compare_digest(digest, self.key_hash)

    async def _checked(self, scope, receive, send):
        try:
            raw = await self._body(scope, receive)
            await self._check(scope["path"], parse_object(raw, self.limits.max_depth))
        except Rejected as exc:
            headers = {"Retry-After": "5"} if exc.status == 503 else None
            return await self._reject(scope, receive, send, exc, headers)
        return await self.app(scope, _replay(raw, receive), send)

    async def _check(self, path: str, body: dict) -> None:
        if self.rules is None:
            from lingtune.serve.limits import body_rules

            self.rules = body_rules()
        rule = self.rules[path]
        check_fields(body, rule.fields)
        check_numbers(body, self.limits)
        prompts = prompt_batch(rule, body, self.limits)
        tokenizer = self.tokenizer()
        if tokenizer is None:
            raise Rejected(503, "the model is still loading")
        # the tokenizer runs in a thread: a long body must not stall every other request
        await asyncio.to_thread(check_prompt_tokens, prompts, _counter(tokenizer), self.limits)

    async def _body(self, scope, receive) -> bytes:
        limit = self.limits.max_body_bytes
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise Rejected(413, f"request body over {limit} bytes")
        try:
            return await asyncio.wait_for(_read_body(receive, limit), self.limits.body_timeout_s)
        except asyncio.TimeoutError:
            raise Rejected(408, f"the request body did not arrive within {self.limits.body_timeout_s:g} s") from None

    async def _forward(self, scope, receive, send):
        """Routes without a JSON body; their bodies are still read under the cap (and replayed)."""
        try:
            raw = await self._body(scope, receive)
        except Rejected as exc:
            return await self._reject(scope, receive, send, exc)
        if scope["path"] == "/v1/models":
            send = _without_local_paths(send)
        return await self.app(scope, _replay(raw, receive), send)

    async def _reject(self, scope, receive, send, exc: Rejected, headers: dict | None = None):
        log.info("%s %s rejected: %d %s", scope.get("method"), scope.get("path"), exc.status, exc)
        return await error_response(exc.status, str(exc), headers)(scope, receive, send)


def _counter(tokenizer) -> Callable[[list[str]], list[int]]:
    def count(texts: list[str]) -> list[int]:
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]

    return count


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
        return await receive()  # later calls: disconnect notifications (vLLM cancels on them)

    return replay


def _without_local_paths(send):
    """/v1/models as vLLM writes it names each model's folder (`root`): answer with the model id instead."""
    start, chunks = {}, []

    async def rewritten(message):
        if message["type"] == "http.response.start":
            start.update(message)
            return None
        if message["type"] != "http.response.body":
            return await send(message)
        chunks.append(message.get("body", b""))
        if message.get("more_body"):
            return None
        body = b"".join(chunks)
        try:
            listing = json.loads(body)
            for card in listing.get("data", []):
                card["root"] = card.get("id")
            body = json.dumps(listing).encode()
        except (ValueError, AttributeError, TypeError):
            pass  # an error body: nothing to hide
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        return await send({"type": "http.response.body", "body": body})

    return rewritten
