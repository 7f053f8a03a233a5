"""The matrix peak of this CPU, per dtype, measured robustly: what every roofline fraction divides by.

For each dtype (bf16, fp32) and each shape (a square matmul, and the three matmuls of the LM head's
forward/backward on answer rows: rows x hidden @ hidden x vocab and its two gradients), it runs a
warm-up, then `--trials` timed runs, and reports the best, median and worst GFLOP/s (the spread says
whether the machine was quiet). It also reports the CPU's matrix instruction sets (AVX2, AVX-512,
AVX-512 BF16, AMX) and torch's CPU capability: without native bf16 (AVX-512 BF16 or AMX), bf16 matmuls
take a slow fallback path, and bf16 training is slower than fp32.

Usage: python benchmarks/matmul_peak.py [--threads N] [--trials 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

# (name, m, k, n): C[m, n] = A[m, k] @ B[k, n]. LM-head shapes: 96 answer rows, Gemma 3's 640-wide hidden
# state, a 16,384-row slice of its 262,144-token vocabulary (to keep the slow paths short). The peak is the
# best of all shapes, and no one shape is best everywhere: on an AMX Xeon (2026-12-07) square-1024 ran at
# ~1.6 TFLOP/s in bf16 while 2048 x 1024 x 1024 and a training step's MLP matmul (~1,000 tokens x 640 ->
# Gemma 3's 2,048-wide MLP) ran at 2.5-3 TFLOP/s (reports/benchmarks/matmul_peak_amx.json), so a probe of
# square-1024 alone reported about half the peak.
SHAPES = [("square-1024", 1024, 1024, 1024), ("tall-2048", 2048, 1024, 1024), ("mlp-up", 1024, 640, 2048),
          ("lm-head-forward", 96, 640, 16384), ("lm-head-input-grad", 96, 16384, 640),
          ("lm-head-weight-grad", 640, 96, 16384)]
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_flags() -> dict[str, bool]:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        flags = []
    return {flag: flag in flags for flag in ISA_FLAGS}


def time_matmul(torch, dtype, m: int, k: int, n: int, trials: int) -> list[float]:
    """GFLOP/s of `trials` timed runs after one warm-up (each run repeats the matmul for >= 0.2 s)."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    started = time.perf_counter()
    a @ b  # warm-up, and the size of one repetition
    once = max(time.perf_counter() - started, 1e-6)
    repeat = max(1, int(0.2 / once))
    rates = []
    for _ in range(trials):
        started = time.perf_counter()
        for _ in range(repeat):
            a @ b
        rates.append(2 * m * k * n * repeat / (time.perf_counter() - started) / 1e9)
    return rates


def peak(dtype: str, threads: int, trials: int) -> tuple[float, float]:
    """(best FLOP/s of `dtype` matmuls over SHAPES with `threads`, best / worst run of that shape): the
    ceiling other benchmarks divide by (serve.py, train_speed.py), in the dtype their work computes in."""
    import torch

    torch.set_num_threads(threads)
    runs = [time_matmul(torch, getattr(torch, dtype), m, k, n, trials) for _, m, k, n in SHAPES]
    best = max(runs, key=max)
    return max(best) * 1e9, max(best) / min(best)


def measure(threads: int, trials: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    report = {"threads": threads, "trials": trials, "cpu_flags": cpu_flags(),
              "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "gflops": {}}
    for dtype_name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        for name, m, k, n in SHAPES:
            rates = time_matmul(torch, dtype, m, k, n, trials)
            report["gflops"][f"{dtype_name}/{name}"] = {
                "best": round(max(rates), 1), "median": round(statistics.median(rates), 1),
                "worst": round(min(rates), 1), "spread": round(max(rates) / min(rates), 3)}
    best = {d: max(v["best"] for key, v in report["gflops"].items() if key.startswith(d)) for d in ("bf16", "fp32")}
    report["peak_gflops"] = best
    report["native_bf16"] = report["cpu_flags"]["avx512_bf16"] or report["cpu_flags"]["amx_bf16"]
    report["bf16_over_fp32_lm_head_input_grad"] = round(
        report["gflops"]["bf16/lm-head-input-grad"]["best"] / report["gflops"]["fp32/lm-head-input-grad"]["best"], 4)
    return report


def table(r: dict) -> str:
    flags = ", ".join(f for f, on in r["cpu_flags"].items() if on) or "none of " + ", ".join(ISA_FLAGS)
    lines = [f"CPU matrix instructions: {flags}; torch capability {r['torch_cpu_capability']}; "
             f"{r['threads']} threads, best of {r['trials']}",
             "| dtype/shape | best GFLOP/s | median | worst | spread |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {k} | {v['best']} | {v['median']} | {v['worst']} | {v['spread']} |" for k, v in r["gflops"].items()]
    lines.append(f"peak: bf16 {r['peak_gflops']['bf16']} GFLOP/s, fp32 {r['peak_gflops']['fp32']} GFLOP/s; "
                 f"native bf16: {r['native_bf16']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    report = measure(args.threads, args.trials)
    print(json.dumps(report, indent=2) if args.json else table(report))


if __name__ == "__main__":
    main()
