"""What a request body may hold, checked before vLLM or a task route sees it.

vLLM's request models are lenient: they accept and ignore unknown fields, coerce `"n": "64"` and
`64.0` to ints, and bound `max_tokens` only by the context length. Everything here is a 400 with the
reason (413 for size), never a 5xx: the JSON must be an object, nest at most `max_depth` levels, name
only the route's fields; `n` / `max_tokens` / `max_completion_tokens` must be JSON integers within the
server's range; each prompt (a whole conversation counts as one) must fit `max_prompt_tokens`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

from lingtune.tasks import TASKS

TASK_FIELDS = frozenset({"text", "texts", "model"})
STRICT_INTS = ("min_tokens", "logprobs", "top_logprobs", "prompt_logprobs", "priority", "top_k", "seed")
"""Integer fields vLLM would coerce from strings or floats: accepted as JSON integers only."""


@dataclass(frozen=True)
class Limits:
    max_tokens: int
    max_prompt_tokens: int
    max_batch: int
    max_body_bytes: int
    max_concurrency: int
    max_depth: int = 32
    body_timeout_s: float = 30.0


class Rejected(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def parse_object(raw: bytes, max_depth: int) -> dict:
    """The JSON object of a request body; 400 when it is malformed, not an object or nested too deep."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Rejected(400, f"malformed JSON body: {exc}") from None
    except RecursionError:  # the C parser's own recursion guard: far deeper than max_depth
        raise Rejected(400, f"the JSON body nests deeper than {max_depth} levels") from None
    if not isinstance(body, dict):
        raise Rejected(400, f"the JSON body must be an object, not {type(body).__name__}")
    _check_depth(body, max_depth)
    return body


def _check_depth(body, max_depth: int) -> None:
    """Iterative, so a deep body cannot raise RecursionError here (or later, in vLLM's validators)."""
    stack = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > max_depth:
            raise Rejected(400, f"the JSON body nests deeper than {max_depth} levels")
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        stack.extend((child, depth + 1) for child in children)


def check_fields(body: dict, fields: frozenset[str]) -> None:
    unknown = sorted(set(body) - fields)
    if unknown:
        raise Rejected(400, f"unknown field(s): {', '.join(unknown)}")


def check_numbers(body: dict, limits: Limits) -> None:
    """Counts and lengths are JSON integers (never strings, floats or booleans) within range."""
    bounds = {"n": limits.max_batch, "max_tokens": limits.max_tokens, "max_completion_tokens": limits.max_tokens}
    for key, bound in bounds.items():
        value = body.get(key)
        if value is None:
            continue
        _require_int(key, value)
        if not 1 <= value <= bound:
            raise Rejected(400, f"{key} {value} is outside this server's limit of 1..{bound}")
    for key in STRICT_INTS:
        if body.get(key) is not None:
            _require_int(key, body[key])


def _require_int(key: str, value) -> None:
    if type(value) is not int:  # bool is an int subclass: `true` is not a count either
        raise Rejected(400, f"{key} must be a JSON integer, not {json.dumps(value)[:40]}")


# -- prompts: what each route would send to the model -------------------------------------------------
STRUCTURE_KEYS = frozenset({"model", "role", "type"})
"""Their values name parts of the request; the chat template's own tokens stand for them."""


def _strings(value) -> list[str]:
    """Every string in a JSON value (a conversation's contents, names, tool definitions, ...)."""
    out, stack = [], [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict):
            stack.extend(v for k, v in item.items() if k not in STRUCTURE_KEYS)
        elif isinstance(item, list):
            stack.extend(item)
    return out


def _conversation(body: dict) -> list:
    """One prompt: all text of the conversation and its tools, counted together."""
    return ["".join(_strings(body))]


def _completion_prompts(body: dict) -> list:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        return prompt  # a batch of prompts (strings or token-id lists)
    return [prompt]


def _task_texts(body: dict) -> list:
    texts = body.get("texts") if isinstance(body.get("texts"), list) else []
    return texts or [body.get("text")]


def _tokens(body: dict) -> list:
    return [body.get("tokens")]


def _tokenize_prompts(body: dict) -> list:
    return _conversation(body) if "messages" in body else _completion_prompts(body)


@dataclass(frozen=True)
class BodyRule:
    """The JSON fields a POST route accepts and how to find its prompts."""

    fields: frozenset[str]
    prompts: Callable[[dict], list]


def body_rules() -> dict[str, BodyRule]:
    """Per route; the OpenAI routes take exactly the fields of vLLM's own request models."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.serve.tokenize.protocol import (DetokenizeRequest, TokenizeChatRequest,
                                                          TokenizeCompletionRequest)

    def names(*models) -> frozenset[str]:
        return frozenset(n for m in models for name, f in m.model_fields.items() for n in (name, f.alias) if n)

    return {"/v1/chat/completions": BodyRule(names(ChatCompletionRequest), _conversation),
            "/v1/completions": BodyRule(names(CompletionRequest), _completion_prompts),
            "/tokenize": BodyRule(names(TokenizeCompletionRequest, TokenizeChatRequest), _tokenize_prompts),
            "/detokenize": BodyRule(names(DetokenizeRequest), _tokens),
            **{f"/v1/{task}": BodyRule(TASK_FIELDS, _task_texts) for task in TASKS}}


def prompt_batch(rule: BodyRule, body: dict, limits: Limits) -> list:
    """The route's prompts (strings or token-id lists); 400 when there are more than max_batch."""
    prompts = [p for p in rule.prompts(body) if isinstance(p, (str, list))]
    if len(prompts) > limits.max_batch:
        raise Rejected(400, f"{len(prompts)} prompts in one request; this server's limit is {limits.max_batch}")
    return prompts


def check_prompt_tokens(prompts: list, count: Callable[[list[str]], list[int]], limits: Limits) -> None:
    """Each prompt within max_prompt_tokens; token-id prompts count their length."""
    texts = [p for p in prompts if isinstance(p, str)]
    lengths = [len(p) for p in prompts if isinstance(p, list)] + (count(texts) if texts else [])
    longest = max(lengths, default=0)
    if longest > limits.max_prompt_tokens:
        raise Rejected(400, f"a prompt of {longest} tokens; this server's limit is {limits.max_prompt_tokens}")
