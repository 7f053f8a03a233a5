"""benchmarks/train_speed.py's roofline: each configuration against the peak of the dtype it computes in
(a float32 RL step or a float32 SFT on a CPU without native bf16 measured against the bf16 peak would be
a meaningless fraction), and a configuration whose dtype was not probed is an error, never a guess."""

import sys

import pytest

from conftest import ROOT
from lingtune.config import parse_params

sys.path.insert(0, str(ROOT / "benchmarks"))
import train_speed  # noqa: E402


def row(precision: str, gflops: float, **extra) -> dict:
    return {"precision": precision, "flops_per_s": gflops * 1e9, "step_seconds": [1.0], "tokens_per_s": 100.0,
            "peak_rss_mb": 1000, **extra}


def test_each_configuration_is_measured_against_the_peak_of_its_dtype():
    rows = {"sft": row("bf16-mixed", 400), "plain": row("32-true", 50), "rl": row("fp32", 20)}
    result = train_speed.summary(rows, {"bfloat16": (800e9, 1.1), "float32": (100e9, 1.02)})
    assert result["peak_dtype"] == "bfloat16" and result["peak_gflops"] == 800.0 and result["peak_spread"] == 1.1
    assert result["peak_gflops_by_dtype"] == {"bfloat16": 800.0, "float32": 100.0}
    assert result["sft_roofline_fraction"] == 0.5
    assert rows["plain"]["roofline_fraction"] == 0.5 and rows["plain"]["peak_dtype"] == "float32"
    assert result["rl_roofline_fraction"] == 0.2


def test_a_dtype_without_a_probed_peak_stops_the_benchmark():
    with pytest.raises(SystemExit, match="rl computed in float32, whose peak was not probed"):
        train_speed.summary({"sft": row("bf16-mixed", 400), "rl": row("fp32", 20)}, {"bfloat16": (800e9, 1.1)})


@pytest.mark.parametrize("native, sft_dtype", [(True, "bfloat16"), (False, "float32")])
def test_the_probed_dtypes_follow_precision_auto(monkeypatch, native, sft_dtype):
    import lingtune.env

    monkeypatch.setattr(lingtune.env, "native_bf16", lambda gpu=False: native)
    params = parse_params({"sft": {"precision": "auto"}})
    assert train_speed.config_dtype("sft", params) == sft_dtype
    assert train_speed.config_dtype("full", params) == sft_dtype
    assert train_speed.config_dtype("plain", params) == "float32"
    assert train_speed.config_dtype("rl", params) == sft_dtype  # rl.precision: auto, as sft
    assert train_speed.config_dtype("rl-fp32", params) == train_speed.config_dtype("rl-before", params) == "float32"
    assert train_speed.config_dtype("rl", parse_params({"rl": {"precision": "bf16"}})) == "bfloat16"
