"""benchmarks/quality_curve.py: reading a run's curve.json, building the points, the saturation summary, and
refusing what it cannot score (the scoring itself is the evaluate stage's code, tested there)."""

import importlib.util
import json
from pathlib import Path

import pytest

from lingtune.config import parse_params

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("quality_curve", ROOT / "benchmarks" / "quality_curve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


curve_module = load_benchmark()

CURVE = {"fingerprint": "abc", "recipe": {"lora": {"r": 8}, "out_dir": "models/sft"}, "train_examples": 400,
         "examples_per_step": 8,
         "snapshots": [{"step": 100, "examples_seen": 800, "train_seconds": 120.0, "train_loss": 2.0,
                        "val_loss": 2.1, "val_step": 100, "path": "step-00100"},
                       {"step": 50, "examples_seen": 400, "train_seconds": 60.0, "train_loss": 3.0,
                        "val_loss": None, "val_step": None, "path": "step-00050"}]}


def test_chosen_steps_keep_their_order_and_an_absent_step_names_those_there_are():
    points = curve_module.base_points(CURVE)
    assert curve_module.chosen_points(points, None) == points
    assert [p["step"] for p in curve_module.chosen_points(points, [100])] == [100]
    with pytest.raises(SystemExit, match="no snapshot at step 75; the run has 50, 100"):
        curve_module.chosen_points(points, [75, 100])


def scores(sentiment: float, ner: float) -> dict:
    return {"sentiment": {"macro_f1": sentiment, "invalid_rate": 0.0},
            "ner": {"precision": ner, "recall": ner, "f1": ner, "invalid_rate": 0.5}}


def test_points_in_step_order_with_epochs():
    points = curve_module.base_points(CURVE)
    assert [p["step"] for p in points] == [50, 100]
    assert [p["epochs"] for p in points] == [1.0, 2.0]
    assert points[1] == {"step": 100, "examples_seen": 800, "epochs": 2.0, "train_seconds": 120.0,
                         "train_loss": 2.0, "val_loss": 2.1, "snapshot": "step-00100"}


def test_saturation_is_the_gain_of_the_last_stretch_per_minute_and_per_1k_examples():
    first, last = (curve_module.scored(p, s) for p, s in zip(curve_module.base_points(CURVE),
                                                             (scores(0.80, 0.40), scores(0.85, 0.43))))
    assert last["ner_f1"] == 0.43 and last["ner_invalid"] == 0.5
    summary = curve_module.saturation([first, last])
    assert summary["from_step"] == 50 and summary["to_step"] == 100 and summary["train_minutes"] == 1.0
    assert summary["sentiment_macro_f1_gain"] == pytest.approx(0.05)
    assert summary["ner_f1_gain_per_minute"] == pytest.approx(0.03)
    assert summary["ner_f1_gain_per_1k_examples"] == pytest.approx(0.075)
    assert summary["sentiment_macro_f1_best_step"] == summary["ner_f1_best_step"] == 100
    assert curve_module.saturation([first]) is None


def test_a_missing_or_empty_curve_names_how_to_make_one(tmp_path):
    with pytest.raises(SystemExit, match="snapshot_every_n_steps"):
        curve_module.read_curve(tmp_path)
    (tmp_path / "curve.json").write_text(json.dumps({**CURVE, "snapshots": []}))
    with pytest.raises(SystemExit, match="no snapshots"):
        curve_module.read_curve(tmp_path)
    (tmp_path / "curve.json").write_text(json.dumps(CURVE))
    assert curve_module.read_curve(tmp_path)["fingerprint"] == "abc"


def test_an_adapter_rank_above_the_engines_is_refused():
    params = parse_params({})
    curve_module.check_rank(CURVE, params)
    with pytest.raises(SystemExit, match=r"rank 16, above evaluate.max_lora_rank \(8\)"):
        curve_module.check_rank({**CURVE, "recipe": {"lora": {"r": 16}}}, params)


def test_the_final_folder_is_compared_with_the_last_snapshot(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for folder in ("snaps/step-00100", "snaps/step-00050", "models/sft"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "adapter_model.safetensors").write_bytes(folder.encode())
    assert curve_module.final_is_last_snapshot(CURVE, Path("snaps")) is False
    (tmp_path / "models/sft/adapter_model.safetensors").write_bytes(b"snaps/step-00100")
    assert curve_module.final_is_last_snapshot(CURVE, Path("snaps")) is True
    assert curve_module.final_is_last_snapshot({**CURVE, "recipe": {"out_dir": "gone"}}, Path("snaps")) is None


def test_a_per_task_run_is_scored_and_summarised_on_its_own_task_only():
    """A run with `sft.tasks: [sentiment]` (a per-task adapter): NER scores are absent, not zeros, and the
    saturation summary says nothing about NER; a run that predates the key trained every task."""
    per_task = {**CURVE, "recipe": {**CURVE["recipe"], "tasks": ["sentiment"]}}
    assert curve_module.trained_tasks(per_task) == ["sentiment"]
    assert curve_module.trained_tasks(CURVE) == ["sentiment", "ner"]
    only = {"sentiment": scores(0.8, 0.0)["sentiment"]}
    first, last = (curve_module.scored(p, s) for p, s in zip(curve_module.base_points(per_task), (only, only)))
    assert last["sentiment_macro_f1"] == 0.8 and last["ner_f1"] is None and last["ner_invalid"] is None
    summary = curve_module.saturation([first, last])
    assert summary["sentiment_macro_f1_gain"] == 0.0 and not any(key.startswith("ner") for key in summary)
    assert "NER" not in curve_module.table({"points": [first, last], "saturation": summary}).splitlines()[-1]
