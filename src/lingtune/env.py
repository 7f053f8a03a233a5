"""Process-wide defaults every entry point applies first: offline and quiet.

Set with `setdefault`, so a user can still opt in (e.g. HF_HUB_OFFLINE=0 to fetch a hub model).
"""

import os

OFFLINE_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "DVC_NO_ANALYTICS": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "BENTOML_DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_NO_USAGE_STATS": "1",
    # stdout is for results (`--json`); vLLM logs to stdout unless told otherwise
    "VLLM_LOGGING_STREAM": "ext://sys.stderr",
}


def apply_offline_defaults() -> None:
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)


def bind_vllm_cpu_threads(setting: str) -> None:
    """VLLM_CPU_OMP_THREADS_BIND for vLLM's CPU engine, unless the user set it.

    `all`: every CPU this process may run on. `auto`: vLLM's own choice, one logical CPU per physical
    core minus one reserved for its scheduler process; on this 2-vCPU machine that leaves a single
    OpenMP thread, and `all` measured 1.3-1.6x the requests/s (benchmarks/serve.py). Anything else is
    passed through in vLLM's syntax (`0-3`, `0-3|4-7`, `nobind`).
    """
    value = ",".join(str(cpu) for cpu in sorted(os.sched_getaffinity(0))) if setting == "all" else setting
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", value)
