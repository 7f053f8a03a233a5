"""Peak memory and throughput of one training step: full FT, LoRA, QLoRA, and a plain baseline.

Each configuration runs in its own process (peak RSS is per process), on the same backbone,
the same real training examples, batch size and sequence length:

* full   lingtune's recipe, every parameter trained (fp32 master weights, bf16 autocast)
* lora   lingtune's recipe: LoRA r=8, bf16 frozen base, answer-only logits, bf16 autocast
* lora-dropout  as lora with LoRA dropout 0.05 (the default is 0.0: the masks cost time on CPU)
* qlora  as lora with the base in bitsandbytes nf4
* plain  a plain transformers + peft loop: fp32, LoRA r=8, no autocast, logits for every position

Usage: python benchmarks/train_memory.py [--backbone models/backbone] [--steps 4] [--json]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

from children import add_config_arguments, run_configs  # benchmarks/, this script's folder

CONFIGS = ("full", "lora", "lora-dropout", "qlora", "plain")


def batches(backbone: str, batch_size: int, seq_len: int, count: int, data: str):
    from transformers import AutoTokenizer

    from lingtune.formats import read_jsonl
    from lingtune.train.loader import SFTDataset, collate_left_padded

    tokenizer = AutoTokenizer.from_pretrained(backbone)
    records = read_jsonl(data)
    dataset = SFTDataset(tokenizer, records, seq_len)
    # the longest examples that fit: every configuration sees full seq_len-token batches
    items = sorted(dataset.items, key=lambda e: -len(e.input_ids))[: batch_size * count]
    return tokenizer, [collate_left_padded(items[i : i + batch_size], tokenizer.pad_token_id)
                       for i in range(0, len(items), batch_size)]


def step_fn(config: str, backbone: str):
    import torch

    from lingtune.config import LoraConfig, SFTConfig
    from lingtune.train.sft import answer_loss, build_optimizer, load_model

    if config == "plain":
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        model = get_peft_model(AutoModelForCausalLM.from_pretrained(backbone, dtype=torch.float32),
                               LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))

        def loss_of(batch):
            labels = batch["labels"].clone()
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss

        autocast = False
    else:
        cfg = SFTConfig(method="full" if config == "full" else "lora", snapshot_every_n_steps=0,
                        quantization="nf4" if config == "qlora" else "none", compile="none",
                        lora=LoraConfig(dropout=0.05 if config == "lora-dropout" else 0.0))
        model = load_model(backbone, cfg)

        def loss_of(batch):
            return answer_loss(model, batch)[0]

        autocast = True
    model.train()
    optimizer = (torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
                 if config == "plain" else build_optimizer(model, cfg))

    def step(batch) -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_of(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    return step


def child(args) -> dict:
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    _, data = batches(args.backbone, args.batch_size, args.seq_len, args.steps + 1, args.data)
    step = step_fn(args.child, args.backbone)
    step(data[0])  # warm-up: allocator, autocast caches
    started = time.perf_counter()
    for batch in data[1:]:
        step(batch)
    seconds = (time.perf_counter() - started) / (len(data) - 1)
    tokens = sum(int(b["attention_mask"].sum()) for b in data[1:]) / (len(data) - 1)
    return {"config": args.child, "step_seconds": round(seconds, 3), "tokens_per_second": round(tokens / seconds, 1),
            "tokens_per_step": tokens, "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="models/backbone")
    parser.add_argument("--data", default="data/processed/train.jsonl")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    add_config_arguments(parser, CONFIGS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    rows = run_configs(__file__, args.configs.split(","), [a for a in sys.argv[1:] if a != "--json"])
    result = {"backbone": args.backbone, "batch_size": args.batch_size, "seq_len": args.seq_len,
              "threads": args.threads, "configs": rows}
    if "full" in rows:
        for name in ("lora", "qlora"):
            if name in rows:
                result[f"{name}_vs_full_peak_ratio"] = round(rows[name]["peak_rss_mb"] / rows["full"]["peak_rss_mb"], 3)
    if "plain" in rows and "lora" in rows:
        result["throughput_vs_plain_ratio"] = round(
            rows["lora"]["tokens_per_second"] / rows["plain"]["tokens_per_second"], 2)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"backbone {args.backbone}, batch {args.batch_size} x <= {args.seq_len} tokens, {args.threads} thread(s)")
    print("| config | step s | tokens/s | peak RSS MB |\n|---|---:|---:|---:|")
    for name, row in rows.items():
        print(f"| {name} | {row['step_seconds']} | {row['tokens_per_second']} | {row['peak_rss_mb']} |")
    print({k: v for k, v in result.items() if k.endswith("ratio")})


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    main()
