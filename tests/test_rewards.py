"""Per-sample rewards, their weights and schedule, clipping, and consistency (no model needed)."""

from __future__ import annotations

import pytest

from lingtune.config import RewardConfig, RewardWeights, parse_params
from lingtune.judge import RubricJudge
from lingtune.records import Record
from lingtune.train.rewards import (COMPONENTS, gold_column, make_weight_schedule, reward_functions, task_reward_fn,
                                    weighted_reward, weights_at)
from lingtune.train.scoring import consistency

TEXT = "江泽民在北京会见李鹏。"
GOLD = [{"start": 0, "end": 3, "type": "PER", "text": "江泽民"}, {"start": 4, "end": 6, "type": "LOC", "text": "北京"},
        {"start": 8, "end": 10, "type": "PER", "text": "李鹏"}]


def ner_answer(*pairs) -> str:
    import json

    return json.dumps({"entities": [{"text": t, "type": y} for t, y in pairs]}, ensure_ascii=False)


def column(*records) -> list[str]:
    return [gold_column(r) for r in records]


def test_sentiment_reward_is_per_sample_correctness_and_none_off_task():
    sentiment = task_reward_fn("sentiment")
    completions = ['{"label": "positive"}', '{"label": "negative"}', "positive!", '{"entities": []}']
    good, ner = Record(text="好书", label="positive"), Record(text="好书", entities=())
    out = sentiment(completions, task=["sentiment"] * 3 + ["ner"], record=column(good, good, good, ner))
    assert out == [1.0, 0.0, 0.0, None]
    chat = [[{"role": "assistant", "content": '{"label": "positive"}'}]]  # TRL's conversational completions
    assert sentiment(chat, task=["sentiment"], record=column(good)) == [1.0]
    assert sentiment.__name__ == "sentiment"


@pytest.mark.parametrize("answer,recall,f1", [
    (ner_answer(("江泽民", "PER"), ("北京", "LOC"), ("李鹏", "PER")), 1.0, 1.0),
    (ner_answer(("江泽民", "PER")), 1 / 3, 0.5),                        # stops after the first entity
    (ner_answer(("江泽民", "PER"), ("北京", "ORG")), 1 / 3, 0.4),         # wrong type is a miss (strict)
    (ner_answer(("江泽", "PER")), 0.0, 0.0),                             # partial span is a miss
    (ner_answer(("江泽民", "PER"), ("上海", "LOC")), 1 / 3, 0.4),         # unlocatable entity: a false positive
    ("江泽民", 0.0, 0.0),                                                 # not JSON
])
def test_entity_recall_and_f1(answer, recall, f1):
    from lingtune import tasks

    record = Record(text=TEXT, entities=tuple(GOLD))
    assert tasks.get("ner").reward(record, answer, "recall") == pytest.approx(recall)
    assert tasks.get("ner").reward(record, answer, "f1") == pytest.approx(f1)


def test_ner_reward_function_and_empty_gold():
    ner = task_reward_fn("ner", "recall")
    gold, empty = Record(text=TEXT, entities=tuple(GOLD)), Record(text="今天天气好", entities=())
    out = ner([ner_answer(("北京", "LOC")), '{"entities": []}', ner_answer(("北京", "LOC")), '{"label": "positive"}'],
              task=["ner", "ner", "ner", "sentiment"], record=column(gold, empty, empty, Record(text="好", label="positive")))
    assert out == [pytest.approx(1 / 3), 1.0, 0.0, None]
    assert ner.__name__ == "ner"


def test_default_weights_and_linear_schedule():
    cfg = RewardConfig()
    assert weights_at(cfg.weights_start, cfg.weights_end, 0.0) == [0.5, 0.3, 0.2]
    assert weights_at(cfg.weights_start, cfg.weights_end, 1.0) == pytest.approx([0.4, 0.4, 0.2])
    assert weights_at(cfg.weights_start, cfg.weights_end, 0.5) == pytest.approx([0.45, 0.35, 0.2])
    assert weights_at(cfg.weights_start, cfg.weights_end, 7.0) == pytest.approx([0.4, 0.4, 0.2])  # clamped
    assert [f.__name__ for f in reward_functions(cfg, RubricJudge())] == list(COMPONENTS)


def test_params_section_validates():
    params = parse_params({"reward": {"weights_start": {"sentiment": 1.0, "ner": 0, "instruction": 0}},
                           "rl": {"algorithm": "grpo"}})
    assert params.reward.weights_start.sentiment == 1.0 and params.rl.algorithm == "grpo"
    for bad in ({"reward": {"clip": [1.0, 0.0]}}, {"reward": {"weights_end": {"ner": -1}}},
                {"rl": {"algorithm": "ppo"}}, {"rl": {"num_generations": 1}}):
        with pytest.raises(ValueError):
            parse_params(bad)


def test_weighted_reward_skips_none_and_clips():
    components = {"sentiment": 1.0, "ner": None, "instruction": 0.5}
    assert weighted_reward(components, [0.5, 0.3, 0.2], (0.0, 1.0)) == pytest.approx(0.6)
    assert weighted_reward(components, [2.0, 0.0, 1.0], (0.0, 1.0)) == 1.0      # clipped high
    assert weighted_reward(components, [-1.0, 0.0, 0.0], (-0.5, 1.0)) == -0.5   # clipped low


def test_schedule_callback_sets_trainer_weights():
    from transformers import TrainerState

    class FakeTrainer:  # the two attributes the callback touches on RLOOTrainer / GRPOTrainer
        reward_weights = None
        logged: dict = {}

        def _log_metric(self, name, value):
            self.logged[name] = value

    trainer = FakeTrainer()
    callback = make_weight_schedule(RewardConfig(weights_end=RewardWeights(sentiment=0.1, ner=0.7, instruction=0.2)))
    callback.bind(trainer)
    callback.on_step_begin(None, TrainerState(global_step=5, max_steps=10), None)
    assert trainer.reward_weights.tolist() == pytest.approx([0.3, 0.5, 0.2])
    assert trainer.logged["reward_weight/ner"] == pytest.approx(0.5)


def test_consistency_agreement_and_valid_rate():
    answers = [['{"label": "positive"}'] * 3 + ['{"label": "negative"}'],       # 3 of 4 agree
               ['{"label": "negative"}', "oops", "oops", '{"label": "negative"}'],  # invalid answers count as a value
               [ner_answer(("北京", "LOC"))] * 2 + [ner_answer(("北京", "ORG")), "{"]]
    out = consistency(["sentiment", "sentiment", "ner"], answers)
    assert out["agreement"] == pytest.approx((0.75 + 0.5 + 0.5) / 3)
    assert out["valid_rate"] == pytest.approx(9 / 12)
    assert out["prompts"] == 3 and out["samples_per_prompt"] == 4
