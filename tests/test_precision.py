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


@pytest.mark.parametrize("native, cuda, expected",
                         [(False, False, "float32"), (True, False, "auto"), (False, True, "auto")])
def test_vllm_runs_bf16_only_where_it_is_native(monkeypatch, native, cuda, expected):
    """vLLM's CPU backend keeps a bf16 checkpoint in bf16 on an AVX2-only CPU, 2.6-6.8x slower than float32
    (benchmarks/engine_dtype.py): lingtune asks for float32 there, in evaluation and in the service."""
    monkeypatch.setattr(lingtune.env, "native_bf16", lambda gpu=False: native)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert lingtune.env.vllm_dtype() == expected
    assert lingtune.env.vllm_dtype("bfloat16") == "bfloat16"  # an explicit dtype is kept


def test_a_quantized_model_keeps_its_checkpoint_dtype(monkeypatch, tmp_path):
    monkeypatch.setattr(lingtune.env, "native_bf16", lambda gpu=False: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (tmp_path / "config.json").write_text('{"quantization_config": {"quant_method": "compressed-tensors"}}')
    assert lingtune.env.vllm_dtype(model_dir=tmp_path) == "auto"
    (tmp_path / "config.json").write_text('{"model_type": "gemma3_text"}')
    assert lingtune.env.vllm_dtype(model_dir=tmp_path) == "float32"


@pytest.mark.parametrize("native, expected", [(False, "float32"), (True, "auto")])
def test_service_and_evaluation_engines_get_that_dtype(monkeypatch, tiny_model_dir, native, expected):
    import vllm

    from lingtune.config import parse_params
    from lingtune.engine import Engine
    from lingtune.serve.runtime import ServePlan, vllm_args

    monkeypatch.setattr(lingtune.env, "native_bf16", lambda gpu=False: native)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert vllm_args(parse_params({}).serve, ServePlan(tiny_model_dir, "lingtune")).dtype == expected

    class Built(Exception):
        pass

    def record_llm(**kwargs):
        raise Built(kwargs)

    monkeypatch.setattr(vllm, "LLM", record_llm)
    with pytest.raises(Built) as built:
        Engine(tiny_model_dir)
    assert built.value.args[0]["dtype"] == expected
