"""Where an SFT step's time goes: torch.profiler over lingtune's SFT step, grouped by kind of work.

The step is benchmarks/train_speed.py's `sft` configuration (same model, params, optimizer, compile mode and
real training batches): an untimed pass over the `--steps` batches first (compiles land there), then the
same batches under `torch.profiler.profile` (CPU activity). Every profiled op's SELF time (time in the op
minus its child ops: no double counting) is put into one kind:

* `matmul`        aten::mm / addmm / bmm / baddbmm / _weight_int4pack_mm (the work the roofline counts)
* `attention`     scaled_dot_product_attention kernels
* `compiled`      inductor's fused kernels (the self time of each "Torch-Compiled Region" / CompiledFunction:
                  norms, activations, rotary embeddings, casts and adds fused by torch.compile)
* `optimizer`     the AdamW update and gradient-norm clipping
* `copy/cast`     copy_, _to_copy, clone, contiguous, cat, index / gather / scatter (moving data, no math)
* `elementwise`   every other aten op run eagerly (adds, muls, reductions, softmax outside attention)
* `allocation`    empty / zeros / fill / resize
* `python/other`  wall time of the step not inside any op: Python, the dispatcher, autograd's engine
                  between ops, compiled-graph guards

`--variant` picks the train_speed configuration to profile (`sft`, `sft-eager`, ...), `--batch-size` overrides
`sft.batch_size` to show how each kind scales with more tokens per step. JSON: `kinds` (seconds per step and
share of the step for each kind), `top_ops` (the `--top` ops by self time per step), `step_seconds`,
`tokens_per_step`, `matmul_share`.

Usage: python benchmarks/sft_profile.py [--variant sft] [--steps 4] [--batch-size N] [--top 15] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from train_speed import CONFIGS as TRAIN_SPEED_CONFIGS  # noqa: E402
from train_speed import sft_step, training_batches  # noqa: E402

VARIANTS = tuple(c for c in TRAIN_SPEED_CONFIGS if not c.startswith("rl"))
MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_weight_int4pack_mm",
          "aten::_addmm_activation")
OPTIMIZER = ("_fused_adamw", "_foreach_", "Optimizer.step", "clip_grad", "aten::_foreach_norm")
COPY = ("aten::copy_", "aten::_to_copy", "aten::clone", "aten::contiguous", "aten::cat", "aten::index",
        "aten::gather", "aten::scatter", "aten::index_put", "aten::masked_select", "aten::nonzero",
        "aten::stack", "aten::embedding")
ALLOC = ("aten::empty", "aten::zeros", "aten::fill_", "aten::zero_", "aten::resize_", "aten::ones",
         "aten::full", "aten::empty_strided", "aten::new_")


def kind_of(name: str) -> str:
    """The kind of work a profiled event does, by its name (the groups of this module's docstring)."""
    if name.startswith(MATMUL) and not name.startswith("aten::mm_"):
        return "matmul"
    if "scaled_dot_product" in name or "flash_attention" in name:
        return "attention"
    if "Compiled" in name or name.startswith(("cpp_fused", "graph_", "Torch-Compiled")):
        return "compiled"
    if any(part in name for part in OPTIMIZER) or "AdamW" in name:
        return "optimizer"
    if name.startswith(COPY):
        return "copy/cast"
    if name.startswith(ALLOC):
        return "allocation"
    if name.startswith("aten::"):
        return "elementwise"
    return "python/other"  # record_function ranges of libraries (their self time is Python around ops)


def profile(variant: str, steps: int, batch_size: int | None, params_path: str, top: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from lingtune.config import load_params

    params = load_params(params_path)
    if batch_size:
        params = params.model_copy(update={"sft": params.sft.model_copy(update={"batch_size": batch_size}),
                                           "sft_full": params.sft_full.model_copy(update={"batch_size": batch_size})})
    torch.manual_seed(params.seed)
    torch.set_num_threads(params.sft.threads or os.cpu_count())
    step, _, cfg = sft_step(variant, params)
    batches = training_batches(params, cfg, steps)
    for batch in batches:  # warm-up on the profiled batches (as train_speed.py): no compile lands in the profile
        step(batch)
    seconds = []
    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for batch in batches:
            started = time.perf_counter()
            step(batch)
            seconds.append(time.perf_counter() - started)
    main_thread = defaultdict(float)  # self microseconds by op name, ops of the stepping thread only
    shapes = defaultdict(lambda: [0, 0.0])  # (m, k, n) of a matmul -> [calls, self microseconds]
    thread = stepping_thread(prof)
    for event in prof.events():
        if event.thread == thread:
            main_thread[event.name] += event.self_cpu_time_total
            if kind_of(event.name) == "matmul" and (mkn := matmul_mkn(event.name, event.input_shapes)):
                shapes[mkn][0] += 1
                shapes[mkn][1] += event.self_cpu_time_total
    step_s = statistics.mean(seconds)
    per_step = {name: us / 1e6 / steps for name, us in main_thread.items()}
    kinds: dict[str, float] = defaultdict(float)
    for name, s in per_step.items():
        kinds[kind_of(name)] += s
    in_ops = sum(v for k, v in kinds.items() if k != "python/other")
    kinds["python/other"] = max(0.0, step_s - in_ops)
    tokens = statistics.mean(int(b["attention_mask"].sum()) for b in batches)
    padded = statistics.mean(b["attention_mask"].numel() for b in batches)
    by_time = sorted(per_step.items(), key=lambda kv: -kv[1])
    return {"variant": variant, "batch_size": cfg.batch_size, "precision": cfg.precision, "compile": cfg.compile,
            "threads": torch.get_num_threads(), "steps": steps, "step_seconds": round(step_s, 3),
            "tokens_per_step": round(tokens, 1), "padded_tokens_per_step": round(padded, 1),
            "tokens_per_s": round(tokens / step_s, 1),
            "kinds": {k: {"seconds": round(v, 4), "share": round(v / step_s, 3)}
                      for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "matmul_share": round(kinds["matmul"] / step_s, 3),
            "matmul_groups": matmul_rows(shapes, steps, step_s),
            "matmul_top_shapes": [{"mkn": list(mkn), "calls_per_step": round(calls / steps, 1),
                                   "seconds": round(us / 1e6 / steps, 4),
                                   "gflops_per_s": round(2 * mkn[0] * mkn[1] * mkn[2] * calls / us / 1e3, 1)}
                                  for mkn, (calls, us) in sorted(shapes.items(), key=lambda kv: -kv[1][1])[:top]],
            "top_ops": [{"op": name, "kind": kind_of(name), "seconds": round(s, 4), "share": round(s / step_s, 3)}
                        for name, s in by_time if kind_of(name) != "python/other"][:top]}


def matmul_mkn(name: str, shapes: list) -> tuple[int, int, int] | None:
    """(m, k, n) of a 2-D matmul event from its recorded input shapes (batched ones: m includes the batch)."""
    if name == "aten::mm" and len(shapes) >= 2 and len(shapes[0]) == 2 and len(shapes[1]) == 2:
        return shapes[0][0], shapes[0][1], shapes[1][1]
    if name == "aten::addmm" and len(shapes) >= 3 and len(shapes[1]) == 2 and len(shapes[2]) == 2:
        return shapes[1][0], shapes[1][1], shapes[2][1]
    if name == "aten::bmm" and len(shapes) >= 2 and len(shapes[0]) == 3 and len(shapes[1]) == 3:
        return shapes[0][0] * shapes[0][1], shapes[0][2], shapes[1][2]
    return None


def matmul_rows(shapes: dict, steps: int, step_s: float) -> list[dict]:
    """Matmuls grouped by the SIZE of their smallest dimension (the thin LoRA ones have the rank there):
    calls, seconds per step, share of the step and achieved GFLOP/s of each group."""
    groups: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])  # calls, microseconds, flops
    for (m, k, n), (calls, us) in shapes.items():
        smallest = min(m, k, n)
        label = ("min dim <= 16 (LoRA rank side)" if smallest <= 16 else
                 "min dim <= 256" if smallest <= 256 else "min dim > 256")
        groups[label][0] += calls
        groups[label][1] += us
        groups[label][2] += 2 * m * k * n * calls
    return [{"group": label, "calls_per_step": round(calls / steps), "seconds": round(us / 1e6 / steps, 4),
             "share": round(us / 1e6 / steps / step_s, 3), "gflops_per_s": round(flops / us / 1e3, 1)}
            for label, (calls, us, flops) in sorted(groups.items(), key=lambda kv: -kv[1][1])]


def stepping_thread(prof) -> int:
    """The thread that ran the steps: the one with the most top-level op time (autograd's backward runs on
    the calling thread on CPU; intra-op worker threads record no ops)."""
    totals: dict[int, float] = defaultdict(float)
    for event in prof.events():
        if event.cpu_parent is None:
            totals[event.thread] += event.cpu_time_total
    return max(totals, key=totals.get)


def table(r: dict) -> str:
    lines = [f"{r['variant']} batch {r['batch_size']} ({r['precision']}, compile {r['compile']}, {r['threads']} "
             f"threads): {r['step_seconds']} s/step, {r['tokens_per_step']} tokens ({r['padded_tokens_per_step']} "
             f"with padding), {r['tokens_per_s']} tokens/s",
             "| kind | s/step | share |", "|---|---:|---:|"]
    lines += [f"| {k} | {v['seconds']} | {v['share']} |" for k, v in r["kinds"].items()]
    lines += ["", "| op | kind | s/step | share |", "|---|---|---:|---:|"]
    lines += [f"| {o['op']} | {o['kind']} | {o['seconds']} | {o['share']} |" for o in r["top_ops"]]
    lines += ["", "| matmuls | calls/step | s/step | share | GFLOP/s |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {g['group']} | {g['calls_per_step']} | {g['seconds']} | {g['share']} | {g['gflops_per_s']} |"
              for g in r["matmul_groups"]]
    lines += ["", "| m x k x n | calls/step | s/step | GFLOP/s |", "|---|---:|---:|---:|"]
    lines += [f"| {' x '.join(map(str, t['mkn']))} | {t['calls_per_step']} | {t['seconds']} | {t['gflops_per_s']} |"
              for t in r["matmul_top_shapes"]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--variant", default="sft", choices=VARIANTS)
    parser.add_argument("--steps", type=int, default=4, help="profiled steps (after an untimed pass)")
    parser.add_argument("--batch-size", type=int, default=0, help="override sft.batch_size (0: the params')")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from lingtune.env import apply_offline_defaults

    apply_offline_defaults()
    result = profile(args.variant, args.steps, args.batch_size or None, args.params, args.top)
    print(json.dumps(result, indent=2) if args.json else table(result))


if __name__ == "__main__":
    main()
