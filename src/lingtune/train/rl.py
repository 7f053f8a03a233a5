"""RL stage: TRL RLOO (or GRPO) on top of the SFT LoRA adapter, with lingtune's weighted rewards.

Features and their cost:
* Policy: the backbone with the SFT adapter loaded trainable (`PeftModel.from_pretrained(...,
  is_trainable=True)`); only the adapter trains and only it is saved (`models/rl/`, same base as
  `models/sft/`, so the evaluation stage loads it as one more LoRA variant).
* Reference: for a PEFT policy that already carries an adapter, TRL (1.16, peft >= 0.20) copies it into a
  frozen adapter named "ref" and computes reference log-probs with it: the KL term (`rl.beta`) keeps
  the policy near the SFT model, not near the bare backbone.
* Objective (RLOO): k = `rl.num_generations` sampled answers per prompt; reward = weighted components
  (lingtune.train.rewards) clipped to `reward.clip`, minus beta x the sequence KL to the reference;
  advantage = reward - mean reward of the other k-1 answers (leave-one-out baseline); loss = PPO-style
  clipped surrogate (`rl.epsilon`). GRPO (`rl.algorithm: grpo`) uses group-normalised advantages and a
  per-token KL in the loss instead, and has no reward clipping.
* Prompts: the training split, rendered with the chat template exactly as in SFT (TRL applies the
  tokenizer's template to conversational prompts, without adding a second BOS).
* Log-probs: TRL's chunked LM head on the completion tokens only (`completion_rows_only`; TRL scores
  every position off CUDA): 2-3x faster RLOO steps on CPU, same numbers.
* Precision (`rl.precision`; `auto`: bf16 where its matmuls are native, else fp32): `bf16` keeps the
  frozen base in bfloat16, the dtype the backbone ships in, with the adapter in float32 under bf16 autocast
  (TRL's `bf16=True`); `fp32` upcasts the base, no autocast. No gradient checkpointing.
* Fault tolerance: checkpoints every `rl.save_steps` in `rl.checkpoint_dir`; the same command resumes
  from the last complete one (`trainer.train(resume_from_checkpoint=...)`) and continues the same MLflow
  run. A checkpoint is complete once its `lingtune_complete` marker exists (written after "ref" is
  removed); one without it (killed mid-save) is deleted at start-up. Checkpoints of another configuration
  are dropped, not resumed.
* Monitoring: TRL's logs go to MLflow (`report_to="mlflow"` inside lingtune's run): reward per component,
  reward weights, KL, clip ratios, completion lengths, step time; at the end `compute_hours` and `cost_usd`
  (judge requests included) of this execution, also in `rl.metrics`.
* Consistency: agreement of k sampled answers per validation prompt and the valid-JSON rate, after RL,
  next to the SFT model's (the `reward` stage's report, same prompts, sampler and seed).

Errors: ValueError when the SFT adapter is missing; JudgeError when an OpenAI judge fails after retries.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from lingtune import tasks
from lingtune.artifacts import CheckpointDir, code_hash, content_hash, fingerprint, publishing, write_json, write_text
from lingtune.errors import StageError
from lingtune.formats import read_jsonl
from lingtune.train.rewards import COMPONENTS, gold_column, make_weight_schedule, reward_functions, weights_at
from lingtune.train.scoring import (consistency_by_task, load_policy, policy_precision, prompt_set, reward_params,
                                   sample_answers)


def prompt_dataset(path: Path, max_prompts: int, seed: int):
    """Conversational prompts plus the gold columns the reward functions read."""
    import random

    from datasets import Dataset

    records = read_jsonl(path)
    if max_prompts and max_prompts < len(records):
        records = random.Random(seed).sample(records, max_prompts)
    return Dataset.from_list([{"prompt": tasks.get(r.task).messages(r)[:1], "task": r.task, "text": r.text,
                               "record": gold_column(r)} for r in records])


def trainer_args(params, output_dir: str):
    """RLOOConfig / GRPOConfig from params.rl and params.reward."""
    from trl import GRPOConfig, RLOOConfig

    cfg, reward = params.rl, params.reward
    common = dict(
        output_dir=output_dir, max_steps=cfg.max_steps, learning_rate=cfg.lr, lr_scheduler_type="constant",
        warmup_steps=0, per_device_train_batch_size=cfg.prompts_per_step * cfg.num_generations,
        gradient_accumulation_steps=1, num_generations=cfg.num_generations,
        max_completion_length=cfg.max_completion_length, temperature=cfg.temperature, beta=cfg.beta,
        epsilon=cfg.epsilon, reward_weights=weights_at(reward.weights_start, reward.weights_end, 0.0),
        use_cpu=not torch.cuda.is_available(), bf16=policy_precision(cfg.precision) == "bf16",
        gradient_checkpointing=False,
        disable_dropout=True,
        # two kept: the trainer rotates before the newest is marked complete, the previous one must survive
        save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=2, logging_steps=cfg.logging_steps,
        report_to=["mlflow"], run_name="rl", seed=params.seed, data_seed=params.seed,
        remove_unused_columns=False, dataloader_num_workers=0, log_completions=False,
        disable_tqdm=not sys.stderr.isatty(),  # without a terminal: one printed line per logged step
    )
    if cfg.algorithm == "grpo":
        return GRPOConfig(**common)
    return RLOOConfig(**common, reward_clip_range=tuple(reward.clip))


COMPLETE = "lingtune_complete"
"""Marker file of a checkpoint folder that is whole: written after the trainer's save and the "ref" removal."""
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")  # transformers' PREFIX_CHECKPOINT_DIR-<global step>


def make_drop_ref_callback():
    """Checkpoints keep the trained adapter only. PEFT saves every adapter, the frozen "ref" copy in a
    sub-folder, and transformers' resume then loads sub-folder adapters only: the trained "default" one
    at the top would be silently skipped and training would resume from the SFT weights. "ref" is
    rebuilt from the SFT adapter at start-up anyway. Then the checkpoint is marked complete: a kill
    before that point leaves a folder the resume must not use."""
    from transformers import TrainerCallback

    class DropRefAdapter(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            shutil.rmtree(folder / "ref", ignore_errors=True)
            if args.should_save and folder.is_dir():
                write_text(folder / COMPLETE, f"{state.global_step}\n")

    return DropRefAdapter()


@contextmanager
def completion_rows_only():
    """While active, TRL's fused LM head scores the completion tokens only, on every device.

    TRL (`add_fused_lm_head`) computes the log-probs of the policy, the old policy and the reference
    through a chunked LM head. It passes only the labelled rows (the completion tokens) on CUDA/XPU, but
    every position elsewhere, to keep tile shapes fixed for compiled back-ends: on CPU that is the
    prompt and the padding too, ~10x the rows of a 262k-vocabulary head, which was ~2/3 of an RLOO
    step (torch.profiler). The log-probs and gradients of the completion tokens are the same either way
    (tests/test_rl.py). TRL makes that choice with one module-level call, `_use_triton(device)`,
    swapped here for the duration; if TRL renames it the stage stops instead of running slow."""
    import trl.trainer.utils as trl_utils

    original = getattr(trl_utils, "_use_triton", None)
    if not callable(original):
        raise StageError(f"trl {trl_utils.__name__}._use_triton is gone (trl changed): the RL stage's "
                         "completion-only scoring needs updating for this TRL version")
    trl_utils._use_triton = lambda device: True
    try:
        yield
    finally:
        trl_utils._use_triton = original


def _scoring_completions_only(trainer_cls):
    """`trainer_cls` whose `train` scores the completion rows only (`completion_rows_only`)."""

    class Trainer(trainer_cls):
        def train(self, *args, **kwargs):
            with completion_rows_only():
                return super().train(*args, **kwargs)

    Trainer.__name__ = Trainer.__qualname__ = trainer_cls.__name__
    return Trainer


def build_trainer(params, model, tokenizer, dataset, judge, output_dir: str):
    from trl import GRPOTrainer, RLOOTrainer

    trainer_cls = _scoring_completions_only(GRPOTrainer if params.rl.algorithm == "grpo" else RLOOTrainer)
    schedule = make_weight_schedule(params.reward)
    trainer = trainer_cls(model=model, reward_funcs=reward_functions(params.reward, judge),
                          args=trainer_args(params, output_dir), train_dataset=dataset, processing_class=tokenizer,
                          callbacks=[schedule, make_drop_ref_callback()])
    schedule.bind(trainer)
    return trainer


def checkpoint_fingerprint(params, data_sha: str, sft_sha: str) -> str:
    """What checkpoints belong to: rl and reward knobs, seed, data, SFT adapter, and the code the stage runs.
    The precision is the resolved one: `auto` trains in bf16 on one machine and fp32 on another, and a run
    resumed on the other kind must start over rather than continue another precision's steps."""
    skip = {"save_steps", "logging_steps", "metrics", "out_dir", "checkpoint_dir", "threads"}
    rl = {**params.rl.model_dump(exclude=skip), "precision": policy_precision(params.rl.precision)}
    return fingerprint(rl=rl, reward=params.reward.model_dump(), seed=params.seed, data=data_sha, sft=sft_sha,
                       code=code_hash(__name__))


def last_checkpoint(folder: Path) -> str | None:
    """The highest complete `checkpoint-N`. Incomplete ones are deleted, not only skipped: the trainer
    would save that step again into the leftover files, and count the folder among the
    `save_total_limit` checkpoints it keeps."""
    steps = {int(match[1]): path for path in Path(folder).iterdir()
             if path.is_dir() and (match := _CHECKPOINT.fullmatch(path.name))}
    complete = [step for step, path in steps.items() if (path / COMPLETE).is_file()]
    for step, path in sorted(steps.items()):
        if step not in complete:
            print(f"{path}: incomplete checkpoint (no {COMPLETE}: the run stopped while saving it); deleted",
                  file=sys.stderr, flush=True)
            shutil.rmtree(path)
    return str(steps[max(complete)]) if complete else None


def save_adapter(model, tokenizer, out_dir: Path) -> None:
    """The trained adapter only (not TRL's "ref" copy), published atomically."""
    with publishing(out_dir) as staging:
        model.save_pretrained(staging, selected_adapters=["default"], safe_serialization=True)
        tokenizer.save_pretrained(staging)


def _summary(trainer) -> dict:
    """Means over the logged steps of what TRL reported, plus the first and last reward."""
    logs = [row for row in trainer.state.log_history if "reward" in row]
    keys = ["reward", "kl", "clip_ratio/region_mean", "completions/mean_length", "step_time",
            *[f"rewards/{c}/mean" for c in COMPONENTS]]

    def mean(key: str):
        values = [row[key] for row in logs if row.get(key) is not None]
        return sum(values) / len(values) if values else None

    return {"logged_steps": len(logs), "first_reward": logs[0]["reward"] if logs else None,
            "last_reward": logs[-1]["reward"] if logs else None, "mean": {k: mean(k) for k in keys}}


def _change(before: dict | None, after: dict) -> dict | None:
    if not before:
        return None
    return {scope: {k: after[scope][k] - before[scope][k] for k in ("agreement", "valid_rate")}
            for scope in after if scope in before}


def measure_consistency(model, tokenizer, params) -> dict:
    cfg = params.reward
    records = prompt_set(Path(params.data.out_dir) / "val.jsonl", cfg.prompts_per_task)
    answers = sample_answers(model, tokenizer, records, cfg.samples, cfg.temperature, cfg.max_new_tokens, params.seed)
    return consistency_by_task(records, answers, cfg, params.seed)


def start_tracking(params, run_id: str | None):
    """The stage's MLflow run: the interrupted run when resuming, else a new one with every knob as a param.
    TRL's MLflow callback logs into the active run."""
    from lingtune.tracking import stage_run

    knobs = {"seed": params.seed, "rl": params.rl.model_dump(), "reward": reward_params(params.reward)}
    return stage_run(params.tracking, "rl", knobs, run_name=f"rl-{params.rl.algorithm}", run_id=run_id)


def run_rl(params) -> dict:
    """DVC stage `rl`: the same command starts a run or resumes the last one."""
    import mlflow

    from lingtune.judge import make_judge
    from lingtune.tracking import flatten

    stage_started = time.time()  # loading included: what `compute_hours` counts
    cfg = params.rl
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    train_path = Path(params.data.out_dir) / "train.jsonl"
    judge = make_judge(params.reward.judge)  # fails fast (missing key) before the model is loaded
    model, tokenizer = load_policy(cfg.sft_dir, trainable=True, precision=cfg.precision)
    checkpoints = CheckpointDir(cfg.checkpoint_dir, checkpoint_fingerprint(params, content_hash(train_path),
                                                                           content_hash(cfg.sft_dir)))
    last, run_id = checkpoints.resume(last_checkpoint)
    trainer = build_trainer(params, model, tokenizer, prompt_dataset(train_path, cfg.max_prompts, params.seed),
                            judge, str(checkpoints.path))
    started = time.time()
    with start_tracking(params, run_id) as run:
        checkpoints.record(run.info.run_id)
        trainer.train(resume_from_checkpoint=last)
        train_seconds = time.time() - started
        save_adapter(trainer.model, tokenizer, Path(cfg.out_dir))
        metrics = _finish(params, trainer, tokenizer, judge, train_seconds, resumed=last, run_id=run.info.run_id,
                          stage_started=stage_started)
        mlflow.log_metrics({f"final.{k}": v for k, v in flatten("", metrics).items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)})
        mlflow.log_metrics({k: metrics[k] for k in ("compute_hours", "cost_usd")})
        mlflow.log_artifacts(cfg.out_dir, "adapter")
    return metrics


def _gpus(trainer) -> int:
    """CUDA devices the trainer used (0 on CPU), for the price of its compute."""
    return trainer.args.n_gpu if trainer.args.device.type == "cuda" else 0


def _finish(params, trainer, tokenizer, judge, train_seconds: float, resumed: str | None, run_id: str,
            stage_started: float) -> dict:
    from lingtune.tracking import run_cost

    cfg = params.rl
    started = time.time()
    after = measure_consistency(trainer.model, tokenizer, params)
    report = Path(params.reward.report)
    before = json.loads(report.read_text()).get("consistency") if report.is_file() else None
    metrics = {
        "algorithm": cfg.algorithm, "steps": trainer.state.global_step, "resumed_from": resumed,
        "train_seconds_this_run": round(train_seconds, 1), **_summary(trainer),
        "judge": {"kind": params.reward.judge.kind, **judge.stats.as_dict()},
        "consistency": {"before": before, "after": after, "change": _change(before, after),
                        "before_source": str(report) if before else None,
                        "seconds": round(time.time() - started, 1)},
        **run_cost(params.cost, time.time() - stage_started, _gpus(trainer), judge.stats.cost_usd),
        "mlflow_run_id": run_id,
    }
    write_json(cfg.metrics, metrics)
    return metrics
