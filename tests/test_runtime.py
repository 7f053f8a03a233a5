"""The engine settings the service and the evaluation derive from params.yaml."""

import os

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
