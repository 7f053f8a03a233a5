"""POST /v1/sentiment and /v1/ner: the trained prompt, constrained decoding in the trained answer
format (so every answer parses), and validated JSON back: a label, or entities with character
offsets (lingtune.tasks.to_result). Runs on the same vLLM engine as the OpenAI routes,
so task requests and chat requests are batched together. A text whose prompt and answer budget do
not fit the context is a 400 (never a cut-off answer in a 200); a client that goes away cancels its
generations."""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field, model_validator

from lingtune import tasks
from lingtune.decoding import TaskDecoder
from lingtune.errors import DataError
from lingtune.tasks import to_result

router = APIRouter()
log = logging.getLogger("lingtune.serve")


@dataclass(frozen=True)
class TaskSettings:
    default_models: dict[str, str]
    """The `model` each task endpoint uses when a request names none (serve.task_model)."""
    max_tokens_ner: int
    max_model_len: int


class TaskRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str | None = Field(None, min_length=1)
    texts: list[str] | None = Field(None, min_length=1)
    model: str | None = None
    """Base model or adapter name (see /v1/models); the server's task_model for this task by default."""

    @model_validator(mode="after")
    def _one_form(self) -> "TaskRequest":
        if (self.text is None) == (self.texts is None):
            raise ValueError("give exactly one of `text` or `texts`")
        if self.texts is not None and not all(t.strip() for t in self.texts):
            raise ValueError("`texts` holds an empty text")
        return self


async def _lora(state, name: str):
    models = state.openai_serving_models
    if models.is_base_model(name):
        return None
    if name in models.lora_requests:
        return models.lora_requests[name]
    known = [card.id for card in (await models.show_available_models()).data]
    raise HTTPException(404, f"unknown model {name!r}; this server has {known}")


def decoder(state) -> TaskDecoder:
    """One TaskDecoder per app (it tokenizes the label answers once)."""
    if getattr(state, "lingtune_decoder", None) is None:
        state.lingtune_decoder = TaskDecoder(state.engine_client.get_tokenizer(), state.lingtune_tasks.max_tokens_ner)
    return state.lingtune_decoder


def fitting_prompts(decode: TaskDecoder, task: str, texts: list[str], max_model_len: int) -> list[dict]:
    """The engine prompts of `texts`; 400 when a prompt plus its answer budget exceeds the context."""
    try:
        return [decode.fitting_prompt(task, text, max_model_len, i) for i, text in enumerate(texts)]
    except DataError as exc:
        raise HTTPException(400, str(exc)) from None


async def _generate(engine, prompt: dict, params, task: str, lora, keep_going=None):
    """(last engine output of one request, whether it ran to its end): a request stops early once
    `keep_going(text so far)` turns false. Closing the stream aborts it in the engine (AsyncLLM.generate
    aborts on GeneratorExit and CancelledError), and so does cancelling this task."""
    last = None
    stream = engine.generate(prompt, params, f"{task}-{uuid.uuid4().hex}", lora_request=lora)
    async for last in stream:
        if keep_going and not keep_going(last.outputs[0].text):
            # closed only here: `aclosing` every stream measured 13.1-13.2 sentiment req/s, 16.6-19.2 without
            await stream.aclose()
            return last, False
    return last, True


async def _answer(engine, decode: TaskDecoder, task: str, prompt: dict, lora) -> tuple[str, int, int, int]:
    """(answer text, prompt tokens, completion tokens, prompt tokens served from the prefix cache) of one
    prompt. A constrained multi-token answer is decoded free first and constrained only when the free
    text is not one the constraint allows (lingtune.decoding); a first try stops as soon as its text can
    no longer become one. Completion tokens count both tries: the work done, not only the answer."""
    first = None
    if free := decode.first_try(task):
        last, ended = await _generate(engine, prompt, free, task, lora, lambda text: decode.may_accept(task, text))
        if ended and decode.accepts(task, last.outputs[0]):
            return _usage_row(decode, task, prompt, last)
        first = last  # its prompt tokens were computed then: cached ones are counted from it
    final, _ = await _generate(engine, prompt, decode.sampling(task), task, lora)
    return _usage_row(decode, task, prompt, final, first=first)


def _usage_row(decode: TaskDecoder, task: str, prompt: dict, final, first=None) -> tuple[str, int, int, int]:
    completion, before = final.outputs[0], first or final
    extra = len(first.outputs[0].token_ids) if first else 0
    return (decode.answer(task, completion), len(prompt["prompt_token_ids"]), len(completion.token_ids) + extra,
            before.num_cached_tokens or 0)


async def until_disconnected(request: Request, every_s: float = 0.25) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(every_s)


async def unless_disconnected(request: Request, work: list):
    """The results of `work` (coroutines), or HTTP 499 with every one cancelled once the client is gone."""
    jobs = asyncio.gather(*work)
    watch = asyncio.ensure_future(until_disconnected(request))
    try:
        await asyncio.wait({jobs, watch}, return_when=asyncio.FIRST_COMPLETED)
        if not jobs.done():
            log.info("%s: client went away, %d generation(s) cancelled", request.url.path, len(work))
            raise HTTPException(499, "client closed the request")
        return jobs.result()
    finally:
        watch.cancel()
        jobs.cancel()
        jobs.add_done_callback(_quietly)


def _quietly(future: asyncio.Future) -> None:
    """A cancelled gather ends with CancelledError; read it so asyncio does not log it as unhandled."""
    if not future.cancelled():
        future.exception()


async def run_task(task: str, body: TaskRequest, request: Request):
    state = request.app.state
    settings: TaskSettings = state.lingtune_tasks
    model = body.model or settings.default_models[task]
    lora = await _lora(state, model)
    decode = decoder(state)
    texts = [body.text] if body.text is not None else body.texts
    prompts = fitting_prompts(decode, task, texts, settings.max_model_len)
    answers = await unless_disconnected(
        request, [_answer(state.engine_client, decode, task, p, lora) for p in prompts])
    results = [to_result(task, t, a[0]) for t, a in zip(texts, answers)]
    prompt_tokens, completion_tokens = sum(a[1] for a in answers), sum(a[2] for a in answers)
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens,
             "prompt_tokens_details": {"cached_tokens": sum(a[3] for a in answers)}}  # OpenAI's usage shape
    if body.text is not None:
        return {**results[0], "model": model, "usage": usage}
    return {"results": results, "model": model, "usage": usage}


def _endpoint(name: str):
    async def endpoint(body: TaskRequest, request: Request):
        return await run_task(name, body, request)

    endpoint.__name__ = name
    endpoint.__doc__ = (f"`{{\"text\": \"...\"}}` -> the {name} result and `usage`; "
                        f"`{{\"texts\": [...]}}` -> `{{\"results\": [...], \"usage\"}}`.")
    return endpoint


for _name in tasks.TASKS:  # /v1/sentiment, /v1/ner
    router.add_api_route(f"/v1/{_name}", _endpoint(_name), methods=["POST"])
