"""vLLM's own OpenAI-compatible FastAPI app (routes, request models, streaming, error handlers,
LoRA by `model` name) around an AsyncLLM engine, plus lingtune's task routes.

The app is built the way `vllm serve` builds it (launchers.api_server.entry.build_and_serve),
but inside BentoML's worker: BentoML owns the HTTP server, the port and the process; the
service's startup hook calls `start` and hands the app to the mounted Gateway.
"""

from __future__ import annotations

import contextlib
from argparse import Namespace

from starlette.responses import JSONResponse

from lingtune.serve.tasks import TaskSettings, router


class Gateway:
    """The ASGI app BentoML mounts at import time; it forwards to vLLM's app once the engine runs
    (503 before that, which only a request racing the startup hook can see)."""

    def __init__(self):
        self.app = None
        self.engine = None
        self.fallback = False
        """Serving `serve.fallback_model`: alive, but not what was asked for, so never ready."""

    def ready(self) -> bool:
        return self.app is not None and not self.engine.errored and not self.fallback

    def tokenizer(self):
        """The served model's tokenizer (the guard counts prompt tokens with it); None before the engine runs."""
        return None if self.engine is None else self.engine.get_tokenizer()

    async def __call__(self, scope, receive, send):
        if self.app is None:
            if scope["type"] == "http":
                return await JSONResponse({"error": {"message": "the model is still loading", "code": 503,
                                                     "type": "ServiceUnavailable"}}, 503)(scope, receive, send)
            return None
        return await self.app(scope, receive, send)


async def start(stack: contextlib.AsyncExitStack, args: Namespace, tasks: TaskSettings):
    """Start the engine (closed with `stack`) and return (engine, app)."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client_from_engine_args
    from vllm.entrypoints.launchers.app import build_app

    engine_args = AsyncEngineArgs.from_cli_args(args)
    engine = await stack.enter_async_context(build_async_engine_client_from_engine_args(engine_args))
    supported = await engine.get_supported_tasks()
    app = build_app(args, supported, engine.model_config)
    app.include_router(router)
    await init_app_state(engine, app.state, args, supported)
    app.state.lingtune_tasks = tasks
    return engine, app
