"""RL stage on the tiny model: a tiny SFT adapter (trained here with peft), a few RLOO steps through the
real TRL trainer, the reward stage, and a real kill-and-resume of `lingtune rl` in a subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from judge_server import judge_server

from conftest import ROOT
from lingtune.train.rl import COMPLETE

SENTIMENT_ROWS = 24
KEY_ENV = "LINGTUNE_TEST_JUDGE_KEY"


@pytest.fixture(scope="module")
def grader():
    """The tiny model's answers are noise that every task reward scores 0; an LLM judge on localhost that
    grades from the answer's characters gives the varied rewards RL needs to move (and runs the OpenAI
    judge inside the RL loop). Screening is off: it would score all that noise 0 without asking."""
    with judge_server() as (url, seen):
        yield url, seen


@pytest.fixture
def judge_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-test")


def rl_params(tmp: Path, tiny_model_dir: Path, sft: Path, judge_url: str, **rl) -> dict:
    data = tmp / "data"
    data.mkdir(exist_ok=True)
    for split in ("train", "val"):
        lines = (ROOT / "tests" / "data" / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
        (data / f"{split}.jsonl").write_text("\n".join(lines[:SENTIMENT_ROWS] + lines[-8:]) + "\n", encoding="utf-8")
    return {
        "tracking": {"uri": f"sqlite:///{tmp}/mlflow.db", "experiment": "t"},
        "backbone": {"out_dir": str(tiny_model_dir)}, "data": {"out_dir": str(data)},
        "reward": {"judge": {"kind": "openai", "base_url": judge_url, "model": "hash", "api_key_env": KEY_ENV,
                             "max_retries": 1, "cache_dir": str(tmp / "judge-cache"),
                             "screen_answers": False},  # the noise fails the rubric: let the LLM grade it
                   "prompts_per_task": 2, "samples": 3, "max_new_tokens": 16, "threads": 1,
                   "dataset": str(tmp / "reward.jsonl"), "report": str(tmp / "reward.json")},
        "rl": {"max_steps": 3, "prompts_per_step": 2, "num_generations": 4, "max_completion_length": 16,
               "lr": 5e-3, "save_steps": 1, "threads": 1, "sft_dir": str(sft), "out_dir": str(tmp / "rl"),
               "checkpoint_dir": str(tmp / "ckpt"), "metrics": str(tmp / "rl.json"), **rl},
    }


def adapter_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def test_trl_renders_the_sft_prompt(tiny_model_dir):
    """TRL tokenises conversational prompts with the chat template: the same ids as SFT's prompt."""
    from transformers import AutoTokenizer

    from lingtune import tasks
    from lingtune.records import Record
    from lingtune.tasks.base import encode_example

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    record = Record(text="这本书很好看", label="positive")
    trl_ids = tokenizer.apply_chat_template(conversation=[tasks.get("sentiment").messages(record)[:1]],
                                            add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"][0]
    sft = encode_example(tokenizer, record)
    assert sft.input_ids[: len(trl_ids)] == list(trl_ids)
    assert sft.labels[len(trl_ids) - 1] == -100 and sft.labels[len(trl_ids)] != -100


def pick_costs(report: dict) -> dict:
    return {k: report[k] for k in ("compute_hours", "cost_usd")}


def assert_costs(report: dict, judge_usd: float) -> None:
    """On the CPU: the stage's hours at the CPU price, plus what the judge's requests cost."""
    from lingtune.config import CostConfig

    assert report["compute_hours"] > 0 and judge_usd > 0
    assert report["cost_usd"] == pytest.approx(report["compute_hours"] * CostConfig().usd_per_cpu_hour + judge_usd,
                                               abs=1e-6)


def test_rl_steps_reward_stage_and_outputs(tmp_path, tiny_model_dir, tiny_sft, grader, judge_key, monkeypatch):
    import mlflow
    import torch

    from lingtune.config import parse_params
    from lingtune.train.scoring import run_reward
    from lingtune.train.rl import run_rl

    def no_multinomial(*_args, **_kwargs):
        raise AssertionError("torch.multinomial was called: a stage sampled without lingtune.train.sampling")

    # Both stages sample through transformers `generate` (TRL's rollouts too) on the policy load_policy
    # built, which draws by inverse CDF.
    monkeypatch.setattr(torch, "multinomial", no_multinomial)
    params = parse_params(rl_params(tmp_path, tiny_model_dir, tiny_sft, grader[0]))
    report = run_reward(params)
    rows = [json.loads(line) for line in Path(params.reward.dataset).read_text().splitlines()]
    assert len(rows) == report["answers"] == 4 * 3
    assert {r["task"] for r in rows} == {"sentiment", "ner"}
    assert all((r["sentiment"] is None) == (r["task"] == "ner") for r in rows)
    assert report["judge"]["kind"] == "openai" and report["judge"]["items"] == 12
    assert report["judge"]["prompt_tokens"] == 100 * report["judge"]["requests"] > 0
    assert len({r["instruction"] for r in rows}) > 1
    assert_costs(report, report["judge"]["cost_usd"])
    mlflow.set_tracking_uri(params.tracking.uri)
    reward_run = mlflow.search_runs(experiment_names=["t"], filter_string="tags.`lingtune.stage` = 'reward'",
                                    output_format="list")[0]
    assert {k: reward_run.data.metrics[k] for k in ("compute_hours", "cost_usd")} == pick_costs(report)

    metrics = run_rl(params)
    assert metrics["steps"] == 3 and metrics["logged_steps"] == 3 and metrics["resumed_from"] is None
    ckpt = Path(params.rl.checkpoint_dir)
    assert sorted(p.name for p in ckpt.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert all((c / COMPLETE).is_file() and not (c / "ref").exists() for c in ckpt.glob("checkpoint-*"))
    trained = adapter_tensors(Path(params.rl.out_dir))
    assert metrics["consistency"]["before"] == report["consistency"]
    assert set(metrics["consistency"]["change"]["all"]) == {"agreement", "valid_rate"}
    assert_costs(metrics, metrics["judge"]["cost_usd"])

    out = Path(params.rl.out_dir)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == json.loads((tiny_sft / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert not (out / "ref").exists()  # TRL's frozen reference copy is not part of the output
    before, after = adapter_tensors(tiny_sft), adapter_tensors(out)
    assert before.keys() == after.keys()
    assert any(not (before[k] == after[k]).all() for k in before)  # the policy moved

    mlflow.set_tracking_uri(params.tracking.uri)
    run = mlflow.get_run(json.loads((Path(params.rl.checkpoint_dir) / "lingtune_run.json").read_text())["mlflow_run_id"])
    for key in ("reward", "kl", "clip_ratio/region_mean", "completions/mean_length", "rewards/sentiment/mean",
                "rewards/instruction/mean", "reward_weight/ner"):
        assert key in run.data.metrics, key
    assert run.data.tags["lingtune.stage"] == "rl"
    assert {k: run.data.metrics[k] for k in ("compute_hours", "cost_usd")} == pick_costs(metrics)
    # weights moved from start towards end (0.5 -> 0.4 for sentiment) over the run
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "reward_weight/sentiment")
    assert history[0].value == pytest.approx(0.5) and history[-1].value < history[0].value

    # killed while saving the last checkpoint, before "ref" was removed: the rerun resumes from the one before
    (ckpt / "checkpoint-3" / COMPLETE).unlink()
    (ckpt / "checkpoint-3" / "ref").mkdir()
    resumed = run_rl(params)
    assert resumed["resumed_from"] == str(ckpt / "checkpoint-2") and resumed["steps"] == 3
    assert (ckpt / "checkpoint-3" / COMPLETE).is_file() and not (ckpt / "checkpoint-3" / "ref").exists()
    again = adapter_tensors(Path(params.rl.out_dir))
    assert all((again[k] == trained[k]).all() for k in trained)  # step 3 redone gives the same adapter


def checkpoint(folder: Path, step: int, complete: bool) -> Path:
    out = folder / f"checkpoint-{step}"
    out.mkdir(parents=True)
    (out / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    if complete:
        (out / COMPLETE).write_text(f"{step}\n")
    return out


def test_resume_picks_the_last_complete_checkpoint(tmp_path, capsys):
    """Unmarked checkpoints (a kill mid-save: truncated files; or before "ref" was removed) are deleted
    with a message; the highest marked one (by step, not by name) is resumed."""
    from lingtune.train.rl import last_checkpoint

    checkpoint(tmp_path, 3, complete=True)
    checkpoint(tmp_path, 10, complete=True)
    truncated = checkpoint(tmp_path, 12, complete=False)
    (truncated / "optimizer.pt").write_bytes(b"\x80\x02")
    with_ref = checkpoint(tmp_path, 15, complete=False)
    (with_ref / "ref").mkdir()
    (with_ref / "ref" / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    (tmp_path / "lingtune_run.json").write_text("{}")

    assert last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")
    printed = capsys.readouterr().err
    assert f"{truncated}: incomplete checkpoint" in printed and f"{with_ref}: incomplete checkpoint" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-3", "lingtune_run.json"]

    only_incomplete = tmp_path / "other"
    checkpoint(only_incomplete, 4, complete=False)
    assert last_checkpoint(only_incomplete) is None and not list(only_incomplete.iterdir())


def test_a_saved_checkpoint_is_marked_complete_once_ref_is_gone(tmp_path):
    from types import SimpleNamespace

    from lingtune.train.rl import make_drop_ref_callback

    saved = checkpoint(tmp_path, 5, complete=False)
    (saved / "ref").mkdir()
    make_drop_ref_callback().on_save(SimpleNamespace(output_dir=str(tmp_path), should_save=True),
                                     SimpleNamespace(global_step=5), None)
    assert not (saved / "ref").exists() and (saved / COMPLETE).is_file()


def test_grpo_option(tmp_path, tiny_model_dir, tiny_sft, grader, judge_key):
    from lingtune.config import parse_params
    from lingtune.train.rl import run_rl

    params = parse_params(rl_params(tmp_path, tiny_model_dir, tiny_sft, grader[0], algorithm="grpo", max_steps=1))
    assert run_rl(params)["steps"] == 1
    assert (Path(params.rl.out_dir) / "adapter_model.safetensors").is_file()


def _lingtune(params_file: Path, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", KEY_ENV: "sk-test"}
    return subprocess.Popen([sys.executable, "-m", "lingtune.cli", "rl", "--params", str(params_file)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _whole_json(path: Path) -> bool:
    try:
        json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return True


@pytest.mark.slow
def test_kill_and_resume(tmp_path, tiny_model_dir, tiny_sft, grader):
    """SIGKILL `lingtune rl` once a checkpoint exists; the same command continues from it and ends with
    the adapter an uninterrupted run produces."""
    raw = rl_params(tmp_path, tiny_model_dir, tiny_sft, grader[0], max_steps=8, save_steps=2)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw, allow_unicode=True))
    ckpt = Path(raw["rl"]["checkpoint_dir"])

    proc = _lingtune(params_file, tmp_path)
    deadline = time.time() + 300
    # Kill as soon as checkpoint-2 is whole (the trainer writes trainer_state.json last): a tiny step takes
    # a fraction of a second, so a fixed wait here let the run finish first on a fast or busy machine.
    while not _whole_json(ckpt / "checkpoint-2" / "trainer_state.json"):
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "no checkpoint within 300 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not Path(raw["rl"]["out_dir"]).exists()

    resumed = _lingtune(params_file, tmp_path)
    output, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, output
    assert "resuming from" in output and "checkpoint-" in output
    metrics = json.loads(Path(raw["rl"]["metrics"]).read_text())
    assert metrics["steps"] == 8 and metrics["resumed_from"].split("-")[-1] in {"2", "4", "6"}
    resumed_adapter = adapter_tensors(Path(raw["rl"]["out_dir"]))

    # the same run without interruption
    straight = {**raw, "rl": {**raw["rl"], "out_dir": str(tmp_path / "rl-straight"),
                              "checkpoint_dir": str(tmp_path / "ckpt-straight"), "metrics": str(tmp_path / "s.json")}}
    params_file.write_text(yaml.safe_dump(straight, allow_unicode=True))
    done = _lingtune(params_file, tmp_path)
    output, _ = done.communicate(timeout=600)
    assert done.returncode == 0, output
    straight_adapter = adapter_tensors(tmp_path / "rl-straight")
    sft = adapter_tensors(tiny_sft)
    assert any(not (straight_adapter[k] == sft[k]).all() for k in sft)
    for key, value in straight_adapter.items():
        assert (value == resumed_adapter[key]).all(), key


def test_completion_only_scoring_gives_the_log_probs_of_the_full_logits_on_fewer_rows(tiny_model_dir):
    """`completion_rows_only`: TRL's fused LM head (as the RL trainer patches the policy) returns, for the
    completion tokens, the log-softmax of the model's own logits, while the head runs on those rows only
    (counted matmul FLOPs: prompt and padding rows cost nothing)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from lingtune.train.rl import completion_rows_only

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = torch.randint(3, model.config.vocab_size, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # padding after the second completion's end
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :8] = -100  # 8 prompt tokens, 4 completion tokens
    with torch.no_grad():
        expected = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
    expected = expected.gather(-1, ids[:, 1:, None])[..., 0]
    add_fused_lm_head(model, temperature=1.0)

    def scored() -> tuple[torch.Tensor, int]:
        with torch.no_grad(), FlopCounterMode(display=False) as flops:
            out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
        return out.log_probs, flops.get_total_flops()

    every_row, every_row_flops = scored()
    with completion_rows_only():
        completion_only, completion_flops = scored()
    valid = labels[:, 1:] != -100
    assert int(valid.sum()) == 5
    torch.testing.assert_close(completion_only[valid], expected[valid], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(completion_only[valid], every_row[valid], rtol=1e-6, atol=1e-6)
    assert completion_flops < every_row_flops


def test_the_policy_head_reads_a_contiguous_input_and_generates_the_same(tiny_model_dir, tiny_sft):
    """`load_policy` hands the LM head a contiguous input: `generate` slices the last position of every row,
    a strided view on which CPU `F.linear` copies the head's weight once per row (pytorch/pytorch#151934).
    Same tokens as the policy loaded without the hook."""
    import torch

    from lingtune.models import ModelRef, load
    from lingtune.train.scoring import load_policy

    policy, tokenizer = load_policy(tiny_sft, trainable=False)
    plain, _ = load(ModelRef(tiny_model_dir, tiny_sft), torch.float32)
    seen: list[bool] = []
    policy.get_output_embeddings().register_forward_hook(lambda _m, args, _out: seen.append(args[0].is_contiguous()))
    enc = tokenizer.pad({"input_ids": [[5, 6, 7, 8, 9, 10], [5, 6, 7]]}, padding_side="left", return_tensors="pt")
    with torch.no_grad():
        ours = policy.generate(**enc, do_sample=False, max_new_tokens=4, pad_token_id=tokenizer.pad_token_id)
        theirs = plain.generate(**enc, do_sample=False, max_new_tokens=4, pad_token_id=tokenizer.pad_token_id)
    assert seen and all(seen), seen
    assert torch.equal(ours, theirs)


def test_a_bf16_policy_keeps_the_backbone_in_bf16_and_trains_the_adapter_in_fp32(tiny_sft):
    import torch

    from lingtune.train.scoring import load_policy

    model, _ = load_policy(tiny_sft, trainable=True, precision="bf16")
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert trained == {torch.float32} and frozen == {torch.bfloat16}


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_only_where_bf16_matmuls_are_native(tmp_path, monkeypatch, native):
    """On an AVX2-only CPU bf16 matmuls take a fallback ~100x slower than fp32: `auto` must not pick it there."""
    import lingtune.env
    from lingtune.config import Params
    from lingtune.train.rl import trainer_args
    from lingtune.train.scoring import policy_precision

    monkeypatch.setattr(lingtune.env, "native_bf16", lambda gpu=False: native)
    params = Params()
    assert params.rl.precision == "auto"
    assert policy_precision("auto") == ("bf16" if native else "fp32")
    assert trainer_args(params, str(tmp_path)).bf16 is native
    assert policy_precision("fp32") == "fp32" and policy_precision("bf16") == "bf16"


def test_the_checkpoint_fingerprint_holds_the_resolved_precision(monkeypatch):
    """`auto` is bf16 on one machine and fp32 on another: a checkpoint must not resume across them."""
    import lingtune.env
    from lingtune.config import parse_params
    from lingtune.train.rl import checkpoint_fingerprint

    def stamp(native: bool, precision: str) -> str:
        monkeypatch.setattr(lingtune.env, "native_bf16", lambda gpu=False: native)
        return checkpoint_fingerprint(parse_params({"rl": {"precision": precision}}), "data", "sft")

    assert stamp(True, "auto") != stamp(False, "auto")
    assert stamp(True, "auto") == stamp(False, "bf16") and stamp(False, "auto") == stamp(True, "fp32")
