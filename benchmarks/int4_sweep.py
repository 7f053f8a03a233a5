"""Choose an INT4 recipe on the VALIDATION split: quantize with `quantize:` overrides, score each.

For every recipe (a name and a JSON object of `quantize:` overrides): `lingtune.quantize.quantize`
into `--out/<name>`, then the evaluation's decoding and scoring on `--data` (sentiment macro-F1, NER
F1; `benchmarks/int4.py --measure`, one vLLM engine per process). `--bf16` also scores the merged
bf16 model the recipes start from. The test split stays for the one recipe you ship.

Usage: python benchmarks/int4_sweep.py [--bf16] [--data data/processed/val.jsonl] [--out /tmp/int4-sweep]
           NAME='{"calibration_samples": 256, "actorder": "weight", "observer": "mse"}' ...
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lingtune.config import load_params  # noqa: E402


def score(model_dir: Path, data: str) -> dict:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "int4.py"), "--measure", str(model_dir),
                           "--test", data, "--tokens", "0", "--max-examples", "0"], capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"error: scoring {model_dir} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def parse_recipe(spec: str) -> tuple[str, dict]:
    name, sep, overrides = spec.partition("=")
    try:
        value = json.loads(overrides) if sep else None
    except json.JSONDecodeError as exc:
        raise SystemExit(f"error: recipe {spec!r}: overrides are not JSON ({exc})") from None
    if not name or not isinstance(value, dict):
        raise SystemExit(f"error: recipe {spec!r}: expected NAME='{{\"key\": value}}'")
    return name, value


def recipe_config(params, name: str, overrides: dict, out: Path):
    from pydantic import ValidationError

    try:
        return params.quantize.model_validate({**params.quantize.model_dump(), **overrides, "out_dir": str(out / name)})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise SystemExit(f"error: recipe {name!r}: {problems}") from None


def main() -> None:
    from lingtune.quantize import merge, pick_source, quantize

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="*", help="NAME='{json of quantize: overrides}'")
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--data", default=str(ROOT / "data" / "processed" / "val.jsonl"))
    parser.add_argument("--out", default="/tmp/int4-sweep")
    parser.add_argument("--bf16", action="store_true", help="also score the merged bf16 model")
    args = parser.parse_args()
    params = load_params(args.params)
    out = Path(args.out)
    recipes = [(name, overrides, recipe_config(params, name, overrides, out))  # all checked before any work
               for name, overrides in map(parse_recipe, args.recipes)]
    rows = []
    if args.bf16:
        bf16 = merge(pick_source(params.quantize.sources), params.backbone.out_dir, out / "bf16")
        rows.append({"recipe": "bf16", **score(bf16, args.data)})
    for name, overrides, cfg in recipes:
        started = time.time()
        quantize(cfg, Path(params.data.out_dir) / "train.jsonl", params.seed,
                 log=lambda message: print(message, file=sys.stderr, flush=True))
        rows.append({"recipe": name, "overrides": overrides, "quantize_seconds": round(time.time() - started),
                     **score(out / name, args.data)})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)  # progress
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
