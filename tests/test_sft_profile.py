"""benchmarks/sft_profile.py: the profile of a real SFT step (tiny backbone) accounts for the whole step, finds
the LoRA adapter's thin matmuls, and sorts ops into the kinds its table reports."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT, make_sft_project

sys.path.insert(0, str(ROOT / "benchmarks"))
import sft_profile  # noqa: E402


@pytest.mark.parametrize("name, kind", [
    ("aten::mm", "matmul"), ("aten::addmm", "matmul"), ("aten::bmm", "matmul"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu_backward", "attention"),
    ("## Call CompiledFxGraph fzdwfm ##", "compiled"), ("Torch-Compiled Region: 0/1", "compiled"),
    ("aten::_fused_adamw_", "optimizer"), ("Optimizer.step#AdamW.step", "optimizer"),
    ("aten::copy_", "copy/cast"), ("aten::_to_copy", "copy/cast"), ("aten::empty_strided", "allocation"),
    ("aten::mul", "elementwise"), ("PeftModel.forward", "python/other"),
])
def test_ops_are_sorted_into_kinds(name, kind):
    assert sft_profile.kind_of(name) == kind


def test_matmul_shapes_are_read_from_the_recorded_inputs():
    assert sft_profile.matmul_mkn("aten::mm", [[872, 640], [640, 2048]]) == (872, 640, 2048)
    assert sft_profile.matmul_mkn("aten::addmm", [[2048], [872, 640], [640, 2048], [], []]) == (872, 640, 2048)
    assert sft_profile.matmul_mkn("aten::bmm", [[4, 110, 256], [4, 256, 110]]) == (440, 256, 110)
    assert sft_profile.matmul_mkn("aten::mm", [[872, 640]]) is None  # shapes not recorded: not guessed


def test_matmuls_are_grouped_by_their_smallest_dimension():
    shapes = {(800, 640, 8): [10, 1000.0], (800, 640, 2048): [2, 2000.0], (64, 640, 262144): [1, 3000.0]}
    groups = {g["group"]: g for g in sft_profile.matmul_rows(shapes, steps=2, step_s=0.01)}
    assert groups["min dim <= 16 (LoRA rank side)"]["calls_per_step"] == 5
    assert groups["min dim > 256"]["seconds"] == 0.001 and groups["min dim > 256"]["share"] == 0.1
    lora = groups["min dim <= 16 (LoRA rank side)"]
    assert lora["gflops_per_s"] == round(2 * 800 * 640 * 8 * 10 / 1000.0 / 1e3, 1)
    assert groups["min dim <= 256"]["calls_per_step"] == 0  # 1 call over 2 steps, rounded


@pytest.mark.parametrize("variant", ["sft", "sft-sdpa"])
def test_a_real_step_is_accounted_for(root, tmp_path, variant):
    project = make_sft_project(root, tmp_path, {"batch_size": 4, "max_seq_len": 160, "compile": "none",
                                                "threads": 1, "precision": "32-true"})
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sft_profile.py"), "--params", "params.yaml",
                           "--steps", "2", "--variant", variant, "--json"], cwd=project, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    kinds = result["kinds"]
    # every kind's seconds add up to the step (python/other is the rest), each kind at most the whole step
    assert sum(k["seconds"] for k in kinds.values()) == pytest.approx(result["step_seconds"], rel=0.02, abs=2e-3)
    assert all(0 <= k["share"] <= 1 for k in kinds.values())
    assert kinds["matmul"]["seconds"] > 0
    # sft.attention: eager (the default) runs no fused attention kernel; sft-sdpa does
    assert (kinds.get("attention", {"seconds": 0})["seconds"] > 0) == (variant == "sft-sdpa")
    lora = next(g for g in result["matmul_groups"] if g["group"].startswith("min dim <= 16"))
    layers, rank = 2, 8  # tests/tiny.py: 2 decoder layers; the LoRA rank of the default recipe
    assert lora["calls_per_step"] >= layers * 7 * 2  # at least x@A and (x@A)@B for 7 linear layers per decoder layer
    assert any(rank in t["mkn"] for t in result["matmul_top_shapes"])
    assert result["tokens_per_step"] <= result["padded_tokens_per_step"] <= 4 * 160
