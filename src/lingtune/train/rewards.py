"""Per-sample rewards, written as TRL reward functions, and their weights over training.

Three components, each in [0, 1]:

* one per task (`Task.reward`): `sentiment` is 1 when the answer's label is the gold label, else 0;
  `ner` is the strict entity F1 of the answer (type and exact character span, located as in
  evaluation), and a sentence without gold entities scores 1 for an empty answer, else 0. F1, not
  recall: precision must count, or listing an entity two or three times (the second copy finds no
  place in the text, so it is a false positive) or inventing one costs nothing and RL learns to do it.
* `instruction`: the judge's instruction-following score (lingtune.judge).

A component that does not apply to a sample (sentiment on an NER prompt and vice versa) returns None:
TRL turns it into NaN and sums the weighted components with `nansum`, so with weights 0.5 / 0.3 / 0.2 a
sentiment sample's reward is 0.5 * sentiment + 0.2 * instruction and an NER sample's 0.3 * ner + 0.2 *
instruction, which are the shipped weights at the start of a run (NER 0.3 was chosen on validation against 0
and 0.5: benchmarks/rl_reward.py). RLOO compares a
completion only with the other completions of the same prompt, so the two tasks' different scales do
not bias each other. An answer that does not parse scores 0 on every component (never None).

Weights move linearly from `reward.weights_start` to `reward.weights_end` over the run
(`RewardWeightSchedule`, a TrainerCallback that sets the trainer's `reward_weights` before each step);
`reward.clip` is TRL's `reward_clip_range` on the weighted sum.
"""

from __future__ import annotations

import json
from typing import Callable

from lingtune import tasks
from lingtune.config import RewardConfig, RewardWeights
from lingtune.judge import Judge, JudgeItem
from lingtune.records import Record, record_to_json

COMPONENTS = (*tasks.names(), "instruction")


def completion_text(completion) -> str:
    """TRL passes strings for plain prompts and [{"role": "assistant", "content": ...}] for chat prompts."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


def gold_column(record: Record) -> str:
    """The `record` column of a reward data set: the gold record as JSON (one column for every task)."""
    return json.dumps(record_to_json(record), ensure_ascii=False)


def task_reward_fn(name: str, metric: str = "f1") -> Callable:
    """TRL reward function of one task: its per-answer reward on that task's prompts, None elsewhere."""
    spec = tasks.get(name)

    def reward(completions: list, task: list[str], record: list[str], **_) -> list[float | None]:
        return [spec.reward(Record.model_validate_json(r), completion_text(c), metric) if t == name else None
                for c, t, r in zip(completions, task, record)]

    reward.__name__ = name  # TRL logs rewards/<__name__>/mean
    return reward


def instruction_reward_fn(judge: Judge) -> Callable:
    def instruction(completions: list, task: list[str], text: list[str], **_) -> list[float | None]:
        items = [JudgeItem(t, x, completion_text(c)) for c, t, x in zip(completions, task, text)]
        return judge.score(items)

    return instruction


def reward_functions(cfg: RewardConfig, judge: Judge) -> list[Callable]:
    """In COMPONENTS order, the order of the weights."""
    return [*(task_reward_fn(name, cfg.ner_metric) for name in tasks.names()), instruction_reward_fn(judge)]


def weights_at(start: RewardWeights, end: RewardWeights, progress: float) -> list[float]:
    """Linear interpolation from start (progress 0) to end (progress 1), in COMPONENTS order."""
    p = min(1.0, max(0.0, progress))
    return [getattr(start, c) + (getattr(end, c) - getattr(start, c)) * p for c in COMPONENTS]


def weighted_reward(components: dict[str, float | None], weights: list[float],
                    clip: tuple[float, float]) -> float:
    """The total TRL computes (nansum of weighted components, then the clip), for the reward data set."""
    total = sum(w * components[c] for c, w in zip(COMPONENTS, weights) if components.get(c) is not None)
    return min(clip[1], max(clip[0], total))


def make_weight_schedule(cfg: RewardConfig):
    """A TrainerCallback that sets `trainer.reward_weights` before every optimizer step; call `.bind(trainer)`."""
    import torch
    from transformers import TrainerCallback

    class RewardWeightSchedule(TrainerCallback):
        trainer = None

        def bind(self, trainer) -> "RewardWeightSchedule":
            self.trainer = trainer
            return self

        def on_step_begin(self, args, state, control, **kwargs):
            weights = weights_at(cfg.weights_start, cfg.weights_end, state.global_step / max(1, state.max_steps))
            self.trainer.reward_weights = torch.tensor(weights, dtype=torch.float32)
            for name, w in zip(COMPONENTS, weights):  # TRL averages these into its logs (MLflow)
                self.trainer._log_metric(f"reward_weight/{name}", w)

    return RewardWeightSchedule()
