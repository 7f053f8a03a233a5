"""Training speed against this CPU's matrix peak, in one run: SFT (lingtune's step and a plain loop),
full fine-tuning, and an RL step at the shipped settings.

1. The matmul peak with all training threads in each dtype the configurations compute in (bf16 under
   bf16 autocast or bf16 RL, else float32: `sft.precision: auto` trains in float32 where bf16 matmuls are not
   native, and RL on a CPU is float32), by the probe of benchmarks/matmul_peak.py: best of `--trials`
   timed runs after a warm-up, square, tall, MLP and LM-head shapes, once before and once after the configurations;
   `peak_gflops` is the best of both in the `sft` configuration's dtype (`peak_dtype`), `peak_spread` the
   best / worst run of that shape, `peak_gflops_by_dtype` every dtype's.
2. Each configuration in its own process (peak RSS is per process), on the same real training batches
   (`BucketBatchSampler` with the pipeline's seed, batch size and sequence limit; `--steps` batches at evenly
   spaced quantiles of an epoch's padded widths, so the lengths are those of a whole `dvc repro sft` run), each
   step timed after one untimed pass over the same batches (the compiles
   happen there: `warm_up_seconds`):
   * `sft`   lingtune's SFT step (`sft.*` params: LoRA, precision auto, answer-only LM head, fused AdamW,
             `sft.compile`), the compile happens in the warm-up pass;
   * `sft-sdpa` the same with `sft.attention: sdpa` (torch's fused attention kernel instead of the eager
             attention ops the compiled layers fuse), to show what the attention choice buys;
   * `sft-batch16` the same with 16 examples per step instead of `sft.batch_size`, to show how throughput scales
             with tokens per step (a recipe change: measured here for speed, not for quality);
   * `sft-eager` the same with `sft.compile: none`, to show what compiling buys;
   * `sft-whole-logits` the same with `sft.loss_chunk_rows: 0` (the LM head and cross-entropy on all answer
             rows at once), to show what the chunked head loss saves in memory and costs in time;
   * `sft-checkpointed` the same with `sft.gradient_checkpointing: true` (decoder layers' activations
             recomputed in the backward pass), to show what LoRA's peak memory can go down to and at what speed;
   * `plain` a plain transformers + peft loop: fp32, LoRA of the same rank, logits for every position;
   * `full`  lingtune's full fine-tuning step (`sft_full` params), for the memory ratio;
   * `full-unfused` the same with torch's default AdamW (for-each kernels) instead of the fused one the sft
             stage builds (`lingtune.train.sft.build_optimizer`), to show what the fused update buys;
   * `rl`    TRL RLOO steps of the `rl` stage (`rl.*` and `reward.*` params, the real SFT adapter);
   * `rl-every-row` the same steps with TRL's own CPU log-prob scoring (the LM head on every prompt,
             completion and padding position, not only the completion tokens: see
             `lingtune.train.rl.completion_rows_only`), to show what scoring the completions only buys;
   * `rl-fp32` the same steps with `rl.precision: fp32` (the base upcast to float32, no autocast), to show
             what the bf16 base and the matrix units buy RL (each fraction is of its own dtype's peak). A step's
             time follows its longest completion, which sampling decides: rows carry the completion lengths;
   * `rl-before` the same steps as the `rl` stage ran them when issue 15 was filed: TRL's every-row scoring,
             fp32, and the policy loaded without `lingtune.train.scoring.load_policy`'s two generation fixes
             (the contiguous LM-head input and inverse-CDF sampling instead of `torch.multinomial`).
3. FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` (matmuls, attention, forward and
   backward as dispatched) on the same batches in a separate, untimed pass; for RL, on one extra step
   (generation, log-probs of policy and reference, the update). Achieved FLOP/s = FLOPs / timed
   seconds; `*_roofline_fraction` = achieved / the peak of the dtype that configuration computes in
   (`configs.<name>.peak_dtype`). Above 1 the benchmark stops with an error.

JSON keys: `peak_gflops`, `peak_spread`, `peak_dtype`, `peak_gflops_by_dtype`, `sft_tokens_per_s`,
`sft_roofline_fraction`, `sft_speedup_vs_plain`,
`rl_seconds_per_step`, `rl_roofline_fraction`, `rl_speedup_vs_every_row`, `rl_bf16_speedup` (`rl-fp32` over `rl`
seconds per step), `rl_speedup_vs_before` (`rl-before` over `rl`), `lora_vs_full_peak_ratio`,
`lora_vs_full_training_memory_ratio` (the same without the imported runtime both pay), `chunked_head_loss_saves_mb`,
`chunked_head_loss_speedup`, `sdpa_attention_speedup` (`sft-sdpa` against `sft`), `batch16_speedup` (tokens/s of
`sft-batch16` against `sft`), `lora_checkpointed_vs_full_peak_ratio` and `checkpointing_speedup` (`sft-checkpointed`
against `full` and against `sft`), `fused_adamw_speedup_full` (`full` against `full-unfused`),
and `configs.<name>` with the details (step seconds per step, tokens and FLOPs per
step; RSS after imports, after loading the model, and the peak of the timed steps).

Usage: python benchmarks/train_speed.py [--steps 6] [--rl-steps 2] [--configs sft,plain,full,rl] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))  # matmul_peak: the one peak probe; children

from children import add_config_arguments, run_configs  # noqa: E402
from matmul_peak import peak as matmul_peak  # noqa: E402  (`peak` names locals and parameters here)

CONFIGS = ("sft", "sft-sdpa", "sft-batch16", "sft-eager", "sft-whole-logits", "sft-checkpointed", "plain", "full",
           "full-unfused", "rl", "rl-every-row", "rl-fp32", "rl-before")


def precision_dtype(precision: str) -> str:
    """The dtype the matmuls of a row's `precision` (Lightning's for SFT, `rl.precision` for RL) run in."""
    return {"bf16-mixed": "bfloat16", "bf16": "bfloat16", "16-mixed": "float16"}.get(precision, "float32")


def config_dtype(config: str, params) -> str:
    """The dtype `config` will compute in, known before it runs (its peak is probed before and after)."""
    from lingtune.train.scoring import policy_precision
    from lingtune.train.sft import resolve_precision

    if config == "plain":
        return "float32"
    if config in ("rl-fp32", "rl-before"):
        return "float32"
    if config.startswith("rl"):
        return precision_dtype(policy_precision(params.rl.precision))
    return precision_dtype(resolve_precision(params.sft_full if config.startswith("full") else params.sft).precision)


def roofline(flops_per_s: float, peak: float, what: str) -> float:
    fraction = flops_per_s / peak
    if fraction > 1.0:
        raise SystemExit(f"{what}: {fraction:.3f} of the peak ({peak / 1e9:.0f} GFLOP/s): the probe under-measured "
                         "the machine or the FLOPs are over-counted; not reported")
    return round(fraction, 3)


def training_batches(params, cfg, count: int) -> list[dict]:
    """`count` batches the SFT stage trains on (same sampler, seed and limits), spread over the lengths of a
    whole epoch: the batches at evenly spaced quantiles of their padded width. The first few batches of a run
    are a sample too small for that (a step's cost grows faster than its length: attention), so a lever
    measured on them can lose on the long batches."""
    from lingtune.train.loader import BucketBatchSampler, collate_left_padded
    from lingtune.train.sft import load_data

    tokenizer, train_set, _ = load_data(params.backbone.out_dir, Path(params.data.out_dir), cfg.max_seq_len,
                                        cfg.tasks)
    lengths = train_set.lengths()
    epoch = sorted(BucketBatchSampler(lengths, cfg.batch_size, params.seed),
                   key=lambda indices: max(lengths[i] for i in indices))
    picked = [epoch[int((k + 0.5) * len(epoch) / count)] for k in range(min(count, len(epoch)))]
    return [collate_left_padded([train_set[i] for i in indices], tokenizer.pad_token_id) for indices in picked]


def sft_step(config: str, params):
    """(step function, count function) of one configuration; step trains, count only runs fwd + bwd."""
    import torch

    from lingtune.train.sft import answer_loss, build_optimizer, compile_for_training, load_model, resolve_precision

    cfg = resolve_precision(params.sft_full if config in ("full", "full-unfused") else params.sft)
    if config == "sft-eager":
        cfg = cfg.model_copy(update={"compile": "none"})
    if config == "sft-sdpa":
        cfg = cfg.model_copy(update={"attention": "sdpa"})
    if config == "sft-batch16":
        cfg = cfg.model_copy(update={"batch_size": 16})
    if config == "sft-whole-logits":
        cfg = cfg.model_copy(update={"loss_chunk_rows": 0})
    if config == "sft-checkpointed":
        cfg = cfg.model_copy(update={"gradient_checkpointing": True})
    if config == "plain":
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        model = get_peft_model(AutoModelForCausalLM.from_pretrained(params.backbone.out_dir, dtype=torch.float32),
                               LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, target_modules="all-linear",
                                          task_type="CAUSAL_LM"))
        autocast = False

        def loss_of(batch):
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"]).loss
    else:
        model = load_model(params.backbone.out_dir, cfg)
        head_loss = compile_for_training(model, cfg)
        autocast = cfg.precision == "bf16-mixed"

        def loss_of(batch):
            return answer_loss(model, batch, head_loss)[0]
    model.train()
    # lingtune's configurations step the optimizer the sft stage builds; `plain` and `full-unfused` keep
    # torch's default AdamW
    optimizer = (torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                   weight_decay=cfg.weight_decay)
                 if config in ("plain", "full-unfused") else build_optimizer(model, cfg))

    def forward_backward(batch) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_of(batch)
        loss.backward()

    def step(batch) -> None:
        forward_backward(batch)
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)  # as Lightning
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def count(batch) -> None:
        forward_backward(batch)
        optimizer.zero_grad(set_to_none=True)

    return step, count, cfg


def counted_flops(fn, *args) -> int:
    """FLOPs of `fn(*args)` as dispatched, compiled code run eagerly (same math, visible to the counter)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.compiler.set_stance("force_eager"), counter:
        fn(*args)
    return counter.get_total_flops()


def rss_mb() -> int:
    """Resident memory of this process now (Linux)."""
    return round(int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20)


def peak_rss_mb() -> int:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def run_sft_config(config: str, params, steps: int) -> dict:
    import peft  # noqa: F401  (the runtime, imported before it is measured)
    import torch
    import transformers  # noqa: F401

    import lingtune.train.sft  # noqa: F401

    runtime = rss_mb()
    step, count, cfg = sft_step(config, params)
    loaded = rss_mb()
    batches = training_batches(params, cfg, steps)
    started = time.perf_counter()
    # warm-up on the timed batches themselves: compile (and the recompiles a new case triggers, e.g. a batch
    # without padding or a one-row loss chunk), allocator, autocast caches. A run compiles each case once, so
    # the timed steps are its steady state; the one-off cost is `warm_up_seconds`.
    for batch in batches:
        step(batch)
    warm_up = time.perf_counter() - started
    seconds = []
    for batch in batches:
        started = time.perf_counter()
        step(batch)
        seconds.append(time.perf_counter() - started)
    peak = peak_rss_mb()  # before the counting pass below, which runs compiled code eagerly
    flops = [counted_flops(count, batch) for batch in batches]
    tokens = [int(batch["attention_mask"].sum()) for batch in batches]
    precision = "32-true" if config == "plain" else cfg.precision
    return {"config": config, "precision": precision, "batch_size": cfg.batch_size,
            "compile": "none" if config == "plain" else cfg.compile, "warm_up_seconds": round(warm_up, 1),
            "threads": torch.get_num_threads(), "step_seconds": [round(s, 3) for s in seconds],
            "tokens_per_step": round(statistics.mean(tokens), 1), "flops_per_step": statistics.mean(flops),
            "tokens_per_s": round(sum(tokens) / sum(seconds), 1), "flops_per_s": sum(flops) / sum(seconds),
            "runtime_rss_mb": runtime, "loaded_rss_mb": loaded, "peak_rss_mb": peak}


def run_rl_config(params, steps: int, name: str) -> dict:
    """`steps` timed RLOO steps after one warm-up step, then one step under the FLOP counter, for the RL
    config `name` (see the module docstring)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import TrainerCallback
    from transformers.integrations import MLflowCallback

    from lingtune.judge import make_judge
    from lingtune.train.rl import build_trainer, prompt_dataset
    from lingtune.train.scoring import load_policy, policy_precision

    before = name == "rl-before"
    every_row = name in ("rl-every-row", "rl-before")
    precision = "fp32" if name in ("rl-fp32", "rl-before") else params.rl.precision
    rl = params.rl.model_copy(update={"max_steps": steps + 2, "save_steps": 10_000,
                                      "precision": policy_precision(precision)})
    params = params.model_copy(update={"rl": rl})
    model, tokenizer = load_policy(rl.sft_dir, trainable=True, precision=rl.precision, contiguous_head=not before,
                                   inverse_cdf=not before)
    dataset = prompt_dataset(Path(params.data.out_dir) / "train.jsonl", rl.max_prompts, params.seed)

    class Clock(TrainerCallback):
        seconds: list[float] = []
        flops = 0

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == steps + 1:  # the last step: counted, not timed
                self.counter = FlopCounterMode(display=False).__enter__()
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == steps + 2:
                self.counter.__exit__(None, None, None)
                self.flops = self.counter.get_total_flops()
            elif state.global_step > 1:
                self.seconds.append(time.perf_counter() - self.started)

    clock = Clock()
    with tempfile.TemporaryDirectory() as out:
        trainer = build_trainer(params, model, tokenizer, dataset, make_judge(params.reward.judge), out)
        trainer.remove_callback(MLflowCallback)
        trainer.add_callback(clock)
        train = super(type(trainer), trainer).train if every_row else trainer.train
        train()
    timed = {h["step"]: h for h in trainer.state.log_history if 2 <= h.get("step", 0) <= steps + 1
             and "completions/max_length" in h}
    mean = statistics.mean(clock.seconds)
    return {"config": name, "algorithm": rl.algorithm, "precision": rl.precision,
            "threads": torch.get_num_threads(),
            "completions_per_step": rl.prompts_per_step * rl.num_generations,
            "step_seconds": [round(s, 2) for s in clock.seconds], "flops_per_step": clock.flops,
            "completion_max_length": [timed[s]["completions/max_length"] for s in sorted(timed)],
            "completion_mean_length": [round(timed[s]["completions/mean_length"], 1) for s in sorted(timed)],
            "flops_per_s": clock.flops / mean}


def child(args) -> dict:
    from lingtune.env import apply_offline_defaults

    apply_offline_defaults()
    import torch

    from lingtune.config import load_params

    params = load_params(args.params)
    torch.manual_seed(params.seed)
    rl = args.child.startswith("rl")
    torch.set_num_threads(params.rl.threads if rl else params.sft.threads or os.cpu_count())
    row = run_rl_config(params, args.rl_steps, args.child) if rl else run_sft_config(args.child, params, args.steps)
    return {"peak_rss_mb": peak_rss_mb(), **row}


def summary(rows: dict[str, dict], peaks: dict[str, tuple[float, float]]) -> dict:
    """`peaks`: dtype -> (best FLOP/s, spread). Each row's fraction is of the peak of the dtype it computes in."""
    for name, row in rows.items():
        row["peak_dtype"] = precision_dtype(row["precision"])
        if row["peak_dtype"] not in peaks:
            raise SystemExit(f"{name} computed in {row['peak_dtype']}, whose peak was not probed: not reported")
    main = rows["sft"]["peak_dtype"] if "sft" in rows else next(iter(peaks))
    result = {"peak_gflops": round(peaks[main][0] / 1e9, 1), "peak_spread": round(peaks[main][1], 3),
              "peak_dtype": main, "peak_gflops_by_dtype": {d: round(p / 1e9, 1) for d, (p, _) in peaks.items()},
              "flop_counting": "torch.utils.flop_counter.FlopCounterMode, forward + backward as dispatched",
              "configs": rows}
    for name, row in rows.items():
        row["gflops_per_s"] = round(row["flops_per_s"] / 1e9, 1)
        row["roofline_fraction"] = roofline(row["flops_per_s"], peaks[row["peak_dtype"]][0],
                                            f"{name} roofline_fraction")
    if "sft" in rows:
        result["sft_tokens_per_s"] = rows["sft"]["tokens_per_s"]
        result["sft_roofline_fraction"] = rows["sft"]["roofline_fraction"]
    if "sft" in rows and "sft-eager" in rows:
        result["sft_speedup_vs_eager"] = round(rows["sft"]["tokens_per_s"] / rows["sft-eager"]["tokens_per_s"], 2)
    if "sft" in rows and "plain" in rows:
        result["sft_speedup_vs_plain"] = round(rows["sft"]["tokens_per_s"] / rows["plain"]["tokens_per_s"], 2)
    if "rl" in rows:
        result["rl_seconds_per_step"] = round(statistics.mean(rows["rl"]["step_seconds"]), 2)
        result["rl_roofline_fraction"] = rows["rl"]["roofline_fraction"]
    if "rl" in rows and "rl-every-row" in rows:
        result["rl_speedup_vs_every_row"] = round(statistics.mean(rows["rl-every-row"]["step_seconds"])
                                                  / statistics.mean(rows["rl"]["step_seconds"]), 2)
    if "rl" in rows and "rl-fp32" in rows:
        result["rl_bf16_speedup"] = round(statistics.mean(rows["rl-fp32"]["step_seconds"])
                                          / statistics.mean(rows["rl"]["step_seconds"]), 2)
    if "rl" in rows and "rl-before" in rows:
        result["rl_speedup_vs_before"] = round(statistics.mean(rows["rl-before"]["step_seconds"])
                                               / statistics.mean(rows["rl"]["step_seconds"]), 2)
    if "sft" in rows and "full" in rows:
        result["lora_vs_full_peak_ratio"] = round(rows["sft"]["peak_rss_mb"] / rows["full"]["peak_rss_mb"], 3)
        # the same without the imported runtime (Python, torch, transformers, peft, Lightning), which both
        # processes pay whatever the model: what training itself adds (weights, gradients, optimizer, activations)
        result["lora_vs_full_training_memory_ratio"] = round(
            (rows["sft"]["peak_rss_mb"] - rows["sft"]["runtime_rss_mb"])
            / (rows["full"]["peak_rss_mb"] - rows["full"]["runtime_rss_mb"]), 3)
    if "sft" in rows and "sft-whole-logits" in rows:
        result["chunked_head_loss_saves_mb"] = rows["sft-whole-logits"]["peak_rss_mb"] - rows["sft"]["peak_rss_mb"]
        result["chunked_head_loss_speedup"] = round(
            rows["sft"]["tokens_per_s"] / rows["sft-whole-logits"]["tokens_per_s"], 2)
    if "sft" in rows and "sft-sdpa" in rows:
        result["sdpa_attention_speedup"] = round(rows["sft-sdpa"]["tokens_per_s"] / rows["sft"]["tokens_per_s"], 2)
    if "sft" in rows and "sft-batch16" in rows:
        result["batch16_speedup"] = round(rows["sft-batch16"]["tokens_per_s"] / rows["sft"]["tokens_per_s"], 2)
    if "sft-checkpointed" in rows and "full" in rows:
        result["lora_checkpointed_vs_full_peak_ratio"] = round(
            rows["sft-checkpointed"]["peak_rss_mb"] / rows["full"]["peak_rss_mb"], 3)
    if "sft-checkpointed" in rows and "sft" in rows:
        result["checkpointing_speedup"] = round(
            rows["sft-checkpointed"]["tokens_per_s"] / rows["sft"]["tokens_per_s"], 2)
    if "full" in rows and "full-unfused" in rows:
        result["fused_adamw_speedup_full"] = round(
            rows["full"]["tokens_per_s"] / rows["full-unfused"]["tokens_per_s"], 2)
    return result


def table(r: dict) -> str:
    lines = [f"{r['peak_dtype']} matmul peak {r['peak_gflops']} GFLOP/s (spread {r['peak_spread']}; by dtype "
             f"{r['peak_gflops_by_dtype']}); FLOPs: {r['flop_counting']}",
             "| config | precision | s/step | tokens/s | GFLOP/s | of peak | runtime / loaded / peak RSS MB |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name, row in r["configs"].items():
        lines.append(f"| {name} | {row['precision']} | {statistics.mean(row['step_seconds']):.2f} | "
                     f"{row.get('tokens_per_s', '–')} | {row['gflops_per_s']} | {row['roofline_fraction']} | "
                     f"{row.get('runtime_rss_mb', '–')} / {row.get('loaded_rss_mb', '–')} / {row['peak_rss_mb']} |")
    lines.append(json.dumps({k: v for k, v in r.items() if k not in ("configs", "flop_counting")}))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--steps", type=int, default=6, help="timed SFT steps per configuration")
    parser.add_argument("--rl-steps", type=int, default=2, help="timed RL steps")
    parser.add_argument("--trials", type=int, default=5, help="timed runs per shape of the peak probe")
    add_config_arguments(parser, CONFIGS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    from lingtune.config import load_params

    params = load_params(args.params)
    threads = params.sft.threads or os.cpu_count()
    configs = args.configs.split(",")
    dtypes = sorted({config_dtype(config, params) for config in configs})
    before = {dtype: matmul_peak(dtype, threads, args.trials) for dtype in dtypes}
    rows = run_configs(__file__, configs, ["--params", args.params, "--steps", str(args.steps),
                                           "--rl-steps", str(args.rl_steps)])
    after = {dtype: matmul_peak(dtype, threads, args.trials) for dtype in dtypes}
    result = summary(rows, {dtype: max(before[dtype], after[dtype]) for dtype in dtypes})
    result["peak_gflops_before_after"] = [round(before[result["peak_dtype"]][0] / 1e9, 1),
                                          round(after[result["peak_dtype"]][0] / 1e9, 1)]
    print(json.dumps(result, indent=2) if args.json else table(result))


if __name__ == "__main__":
    main()
