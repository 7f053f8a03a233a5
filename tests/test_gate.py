"""The promotion gate on a real (temporary sqlite) MLflow registry: it decides on the validation answers
the evaluate stage keeps, example by example, with a paired bootstrap interval. A lead within the noise
of the validation set moves nothing, a clear one does, and a champion without validation answers neither
blocks the candidate for good nor waves it through."""

from __future__ import annotations

import json

import pytest

from lingtune import tasks
from lingtune.config import RegisterConfig
from lingtune.errors import ConfigError
from lingtune.gate import gate, paired_lead
from lingtune.predictions import ScoredModel, example_rows, write_validation
from lingtune.records import Entity, Record
from lingtune.registry import CONTENT_TAG, FORMAT, FORMAT_TAG, alias_version, client

SENTIMENT = [Record(text=f"第{i}条评论", label=("positive", "negative")[i % 2]) for i in range(60)]
NER = [Record(text=f"张三在北京工作{i}。", entities=(Entity(start=0, end=2, type="PER", text="张三"),
                                                  Entity(start=3, end=5, type="LOC", text="北京"))) for i in range(30)]


def answer_texts(wrong_sentiment: set[int], wrong_ner: set[int]) -> list[str]:
    """Answers to SENTIMENT + NER of a model that errs on the given examples (and is right on all others)."""
    flip = {"positive": "negative", "negative": "positive"}
    sentiment = [json.dumps({"label": flip[r.label] if i in wrong_sentiment else r.label})
                 for i, r in enumerate(SENTIMENT)]
    ner = [json.dumps({"entities": [{"text": "张三", "type": "PER"}] + ([] if i in wrong_ner else
                                                                        [{"text": "北京", "type": "LOC"}])},
                      ensure_ascii=False) for i in range(len(NER))]
    return sentiment + ner


def answers_for(wrong_sentiment: set[int], wrong_ner: set[int]) -> list[dict]:
    """Validation rows, as the evaluate stage writes them."""
    return example_rows(SENTIMENT + NER, answer_texts(wrong_sentiment, wrong_ner))


CHAMPION = answers_for(set(range(12)), set(range(6)))  # 80% right on both tasks


@pytest.fixture
def registry(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow_client = client(uri)
    mlflow_client.create_registered_model("lingtune")
    cfg = RegisterConfig(validation_dir=str(tmp_path / "validation"))

    def version(sha: str) -> str:
        tags = {CONTENT_TAG: sha, FORMAT_TAG: FORMAT}
        return str(mlflow_client.create_model_version("lingtune", source=str(tmp_path), tags=tags).version)

    def scored(**models: list[dict]) -> None:  # content hash -> validation rows, as `lingtune evaluate` writes them
        write_validation(cfg.validation_dir, "val.jsonl", [ScoredModel(sha, sha, sha, rows) for sha, rows in models.items()])

    return mlflow_client, cfg, version, scored


def champion_of(mlflow_client) -> str | None:
    found = alias_version(mlflow_client, "lingtune", "champion")
    return str(found.version) if found else None


def with_champion(mlflow_client, version) -> None:
    mlflow_client.set_registered_model_alias("lingtune", "champion", version)


def test_a_lead_within_the_noise_is_not_promoted(registry):
    mlflow_client, cfg, version, scored = registry
    old, new = version("old"), version("new")
    with_champion(mlflow_client, old)
    # right on two more reviews, wrong on one more: ahead on paper, by one review out of sixty
    scored(old=CHAMPION, new=answers_for((set(range(12)) - {0, 1}) | {40}, set(range(6))))
    decision = gate(mlflow_client, cfg, new, seed=0)
    assert not decision.promoted and champion_of(mlflow_client) == old
    assert "may be the validation set's noise" in decision.reason and "95% interval [-" in decision.reason
    lead = decision.reason.split("lead ")[1].split(",")[0]
    assert float(lead) > 0, decision.reason  # a gate comparing point scores would have promoted it


def test_a_clear_lead_is_promoted_and_the_margin_applies_to_the_lower_bound(registry):
    mlflow_client, cfg, version, scored = registry
    old, new = version("old"), version("new")
    with_champion(mlflow_client, old)
    scored(old=CHAMPION, new=answers_for({0, 1}, {0}))
    strict = cfg.model_copy(update={"margin": 0.2})  # the lead is ~0.15: its lower bound is below 0.2
    refused = gate(mlflow_client, strict, new, seed=0)
    assert not refused.promoted and "not above the margin 0.2" in refused.reason
    decision = gate(mlflow_client, cfg, new, seed=0)
    assert decision.promoted and champion_of(mlflow_client) == new and decision.champion_before == old
    assert "better beyond the noise" in decision.reason and "2000 resamples of 90 examples" in decision.reason
    assert gate(mlflow_client, cfg, new, seed=0).reason == f"v{new} is already the champion"


def test_an_old_format_champion_is_replaced_by_a_scored_candidate(registry):
    """A champion an older lingtune registered is not an MLflow model: nothing loads it, so equal scores
    must not keep it (serving would refuse it). An unscored candidate still does not replace it."""
    mlflow_client, cfg, version, scored = registry
    old = str(mlflow_client.create_model_version("lingtune", source="x", tags={CONTENT_TAG: "old"}).version)
    unscored, new = version("unscored"), version("new")
    with_champion(mlflow_client, old)
    scored(old=CHAMPION, new=CHAMPION)
    assert not gate(mlflow_client, cfg, unscored, seed=0).promoted
    decision = gate(mlflow_client, cfg, new, seed=0)
    assert decision.promoted and champion_of(mlflow_client) == new and "older lingtune" in decision.reason


def test_the_interval_is_the_same_every_time():
    """Seeded: the same answers always get the same interval, so a decision is reproducible."""
    cfg = RegisterConfig()
    new = answers_for(set(range(9)), set(range(5)))
    first, again = paired_lead(new, CHAMPION, cfg, seed=42), paired_lead(new, CHAMPION, cfg, seed=42)
    assert first == again and first.low < first.difference < first.high
    texts = answer_texts(set(range(9)), set(range(5)))
    expected = (tasks.get("sentiment").metrics(SENTIMENT, texts[:60])["macro_f1"]
                + tasks.get("ner").metrics(NER, texts[60:])["f1"]) / 2
    assert first.candidate == pytest.approx(expected)


def test_a_champion_without_validation_answers_neither_blocks_nor_waves_through(registry):
    """Not promoted, with what to do; once `lingtune evaluate` has scored the champion the same candidate
    is compared and promoted (nothing stays blocked)."""
    mlflow_client, cfg, version, scored = registry
    old, new = version("old"), version("new")
    with_champion(mlflow_client, old)
    better = answers_for(set(), set())
    scored(new=better)
    decision = gate(mlflow_client, cfg, new, seed=0)
    assert not decision.promoted and champion_of(mlflow_client) == old
    assert f"champion v{old} has no validation answers" in decision.reason
    assert "lingtune evaluate" in decision.reason and f"lingtune promote --version {new} --force" in decision.reason
    scored(new=better, old=CHAMPION)
    assert gate(mlflow_client, cfg, new, seed=0).promoted and champion_of(mlflow_client) == new


def test_a_candidate_needs_validation_answers_even_without_a_champion(registry):
    mlflow_client, cfg, version, scored = registry
    first = version("first")
    refused = gate(mlflow_client, cfg, first, seed=0)  # no validation folder at all
    assert not refused.promoted and "has no validation answers" in refused.reason and champion_of(mlflow_client) is None
    scored(other=CHAMPION)
    assert not gate(mlflow_client, cfg, first, seed=0).promoted
    scored(first=CHAMPION)
    decision = gate(mlflow_client, cfg, first, seed=0)
    assert decision.promoted and "no champion yet" in decision.reason and champion_of(mlflow_client) == first


def test_answers_to_different_examples_are_not_compared(registry):
    mlflow_client, cfg, version, scored = registry
    old, new = version("old"), version("new")
    with_champion(mlflow_client, old)
    elsewhere = [{**row, "text": row["text"] + "!"} if row["task"] == "ner" else row for row in CHAMPION]
    scored(old=elsewhere, new=answers_for(set(), set()))
    decision = gate(mlflow_client, cfg, new, seed=0)
    assert not decision.promoted and "ner validation answers are not to the same examples" in decision.reason


def test_a_gate_metric_the_rows_cannot_give_is_a_config_error(registry):
    mlflow_client, cfg, version, scored = registry
    old, new = version("old"), version("new")
    with_champion(mlflow_client, old)
    scored(old=CHAMPION, new=CHAMPION)
    with pytest.raises(ConfigError, match="'ner.support' is not a metric the gate can recompute"):
        gate(mlflow_client, cfg.model_copy(update={"gate_metrics": ["ner.support"]}), new, seed=0)


def run_compare(tmp_path, capsys, baseline: list[dict], candidate: list[dict], *args: str) -> tuple[int, str, str]:
    """`lingtune compare` in this process (exit status, stdout, stderr)."""
    from lingtune import cli

    files = []
    for name, rows in (("baseline", baseline), ("candidate", candidate)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        files.append(str(path))
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    try:
        cli.main(["compare", *files, *args, "--params", str(tmp_path / "params.yaml")])
        status = 0
    except SystemExit as exc:
        status = exc.code
    out = capsys.readouterr()
    return status, out.out, out.err


def test_compare_says_which_leads_are_beyond_the_noise(tmp_path, capsys):
    # the candidate fixes every NER miss (6 of 30) and gains one review net out of sixty
    candidate = answers_for((set(range(12)) - {0, 1}) | {40}, set())
    status, out, err = run_compare(tmp_path, capsys, CHAMPION, candidate, "--json")
    assert status == 0, err
    report = json.loads(out)
    metrics = report["metrics"]
    assert set(metrics) == {"sentiment.accuracy", "sentiment.macro_f1", "ner.precision", "ner.recall", "ner.f1",
                            "gate score"} and report["confidence"] == 0.95
    assert metrics["ner.recall"]["baseline"] == pytest.approx(0.9) and metrics["ner.recall"]["candidate"] == 1.0
    assert metrics["ner.recall"]["beyond_noise"] and metrics["ner.recall"]["low"] > 0
    assert metrics["sentiment.accuracy"]["lead"] > 0 and not metrics["sentiment.accuracy"]["beyond_noise"]
    assert metrics["sentiment.accuracy"]["low"] < 0 < metrics["sentiment.accuracy"]["high"]
    status, out, _ = run_compare(tmp_path, capsys, CHAMPION, candidate, "--metric", "ner.f1")
    assert status == 0 and out.startswith("ner.f1: baseline ") and "(beyond noise)" in out


def test_compare_refuses_answers_to_other_examples_and_rows_that_are_not_answers(tmp_path, capsys):
    other = example_rows(SENTIMENT[::-1] + NER, answer_texts(set(), set()))
    status, _, err = run_compare(tmp_path, capsys, CHAMPION, other)
    assert status == 2 and "cannot be compared" in err
    bare = [{"task": r["task"], "text": r["text"]} for r in CHAMPION]
    status, _, err = run_compare(tmp_path, capsys, CHAMPION, bare)
    assert status == 2 and "lingtune eval --predictions" in err, err
    status, _, err = run_compare(tmp_path, capsys, CHAMPION, CHAMPION, "--metric", "ner.bleu")
    assert status == 2 and "ner.bleu" in err, err
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(SystemExit) as exc:
        from lingtune import cli
        cli.main(["compare", str(tmp_path / "broken.jsonl"), str(tmp_path / "broken.jsonl")])
    assert exc.value.code == 2 and "not a file of per-example answers" in capsys.readouterr().err
