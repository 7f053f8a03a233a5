"""Where NER decode time goes on this CPU, and what decoding free first saves (lingtune.decoding).

In one process, one vLLM engine (params.evaluate's settings) on a model (default models/sft merged into its
base, as served), the NER prompts of a split (default validation), all submitted at once, after a warm-up:
  - `constrained`: every answer decoded under the answer regex (the token bitmask at every step);
  - `free_first`: what lingtune does (Engine.complete): unconstrained greedy first, constrained again only
    for the answers the regex does not accept; `identical_answers` counts answers equal to `constrained`'s;
  - `free`: unconstrained only (the floor of the two above; its answers are not all valid);
then, with --profile, one batch of --profile-batch prompts of each mode under torch.profiler: the share of
the wall time in the matrix multiplications (oneDNN), in other torch ops, and outside torch (vLLM's Python:
scheduling, input preparation, detokenization; the grammar's mask filling).

Usage: python benchmarks/ner_decode.py [--model models/sft] [--data data/processed/val.jsonl] [--limit 0]
       [--profile] [--profile-batch 16] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def engine_model(spec: str, params) -> Path:
    """The folder vLLM runs, as the evaluate stage picks it (an adapter merged into its recorded base)."""
    from lingtune.evaluate.run import scoring_ref
    from lingtune.models import folder_ref

    ref = folder_ref(spec)
    if ref is None:
        raise SystemExit(f"error: {spec} is neither a model folder nor an adapter")
    ref = scoring_ref(ref, params.evaluate)
    if ref.adapter is not None:
        raise SystemExit("error: an adapter needs evaluate.merge_adapters: true here (the engine runs without LoRA)")
    return Path(ref.base)


def timed(fn) -> tuple[float, object]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def constrained_only(engine, prompts: list[dict]) -> list[str]:
    params = engine.sampling("ner", True)
    outputs = engine.llm.generate(prompts, [params] * len(prompts), use_tqdm=False)
    return [engine.decoder.answer("ner", o.outputs[0]) for o in outputs]


def free_only(engine, prompts: list[dict]) -> list[str]:
    params = engine.decoder.first_try("ner")
    return [o.outputs[0].text for o in engine.llm.generate(prompts, [params] * len(prompts), use_tqdm=False)]


def free_first(engine, prompts: list[dict]) -> list[str]:
    return engine.complete(["ner"] * len(prompts), prompts)


MODES = {"constrained": constrained_only, "free_first": free_first, "free": free_only}


def profile_shares(engine, prompts: list[dict], mode: str) -> dict:
    """Shares of one batch's wall time: oneDNN matmuls, other torch ops, outside torch."""
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        wall, _ = timed(lambda: MODES[mode](engine, prompts))
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    matmul = sum(e.self_cpu_time_total for e in events if "mm" in e.key and "onednn" in e.key) / 1e6
    return {"seconds": round(wall, 2), "matmul_share": round(matmul / wall, 3),
            "other_torch_share": round((total - matmul) / wall, 3),
            "outside_torch_share": round(max(0.0, wall - total) / wall, 3)}


def run(args) -> dict:
    from lingtune.config import load_params
    from lingtune.engine import Engine
    from lingtune.evaluate.run import engine_config
    from lingtune.formats import read_jsonl

    params = load_params(args.params)
    model = engine_model(args.model, params)
    records = read_jsonl(Path(args.data), task="ner")
    records = records[: args.limit] if args.limit else records
    engine = Engine(model, engine_config(params), enable_lora=False)
    prompts = [engine.prompt(r) for r in records]
    for mode in MODES:  # warm-up: the grammar compiles once, oneDNN picks its kernels
        MODES[mode](engine, prompts[:4])
    engine.first_tries = engine.constrained_again = 0
    report = {"model": str(args.model), "engine_model": str(model), "data": str(args.data), "prompts": len(prompts)}
    answers = {}
    for mode in MODES:
        seconds, answers[mode] = timed(lambda: MODES[mode](engine, prompts))
        report[mode] = {"seconds": round(seconds, 2), "req_per_s": round(len(prompts) / seconds, 2)}
        print(f"{mode}: {report[mode]}", file=sys.stderr, flush=True)
    report["free_first"]["constrained_again"] = engine.constrained_again
    report["identical_answers"] = sum(a == b for a, b in zip(answers["free_first"], answers["constrained"]))
    report["speedup_free_first"] = round(report["constrained"]["seconds"] / report["free_first"]["seconds"], 3)
    report["grammar_share"] = round(1 - report["free"]["seconds"] / report["constrained"]["seconds"], 3)
    if args.profile:
        batch = prompts[: args.profile_batch]
        shares = {mode: profile_shares(engine, batch, mode) for mode in ("constrained", "free")}
        report["profile"] = {"batch": len(batch), **shares}
    if report["identical_answers"] != len(prompts):
        report["error"] = "free-first answers differ from constrained answers"
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--model", default="models/sft", help="a model folder or an adapter (merged into its base)")
    parser.add_argument("--data", default=str(ROOT / "data" / "processed" / "val.jsonl"))
    parser.add_argument("--limit", type=int, default=0, help="first N NER records; 0 = all")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--profile-batch", type=int, default=16)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from lingtune.env import apply_offline_defaults, quiet_library_noise

    apply_offline_defaults()  # vLLM logs to stderr; offline
    quiet_library_noise()
    with contextlib.redirect_stdout(sys.stderr):  # progress bars and prints of the merge: stdout is the report
        report = run(args)
    print(json.dumps(report, indent=2) if args.json else
          "\n".join(f"{k}: {v}" for k, v in report.items()))
    if "error" in report:
        raise SystemExit(f"error: {report['error']}")


if __name__ == "__main__":
    main()
