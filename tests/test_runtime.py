"""The engine settings the service and the evaluation derive from params.yaml."""

import os

import pytest

from lingtune.config import parse_params
from lingtune.env import bind_vllm_cpu_threads
from lingtune.serve.runtime import ServePlan, vllm_args


def test_all_binds_every_allowed_cpu_and_a_users_value_wins(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    bind_vllm_cpu_threads("all")
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"].split(",") == [str(c) for c in sorted(os.sched_getaffinity(0))]
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    bind_vllm_cpu_threads("all")
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"


def test_vllm_args_use_a_block_the_prompt_template_fills(tiny_model_dir):
    cfg = parse_params({"serve": {"block_size": 32}}).serve
    args = vllm_args(cfg, ServePlan(tiny_model_dir, "lingtune"))
    assert args.block_size == 32 and args.enable_prefix_caching
    default = vllm_args(parse_params({"serve": {"block_size": None}}).serve, ServePlan(tiny_model_dir, "lingtune"))
    assert default.block_size is None


def serve_params(tmp_path, fallback, db: str = "mlflow.db"):
    from lingtune.config import parse_params

    return parse_params({"tracking": {"uri": f"sqlite:///{tmp_path / db}"},
                         "register": {"cache_dir": str(tmp_path / "cache")},
                         "serve": {"model": "models:/lingtune@champion", "fallback_model": fallback, "adapters": {}}})


def test_no_fallback_unless_configured():
    from lingtune.config import parse_params

    assert parse_params({}).serve.fallback_model is None


def test_fallback_only_while_the_registry_lacks_the_model(tmp_path, tiny_model_dir):
    """No store, no registered model, no alias: the fallback when one is set, else RegistryMissing."""
    from lingtune.registry import RegistryMissing, client
    from lingtune.serve.runtime import resolve_plan

    def falls_back_only_when_set(missing: str) -> None:
        plan = resolve_plan(serve_params(tmp_path, str(tiny_model_dir)))
        assert plan.serves_fallback and plan.base == tiny_model_dir and missing in plan.fallback
        with pytest.raises(RegistryMissing, match=missing):
            resolve_plan(serve_params(tmp_path, None))

    falls_back_only_when_set("no MLflow model registry")
    store = client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    falls_back_only_when_set("Registered Model with name=lingtune not found")
    store.create_registered_model("lingtune")
    falls_back_only_when_set("no @champion")


def test_a_failing_registry_never_falls_back(tmp_path, tiny_model_dir, monkeypatch):
    """A store that cannot answer is an error, even with a fallback configured: serving the untrained
    backbone then would hide it."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE

    from lingtune.registry import RegistryError, RegistryMissing, client
    from lingtune.serve.runtime import resolve_plan

    def locked(*args, **kwargs):
        raise MlflowException("(sqlite3.OperationalError) database is locked", error_code=TEMPORARILY_UNAVAILABLE)

    client(f"sqlite:///{tmp_path / 'mlflow.db'}").create_registered_model("lingtune")
    monkeypatch.setattr(MlflowClient, "get_model_version_by_alias", locked)
    with pytest.raises(RegistryError, match="database is locked") as raised:
        resolve_plan(serve_params(tmp_path, str(tiny_model_dir)))
    assert not isinstance(raised.value, RegistryMissing)
    monkeypatch.undo()

    (tmp_path / "garbage.db").write_bytes(b"this is not an sqlite database\n" * 200)
    with pytest.raises(RegistryError, match="file is not a database") as raised:
        resolve_plan(serve_params(tmp_path, str(tiny_model_dir), db="garbage.db"))
    assert not isinstance(raised.value, RegistryMissing)


def test_a_model_vllm_cannot_run_here_is_refused_at_start(tiny_model_dir, monkeypatch):
    """An INT4 champion on a CPU whose vLLM build lacks the INT4 kernel: a clear ModelError before the
    engine starts, not a crash on the first request."""
    import lingtune.serve.runtime as runtime
    from lingtune.config import parse_params
    from lingtune.errors import ModelError

    params = parse_params({"serve": {"model": str(tiny_model_dir), "adapters": {}}})
    assert runtime.resolve_plan(params).base == tiny_model_dir
    monkeypatch.setattr(runtime, "unsupported_here", lambda folder: "no INT4 kernel in this vLLM build")
    with pytest.raises(ModelError, match="cannot serve .*no INT4 kernel"):
        runtime.resolve_plan(params)


def test_only_quantized_models_are_checked_for_a_kernel(tiny_model_dir, tmp_path):
    import json
    import shutil

    import torch

    from lingtune.models import unsupported_here

    assert unsupported_here(tiny_model_dir) is None
    int4 = tmp_path / "int4"
    shutil.copytree(tiny_model_dir, int4)
    config = json.loads((int4 / "config.json").read_text())
    (int4 / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "compressed-tensors"}}))
    import vllm._custom_ops  # noqa: F401

    has_kernel = torch.cuda.is_available() or hasattr(torch.ops._C, "cpu_gemm_wna16")
    assert (unsupported_here(int4) is None) == has_kernel
