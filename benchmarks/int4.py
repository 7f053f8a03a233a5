"""INT4 (models/int4) against the same model in bf16: weight bytes, folder size, vLLM throughput, F1.

* Linear weight bytes: every layer the INT4 folder quantized (packed 4-bit weights + scales +
  shapes) against the same layers' weights in the bf16 model; read from safetensors headers.
* Folder size: the INT4 folder against the bf16 model it came from (the adapter merged into the
  backbone, written to a temporary folder; embeddings and norms stay bf16 in both).
* Throughput: vLLM offline (the evaluation's Engine, in-process, eager), greedy, `--tokens` new
  tokens per request with EOS ignored: 1 request at a time, then `--concurrency` at once.
* F1: the evaluation's constrained decoding and scoring on the test split, both tasks.

Each model runs in its own process (one vLLM engine, about 5 GB of RAM). The machine must be quiet:
numbers taken while training runs are wrong.

Usage: python benchmarks/int4.py [--int4 models/int4] [--backbone models/backbone]
       [--test data/processed/test.jsonl] [--max-examples 0] [--tokens 64] [--concurrency 16] [--json]
"""

from __future__ import annotations

import argparse
import json
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUANT_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")


def tensor_bytes(folder: Path) -> dict[str, int]:
    """name -> bytes of every tensor in a folder's safetensors files (headers only)."""
    sizes = {}
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as handle:
            header = json.loads(handle.read(struct.unpack("<Q", handle.read(8))[0]))
        sizes.update({name: meta["data_offsets"][1] - meta["data_offsets"][0]
                      for name, meta in header.items() if name != "__metadata__"})
    return sizes


def linear_bytes(int4_dir: Path, bf16_dir: Path) -> dict:
    quant, dense = tensor_bytes(int4_dir), tensor_bytes(bf16_dir)
    layers = sorted({name.rsplit(".", 1)[0] for name in quant if name.endswith(".weight_packed")})
    missing = [layer for layer in layers if f"{layer}.weight" not in dense]
    if not layers or missing:
        raise SystemExit(f"error: {int4_dir} has no quantized layers, or {bf16_dir} lacks {missing[:3]}")
    q = sum(quant.get(f"{layer}.{suffix}", 0) for layer in layers for suffix in QUANT_SUFFIXES)
    d = sum(dense[f"{layer}.weight"] for layer in layers)
    return {"layers": len(layers), "int4_bytes": q, "bf16_bytes": d, "size_ratio": round(q / d, 4)}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def measure(model_dir: str, test: str, max_examples: int, tokens: int, concurrency: int) -> dict:
    """One model in this process: F1 on both tasks, then tokens/s at 1 and `concurrency` requests."""
    from vllm import SamplingParams

    from lingtune.formats import read_jsonl
    from lingtune.engine import Engine, EngineConfig
    from lingtune.evaluate.run import score

    engine = Engine(model_dir, EngineConfig(kv_cache_gb=1), enable_lora=False)  # 1 GB: ~55k tokens of Gemma 270M KV
    result = {}
    for task, key in (("sentiment", "macro_f1"), ("ner", "f1")):
        records = read_jsonl(test, task=task)[: max_examples or None]
        result[f"{task}_f1"] = score(task, records, engine.generate(records))[key]
    if tokens == 0:  # --skip-throughput
        return result
    prompts = [engine.prompt(r, constrained=False) for r in read_jsonl(test)[:concurrency]]
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    engine.llm.generate(prompts[:2], params, use_tqdm=False)  # warm-up
    started = time.perf_counter()
    for prompt in prompts[:4]:
        engine.llm.generate([prompt], params, use_tqdm=False)
    result["tok_s_1"] = round(4 * tokens / (time.perf_counter() - started), 1)
    started = time.perf_counter()
    engine.llm.generate(prompts, params, use_tqdm=False)
    result[f"tok_s_{concurrency}"] = round(len(prompts) * tokens / (time.perf_counter() - started), 1)
    return result


def measure_in_subprocess(model_dir: Path, args) -> dict:
    tokens = 0 if args.skip_throughput else args.tokens
    command = [sys.executable, __file__, "--measure", str(model_dir), "--test", args.test, "--tokens", str(tokens),
               "--max-examples", str(args.max_examples), "--concurrency", str(args.concurrency)]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"error: measuring {model_dir} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def compare(args) -> dict:
    from lingtune.quantize import CARD, merge

    int4 = Path(args.int4)
    card = json.loads((int4 / CARD).read_text())
    report = {"int4": str(int4), "method": card["method"], "group_size": card["group_size"]}
    with tempfile.TemporaryDirectory(prefix="int4-bench-") as tmp:
        bf16 = merge(Path(card["source"]), args.backbone, Path(tmp) / "bf16")
        report.update(linear_bytes(int4, bf16))
        report["folder_bytes_int4"], report["folder_bytes_bf16"] = folder_bytes(int4), folder_bytes(bf16)
        report["folder_ratio"] = round(report["folder_bytes_int4"] / report["folder_bytes_bf16"], 4)
        if args.size_only:
            return report
        report["bf16"] = measure_in_subprocess(bf16, args)
    report["int4_metrics"] = measure_in_subprocess(int4, args)
    b, q, c = report["bf16"], report["int4_metrics"], args.concurrency
    report["f1_drop_points"] = round(100 * max(b["sentiment_f1"] - q["sentiment_f1"], b["ner_f1"] - q["ner_f1"]), 2)
    if args.skip_throughput:  # the machine was busy: timings would be wrong, so none are reported
        report["throughput_ratio"] = report[f"throughput_ratio_{c}"] = None
        return report
    report["throughput_ratio"] = round(q["tok_s_1"] / b["tok_s_1"], 3)
    report[f"throughput_ratio_{c}"] = round(q[f"tok_s_{c}"] / b[f"tok_s_{c}"], 3)
    return report


def table(r: dict, concurrency: int) -> str:
    mb = 1024 * 1024
    if "bf16" not in r:  # --size-only
        return (f"Linear weights: {r['bf16_bytes'] / mb:.1f} MB bf16 -> {r['int4_bytes'] / mb:.1f} MB int4 "
                f"({r['size_ratio']:.3f}); folder {r['folder_bytes_bf16'] / mb:.1f} -> {r['folder_bytes_int4'] / mb:.1f} MB "
                f"({r['folder_ratio']:.3f})")
    b, q, c = r["bf16"], r["int4_metrics"], concurrency
    rows = [("Linear weights (MB)", f"{r['bf16_bytes'] / mb:.1f}", f"{r['int4_bytes'] / mb:.1f}", f"{r['size_ratio']:.3f}"),
            ("whole folder (MB)", f"{r['folder_bytes_bf16'] / mb:.1f}", f"{r['folder_bytes_int4'] / mb:.1f}",
             f"{r['folder_ratio']:.3f}"),
            ("sentiment macro-F1", f"{b['sentiment_f1']:.1%}", f"{q['sentiment_f1']:.1%}",
             f"{100 * (q['sentiment_f1'] - b['sentiment_f1']):+.1f} pt"),
            ("NER F1", f"{b['ner_f1']:.1%}", f"{q['ner_f1']:.1%}", f"{100 * (q['ner_f1'] - b['ner_f1']):+.1f} pt")]
    if r["throughput_ratio"] is not None:
        rows[2:2] = [("tokens/s, 1 request", f"{b['tok_s_1']}", f"{q['tok_s_1']}", f"{r['throughput_ratio']:.3f}"),
                     (f"tokens/s, {c} requests", f"{b[f'tok_s_{c}']}", f"{q[f'tok_s_{c}']}",
                      f"{r[f'throughput_ratio_{c}']:.3f}")]
    lines = [f"INT4 {r['method']} (group {r['group_size']}, {r['layers']} Linear layers) vs bf16",
             "| | bf16 | int4 | int4/bf16 |", "|---|---:|---:|---:|"]
    return "\n".join(lines + [f"| {' | '.join(row)} |" for row in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--int4", default="models/int4")
    parser.add_argument("--backbone", default="models/backbone")
    parser.add_argument("--test", default="data/processed/test.jsonl")
    parser.add_argument("--max-examples", type=int, default=0, help="per task; 0 = the whole test split")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per throughput request")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--size-only", action="store_true", help="bytes only: no vLLM, seconds")
    parser.add_argument("--skip-throughput", action="store_true", help="size and F1 only (for a busy machine)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one model in this process
    args = parser.parse_args()
    from lingtune.env import apply_offline_defaults

    apply_offline_defaults()
    if args.measure:
        print("RESULT " + json.dumps(measure(args.measure, args.test, args.max_examples, args.tokens, args.concurrency)))
        return
    report = compare(args)
    print(json.dumps(report, indent=2) if args.json else table(report, args.concurrency))


if __name__ == "__main__":
    main()
