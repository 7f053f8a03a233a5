"""`sft.precision: auto`: bf16 where this machine's bf16 matmuls are native, float32 (a float32 LoRA base
too) elsewhere; explicit settings are kept as they are."""

import pytest
import torch

import lingtune.env
from lingtune.config import SFTConfig
from lingtune.train.sft import load_model, resolve_precision


@pytest.mark.parametrize("native, expected", [(True, "bf16-mixed"), (False, "32-true")])
def test_auto_follows_the_hardware(monkeypatch, native, expected):
    monkeypatch.setattr(lingtune.env, "native_bf16", lambda gpu=False: native)
    assert resolve_precision(SFTConfig(precision="auto")).precision == expected


def test_explicit_precision_is_kept(monkeypatch):
    monkeypatch.setattr(lingtune.env, "native_bf16", lambda gpu=False: False)
    assert resolve_precision(SFTConfig(precision="bf16-mixed")).precision == "bf16-mixed"


def test_native_bf16_reads_the_cpu_flags(monkeypatch, tmp_path):
    import builtins

    real_open = builtins.open
    for flags, expected in (("fpu avx2 fma", False), ("fpu avx2 avx512f avx512_bf16", True), ("amx_bf16 amx_tile", True)):
        cpuinfo = tmp_path / "cpuinfo"
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        monkeypatch.setattr(builtins, "open", lambda path, *a, **k: real_open(cpuinfo if path == "/proc/cpuinfo" else path, *a, **k))
        assert lingtune.env.native_bf16() is expected, flags
        monkeypatch.setattr(builtins, "open", real_open)


@pytest.mark.parametrize("precision, dtype", [("32-true", torch.float32), ("bf16-mixed", torch.bfloat16)])
def test_lora_base_dtype_follows_the_precision(tiny_model_dir, precision, dtype):
    model = load_model(str(tiny_model_dir), SFTConfig(precision=precision))
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    assert frozen == {dtype} and trained == {torch.float32}
