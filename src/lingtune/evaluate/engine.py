"""Batched generation with vLLM: one engine per base model, LoRA adapters per request, and
constrained decoding so every answer parses (shared with serving later).

Constraints follow the trained answer format exactly (prompts.answer_json):
* sentiment: a `choice` between the two answers, `{"label": "positive"}` / `{"label": "negative"}`;
* NER: a regular expression for `{"entities": [{"text": "...", "type": "PER|LOC|ORG"}, ...]}`
  with the same separators as training, no free whitespace (a model that has not learned the
  format would otherwise pad the JSON with spaces until max_tokens).
Where the tokenizer allows it, sentiment is one step instead (TaskDecoder): the shared answer prefix
goes into the prompt and the next token is restricted to the two label tokens.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from lingtune.data.formats import Record
from lingtune.data.prompts import answer_json

SENTIMENT_CHOICES = ['{"label": "positive"}', '{"label": "negative"}']
_ENTITY = r'\{"text": "[^"\\\n]{1,40}", "type": "(PER|LOC|ORG)"\}'
NER_REGEX = r'\{"entities": \[(' + _ENTITY + r'(, ' + _ENTITY + r'){0,40})?\]\}'


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


def _prepare_cpu_environment(cfg: EngineConfig) -> None:
    from lingtune.env import bind_vllm_cpu_threads

    # In-process engine: no spawn of a second interpreter (works from CLIs, tests and DVC alike).
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.kv_cache_gb))
    bind_vllm_cpu_threads(cfg.cpu_threads_bind)


def trained_encoding(tokenizer, record: Record) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) of a record exactly as SFT encoded them (train.loader.encode_example)."""
    from lingtune.train.loader import IGNORE, encode_example

    encoded = encode_example(tokenizer, record)
    prompt_len = next((i for i, label in enumerate(encoded.labels) if label != IGNORE), len(encoded.labels))
    return encoded.input_ids[:prompt_len], encoded.input_ids[prompt_len:]


def _task_record(task: str, text: str, label: str = "positive") -> Record:
    return Record(text=text, label=label) if task == "sentiment" else Record(text=text, entities=())


@dataclass(frozen=True)
class LabelStep:
    """The sentiment answer as tokens: a prefix both labels share, then one token that decides."""

    prefix_ids: tuple[int, ...]
    labels: dict[int, str]


def label_step(tokenizer) -> LabelStep | None:
    """None when the tokenizer does not tell the labels apart by one token after a shared prefix."""
    answers = {label: trained_encoding(tokenizer, _task_record("sentiment", "x", label))[1]
               for label in ("positive", "negative")}
    first, second = answers.values()
    shared = next((i for i, (a, b) in enumerate(zip(first, second)) if a != b), min(len(first), len(second)))
    deciding = {ids[shared]: label for label, ids in answers.items() if len(ids) > shared}
    return LabelStep(tuple(first[:shared]), deciding) if len(deciding) == len(answers) else None


class TaskDecoder:
    """Engine input for a task request, and the trained answer text from the engine's output.

    Prompts are token ids exactly as SFT encoded them. A text prompt would be tokenized again by
    vLLM with special tokens added: a second <bos> after the one Gemma's chat template writes.
    Constrained sentiment: the answer's shared prefix (`{"label": "`) is part of the prompt and the
    label is one step restricted to the two label tokens, so the prefill yields the answer and no
    decode step runs (the same argmax a choice constraint reaches after forcing the prefix). A
    tokenizer that splits the labels otherwise gets the choice constraint over the whole answer.
    """

    def __init__(self, tokenizer, max_tokens_ner: int):
        self.tokenizer = tokenizer
        self.max_tokens_ner = max_tokens_ner
        self.label_step = label_step(tokenizer)

    def _one_step(self, task: str, constrained: bool) -> bool:
        return task == "sentiment" and constrained and self.label_step is not None

    def prompt(self, task: str, text: str, constrained: bool = True) -> dict:
        ids = trained_encoding(self.tokenizer, _task_record(task, text))[0]
        if self._one_step(task, constrained):
            ids += self.label_step.prefix_ids
        return {"prompt_token_ids": ids}

    def sampling(self, task: str, constrained: bool = True):
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        if self._one_step(task, constrained):
            return SamplingParams(temperature=0, max_tokens=1, allowed_token_ids=list(self.label_step.labels))
        max_tokens = 32 if task == "sentiment" else self.max_tokens_ner
        if not constrained:
            return SamplingParams(temperature=0, max_tokens=max_tokens)
        rule = (StructuredOutputsParams(choice=SENTIMENT_CHOICES) if task == "sentiment"
                else StructuredOutputsParams(regex=NER_REGEX))
        return SamplingParams(temperature=0, max_tokens=max_tokens, structured_outputs=rule)

    def answer(self, task: str, output, constrained: bool = True) -> str:
        """The answer in the trained format from a vLLM CompletionOutput."""
        if self._one_step(task, constrained) and output.token_ids:
            label = self.label_step.labels.get(output.token_ids[0])
            if label is not None:
                return answer_json(_task_record("sentiment", "x", label))
        return output.text


class Engine:
    """A vLLM engine over one base model; adapters are applied per call, without merging."""

    def __init__(self, model_dir: str | Path, cfg: EngineConfig = EngineConfig(), enable_lora: bool = True):
        _prepare_cpu_environment(cfg)
        from vllm import LLM

        self.cfg = cfg
        self.enable_lora = enable_lora
        self.llm = LLM(model=str(model_dir), enable_lora=enable_lora, max_lora_rank=cfg.max_lora_rank,
                       max_model_len=cfg.max_model_len, enforce_eager=cfg.enforce_eager, seed=0,
                       block_size=cfg.block_size, enable_prefix_caching=True)
        self.tokenizer = self.llm.get_tokenizer()
        self.decoder = TaskDecoder(self.tokenizer, cfg.max_tokens_ner)
        self._adapters: dict[str, int] = {}

    def prompt(self, record: Record, constrained: bool = True) -> dict:
        return self.decoder.prompt(record.task, record.text, constrained)

    def sampling(self, task: str, constrained: bool):
        return self.decoder.sampling(task, constrained)

    def _lora(self, adapter: str | Path | None):
        if adapter is None:
            return None
        if not self.enable_lora:
            raise ValueError("this engine was started without LoRA support")
        from vllm.lora.request import LoRARequest

        key = str(Path(adapter).resolve())
        self._adapters.setdefault(key, len(self._adapters) + 1)
        return LoRARequest(f"adapter-{self._adapters[key]}", self._adapters[key], key)

    def generate(self, records: list[Record], adapter: str | Path | None = None, constrained: bool = True) -> list[str]:
        prompts = [self.prompt(r, constrained) for r in records]
        params = [self.sampling(r.task, constrained) for r in records]
        outputs = self.llm.generate(prompts, params, lora_request=self._lora(adapter), use_tqdm=False)
        return [self.decoder.answer(r.task, o.outputs[0], constrained) for r, o in zip(records, outputs)]
