"""Shared fixtures: the project root, small configs, a tiny model built from a config, and a scratch SFT project."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lingtune.env import apply_offline_defaults

apply_offline_defaults()

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write((row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_sft(tiny_model_dir, tmp_path_factory) -> Path:
    """A LoRA adapter on the tiny model, saved by peft like models/sft (B = 0: it equals the base)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    out = tmp_path_factory.mktemp("tiny-sft")
    model.save_pretrained(out)
    return out


def make_sft_project(root: Path, tmp: Path, sft: dict) -> Path:
    """A scratch project for `lingtune sft`: the tiny backbone, a slice of the prepared data, its own MLflow store."""
    from tiny import build_tiny_model

    tmp.mkdir(parents=True, exist_ok=True)
    build_tiny_model(tmp / "models" / "backbone")
    data = tmp / "data" / "processed"
    data.mkdir(parents=True)
    for split, n in (("train", 400), ("val", 40)):
        rows = [json.loads(line) for line in (root / "tests" / "data" / f"{split}.jsonl").read_text().splitlines()]
        write_jsonl(data / f"{split}.jsonl", rows[:n])
    params = {"tracking": {"uri": f"sqlite:///{tmp}/mlflow.db", "system_metrics_seconds": 0.5}, "sft": sft}
    (tmp / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp
