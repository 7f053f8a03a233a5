"""What vLLM's dtype costs on this CPU: the evaluation engine in bf16 (the checkpoint's) against float32.

On a CPU without native bf16 matmuls (AVX2 only, no AVX-512 BF16 / AMX), vLLM's CPU backend still runs a
bf16 checkpoint in bf16, on torch's fallback path; lingtune.env.vllm_dtype picks float32 there. One child
process per dtype (one engine per process, as vLLM expects), each on the same prompts: the first --limit
validation examples of each task, a model (default models/sft merged into its base, as evaluation runs
it), greedy constrained answers through Engine.generate after a warm-up. Reports the seconds per dtype,
the speed-up of float32, and how many answers agree between the two.

Usage: python benchmarks/engine_dtype.py [--model models/sft] [--data data/processed/val.jsonl] [--limit 32]
       [--json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

DTYPES = ("bfloat16", "float32")


def child(args) -> dict:
    """One dtype: time the answers of `--limit` examples per task."""
    from ner_decode import engine_model

    from lingtune.config import load_params
    from lingtune.engine import Engine
    from lingtune.evaluate.run import engine_config
    from lingtune.formats import read_jsonl

    params = load_params(args.params)
    cfg = engine_config(params)
    engine = Engine(engine_model(args.model, params), type(cfg)(**{**cfg.__dict__, "dtype": args.dtype}),
                    enable_lora=False)
    out = {"dtype": args.dtype, "seconds": {}, "answers": {}}
    for task in ("sentiment", "ner"):
        records = read_jsonl(Path(args.data), task=task)[: args.limit]
        engine.generate(records[:2])  # warm-up: first-call allocations and grammar compilation
        started = time.perf_counter()
        out["answers"][task] = engine.generate(records)
        out["seconds"][task] = round(time.perf_counter() - started, 2)
    return out


def run_child(args, dtype: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--dtype", dtype, "--model", args.model, "--data", args.data,
           "--limit", str(args.limit), "--params", args.params]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"error: the {dtype} engine failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/sft")
    parser.add_argument("--data", default="data/processed/val.jsonl")
    parser.add_argument("--limit", type=int, default=32)
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--dtype", choices=DTYPES, help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args), ensure_ascii=False))
        return

    from lingtune.env import native_bf16, vllm_dtype

    runs = {dtype: run_child(args, dtype) for dtype in DTYPES}
    bf16, fp32 = runs["bfloat16"], runs["float32"]
    report = {
        "native_bf16": native_bf16(), "auto_dtype": vllm_dtype(), "examples_per_task": args.limit,
        "seconds": {dtype: run["seconds"] for dtype, run in runs.items()},
        "float32_speedup": {task: round(bf16["seconds"][task] / fp32["seconds"][task], 2) for task in fp32["seconds"]},
        "agreeing_answers": {task: sum(a == b for a, b in zip(bf16["answers"][task], fp32["answers"][task]))
                             for task in fp32["answers"]},
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    for task in report["seconds"]["float32"]:
        print(f"{task}: bf16 {report['seconds']['bfloat16'][task]} s, float32 {report['seconds']['float32'][task]} s "
              f"({report['float32_speedup'][task]}x), {report['agreeing_answers'][task]}/{args.limit} answers agree")


if __name__ == "__main__":
    main()
