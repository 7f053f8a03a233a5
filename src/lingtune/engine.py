"""Batched generation with vLLM in-process: one engine per base model, LoRA adapters per request,
and the constrained decoding of lingtune.decoding (the same as serving), so every answer parses.
Shared by evaluation and the MLflow model (lingtune.pyfunc)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from lingtune.decoding import TaskDecoder
from lingtune.errors import ModelError
from lingtune.models import unsupported_here
from lingtune.records import Record


@dataclass(frozen=True)
class EngineConfig:
    max_model_len: int = 640
    max_lora_rank: int = 8
    kv_cache_gb: int = 2
    enforce_eager: bool = True
    """Measured: eager start 17-34 s instead of 85-148 s on this CPU."""
    max_tokens_ner: int = 256
    cpu_threads_bind: str = "all"
    block_size: int = 32
    """KV-cache block: prefix caching shares whole blocks, and vLLM's CPU default (128) is longer
    than the prompt template every request starts with."""
    dtype: str = "auto"
    """lingtune.env.vllm_dtype: bf16 where it is native, float32 on an AVX2-only CPU."""


def _prepare_cpu_environment(cfg: EngineConfig) -> None:
    from lingtune.env import bind_vllm_cpu_threads

    # In-process engine: no spawn of a second interpreter (works from CLIs, tests and DVC alike).
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.kv_cache_gb))
    bind_vllm_cpu_threads(cfg.cpu_threads_bind)


def gpus() -> int:
    """GPUs an engine runs on: one where CUDA is available (vLLM's default tensor_parallel_size), else 0."""
    import torch

    return 1 if torch.cuda.is_available() else 0


class Engine:
    """A vLLM engine over one base model; adapters are applied per call, without merging."""

    def __init__(self, model_dir: str | Path, cfg: EngineConfig = EngineConfig(), enable_lora: bool = True):
        _prepare_cpu_environment(cfg)
        if reason := unsupported_here(model_dir):
            raise ModelError(reason)
        from vllm import LLM

        from lingtune.env import vllm_dtype

        self.cfg = cfg
        self.enable_lora = enable_lora
        self.llm = LLM(model=str(model_dir), enable_lora=enable_lora, max_lora_rank=cfg.max_lora_rank,
                       max_model_len=cfg.max_model_len, enforce_eager=cfg.enforce_eager, seed=0,
                       block_size=cfg.block_size, enable_prefix_caching=True, dtype=vllm_dtype(cfg.dtype, model_dir))
        self.tokenizer = self.llm.get_tokenizer()
        self.decoder = TaskDecoder(self.tokenizer, cfg.max_tokens_ner)
        self._adapters: dict[str, int] = {}
        self.first_tries = self.constrained_again = 0  # lingtune.decoding: free first, then the constraint

    def prompt(self, record: Record, constrained: bool = True) -> dict:
        return self.decoder.prompt(record.task, record.text, constrained)

    def sampling(self, task: str, constrained: bool):
        return self.decoder.sampling(task, constrained)

    def _lora(self, adapter: str | Path | None):
        if adapter is None:
            return None
        if not self.enable_lora:
            raise ModelError("this engine was started without LoRA support")
        from vllm.lora.request import LoRARequest

        key = str(Path(adapter).resolve())
        self._adapters.setdefault(key, len(self._adapters) + 1)
        return LoRARequest(f"adapter-{self._adapters[key]}", self._adapters[key], key)

    def generate(self, records: list[Record], adapter: str | Path | None = None, constrained: bool = True) -> list[str]:
        prompts = [self.prompt(r, constrained) for r in records]
        return self.complete([r.task for r in records], prompts, adapter, constrained)

    def complete(self, task_names: list[str], prompts: list[dict], adapter: str | Path | None = None,
                 constrained: bool = True) -> list[str]:
        """The answers to engine prompts (TaskDecoder.prompt) of the given tasks, in the trained format.
        Constrained multi-token answers are decoded free first and again constrained only where the
        free answer is not one the constraint allows (lingtune.decoding)."""
        lora = self._lora(adapter)
        first = [self.decoder.first_try(task, constrained) for task in task_names]
        params = [self.sampling(task, constrained) for task in task_names]
        tries = [free or param for free, param in zip(first, params)]
        outputs = [o.outputs[0] for o in self.llm.generate(prompts, tries, lora_request=lora, use_tqdm=False)]
        again = [i for i, free in enumerate(first) if free and not self.decoder.accepts(task_names[i], outputs[i])]
        if again:  # the first tries the constraint would not have produced: decode those constrained
            redone = self.llm.generate([prompts[i] for i in again], [params[i] for i in again], lora_request=lora,
                                       use_tqdm=False)
            for i, output in zip(again, redone):
                outputs[i] = output.outputs[0]
        self.first_tries += sum(1 for free in first if free)
        self.constrained_again += len(again)
        return [self.decoder.answer(task, o, constrained) for task, o in zip(task_names, outputs)]
