"""Where the RL stage's generation time goes: transformers `generate` on the policy, per generated token.

The RLOO step of the `rl` stage spends most of its time in TRL's sampling with transformers `generate`
(benchmarks/train_speed.py times the whole step; the `rl` stage's MLflow run logs TRL's
`profiling/Time taken: RLOOTrainer.transformers.generate`). This benchmark isolates it, on the real SFT
adapter (`rl.sft_dir`) and prompts of the RL training split rendered as RL renders them, with the stage's
sampler (`rl.temperature`, no top-k / top-p) and `rl.prompts_per_step` x `rl.num_generations` sequences:

* each row generates exactly `--tokens` new tokens (`min_new_tokens` = `max_new_tokens`), so rows compare
  the same work whatever they sample; best of `--trials` after a warm-up;
* rows: the policy as `lingtune.train.scoring.load_policy` loads it, at `fp32` and `bf16` (`rl.precision`);
  each again with transformers' own sampler (`-multinomial`: `torch.multinomial`'s draw of random numbers
  over the whole vocabulary instead of lingtune.train.sampling's inverse-CDF draw), and again without the
  contiguous LM-head input (`-strided-multinomial`: `generate` hands the head a strided slice of the last
  positions, on which CPU `F.linear` copies the head weight once per row, pytorch/pytorch#151934).
  `fp32-strided-multinomial` is the policy as the `rl` stage loaded it before either change;
* `breakdown`: torch.profiler over one generation of the shipped row, every op's self time put into
  `lm_head` (matmuls with the vocabulary as a dimension), `sampling` (every other op over the vocabulary:
  the float copy of the logits, the logits processors, softmax, the draw), `layers and loop` (everything
  else: the decoder layers with the adapter, the cache, Python).

JSON: `tokens`, `sequences`, `rows.<name>.{precision, contiguous_head, inverse_cdf, ms_per_token}`,
`bf16_speedup` (fp32 over bf16), `contiguous_head_speedup` (per precision: strided over contiguous, both
with multinomial), `inverse_cdf_speedup` (per precision: multinomial over inverse CDF), `speedup_vs_before`
(`fp32-strided-multinomial` over the shipped row), `breakdown.{precision, ms_per_token, kinds.<kind>.{ms_per_token,
share}}`.

Usage: python benchmarks/rl_generate.py [--tokens 40] [--trials 2] [--adapter DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

ROWS = {f"{precision}{suffix}": (precision, contiguous, inverse_cdf) for precision in ("fp32", "bf16")
        for suffix, contiguous, inverse_cdf in (("-strided-multinomial", False, False),
                                                ("-multinomial", True, False), ("", True, True))}
"""Row name -> (rl.precision, contiguous head input, inverse-CDF sampling)."""
BEFORE = "fp32-strided-multinomial"
MATMULS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::linear", "aten::matmul")
DRAWS = ("aten::exponential_", "aten::multinomial", "aten::uniform_", "aten::searchsorted")


def load_row(adapter: Path, precision: str, contiguous: bool, inverse_cdf: bool):
    """The policy as the RL stage loads it, without the head hook and/or the sampler where the row says."""
    from lingtune.train.scoring import load_policy

    return load_policy(adapter, trainable=False, precision=precision, contiguous_head=contiguous,
                       inverse_cdf=inverse_cdf)


def rl_prompts(params, tokenizer, data: Path) -> dict:
    """`rl.prompts_per_step` training prompts, one per task in turn, left-padded as TRL pads them."""
    from lingtune import tasks
    from lingtune.formats import read_jsonl
    from lingtune.tasks.base import prompt_ids

    records = read_jsonl(data)
    first = [next(r for r in records if r.task == task) for task in ("ner", "sentiment")]
    chosen = [first[i % 2] for i in range(params.rl.prompts_per_step)]
    ids = [prompt_ids(tokenizer, tasks.get(r.task), r.text) for r in chosen]
    return tokenizer.pad({"input_ids": ids}, padding=True, padding_side="left", return_tensors="pt")


def generate(model, tokenizer, enc, params, tokens: int) -> float:
    """Seconds for `tokens` new tokens on every sequence, sampled as the RL stage samples."""
    import torch

    torch.manual_seed(params.seed)
    started = time.perf_counter()
    with torch.no_grad():
        model.generate(**enc, do_sample=True, temperature=params.rl.temperature, top_k=0, top_p=1.0,
                       max_new_tokens=tokens, min_new_tokens=tokens, num_return_sequences=params.rl.num_generations,
                       pad_token_id=tokenizer.pad_token_id)
    return time.perf_counter() - started


def kind_of(name: str, shapes: list, vocab: int) -> str:
    over_vocab = any(vocab in shape for shape in shapes if isinstance(shape, (list, tuple)))
    if over_vocab and name.startswith(MATMULS):
        return "lm_head"
    if over_vocab or name.startswith(DRAWS):
        return "sampling"
    return "layers and loop"


def breakdown(model, tokenizer, enc, params, tokens: int) -> dict:
    """Self time per kind of one profiled generation, per generated token."""
    from torch.profiler import ProfilerActivity, profile

    vocab = model.get_output_embeddings().weight.shape[0]
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        seconds = generate(model, tokenizer, enc, params, tokens)
    kinds: dict[str, float] = defaultdict(float)
    for event in prof.key_averages(group_by_input_shape=True):
        kinds[kind_of(event.key, event.input_shapes or [], vocab)] += event.self_cpu_time_total / 1e6
    profiled = sum(kinds.values())
    kinds["layers and loop"] += max(seconds - profiled, 0.0)  # outside any op: Python, generate's loop
    total = sum(kinds.values())
    return {"ms_per_token": round(total / tokens * 1000, 1),
            "kinds": {k: {"ms_per_token": round(v / tokens * 1000, 1), "share": round(v / total, 3)}
                      for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])}}


def measure(params, adapter: Path, data: Path, tokens: int, trials: int) -> dict:
    import torch

    from lingtune.train.scoring import policy_precision

    if params.rl.threads:
        torch.set_num_threads(params.rl.threads)
    rows, enc = {}, None
    shipped_row = policy_precision(params.rl.precision)
    for name, (precision, contiguous, inverse_cdf) in ROWS.items():
        model, tokenizer = load_row(adapter, precision, contiguous, inverse_cdf)
        model.eval()
        enc = rl_prompts(params, tokenizer, data) if enc is None else enc
        generate(model, tokenizer, enc, params, 2)  # warm-up: first-call allocations
        best = min(generate(model, tokenizer, enc, params, tokens) for _ in range(trials))
        rows[name] = {"precision": precision, "contiguous_head": contiguous, "inverse_cdf": inverse_cdf,
                      "ms_per_token": round(best / tokens * 1000, 1)}
        if name == shipped_row:
            shipped = {"precision": precision, **breakdown(model, tokenizer, enc, params, tokens)}
        del model
    ms = {name: row["ms_per_token"] for name, row in rows.items()}
    return {"tokens": tokens, "sequences": params.rl.prompts_per_step * params.rl.num_generations,
            "threads": torch.get_num_threads(), "rows": rows,
            "bf16_speedup": round(ms["fp32"] / ms["bf16"], 2),
            "contiguous_head_speedup": {p: round(ms[f"{p}-strided-multinomial"] / ms[f"{p}-multinomial"], 2)
                                        for p in ("fp32", "bf16")},
            "inverse_cdf_speedup": {p: round(ms[f"{p}-multinomial"] / ms[p], 2) for p in ("fp32", "bf16")},
            "speedup_vs_before": round(ms[BEFORE] / ms[shipped_row], 2), "breakdown": shipped}


def table(result: dict) -> str:
    lines = [f"{result['sequences']} sequences x {result['tokens']} tokens", "| row | ms per token |", "|---|---:|"]
    lines += [f"| {name} | {row['ms_per_token']} |" for name, row in result["rows"].items()]
    lines += ["", f"breakdown ({result['breakdown']['precision']}): | kind | ms per token | share |"]
    lines += [f"| {k} | {v['ms_per_token']} | {v['share']:.0%} |" for k, v in result["breakdown"]["kinds"].items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--adapter", default=None, help="the SFT adapter (default: rl.sft_dir)")
    parser.add_argument("--data", default=None, help="prompts (default: data.out_dir/train.jsonl)")
    parser.add_argument("--tokens", type=int, default=40, help="new tokens per sequence")
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from lingtune.config import load_params
    from lingtune.env import apply_offline_defaults

    apply_offline_defaults()
    params = load_params(args.params)
    adapter = Path(args.adapter or params.rl.sft_dir)
    if not adapter.is_dir():
        raise SystemExit(f"error: no SFT adapter at {adapter}: run `make pipeline` (or `dvc repro sft`) first")
    result = measure(params, adapter, Path(args.data or Path(params.data.out_dir) / "train.jsonl"), args.tokens,
                     args.trials)
    print(json.dumps(result, indent=2) if args.json else table(result))


if __name__ == "__main__":
    main()
