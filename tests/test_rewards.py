"""Per-sample rewards, their weights and schedule, clipping, and consistency (with its bootstrap interval); the
schedule through the real TRL trainers on the tiny model. The NER reward cannot be gamed by listing entities
twice or inventing them."""

from __future__ import annotations

import json

import pytest

from lingtune.config import RewardConfig, RewardWeights, parse_params
from lingtune.judge import RubricJudge
from lingtune.records import Record
from lingtune.train.rewards import COMPONENTS, gold_column, reward_functions, task_reward_fn, weighted_reward, weights_at
from lingtune.train.scoring import consistency

TEXT = "江泽民在北京会见李鹏。"
GOLD = [{"start": 0, "end": 3, "type": "PER", "text": "江泽民"}, {"start": 4, "end": 6, "type": "LOC", "text": "北京"},
        {"start": 8, "end": 10, "type": "PER", "text": "李鹏"}]


def ner_answer(*pairs) -> str:
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


EXACT = ner_answer(("江泽民", "PER"), ("北京", "LOC"), ("李鹏", "PER"))
TWICE = ner_answer(("江泽民", "PER"), ("江泽民", "PER"), ("北京", "LOC"), ("北京", "LOC"), ("李鹏", "PER"), ("李鹏", "PER"))
THRICE = ner_answer(*[pair for pair in (("江泽民", "PER"), ("北京", "LOC"), ("李鹏", "PER")) for _ in range(3)])
INVENTED = ner_answer(("江泽民", "PER"), ("北京", "LOC"), ("李鹏", "PER"), ("朱镕基", "PER"))


@pytest.mark.parametrize("answer,f1", [
    (EXACT, 1.0),
    (ner_answer(("江泽民", "PER")), 0.5),                                # stops after the first entity
    (ner_answer(("江泽民", "PER"), ("北京", "ORG")), 0.4),               # wrong type is a miss (strict)
    (ner_answer(("江泽", "PER")), 0.0),                                  # partial span is a miss
    (ner_answer(("江泽民", "PER"), ("上海", "LOC")), 0.4),               # unlocatable entity: a false positive
    (TWICE, 2 * 3 / (2 * 3 + 3)),                                        # every entity listed twice
    (THRICE, 2 * 3 / (2 * 3 + 6)),                                       # ... three times
    (INVENTED, 2 * 3 / (2 * 3 + 1)),                                     # a name that is not in the text
    ("江泽民", 0.0),                                                      # not JSON
])
def test_entity_f1(answer, f1):
    from lingtune import tasks

    record = Record(text=TEXT, entities=tuple(GOLD))
    assert tasks.get("ner").reward(record, answer, "f1") == pytest.approx(f1)


@pytest.mark.parametrize("answer,reward", [
    (EXACT, 1.0),
    (ner_answer(("江泽民", "PER")), 1 - 2 / 4),                          # two misses of three (+1 in the denominator)
    # a wrong type: a miss and a spurious entity
    (ner_answer(("江泽民", "PER"), ("北京", "ORG"), ("李鹏", "PER")), 1 - (1 + 0.7) / 4),
    (TWICE, 1 - 0.7 * 3 / 4),                                            # three spurious copies
    (THRICE, 0.0),                                                       # six: clipped at 0
    (INVENTED, 1 - 0.7 / 4),
    ("江泽民", 0.0),
])
def test_micro_reward_weighs_misses_and_spurious_entities_as_micro_f1_does(answer, reward):
    from lingtune import tasks

    record = Record(text=TEXT, entities=tuple(GOLD))
    assert tasks.get("ner").reward(record, answer, "micro") == pytest.approx(reward)


def test_micro_reward_does_not_lean_to_recall_on_one_entity_sentences():
    """Per-answer F1 on a one-entity sentence: a spurious entity costs 1/3 of the reward, a miss all of it, so
    RL trades precision for recall; the micro reward charges a spurious entity 0.7 of a miss."""
    from lingtune import tasks

    ner = tasks.get("ner")
    record = Record(text="李鹏在北京。", entities=({"start": 0, "end": 2, "type": "PER", "text": "李鹏"},))
    exact, extra, missed = ner_answer(("李鹏", "PER")), ner_answer(("李鹏", "PER"), ("北京", "LOC")), '{"entities": []}'

    def cost_ratio(metric: str) -> float:  # what a spurious entity costs, as a share of what a miss costs
        r = {a: ner.reward(record, a, metric) for a in (exact, extra, missed)}
        return (r[exact] - r[extra]) / (r[exact] - r[missed])

    assert cost_ratio("f1") == pytest.approx(1 / 3)
    assert cost_ratio("micro") == pytest.approx(0.7)
    empty = Record(text="今天天气好。", entities=())
    assert ner.reward(empty, missed, "micro") == 1.0 and ner.reward(empty, extra, "micro") < 1.0


def test_listing_entities_again_or_inventing_them_lowers_the_reward():
    """What RL learned from a recall-only reward (the same entity two or three times) now costs it: per task
    component and in the weighted reward TRL optimises (the rubric judge cannot tell a repeated list from the exact one)."""
    record = Record(text=TEXT, entities=tuple(GOLD))
    shipped = RewardConfig()
    assert shipped.ner_metric == "f1"
    ner_on = RewardConfig(weights_start=RewardWeights(sentiment=0.5, ner=0.3, instruction=0.2),
                          weights_end=RewardWeights(sentiment=0.4, ner=0.4, instruction=0.2))
    answers = [EXACT, TWICE, THRICE, INVENTED]
    n = len(answers)
    parts = [fn(answers, task=["ner"] * n, text=[TEXT] * n, record=column(*[record] * n))
             for fn in reward_functions(shipped, RubricJudge())]
    assert parts[COMPONENTS.index("ner")][0] == 1.0
    assert [parts[COMPONENTS.index("instruction")][i] for i in range(3)] == [1.0] * 3  # the judge sees no fault

    def totals(cfg: RewardConfig, progress: float) -> list[float]:
        weights = weights_at(cfg.weights_start, cfg.weights_end, progress)
        return [weighted_reward({c: parts[j][i] for j, c in enumerate(COMPONENTS)}, weights, cfg.clip)
                for i in range(n)]

    for progress in (0.0, 1.0):
        exact, twice, thrice, invented = totals(ner_on, progress)
        assert exact > twice > thrice and exact > invented
        # the shipped weights leave NER out: listing again or inventing still earns nothing more than the exact answer
        exact, twice, thrice, invented = totals(shipped, progress)
        assert exact >= twice >= thrice and exact >= invented


def test_recall_is_no_longer_a_reward_choice():
    from lingtune import tasks

    with pytest.raises(ValueError, match="ner_metric"):
        parse_params({"reward": {"ner_metric": "recall"}})
    with pytest.raises(ValueError, match="unknown NER reward metric"):
        tasks.get("ner").reward(Record(text=TEXT, entities=tuple(GOLD)), TWICE, "recall")


def test_ner_reward_function_and_empty_gold():
    ner = task_reward_fn("ner", "f1")
    gold, empty = Record(text=TEXT, entities=tuple(GOLD)), Record(text="今天天气好", entities=())
    out = ner([ner_answer(("北京", "LOC")), '{"entities": []}', ner_answer(("北京", "LOC")), '{"label": "positive"}'],
              task=["ner", "ner", "ner", "sentiment"], record=column(gold, empty, empty, Record(text="好", label="positive")))
    assert out == [pytest.approx(0.5), 1.0, 0.0, None]
    assert ner.__name__ == "ner"


def test_default_weights_and_linear_schedule():
    cfg = RewardConfig()
    assert weights_at(cfg.weights_start, cfg.weights_end, 0.0) == [0.5, 0.3, 0.2]
    assert weights_at(cfg.weights_start, cfg.weights_end, 1.0) == pytest.approx([0.4, 0.3, 0.2])
    assert weights_at(cfg.weights_start, cfg.weights_end, 0.5) == pytest.approx([0.45, 0.3, 0.2])
    assert weights_at(cfg.weights_start, cfg.weights_end, 7.0) == pytest.approx([0.4, 0.3, 0.2])  # clamped
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


class LengthJudge:
    """A Judge (lingtune.judge.Judge) that scores an answer by its length, never 0, and keeps every call:
    the tiny model's answers score 0 on the task rewards, so the instruction component is what varies."""

    name = "length"

    def __init__(self):
        from lingtune.judge import JudgeStats

        self.stats, self.calls = JudgeStats(), []

    def score(self, items):
        scores = [(len(item.answer) % 5 + 1) / 5 for item in items]
        self.calls.append(list(zip(items, scores)))
        return scores


@pytest.mark.parametrize("algorithm", ["rloo", "grpo"])
def test_schedule_moves_the_weights_trl_uses_for_the_reward(root, tiny_model_dir, tmp_path, algorithm):
    """The real TRL trainer, built as `lingtune rl` builds it: each step runs with the schedule's
    `reward_weights`, and the reward TRL logs for a step is the mean of `weighted_reward` over the step's
    samples under those weights (the other task's None component skipped, as TRL's nansum does)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, TrainerCallback
    from transformers.integrations import MLflowCallback

    from lingtune import tasks
    from lingtune.formats import read_jsonl
    from lingtune.train.rl import build_trainer, prompt_dataset
    from lingtune.train.scoring import load_policy

    lines = (root / "tests" / "data" / "train.jsonl").read_text(encoding="utf-8").splitlines()
    shortest = sorted(lines, key=lambda line: len(json.loads(line)["text"]))  # short prompts: fast steps
    picked = [line for task in ("sentiment", "ner") for line in
              [line for line in shortest if json.loads(line)["task"] == task][:4]]
    (tmp_path / "train.jsonl").write_text("\n".join(picked) + "\n", encoding="utf-8")
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                   LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM")).save_pretrained(tmp_path / "sft")
    params = parse_params({
        "reward": {"weights_start": {"sentiment": 0.5, "ner": 0.3, "instruction": 0.2},
                   "weights_end": {"sentiment": 0.1, "ner": 0.1, "instruction": 0.8}},
        "rl": {"algorithm": algorithm, "max_steps": 3, "prompts_per_step": 4, "num_generations": 2,
               "max_completion_length": 8, "lr": 1e-3, "threads": 1, "save_steps": 100}})
    judge = LengthJudge()
    model, tokenizer = load_policy(tmp_path / "sft", trainable=True)
    trainer = build_trainer(params, model, tokenizer, prompt_dataset(tmp_path / "train.jsonl", 0, params.seed),
                            judge, str(tmp_path / "ckpt"))
    used = []

    class RecordWeights(TrainerCallback):  # runs after the schedule: the weights the step ran with
        def on_step_end(self, args, state, control, **kwargs):
            used.append(trainer.reward_weights.tolist())

    trainer.remove_callback(MLflowCallback)  # test_rl checks what reaches MLflow; here, what TRL computes
    trainer.add_callback(RecordWeights())
    trainer.train()

    schedule = [weights_at(params.reward.weights_start, params.reward.weights_end, step / 3) for step in range(3)]
    assert used == [pytest.approx(w) for w in schedule] and used[0] != pytest.approx(used[-1])
    logs = [row for row in trainer.state.log_history if "reward" in row]
    assert [row["reward_weight/instruction"] for row in logs] == pytest.approx([w[2] for w in schedule])
    assert len(judge.calls) == len(logs) == 3  # one scoring call per step

    gold = {r.text: r for r in read_jsonl(tmp_path / "train.jsonl")}
    for call, row, weights in zip(judge.calls, logs, schedule):
        totals = []
        for item, instruction in call:
            record = gold[item.text]
            components = {name: tasks.get(name).reward(record, item.answer, params.reward.ner_metric)
                          if record.task == name else None for name in tasks.names()}
            components["instruction"] = instruction
            totals.append(weighted_reward(components, weights, params.reward.clip))
        assert row["reward"] == pytest.approx(sum(totals) / len(totals), rel=1e-5)


def test_consistency_agreement_and_valid_rate():
    answers = [['{"label": "positive"}'] * 3 + ['{"label": "negative"}'],       # 3 of 4 agree
               ['{"label": "negative"}', "oops", "oops", '{"label": "negative"}'],  # invalid answers count as a value
               [ner_answer(("北京", "LOC"))] * 2 + [ner_answer(("北京", "ORG")), "{"]]
    out = consistency(["sentiment", "sentiment", "ner"], answers)
    assert out["agreement"] == pytest.approx((0.75 + 0.5 + 0.5) / 3)
    assert out["valid_rate"] == pytest.approx(9 / 12)
    assert out["prompts"] == 3 and out["samples_per_prompt"] == 4


def test_consistency_reports_a_bootstrap_interval_over_prompts():
    """The interval holds the agreement, is reproducible, narrows with more prompts, and has no width when
    every prompt agrees alike."""
    def answers(prompts: int) -> list[list[str]]:  # half the prompts agree fully, half split 2:2
        split = ['{"label": "positive"}'] * 2 + ['{"label": "negative"}'] * 2
        return [['{"label": "positive"}'] * 4 if i % 2 else split for i in range(prompts)]

    few = consistency(["sentiment"] * 8, answers(8), confidence=0.95, resamples=2000, seed=1)
    many = consistency(["sentiment"] * 200, answers(200), confidence=0.95, resamples=2000, seed=1)
    for out in (few, many):
        interval = out["agreement_interval"]
        assert out["agreement"] == pytest.approx(0.75) and interval["low"] < 0.75 < interval["high"]
        assert interval["confidence"] == 0.95 and interval["method"] == "percentile bootstrap over prompts"
    assert consistency(["sentiment"] * 8, answers(8), resamples=2000, seed=1) == few
    width = {name: o["agreement_interval"]["high"] - o["agreement_interval"]["low"] for name, o in
             (("few", few), ("many", many))}
    assert width["many"] < width["few"] / 3
    same = consistency(["sentiment"] * 5, [['{"label": "positive"}'] * 4] * 5)["agreement_interval"]
    assert (same["low"], same["high"]) == (1.0, 1.0)
    assert consistency([], [])["agreement_interval"]["low"] is None
