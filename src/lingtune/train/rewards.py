"""Per-sample rewards, written as TRL reward functions, and their weights over training.

Three components, each in [0, 1]:

* `sentiment`: 1 when the answer's label is the gold label, else 0 (the per-sample term of accuracy /
  F1: summed over a batch it counts the true positives of both classes).
* `ner`: strict entity recall of the answer (type and exact character span, spans located with
  `prompts.locate_entities`, as in evaluation); `reward.ner_metric: f1` uses per-sample F1 instead.
  A sentence without gold entities scores 1 for an empty answer, else 0.
* `instruction`: the judge's instruction-following score (lingtune.judge).

A component that does not apply to a sample (sentiment on an NER prompt and vice versa) returns None:
TRL turns it into NaN and sums the weighted components with `nansum`, so a sentiment sample's reward is
0.5 * sentiment + 0.2 * instruction and an NER sample's 0.3 * ner + 0.2 * instruction. RLOO compares a
completion only with the other completions of the same prompt, so the two tasks' different scales do
not bias each other. An answer that does not parse scores 0 on every component (never None).

Weights move linearly from `reward.weights_start` to `reward.weights_end` over the run
(`RewardWeightSchedule`, a TrainerCallback that sets the trainer's `reward_weights` before each step);
`reward.clip` is TRL's `reward_clip_range` on the weighted sum.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable

from lingtune.config import RewardConfig, RewardWeights
from lingtune.data.prompts import locate_entities, parse_answer
from lingtune.judge import Judge, JudgeItem

COMPONENTS = ("sentiment", "ner", "instruction")


def completion_text(completion) -> str:
    """TRL passes strings for plain prompts and [{"role": "assistant", "content": ...}] for chat prompts."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


def sentiment_reward(completions: list, task: list[str], label: list, **_) -> list[float | None]:
    out: list[float | None] = []
    for completion, t, gold in zip(completions, task, label):
        if t != "sentiment":
            out.append(None)
            continue
        out.append(float(parse_answer("sentiment", completion_text(completion)).label == gold))
    return out


sentiment_reward.__name__ = "sentiment"  # TRL logs rewards/<__name__>/mean


def _gold_spans(entities) -> Counter:
    return Counter((e["start"], e["end"], e["type"]) for e in entities or [])


def entity_score(text: str, answer: str, gold: Counter, metric: str = "recall") -> float:
    """Strict span-and-type recall (or F1) of one NER answer; an unparsable answer scores 0."""
    parsed = parse_answer("ner", answer)
    if not parsed.valid:
        return 0.0
    located, unlocated = locate_entities(text, parsed.entities)
    predicted = Counter((e.start, e.end, e.type) for e in located)
    if not gold:
        return float(not parsed.entities)
    hits = sum((gold & predicted).values())
    recall = hits / sum(gold.values())
    if metric == "recall":
        return recall
    n_pred = sum(predicted.values()) + len(unlocated)
    precision = hits / n_pred if n_pred else 0.0
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def ner_reward_fn(metric: str = "recall") -> Callable:
    def ner(completions: list, task: list[str], text: list[str], entities: list, **_) -> list[float | None]:
        return [entity_score(x, completion_text(c), _gold_spans(e), metric) if t == "ner" else None
                for c, t, x, e in zip(completions, task, text, entities)]

    return ner


def instruction_reward_fn(judge: Judge) -> Callable:
    def instruction(completions: list, task: list[str], text: list[str], **_) -> list[float | None]:
        items = [JudgeItem(t, x, completion_text(c)) for c, t, x in zip(completions, task, text)]
        return judge.score(items)

    return instruction


def reward_functions(cfg: RewardConfig, judge: Judge) -> list[Callable]:
    """In COMPONENTS order, the order of the weights."""
    return [sentiment_reward, ner_reward_fn(cfg.ner_metric), instruction_reward_fn(judge)]


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
