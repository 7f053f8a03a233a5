"""Instruction-following judges: how well does an answer follow the prompt it was given? Scores in [0, 1].

* `RubricJudge` (default, offline, free): scores the answer's form from the answer itself, four checks
  worth a quarter each: it parses as the task's schema (`Task.parse`), it is nothing but that
  JSON object (no prose, no code fence), it uses the exact schema (only the expected keys, canonical
  label / type spellings), and every entity it names occurs in the input text. An answer that does not
  parse scores 0.
* `OpenAIJudge`: asks an LLM behind any OpenAI-compatible endpoint (the seed used GPT-3.5; vLLM or
  lingtune's own server work too) for a 0-10 grade. Timeouts and retries with exponential backoff are
  the `openai` client's own (`timeout`, `max_retries`); a thread pool bounds concurrency; answers are
  cached on disk under a hash of the request (endpoint, model, messages; never the key); tokens and cost
  are counted. The key is read from the environment variable named in params and is never logged.
  A request that still fails after its retries raises `JudgeError` (never a silent default score); a
  reply without a readable grade scores None ("not scored") and is counted as `unparsed`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

from lingtune import tasks
from lingtune.config import JudgeConfig
from lingtune.errors import JudgeError
from lingtune.tasks.base import first_json_object

__all__ = ["JudgeError", "JudgeItem", "make_judge", "rubric_score"]


@dataclass(frozen=True)
class JudgeItem:
    task: str
    text: str
    """The input text the prompt was built from."""
    answer: str


@dataclass
class JudgeStats:
    items: int = 0
    cache_hits: int = 0
    requests: int = 0
    """HTTP attempts, retries included."""
    errors: int = 0
    unparsed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(self).items()}


class Judge(Protocol):
    name: str
    stats: JudgeStats

    def score(self, items: Sequence[JudgeItem]) -> list[float | None]: ...


# -- offline rubric ------------------------------------------------------------------------------
def _whole_json(answer: str) -> object | None:
    try:
        return json.loads(answer.strip())
    except json.JSONDecodeError:
        return None


def rubric_checks(task: str, text: str, answer: str) -> dict[str, float]:
    """The four checks of the rubric, each in [0, 1]; all 0 when the answer does not parse."""
    spec = tasks.get(task)
    parsed = spec.parse(answer)
    if not parsed.valid:
        return {"parses": 0.0, "only_json": 0.0, "exact_schema": 0.0, "grounded": 0.0}
    whole = _whole_json(answer)
    names = [surface for surface, _ in parsed.entities]
    grounded = sum(surface in text for surface in names) / len(names) if names else 1.0
    return {"parses": 1.0, "only_json": float(isinstance(whole, dict)),
            "exact_schema": float(spec.exact_schema(first_json_object(answer))), "grounded": grounded}


def rubric_score(task: str, text: str, answer: str) -> float:
    checks = rubric_checks(task, text, answer)
    return sum(checks.values()) / len(checks)


class RubricJudge:
    name = "rubric"

    def __init__(self) -> None:
        self.stats = JudgeStats()

    def score(self, items: Sequence[JudgeItem]) -> list[float | None]:
        started = time.perf_counter()
        scores: list[float | None] = [rubric_score(i.task, i.text, i.answer) for i in items]
        self.stats.items += len(items)
        self.stats.seconds += time.perf_counter() - started
        return scores


# -- OpenAI-compatible LLM judge -------------------------------------------------------------------
SYSTEM = ("You grade how well an answer follows the instruction it was given: the required JSON format, "
          "nothing but that JSON, and content taken from the text. Reply with only a JSON object "
          '{"score": N}, N an integer from 0 (ignores the instruction) to 10 (follows it exactly).')


def judge_messages(item: JudgeItem) -> list[dict]:
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Instruction:\n{tasks.get(item.task).user_prompt(item.text)}\n\nAnswer:\n{item.answer}"}]


def parse_grade(reply: str) -> float | None:
    """0-10 grade in the reply -> [0, 1]; None when there is none."""
    obj = _whole_json(reply)
    value = obj.get("score") if isinstance(obj, dict) else None
    if not isinstance(value, (int, float)):
        match = re.search(r'"?score"?\s*[:=]\s*(-?\d+(?:\.\d+)?)', reply)
        value = float(match.group(1)) if match else None
    return None if value is None else min(1.0, max(0.0, float(value) / 10.0))


class DiskCache:
    """One JSON file per key; written to a temporary name and renamed, so readers never see half a file."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)

    def _path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        path = self._path(key)
        return json.loads(path.read_text()) if path.is_file() else None

    def put(self, key: str, value: dict) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(value))
        os.replace(tmp, path)


def request_key(cfg: JudgeConfig, messages: list[dict]) -> str:
    blob = json.dumps({"base_url": cfg.base_url.rstrip("/"), "model": cfg.model, "messages": messages,
                       "max_tokens": cfg.max_tokens, "temperature": 0}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class OpenAIJudge:
    cfg: JudgeConfig
    stats: JudgeStats = field(default_factory=JudgeStats)
    name: str = "openai"

    def __post_init__(self) -> None:
        import httpx
        from openai import OpenAI

        key = os.environ.get(self.cfg.api_key_env)
        if not key:
            raise JudgeError(f"judge: environment variable {self.cfg.api_key_env} is not set "
                             "(reward.judge.api_key_env names it)")
        self._lock = threading.Lock()
        self.cache = DiskCache(self.cfg.cache_dir)
        http = httpx.Client(event_hooks={"request": [self._count_request]})
        self.client = OpenAI(base_url=self.cfg.base_url, api_key=key, timeout=self.cfg.timeout_s,
                             max_retries=self.cfg.max_retries, http_client=http)

    def _count_request(self, _request) -> None:
        with self._lock:
            self.stats.requests += 1

    def _ask(self, item: JudgeItem) -> float | None:
        messages = judge_messages(item)
        key = request_key(self.cfg, messages)
        cached = self.cache.get(key)
        if cached is None:
            cached = self._call(messages)
            self.cache.put(key, cached)
        else:
            with self._lock:
                self.stats.cache_hits += 1
        grade = parse_grade(cached["reply"])
        if grade is None:
            with self._lock:
                self.stats.unparsed += 1
        return grade

    def _call(self, messages: list[dict]) -> dict:
        from openai import OpenAIError

        try:
            response = self.client.chat.completions.create(
                model=self.cfg.model, messages=messages, max_tokens=self.cfg.max_tokens, temperature=0)
        except OpenAIError as exc:
            with self._lock:
                self.stats.errors += 1
            raise JudgeError(f"judge {self.cfg.base_url} ({self.cfg.model}) failed after "
                             f"{self.cfg.max_retries} retries: {type(exc).__name__}: {exc}") from None
        usage = response.usage
        prompt_tokens, completion_tokens = (usage.prompt_tokens, usage.completion_tokens) if usage else (0, 0)
        with self._lock:
            self.stats.prompt_tokens += prompt_tokens
            self.stats.completion_tokens += completion_tokens
            self.stats.cost_usd += (prompt_tokens * self.cfg.usd_per_million_input
                                    + completion_tokens * self.cfg.usd_per_million_output) / 1e6
        return {"reply": response.choices[0].message.content or "", "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens}

    def score(self, items: Sequence[JudgeItem]) -> list[float | None]:
        """Scores in input order; the first failure is raised once every request has finished."""
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=self.cfg.concurrency) as pool:
            futures = [pool.submit(self._ask, item) for item in items]
        self.stats.items += len(items)
        self.stats.seconds += time.perf_counter() - started
        return [f.result() for f in futures]


def make_judge(cfg: JudgeConfig) -> Judge:
    return OpenAIJudge(cfg) if cfg.kind == "openai" else RubricJudge()
