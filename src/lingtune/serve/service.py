"""The BentoML service: `bentoml serve` (bentofile.yaml) or `lingtune serve`.

Reads params.yaml (or $LINGTUNE_PARAMS) once, at import: the model, adapters, limits and the
name of the environment variable that holds the API key. Routes:
  /v1/chat/completions, /v1/completions, /v1/models, ...   vLLM's OpenAI server, unchanged
  /v1/sentiment, /v1/ner                                    lingtune's task endpoints
  /healthz, /livez, /readyz (BentoML), /health (vLLM)       open without the key
Every other route is a 404 (lingtune.serve.guard). Without a key it binds 127.0.0.1 and answers
local clients only, unless `serve.allow_anonymous: true`.
"""

from __future__ import annotations

import contextlib
import logging
import os

import bentoml

from lingtune.config import load_params
from lingtune.serve.app import Gateway, start
from lingtune.serve.guard import Guard
from lingtune.serve.limits import Limits
from lingtune.serve.runtime import access_summary, bind_host, prepare_environment, resolve_plan, vllm_args
from lingtune.serve.tasks import TaskSettings

log = logging.getLogger("lingtune.serve")

PARAMS = load_params(os.environ.get("LINGTUNE_PARAMS", "params.yaml"))
CFG = PARAMS.serve
API_KEY = os.environ.get(CFG.api_key_env) or None
prepare_environment(CFG)  # before any engine process exists (LD_PRELOAD is read at process start)
gateway = Gateway()


@bentoml.asgi_app(gateway, path="/")  # vLLM's routes carry /v1 themselves; BentoML keeps its own routes
@bentoml.service(name="lingtune", workers=1, http={"host": bind_host(CFG, API_KEY), "port": CFG.port},
                 traffic={"timeout": CFG.timeout_s})
class LingTune:
    """One worker, one vLLM engine: the engine batches all concurrent requests itself."""

    def __init__(self) -> None:
        self.stack = contextlib.AsyncExitStack()

    @bentoml.on_startup
    async def start_engine(self) -> None:
        log.warning("%s", access_summary(CFG, API_KEY))
        plan = resolve_plan(PARAMS)  # here, not at import: `bentoml build` needs no model on disk
        if plan.fallback:
            log.warning("%s; /readyz stays not ready while the fallback is served", plan.fallback)
        for skipped in plan.skipped:
            log.warning("adapter %s not served", skipped)
        tasks = TaskSettings(default_models=plan.task_model, max_tokens_ner=CFG.max_tokens_ner,
                             max_model_len=CFG.max_model_len)
        gateway.engine, gateway.app = await start(self.stack, vllm_args(CFG, plan), tasks)
        gateway.fallback = bool(plan.fallback)
        log.info("serving %s (%s) with adapters %s; task endpoints use %s", plan.base_name, plan.base,
                 sorted(plan.adapters), plan.task_model)

    @bentoml.on_shutdown
    async def stop_engine(self) -> None:
        await self.stack.aclose()

    async def __is_ready__(self) -> bool:
        return gateway.ready()


LingTune.add_asgi_middleware(
    Guard, api_key=API_KEY, allow_anonymous=CFG.allow_anonymous, tokenizer=gateway.tokenizer,
    limits=Limits(CFG.max_tokens, CFG.max_prompt_tokens, CFG.max_batch, CFG.max_body_bytes, CFG.max_concurrency))
