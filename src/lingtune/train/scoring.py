"""Sampling answers from a LoRA policy, generation consistency, and the DVC stage `reward`.

* `sample_answers`: k sampled answers per record with `transformers.generate`, from the prompt the
  model was trained on (`tasks.base.prompt_ids`, the token ids SFT encodes).
* `consistency`: agreement of the k answers to each prompt (share of answers equal to the most common
  parsed answer, an unparsable answer counting as its own value), averaged over the prompts, with a
  percentile bootstrap interval that resamples the prompts (with 16 prompts a task, one prompt moves
  the mean by several points: the interval says how far), and the valid-JSON rate.
* `run_reward` (stage `reward`): samples the SFT model on `reward.prompts_per_task` validation prompts
  per task, scores every answer with the judge and the task rewards, and writes the reward data set
  (`reward.dataset`, one JSON line per answer) and `reward.report` (judge statistics, mean components,
  the SFT model's consistency: the "before" of the RL stage, and the run's `compute_hours` and `cost_usd`,
  judge requests included). One MLflow run.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import torch

from lingtune import tasks
from lingtune.artifacts import write_json, write_jsonl
from lingtune.bootstrap import mean_interval
from lingtune.config import RewardConfig
from lingtune.formats import read_jsonl
from lingtune.models import ModelRef, adapter_base, load
from lingtune.records import Record
from lingtune.tasks.base import prompt_ids
from lingtune.train.rewards import COMPONENTS, gold_column, reward_functions, weighted_reward, weights_at
from lingtune.train.sampling import use_inverse_cdf_sampling


def policy_precision(precision: str) -> str:
    """`rl.precision: auto` made concrete: bf16 where this machine's bf16 matmuls are native (AMX or
    AVX-512 BF16, a bf16 GPU), else fp32 (on an AVX2-only CPU they take a fallback two orders of magnitude
    slower: benchmarks/matmul_peak.py)."""
    if precision != "auto":
        return precision
    from lingtune.env import native_bf16

    return "bf16" if native_bf16(torch.cuda.is_available()) else "fp32"


def load_policy(adapter_dir: str | Path, trainable: bool, precision: str = "fp32", contiguous_head: bool = True,
                inverse_cdf: bool = True):
    """The base the adapter was trained on with the LoRA adapter on top, and its tokenizer.

    `precision` bf16 keeps the frozen base in bfloat16, the dtype the backbone ships in (so no weight
    changes), and the adapter in float32 (PEFT upcasts it): the matmuls run on the bf16 matrix units and
    generation reads half the bytes per token. fp32 upcasts the base (TRL on CPU without autocast).
    Sampling draws by inverse CDF instead of `torch.multinomial` (lingtune.train.sampling). The stages keep
    both generation fixes; `contiguous_head` / `inverse_cdf` off are for the benchmarks that measure them."""
    dtype = torch.bfloat16 if policy_precision(precision) == "bf16" else torch.float32
    model, tokenizer = load(ModelRef(adapter_base(adapter_dir), Path(adapter_dir)), dtype, trainable)
    if contiguous_head:
        contiguous_head_input(model)
    if inverse_cdf:
        use_inverse_cdf_sampling(model)
    return model, tokenizer


def contiguous_head_input(model) -> None:
    """The LM head gets a contiguous input. `generate` feeds it the last position of every row,
    `hidden[:, -1:, :]`, a strided view: on CPU `F.linear` then runs a batched matmul that copies the
    262k x 640 weight once per row (pytorch/pytorch#151934): 3.3 s instead of 20 ms in bf16, and 2x slower in
    fp32, once per `generate` call. A copy of the few rows costs nothing."""
    model.get_output_embeddings().register_forward_pre_hook(lambda _module, args: (args[0].contiguous(), *args[1:]))


@torch.no_grad()
def sample_answers(model, tokenizer, records: list[Record], k: int, temperature: float, max_new_tokens: int,
                   seed: int, batch_size: int = 4) -> list[list[str]]:
    """k sampled answers per record (seeded), decoded without special tokens."""
    torch.manual_seed(seed)
    model.eval()
    out: list[list[str]] = []
    for i in range(0, len(records), batch_size):
        chunk = records[i : i + batch_size]
        ids = [prompt_ids(tokenizer, tasks.get(r.task), r.text) for r in chunk]
        enc = tokenizer.pad({"input_ids": ids}, padding=True, padding_side="left", return_tensors="pt")
        generated = model.generate(**enc, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                                   max_new_tokens=max_new_tokens, num_return_sequences=k,
                                   pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(generated[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        out.extend(texts[j * k : (j + 1) * k] for j in range(len(chunk)))
    return out


def consistency(task_names: list[str], answers: list[list[str]], confidence: float = 0.95, resamples: int = 1000,
                seed: int = 0) -> dict:
    """Agreement of the k answers per prompt (mean share of the modal answer) with its bootstrap
    interval over the prompts, and the valid-JSON rate."""
    agreements, valid, total = [], 0, 0
    for task, group in zip(task_names, answers):
        values = [tasks.get(task).normalised(a) for a in group]
        agreements.append(Counter(values).most_common(1)[0][1] / len(values))
        valid += sum(v != "<invalid>" for v in values)
        total += len(values)
    low, high = mean_interval(agreements, confidence, resamples, seed) if agreements else (None, None)
    return {"agreement": sum(agreements) / len(agreements) if agreements else 0.0,
            "agreement_interval": {"low": low, "high": high, "confidence": confidence, "resamples": resamples,
                                   "method": "percentile bootstrap over prompts"},
            "valid_rate": valid / total if total else 0.0, "prompts": len(answers),
            "samples_per_prompt": len(answers[0]) if answers else 0}


def consistency_by_task(records: list[Record], answers: list[list[str]], cfg: RewardConfig, seed: int) -> dict:
    names = [r.task for r in records]
    interval = {"confidence": cfg.confidence, "resamples": cfg.bootstrap_samples, "seed": seed}
    out = {"all": consistency(names, answers, **interval)}
    for task in tasks.names():
        picked = [(t, a) for t, a in zip(names, answers) if t == task]
        out[task] = consistency([t for t, _ in picked], [a for _, a in picked], **interval)
    return out


def prompt_set(path: Path, per_task: int) -> list[Record]:
    """The first `per_task` records of each task (files are already shuffled by prepare)."""
    records = read_jsonl(path)
    return [r for task in tasks.names() for r in [x for x in records if x.task == task][:per_task]]


def score_samples(records: list[Record], answers: list[list[str]], cfg, judge) -> list[dict]:
    """One row per answer: the three reward components and the weighted total at the start weights."""
    flat = [(r, a) for r, group in zip(records, answers) for a in group]
    columns = {"completions": [a for _, a in flat], "task": [r.task for r, _ in flat],
               "text": [r.text for r, _ in flat], "record": [gold_column(r) for r, _ in flat]}
    parts = [reward(**columns) for reward in reward_functions(cfg, judge)]  # TRL's call, in COMPONENTS order
    weights = weights_at(cfg.weights_start, cfg.weights_end, 0.0)
    rows = []
    for i, (record, answer) in enumerate(flat):
        components = {c: parts[j][i] for j, c in enumerate(COMPONENTS)}
        rows.append({"id": record.id, "task": record.task, "text": record.text, "answer": answer, **components,
                     "reward": weighted_reward(components, weights, cfg.clip)})
    return rows


def _means(rows: list[dict]) -> dict:
    out = {}
    for key in (*COMPONENTS, "reward"):
        values = [r[key] for r in rows if r[key] is not None]
        out[key] = sum(values) / len(values) if values else None
    return out


def reward_params(cfg) -> dict:
    """params.reward as MLflow params: the judge's base_url without credentials (lingtune.judge.redact_url)."""
    from lingtune.judge import public_config

    return {**cfg.model_dump(), "judge": public_config(cfg.judge)}


def run_reward(params) -> dict:
    """DVC stage `reward`: the SFT model's sampled answers on validation prompts, scored by the judge."""
    from lingtune.judge import describe, make_judge
    from lingtune.tracking import run_cost, stage_run

    stage_started = time.time()
    cfg = params.reward
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    records = prompt_set(Path(params.data.out_dir) / "val.jsonl", cfg.prompts_per_task)
    judge = make_judge(cfg.judge)  # fails fast (missing key) before the model is loaded
    # the RL stage's numerics: its consistency "after" is compared with this "before"
    model, tokenizer = load_policy(params.rl.sft_dir, trainable=False, precision=params.rl.precision)
    started = time.time()
    answers = sample_answers(model, tokenizer, records, cfg.samples, cfg.temperature, cfg.max_new_tokens, params.seed)
    sampled = time.time() - started
    rows = score_samples(records, answers, cfg, judge)
    report = {"judge": {**describe(cfg.judge), **judge.stats.as_dict()},
              "mean": _means(rows), "consistency": consistency_by_task(records, answers, cfg, params.seed),
              "answers": len(rows), "sampling_seconds": round(sampled, 1),
              "wall_seconds": round(time.time() - started, 1),
              **run_cost(params.cost, time.time() - stage_started, _gpus(model), judge.stats.cost_usd)}
    write_jsonl(cfg.dataset, rows)
    write_json(cfg.report, report)
    with stage_run(params.tracking, "reward", {"reward": reward_params(cfg), "seed": params.seed}):
        import mlflow

        mlflow.log_metrics(_numbers(report))
        mlflow.log_artifact(cfg.dataset, "reward")
        mlflow.log_artifact(cfg.report, "reward")
    return report


def _gpus(model) -> int:
    return 1 if model.device.type == "cuda" else 0


def _numbers(report: dict, prefix: str = "") -> dict[str, float]:
    """Flat numeric leaves of a nested report, for MLflow metrics."""
    out: dict[str, float] = {}
    for key, value in report.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_numbers(value, name + "."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out
