"""`lingtune eval` end to end on a tiny model through vLLM (in-process engine)."""

import json
import subprocess
import sys

from tiny import build_tiny_model


def lingtune_eval(cwd, *args):
    return subprocess.run([sys.executable, "-m", "lingtune.cli", "eval", *args, "--params", str(cwd / "params.yaml")],
                          capture_output=True, text=True, cwd=cwd, timeout=600)


def test_eval_tiny_model_json(root, tmp_path):
    model = build_tiny_model(tmp_path / "tiny")
    (tmp_path / "params.yaml").write_text(f"data:\n  out_dir: {root}/tests/data\n")
    cases = (("sentiment", "train.jsonl", {"accuracy", "macro_f1"}),
             ("ner", "val.jsonl", {"precision", "recall", "f1", "per_type"}))
    for task, name, keys in cases:
        result = lingtune_eval(tmp_path, "--model", str(model), "--data", str(root / "tests/data" / name),
                               "--task", task, "--json")
        assert result.returncode == 0, result.stderr[-3000:]
        metrics = json.loads(result.stdout[result.stdout.index("{"):])
        assert keys | {"invalid_rate", "n"} <= set(metrics)
        assert metrics["n"] > 0 and 0 <= metrics["invalid_rate"] <= 1
        if name == "train.jsonl":  # evaluating on the training file itself must be flagged
            assert "warning:" in result.stderr and "texts are in" in result.stderr
    bad_task = lingtune_eval(tmp_path, "--model", str(model), "--data", str(root / "tests/data/val.jsonl"),
                             "--task", "pos")
    assert bad_task.returncode == 2 and "unknown task 'pos'; lingtune knows sentiment, ner" in bad_task.stderr


def test_eval_refuses_bad_models(root, tmp_path):
    (tmp_path / "params.yaml").write_text("{}\n")
    for model, text in ((str(tmp_path), "neither a model folder"), ("models:/lingtune@champion", "registry")):
        result = lingtune_eval(tmp_path, "--data", str(root / "tests/data/val.jsonl"), "--model", model, "--task", "ner")
        assert result.returncode == 2 and text in result.stderr and "Traceback" not in result.stderr
