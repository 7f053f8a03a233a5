"""What the served engine is: the model and adapters from `serve:` in params.yaml, the CPU
environment vLLM wants, and vLLM's own server arguments (parsed by vLLM's parser, so every
attribute its app expects exists)."""

from __future__ import annotations

import glob
import json
import os
import sys
from argparse import Namespace
from dataclasses import dataclass, field
from pathlib import Path

from lingtune.config import Params, ServeConfig
from lingtune.errors import ModelError
from lingtune.models import adapter_base, is_adapter, merged_model, resolve, same_model, unsupported_here


@dataclass(frozen=True)
class ServePlan:
    """The resolved model: base folder, the name it answers to, and LoRA adapters by name."""

    base: Path
    base_name: str
    adapters: dict[str, Path] = field(default_factory=dict)
    task_model: dict[str, str] = field(default_factory=dict)
    """The task endpoints' default `model`, per task."""
    skipped: tuple[str, ...] = ()
    fallback: str = ""
    """Why `serve.fallback_model` is served instead of `serve.model` (empty when it is not)."""

    @property
    def serves_fallback(self) -> bool:
        return bool(self.fallback)


def resolve_served_model(params: Params):
    """`serve.model`, or `serve.fallback_model` (and why) when it is set and the registry truly lacks
    what a models:/ URI names (no store, model, alias or version). A registry that cannot answer (locked,
    corrupt, another schema) raises: serving the untrained backbone then would hide the failure."""
    from lingtune.registry import RegistryMissing

    cfg = params.serve
    where = {"tracking_uri": params.tracking.uri, "cache_dir": params.register_.cache_dir}
    try:
        return resolve(cfg.model, **where), ""
    except RegistryMissing as exc:
        if not cfg.fallback_model:
            raise
        return resolve(cfg.fallback_model, **where), f"{exc}; serving serve.fallback_model {cfg.fallback_model} instead"


def resolve_plan(params: Params) -> ServePlan:
    """Resolve `serve.model` (folder, adapter folder or models:/ URI) and the adapters that fit its base;
    ModelError when vLLM cannot run that model here (an INT4 model without vLLM's INT4 kernel)."""
    cfg = params.serve
    ref, fallback = resolve_served_model(params)
    if reason := unsupported_here(ref.base):
        raise ModelError(f"cannot serve {cfg.model}: {reason}")
    adapters: dict[str, Path] = {}
    base_name = cfg.served_model_name
    skipped = []
    if ref.adapter is not None and cfg.merge_adapter:  # one merged model, no LoRA path
        merged = merged_model(Path(ref.base), Path(ref.adapter), Path(cfg.merge_cache_dir))
        skipped = [f"{name} ({folder}: serve.merge_adapter serves {cfg.model} merged, without LoRA)"
                   for name, folder in cfg.adapters.items()]
        return ServePlan(merged, base_name, {}, task_models(cfg, base_name, {}, skipped), tuple(skipped), fallback)
    if ref.adapter is not None:  # an adapter as the model: it takes the served name, the base `<name>-base`
        adapters[cfg.served_model_name] = Path(ref.adapter)
        base_name = f"{cfg.served_model_name}-base"
    for name, folder in cfg.adapters.items():
        folder = Path(folder)
        reason = _unservable(folder, Path(ref.base))
        if reason:
            skipped.append(f"{name} ({folder}: {reason})")
        else:
            adapters.setdefault(name, folder)
    return ServePlan(Path(ref.base), base_name, adapters, task_models(cfg, base_name, adapters, skipped),
                     tuple(skipped), fallback)


def every_task(name: str) -> dict[str, str]:
    from lingtune.tasks import names

    return dict.fromkeys(names(), name)


def task_models(cfg: ServeConfig, base_name: str, adapters: dict[str, Path], skipped: list[str]) -> dict[str, str]:
    """The task endpoints' default model per task: the served model (`serve.task_model: null`), or the
    named ones, each of which must be served, or ModelError: a task must not silently be answered by
    another model (the untrained base, say) than the one the params name."""
    if cfg.task_model is None:
        return every_task(cfg.served_model_name if cfg.served_model_name in adapters else base_name)
    named = every_task(cfg.task_model) if isinstance(cfg.task_model, str) else dict(cfg.task_model)
    served = {*adapters, base_name}
    if missing := {task: name for task, name in named.items() if name not in served}:
        raise ModelError(f"serve.task_model: {missing} not served (served: {sorted(served)}"
                         + (f"; skipped: {'; '.join(skipped)})" if skipped else ")"))
    return named


def _unservable(folder: Path, served_base: Path) -> str | None:
    """Why an adapter cannot run on the served base (None when it can)."""
    if not is_adapter(folder):
        return "no adapter_config.json"
    try:
        base = adapter_base(folder)
    except ModelError as exc:
        return str(exc)
    return None if same_model(base, served_base) else f"trained on {base}, not on the served {served_base}"


LOCAL_HOST = "127.0.0.1"


def bind_host(cfg: ServeConfig, api_key: str | None) -> str:
    """`serve.host` with a key (or allow_anonymous); loopback only without one."""
    return cfg.host if api_key or cfg.allow_anonymous else LOCAL_HOST


def access_summary(cfg: ServeConfig, api_key: str | None) -> str:
    host = bind_host(cfg, api_key)
    if api_key:
        return f"listening on {host}:{cfg.port}; every route but the health probes needs the key in ${cfg.api_key_env}"
    if cfg.allow_anonymous:
        return f"listening on {host}:{cfg.port} WITHOUT an API key (serve.allow_anonymous: true): anyone who reaches it"
    return (f"listening on {host}:{cfg.port} for local clients only: ${cfg.api_key_env} is not set "
            "(set it, or serve.allow_anonymous: true, to serve other hosts)")


def preload_libraries() -> list[str]:
    """tcmalloc and Intel OpenMP, where the venv or the system has them (vLLM's CPU guide asks for
    both; without them vLLM preloads torch's libgomp itself)."""
    roots = [os.path.join(sys.prefix, "lib"), "/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib"]
    found = []
    for patterns in (("libtcmalloc_minimal.so*", "libtcmalloc.so*"), ("libiomp5.so",)):
        hits = [h for p in patterns for root in roots for h in sorted(glob.glob(os.path.join(root, p)))]
        found += hits[:1]
    return found


def prepare_environment(cfg: ServeConfig) -> None:
    """Environment of the engine process. vLLM starts its engine core with `spawn` on CPU, so what
    is set here (LD_PRELOAD included) takes effect there, where the model runs."""
    from lingtune.env import apply_offline_defaults, bind_vllm_cpu_threads, quiet_library_noise

    apply_offline_defaults()
    quiet_library_noise()  # the service's log, like a stage's, shows only what its operator can act on
    bind_vllm_cpu_threads(cfg.cpu_threads_bind)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.kv_cache_gb))
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"  # the engine loop must not share the API's core
    if cfg.preload and "LD_PRELOAD" not in os.environ:
        libs = preload_libraries()
        if libs:
            os.environ["LD_PRELOAD"] = ":".join(libs)


def vllm_args(cfg: ServeConfig, plan: ServePlan) -> Namespace:
    """The arguments `vllm serve` would parse for this plan."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from lingtune.env import vllm_dtype

    argv = ["--model", str(plan.base), "--served-model-name", plan.base_name,
            "--max-model-len", str(cfg.max_model_len), "--max-num-seqs", str(cfg.max_num_seqs),
            "--seed", "0", "--disable-uvicorn-access-log", "--disable-log-stats",
            "--enable-prompt-tokens-details"]  # usage.prompt_tokens_details.cached_tokens, as OpenAI reports it
    argv += ["--enforce-eager"] if cfg.enforce_eager else []
    argv += ["--dtype", vllm_dtype(model_dir=plan.base)]  # float32 on an AVX2-only CPU (bf16 there: a slow fallback)
    argv += ["--enable-prefix-caching"] if cfg.prefix_caching else ["--no-enable-prefix-caching"]
    argv += ["--block-size", str(cfg.block_size)] if cfg.block_size else []
    if not cfg.json_whitespace:  # structured outputs as compact JSON: a small model cannot pad them with blanks
        argv += ["--structured-outputs-config", json.dumps({"backend": "xgrammar", "disable_any_whitespace": True})]
    if plan.adapters:
        argv += ["--enable-lora", "--max-lora-rank", str(cfg.max_lora_rank), "--max-loras", str(len(plan.adapters)),
                 "--lora-modules", *(f"{name}={path}" for name, path in plan.adapters.items())]
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(argv)
    validate_parsed_serve_args(args)
    return args
