"""`lingtune eval` end to end on a tiny model through vLLM (in-process engine)."""

import json
import subprocess
import sys

from tiny import build_tiny_model


def lingtune_eval(cwd, *args):
    return subprocess.run([sys.executable, "-m", "lingtune.cli", "eval", *args, "--params", str(cwd / "params.yaml")],
                          capture_output=True, text=True, cwd=cwd, timeout=600)


def test_eval_tiny_model_json(root, tmp_path):
    """Both tasks; the NER file carries a key of its own (`sector`), which is ignored and named, and
    `--predictions` writes one error-analysis line per example."""
    model = build_tiny_model(tmp_path / "tiny")
    (tmp_path / "params.yaml").write_text(f"data:\n  out_dir: {root}/tests/data\n")
    sectored = tmp_path / "sectored.jsonl"
    sectored.write_text("".join(json.dumps({**json.loads(line), "sector": "news"}, ensure_ascii=False) + "\n"
                                for line in (root / "tests/data/val.jsonl").read_text().splitlines()))
    cases = (("sentiment", root / "tests/data/train.jsonl", {"accuracy", "macro_f1"}),
             ("ner", sectored, {"precision", "recall", "f1", "per_type"}))
    for task, path, keys in cases:
        result = lingtune_eval(tmp_path, "--model", str(model), "--data", str(path), "--task", task, "--json",
                               "--predictions", str(tmp_path / f"{task}.predictions.jsonl"))
        assert result.returncode == 0, result.stderr[-3000:]
        metrics = json.loads(result.stdout[result.stdout.index("{"):])
        assert keys | {"invalid_rate", "n"} <= set(metrics)
        assert metrics["n"] > 0 and 0 <= metrics["invalid_rate"] <= 1
        lines = [json.loads(line) for line in (tmp_path / f"{task}.predictions.jsonl").read_text().splitlines()]
        assert len(lines) == metrics["n"] and all({"text", "gold", "predicted", "answer"} <= set(x) for x in lines)
        if task == "ner":
            assert all({"missed", "spurious", "wrong_type"} <= set(x) for x in lines)
            assert f"note: {path}: ignored keys the neutral format does not use: sector (40 records)" in result.stderr
        else:  # evaluating on the training file itself must be flagged
            assert "warning:" in result.stderr and "texts are in" in result.stderr
            assert all("correct" in x for x in lines)
    bad_task = lingtune_eval(tmp_path, "--model", str(model), "--data", str(root / "tests/data/val.jsonl"),
                             "--task", "pos")
    assert bad_task.returncode == 2 and "unknown task 'pos'; lingtune knows sentiment, ner" in bad_task.stderr


def test_eval_refuses_bad_models(root, tmp_path):
    (tmp_path / "params.yaml").write_text("{}\n")
    for model, text in ((str(tmp_path), "neither a model folder"), ("models:/lingtune@champion", "registry")):
        result = lingtune_eval(tmp_path, "--data", str(root / "tests/data/val.jsonl"), "--model", model, "--task", "ner")
        assert result.returncode == 2 and text in result.stderr and "Traceback" not in result.stderr


def test_eval_scores_an_adapter_merged_as_the_evaluate_stage_does(root, tmp_path):
    """`lingtune eval --model ADAPTER` runs what the evaluate stage runs (evaluate.merge_adapters: the
    adapter merged into its base, cached), not vLLM's slower CPU LoRA path."""
    from test_register import make_adapter

    base = build_tiny_model(tmp_path / "tiny")
    adapter = make_adapter(base, tmp_path / "adapter", seed=1)
    cache = tmp_path / "merged"
    (tmp_path / "params.yaml").write_text(f"data:\n  out_dir: {root}/tests/data\n"
                                          f"evaluate:\n  merge_cache_dir: {cache}\n")
    result = lingtune_eval(tmp_path, "--model", str(adapter), "--data", str(root / "tests/data/val.jsonl"),
                           "--task", "sentiment", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p.name[:7] for p in cache.iterdir()] == ["merged-"] and (next(cache.iterdir()) / "config.json").is_file()
    assert "enable_lora=True" not in result.stderr and "'enable_lora': True" not in result.stderr
