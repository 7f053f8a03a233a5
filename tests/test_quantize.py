"""The INT4 path on the tiny model: adapter merged, GPTQ W4A16 in the quantize env (created on first
use from requirements/quantize-constraints.txt, then reused), and the result generates in vLLM."""

import json
from pathlib import Path

import pytest

from lingtune.config import QuantizeConfig
from lingtune.quantize import CARD, QuantizeError, check_group_size, quantize
from test_register import make_adapter

ROOT = Path(__file__).resolve().parents[1]


def config(tmp_path, **overrides) -> QuantizeConfig:
    # The project's own env folder: the first run creates it (about a minute), later runs reuse it.
    values = {"sources": [str(tmp_path / "models/rl"), str(tmp_path / "models/sft")], "group_size": 32,
              "calibration_samples": 8, "env_dir": str(ROOT / ".venv-quant"),
              "env_requirements": str(ROOT / "requirements/quantize-constraints.txt"),
              "out_dir": str(tmp_path / "models/int4")}
    return QuantizeConfig(**{**values, **overrides})


def test_bad_inputs_fail_before_any_work(tmp_path, tiny_model_dir):
    with pytest.raises(QuantizeError, match="nothing to quantize"):
        quantize(config(tmp_path), ROOT / "tests/data/train.jsonl")
    make_adapter(tiny_model_dir, tmp_path / "models/sft", seed=1)
    with pytest.raises(QuantizeError, match=r"group_size 48 does not divide .*sizes that fit: \[32, 64\]"):
        quantize(config(tmp_path, group_size=48), ROOT / "tests/data/train.jsonl")
    with pytest.raises(QuantizeError, match="no training split"):
        quantize(config(tmp_path), tmp_path / "missing.jsonl")
    assert not (tmp_path / "models/int4").exists()


def test_group_sizes_of_the_shipped_backbones(tmp_path):
    gemma = {"hidden_size": 640, "intermediate_size": 2048, "num_attention_heads": 4, "head_dim": 256}
    smol = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9}
    for name, cfg, ok, bad in (("gemma", gemma, 128, 256), ("smol", smol, 64, 128)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(cfg))
        check_group_size(tmp_path / name, ok)
        with pytest.raises(QuantizeError):
            check_group_size(tmp_path / name, bad)


@pytest.mark.slow
def test_gptq_int4_of_an_adapter_generates_in_vllm(tmp_path, tiny_model_dir):
    from lingtune.formats import read_jsonl
    from lingtune import tasks
    from lingtune.errors import ModelError
    from lingtune.engine import Engine, EngineConfig, unsupported_here

    make_adapter(tiny_model_dir, tmp_path / "models/sft", seed=1)
    card = quantize(config(tmp_path), ROOT / "tests/data/train.jsonl", log=lambda m: None)
    out = tmp_path / "models/int4"
    assert card["source"].endswith("models/sft") and card["method"] == "gptq" and card["calibration_samples"] == 8
    assert json.loads((out / CARD).read_text()) == card
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    weights = quant["config_groups"]["group_0"]["weights"]
    assert quant["quant_method"] == "compressed-tensors" and quant["ignore"] == ["lm_head"]
    assert (weights["num_bits"], weights["group_size"], weights["strategy"]) == (4, 32, "group")
    assert not list(tmp_path.glob("models/.quantize-*")) and not list(tmp_path.glob("models/.int4.partial-*"))

    if reason := unsupported_here(out):  # vLLM's AVX2 build has no INT4 kernel: a clear refusal, not a crash later
        with pytest.raises(ModelError, match="no INT4 kernel"):
            Engine(out, EngineConfig(kv_cache_gb=1, max_model_len=512), enable_lora=False)
        assert "cpu_gemm_wna16" in reason
        return
    engine = Engine(out, EngineConfig(kv_cache_gb=1, max_model_len=512), enable_lora=False)
    records = read_jsonl(ROOT / "tests/data/val.jsonl")[:4]
    free = engine.generate(records, constrained=False)
    assert len(free) == 4 and all(isinstance(text, str) and text for text in free)
    sentiment = [r for r in read_jsonl(ROOT / "tests/data/val.jsonl", task="sentiment")][:2]
    answers = engine.generate(sentiment)
    assert len(answers) == len(sentiment) == 2 and all(a in tasks.get("sentiment").choices() for a in answers)


@pytest.mark.parametrize("recipe, message", [("bad={x", "overrides are not JSON"),
                                             ('a={"group_sise": 64}', "group_sise: Extra inputs"),
                                             ('a={"group_size": 4}', "group_size: Input should be greater"),
                                             ("noequals", "expected NAME=")])
def test_int4_sweep_refuses_a_bad_recipe_before_any_work(root, tmp_path, recipe, message):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, str(root / "benchmarks" / "int4_sweep.py"), "--out", str(tmp_path), recipe],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and message in done.stderr
    assert not any(tmp_path.iterdir())  # nothing quantized


def test_a_second_process_waits_while_the_env_is_being_created(tmp_path, monkeypatch):
    """Two pipelines (or a pipeline and a test run) on one machine: the second must not delete the env the first
    is still installing; it waits on the lock beside the env, then finds it ready."""
    import fcntl
    import threading

    import lingtune.quantize as q

    created = []
    monkeypatch.setattr(q, "_create_env_once", lambda env, requirements, log: created.append(env) or env / "bin/python")
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("")
    env = tmp_path / "envs" / ".venv-quant"
    env.parent.mkdir()
    with open(env.parent / ".venv-quant.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another process is creating the env
        waiting = threading.Thread(target=q.ensure_env, args=(env, requirements), daemon=True)
        waiting.start()
        waiting.join(timeout=1.0)
        assert waiting.is_alive() and not created, "ensure_env went on while another process held the env's lock"
    waiting.join(timeout=10)
    assert not waiting.is_alive() and created == [env]
