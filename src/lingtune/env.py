"""Process-wide defaults every entry point applies first: offline and quiet.

Set with `setdefault`, so a user can still opt in (e.g. HF_HUB_OFFLINE=0 to fetch a hub model).
"""

import json
import os
from pathlib import Path

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


# Messages a lingtune user can do nothing about, matched by their start (checked against the pinned stack).
_NOISE_WARNINGS = (
    r".*'set_vital' is deprecated",  # torchdata's StatefulDataLoader on torch 2.13
    r".*isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning's pytree helper
    r".*_register_pytree_node is deprecated",
    r".*The '(train|val)_dataloader' does not have many workers",  # num_workers=0 is deliberate (resumable)
    # lingtune always asks Lightning to resume from its own fingerprinted checkpoint folder (lingtune.artifacts):
    r'\.fit\(ckpt_path="last"\) is set, but there is no last checkpoint',  # a first run
    r"Checkpoint directory .* exists and is not empty",  # a resumed run
)
_NOISE_LOG_LINES = (
    "Failed to load CPU gemm_4bit_forward",  # bitsandbytes on a CPU without its optional kernel
    "💡 Tip:",  # Lightning's litlogger advertisement
)


class _DropNoise:
    def filter(self, record) -> bool:
        message = record.getMessage()
        return not any(noise in message for noise in _NOISE_LOG_LINES)


def quiet_library_noise() -> None:
    """Filter the warnings and log lines of the stack that say nothing actionable to a lingtune user.
    Without a terminal, progress bars are off (they fill logs with carriage returns); long stages
    print a line every N steps instead."""
    import logging
    import sys
    import warnings

    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

    for pattern in _NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    # A logger's filters see only the records logged on it, not those its children propagate: name each
    # module logger that emits a line of _NOISE_LOG_LINES.
    for name in ("bitsandbytes", "bitsandbytes.cextension", "bitsandbytes.backends.cpu.ops",
                 "lightning.pytorch.utilities.rank_zero", "pytorch_lightning.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise())


def native_bf16(gpu: bool = False) -> bool:
    """Whether bf16 matmuls run at matrix speed here: a CUDA GPU with bf16 support, or a CPU with AVX-512
    BF16 or AMX. Elsewhere (an AVX2-only CPU, e.g. many AMD EPYC servers) torch takes a fallback path
    measured ~100x slower than fp32 (benchmarks/matmul_peak.py), so training should run in fp32 there."""
    if gpu:
        import torch

        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            flags = next((line.split() for line in handle if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def vllm_dtype(requested: str = "auto", model_dir: str | Path | None = None) -> str:
    """vLLM's `dtype` for an engine on `model_dir` here. `auto` is the checkpoint's (bf16) on a GPU or on a
    CPU with native bf16 matmuls, else float32: vLLM's CPU backend keeps bf16 on an AVX2-only CPU and runs it
    on the slow fallback path (benchmarks/engine_dtype.py). A quantized model keeps its checkpoint's dtype
    (vLLM's INT4 CPU kernel has only run with its bf16 activations here; float32 is untested). Any other value is passed through."""
    if requested != "auto":
        return requested
    import torch

    config = Path(model_dir or "") / "config.json"
    if model_dir is not None and config.is_file() and "quantization_config" in json.loads(config.read_text()):
        return "auto"
    return "auto" if torch.cuda.is_available() or native_bf16() else "float32"
