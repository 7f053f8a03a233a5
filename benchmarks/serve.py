"""Load benchmark of the serving stack against the machine's ceiling and a naive baseline.

In one run: (1) the peak matmul FLOP/s of this machine in the dtype the engine computes in (bf16, or
float32 where bf16 is not native: lingtune.env.vllm_dtype); (2) the lingtune service
(`bentoml serve`, vLLM) started from params.yaml, then one client in sequence (latency), then C
concurrent clients with the official `openai` async client sending sentiment and/or NER requests
from the test split to the task endpoints /v1/sentiment and /v1/ner (`--route chat`: chat
completions in the trained prompt with the whole answer constrained); optionally a soak (64
clients x 60 s); (3) the same load against benchmarks/naive_server.py (FastAPI + transformers,
one request at a time, same model, same prompt tokens and answer length). FLOPs of a request:
2 x non-embedding parameters x (prompt tokens not served by the prefix cache + output tokens)
+ 2 x LM-head parameters x output tokens. The peak is benchmarks/matmul_peak.py's probe; a
roofline_fraction above 1 is refused as a benchmark bug.

Usage: python benchmarks/serve.py [--clients 16] [--requests 400] [--task sentiment|ner|mix] [--route task|chat]
       [--model lingtune] [--soak] [--naive-requests 32] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))  # matmul_peak: the one peak probe

from lingtune.config import load_params  # noqa: E402
from lingtune.formats import read_jsonl  # noqa: E402
from lingtune import tasks as lingtune_tasks  # noqa: E402


def engine_dtype(model_dir: Path) -> str:
    """The dtype vLLM computes in for `model_dir` here: float32 where lingtune.env.vllm_dtype asks for it
    (no native bf16 matmuls), else bf16 (the checkpoints' dtype)."""
    from lingtune.env import vllm_dtype

    return "float32" if vllm_dtype(model_dir=model_dir) == "float32" else "bfloat16"


def peak_flops(dtype: str = "bfloat16", trials: int = 5) -> tuple[float, float]:
    """(matmul FLOP/s in `dtype` with all cores, spread): the ceiling every request shares, measured by
    benchmarks/matmul_peak.py's probe. The dtype is the engine's: a bf16 peak on a CPU whose engine runs
    float32 would be the wrong ceiling (and takes minutes to probe there)."""
    from matmul_peak import peak

    rate, spread = peak(dtype, len(os.sched_getaffinity(0)), trials)
    return rate, round(spread, 3)


def roofline(req_per_s: float, flops_per_request: float, peak: float) -> float:
    """The fraction of the peak that requests use. Above 1 the probe under-measured the peak or the
    FLOPs are over-counted: a benchmark bug, never a result."""
    fraction = req_per_s * flops_per_request / peak
    if fraction > 1.0:
        raise SystemExit(f"roofline_fraction {fraction:.3f} > 1: the peak probe ({peak / 1e9:.0f} GFLOP/s) "
                         "under-measured the machine or the FLOPs per request are over-counted; not reported")
    return float(f"{fraction:.3g}")  # significant digits: a tiny model on a fast peak is 0.0004, not 0.0


def parameter_counts(model_dir: Path) -> tuple[int, int]:
    """(non-embedding parameters, LM-head parameters) from the safetensors headers (no loading)."""
    from safetensors import safe_open

    config = json.loads((model_dir / "config.json").read_text())
    text = config.get("text_config", config)
    total = embed = head = 0
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(file, "np") as f:
            for name in f.keys():
                numel = 1
                for dim in f.get_slice(name).get_shape():
                    numel *= dim
                total += numel
                embed += numel if "embed_tokens" in name else 0
                head += numel if "lm_head" in name else 0
    return total - embed - head, head or text["vocab_size"] * text["hidden_size"]


def workload(data: Path, task: str, max_tokens_ner: int, route: str) -> list[dict]:
    """Requests from the test split: task-endpoint bodies (`route` task, what /v1/sentiment and /v1/ner
    users send), or chat completions in the trained prompt with the trained answer's constraint."""
    tasks = ["sentiment", "ner"] if task == "mix" else [task]
    per_task = [read_jsonl(data, task=t) for t in tasks]
    items = []
    for row in zip(*per_task):
        for record in row:
            if route == "task":
                items.append({"path": f"/{record.task}", "body": {"text": record.text}})
                continue
            spec = lingtune_tasks.get(record.task)
            items.append({"messages": spec.messages(record)[:1], "max_tokens": spec.max_tokens(max_tokens_ner),
                          "extra_body": {"structured_outputs": spec.constraint()}})
    return items


async def send(client, model: str, item: dict, max_new: int | None) -> tuple[int, int, int]:
    """One request; (prompt tokens, completion tokens, prompt tokens from the prefix cache) from its usage."""
    if "path" in item:  # max_tokens only for the naive server (the same work as the service did)
        body = {**item["body"], "model": model, **({"max_tokens": max_new} if max_new else {})}
        usage = (await client.post(item["path"], body=body, cast_to=object))["usage"]
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        return usage["prompt_tokens"], usage["completion_tokens"], cached
    reply = await client.chat.completions.create(
        model=model, messages=item["messages"], temperature=0, extra_body=item["extra_body"],
        max_tokens=max_new or item["max_tokens"])
    details = reply.usage.prompt_tokens_details
    return reply.usage.prompt_tokens, reply.usage.completion_tokens, (details.cached_tokens or 0) if details else 0


class Feed:
    """The requests in order, each sent once to a server while the pool lasts: a prompt the server has
    answered before is a whole-prompt prefix-cache hit and would flatter the numbers. Each phase takes
    the next items; `repeats` counts requests of an item this server already had (pool used up)."""

    def __init__(self, items: list[dict]):
        self.items, self.sent = items, 0

    def next(self) -> tuple[dict, bool]:
        item, repeat = self.items[self.sent % len(self.items)], self.sent >= len(self.items)
        self.sent += 1
        return item, repeat


async def load(url: str, model: str, feed: Feed, clients: int, count: int | None = None,
               duration: float | None = None, api_key: str = "none", max_new: int | None = None) -> dict:
    """C clients, each sending its next request when the previous one is answered."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=600)
    results, issued, repeats = [], 0, 0
    deadline = time.perf_counter() + duration if duration else None

    async def one_client():
        nonlocal issued, repeats
        while (count is None or issued < count) and (deadline is None or time.perf_counter() < deadline):
            item, repeat = feed.next()
            issued, repeats = issued + 1, repeats + repeat
            started = time.perf_counter()
            try:
                prompt_tokens, completion_tokens, cached = await send(client, model, item, max_new)
                results.append((time.perf_counter() - started, prompt_tokens, completion_tokens, cached))
            except openai.OpenAIError as exc:
                results.append((time.perf_counter() - started, None, repr(exc), 0))

    started = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(clients)))
    wall = time.perf_counter() - started
    await client.close()
    summary = {**summarize(results, wall, clients), "repeated_prompts": repeats}
    print(f"{url} {clients} clients: {json.dumps(summary)}", file=sys.stderr, flush=True)  # progress
    return summary


def summarize(results: list[tuple], wall: float, clients: int) -> dict:
    ok = sorted(r[0] for r in results if r[1] is not None)
    errors = [r[2] for r in results if r[1] is None]

    def pct(q: float) -> float:
        return round(1000 * ok[min(len(ok) - 1, int(q * len(ok)))], 1) if ok else float("nan")

    prompt = sum(r[1] for r in results if r[1] is not None)
    output = sum(r[2] for r in results if r[1] is not None)
    cached = sum(r[3] for r in results if r[1] is not None)
    return {"clients": clients, "requests": len(results), "errors": len(errors), "error_examples": errors[:3],
            "seconds": round(wall, 2), "req_per_s": round(len(ok) / wall, 3),
            "mean_latency_ms": round(1000 * sum(ok) / len(ok), 1) if ok else float("nan"),
            "p50_latency_ms": pct(0.5), "p95_latency_ms": pct(0.95), "p99_latency_ms": pct(0.99),
            "output_tok_per_s": round(output / wall, 1),
            "mean_prompt_tokens": round(prompt / max(1, len(ok)), 1),
            "mean_output_tokens": round(output / max(1, len(ok)), 2),
            "mean_cached_prompt_tokens": round(cached / max(1, len(ok)), 1)}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(url: str, proc: subprocess.Popen, seconds: int = 600) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"error: server exited with {proc.returncode} (see its log above)")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"error: {url} not ready in {seconds} s")


def start_service(params_path: Path, overrides: dict, log) -> tuple[subprocess.Popen, str]:
    raw = yaml.safe_load(params_path.read_text()) or {}
    port = _free_port()
    raw["serve"] = {**raw.get("serve", {}), **overrides, "host": "127.0.0.1", "port": port}
    tmp = Path(tempfile.mkdtemp(prefix="lingtune-bench-")) / "params.yaml"
    tmp.write_text(yaml.safe_dump(raw, allow_unicode=True))
    env = {**os.environ, "LINGTUNE_PARAMS": str(tmp)}
    env.pop(load_params(tmp).serve.api_key_env, None)
    proc = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", "lingtune.serve.service:LingTune"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    _wait(f"{url}/readyz", proc)
    return proc, url


def start_naive(model_dir: Path, adapter: Path | None, log, threads: int = 0) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, str(ROOT / "benchmarks" / "naive_server.py"), str(model_dir), str(port),
           "--threads", str(threads)]
    proc = subprocess.Popen(cmd + (["--adapter", str(adapter)] if adapter else []), cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    _wait(f"{url}/health", proc)
    return proc, url


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()


def run(args) -> dict:
    from lingtune.config import parse_params
    from lingtune.serve.runtime import resolve_plan

    params = load_params(args.params)
    raw = yaml.safe_load(Path(args.params).read_text()) or {}
    overrides = {"preload": not args.no_preload, **({"model": args.serve_model} if args.serve_model else {})}
    plan = resolve_plan(parse_params({**raw, "serve": {**raw.get("serve", {}), **overrides}}))
    model = args.model or plan.base_name
    items = workload(Path(args.data), args.task, params.serve.max_tokens_ner, args.route)
    more = [item for extra in args.more_data for item in workload(Path(extra), args.task, params.serve.max_tokens_ner,
                                                                   args.route)]
    feed = Feed(items + more)  # test split first; the soak goes on into the other splits
    log = sys.stderr if args.verbose else open(os.devnull, "w")
    report = {"task": args.task, "route": args.route, "model": model, "base": str(plan.base), "preload": not args.no_preload}
    report["load_average_at_start"] = os.getloadavg()[0]  # other processes share these cores: read with care
    report["peak_dtype"] = engine_dtype(plan.base)
    report["peak_flops"], report["peak_spread"] = peak_flops(report["peak_dtype"])
    non_embedding, head = parameter_counts(plan.base)
    proc, url = start_service(Path(args.params), overrides, log)
    try:
        asyncio.run(load(url, model, feed, args.clients, count=2 * args.clients))  # warm-up: template cache, pools
        single = asyncio.run(load(url, model, feed, 1, count=args.single_requests))
        if args.duration:
            main = asyncio.run(load(url, model, feed, args.clients, duration=args.duration))
        else:
            main = asyncio.run(load(url, model, feed, args.clients, count=args.requests))
        soak = asyncio.run(load(url, model, feed, 64, duration=60)) if args.soak else None
    finally:
        stop(proc)
    computed_prompt = main["mean_prompt_tokens"] - main["mean_cached_prompt_tokens"]  # cache hits cost no FLOPs
    flops = 2 * non_embedding * (computed_prompt + main["mean_output_tokens"]) + 2 * head * main["mean_output_tokens"]
    report.update(main)
    report.update({"single_client_latency_ms": single["mean_latency_ms"], "flops_per_request": flops,
                   "roofline_req_per_s": round(report["peak_flops"] / flops, 2),
                   "roofline_fraction": roofline(main["req_per_s"], flops, report["peak_flops"]), "soak": soak})
    full = None
    if args.naive_requests:
        adapter = plan.adapters.get(model)
        proc, url = start_naive(plan.base, adapter, log, args.naive_threads)
        try:
            max_new = max(1, round(main["mean_output_tokens"]))  # the same work per request as the service did
            naive = asyncio.run(load(url, model, Feed(items), args.clients, count=args.naive_requests,
                                     max_new=max_new))
            if args.route == "task" and args.task == "sentiment":  # what a naive server generates for the same
                chat = workload(Path(args.data), "sentiment", params.serve.max_tokens_ner, "chat")  # question
                full = asyncio.run(load(url, model, Feed(chat), args.clients, count=args.naive_requests,
                                        max_new=answer_tokens(plan.base)))
        finally:
            stop(proc)
        report["naive"] = naive
        report["speedup_vs_naive"] = round(main["req_per_s"] / naive["req_per_s"], 2) if naive["req_per_s"] else None
        if full:
            report["naive_full_answer"] = full
            report["speedup_vs_naive_full_answer"] = round(main["req_per_s"] / full["req_per_s"], 2)
    report["load_average_at_end"] = os.getloadavg()[0]
    return report


def answer_tokens(model_dir: Path) -> int:
    """Tokens of the whole trained sentiment answer (`{"label": "positive"}` and the end of turn)."""
    from transformers import AutoTokenizer

    from lingtune.records import Record
    from lingtune.tasks.base import answer_ids

    return len(answer_ids(AutoTokenizer.from_pretrained(model_dir), Record(text="x", label="positive")))


def table(r: dict) -> str:
    rows = [("service", r), ("naive baseline (same tokens)", r.get("naive")),
            ("naive baseline (generates the whole answer)", r.get("naive_full_answer")),
            ("soak (64 clients x 60 s)", r.get("soak"))]
    lines = ["| run | clients | requests | errors | req/s | mean ms | p50 ms | p95 ms | p99 ms | output tok/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {name} | {m['clients']} | {m['requests']} | {m['errors']} | {m['req_per_s']:.2f} | "
              f"{m['mean_latency_ms']:.0f} | {m['p50_latency_ms']:.0f} | {m['p95_latency_ms']:.0f} | "
              f"{m['p99_latency_ms']:.0f} | {m['output_tok_per_s']:.0f} |" for name, m in rows if m]
    lines.append(f"\npeak {r['peak_dtype']} matmul {r['peak_flops'] / 1e9:.0f} GFLOP/s; "
                 f"{r['flops_per_request'] / 1e9:.2f} GFLOP/request -> "
                 f"ceiling {r['roofline_req_per_s']:.1f} req/s; "
                 f"roofline_fraction {r['roofline_fraction']:.2f}; "
                 f"single-client mean {r['single_client_latency_ms']:.0f} ms; "
                 f"speed-up vs naive {r.get('speedup_vs_naive')} (same tokens), "
                 f"{r.get('speedup_vs_naive_full_answer')} (naive generates the whole answer); "
                 f"load average {r['load_average_at_start']:.1f} at start, "
                 f"{r['load_average_at_end']:.1f} at end")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--data", default=str(ROOT / "data" / "processed" / "test.jsonl"))
    splits = [ROOT / "data" / "processed" / f"{split}.jsonl" for split in ("val", "train")]
    parser.add_argument("--more-data", nargs="*", default=[str(p) for p in splits if p.is_file()],
                        help="requests after --data is used up (the soak), so that no prompt is sent twice "
                             "(default: the val and train splits where they exist)")
    parser.add_argument("--task", choices=("sentiment", "ner", "mix"), default="sentiment")
    parser.add_argument("--route", choices=("task", "chat"), default="task",
                        help="task: POST /v1/sentiment|/v1/ner; chat: /v1/chat/completions with the trained "
                             "prompt and the whole answer constrained")
    parser.add_argument("--model", help="`model` name to request (default: the base model)")
    parser.add_argument("--serve-model", help="override serve.model (a folder or models:/name@alias)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--duration", type=float, help="seconds of load instead of --requests")
    parser.add_argument("--single-requests", type=int, default=20)
    parser.add_argument("--naive-requests", type=int, default=32, help="0 skips the naive baseline")
    parser.add_argument("--naive-threads", type=int, default=0, help="torch threads of the naive server (0: default)")
    parser.add_argument("--soak", action="store_true", help="also 64 clients x 60 s")
    parser.add_argument("--no-preload", action="store_true", help="serve.preload false (vLLM's own libgomp)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--verbose", action="store_true", help="server logs to stderr")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the servers started here are stopped
    report = run(args)
    print(json.dumps(report, indent=2) if args.json else table(report))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
