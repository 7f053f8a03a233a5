"""Check that the issue-12 refactor (shared `lingtune.tasks`, `models`, `artifacts`, `decoding`) computes
what the code before it computed, on the real tokenizer and data:

* the SFT encoding (prompt + answer token ids and labels) of every record of every split;
* the prompt ids the engine gets for a task request;
* the task metrics of synthetic answers (valid, invalid, aliased labels, duplicated and mistyped entities);
* the GPTQ calibration examples (these change on purpose: the old ones kept the newline after the turn).

Usage (the old code from git, e.g. 9be0f80, in a throw-away worktree):
    git worktree add --detach /tmp/lingtune-old 9be0f80
    python scripts/refactor_equivalence.py --old-src /tmp/lingtune-old/src [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = r'''
import json, random, sys
from transformers import AutoTokenizer
mode, backbone, data, out = sys.argv[1:5]
tok = AutoTokenizer.from_pretrained(backbone)
if mode == "old":
    from lingtune.data.formats import read_jsonl
    from lingtune.train.loader import encode_example
    from lingtune.evaluate.engine import TaskDecoder
else:
    from lingtune.formats import read_jsonl
    from lingtune.tasks.base import encode_example
    from lingtune.decoding import TaskDecoder
from lingtune.evaluate.run import score
from lingtune.quantize import write_calibration
records = [r for split in ("train", "val", "test") for r in read_jsonl(f"{data}/{split}.jsonl")]
encodings = [(e.input_ids, e.labels) for e in (encode_example(tok, r) for r in records)]
decoder = TaskDecoder(tok, 256)
prompts = [decoder.prompt(r.task, r.text)["prompt_token_ids"] for r in records]
rng, sample = random.Random(0), records[-1000:]
answers = []
for r in sample:
    if r.task == "sentiment":
        answers.append(rng.choice(['{"label": "positive"}', '{"label": "negative"}', "oops", '{"label": "正面"}']))
        continue
    entities = list(r.entities) + ([r.entities[0]] if r.entities and rng.random() < 0.5 else [])
    rng.shuffle(entities)
    answers.append(json.dumps({"entities": [{"text": e.text, "type": rng.choice([e.type, "PER"])} for e in entities]},
                              ensure_ascii=False))
metrics = {t: score(t, [r for r in sample if r.task == t], [a for r, a in zip(sample, answers) if r.task == t])
           for t in ("sentiment", "ner")}
write_calibration(backbone, f"{data}/train.jsonl", 256, 42, out + ".calibration.jsonl")
calibration = [json.loads(line)["input_ids"] for line in open(out + ".calibration.jsonl")]
json.dump({"encodings": encodings, "prompts": prompts, "metrics": metrics, "calibration": calibration}, open(out, "w"))
'''


def probe(mode: str, src: Path, backbone: str, data: str, work: Path) -> dict:
    out = work / f"{mode}.json"
    env = {**os.environ, "PYTHONPATH": str(src)}
    subprocess.run([sys.executable, "-c", PROBE, mode, backbone, data, str(out)], env=env, check=True, cwd=work)
    return json.loads(out.read_text())


def compare(old: dict, new: dict) -> dict:
    pairs = list(zip(old["calibration"], new["calibration"]))
    return {
        "records": len(old["encodings"]),
        "encodings_identical": old["encodings"] == new["encodings"],
        "prompts_identical": old["prompts"] == new["prompts"],
        "metrics_identical": old["metrics"] == new["metrics"],
        "calibration_examples": len(pairs),
        "calibration_identical": sum(o == n for o, n in pairs),
        "calibration_new_is_prefix_of_old": all(o[: len(n)] == n for o, n in pairs),
        "calibration_tokens_old": sum(len(o) for o, _ in pairs),
        "calibration_tokens_new": sum(len(n) for _, n in pairs),
        "calibration_dropped_token_ids": sorted({t for o, n in pairs for t in o[len(n):]}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old-src", required=True, type=Path, help="src/ of the code before the refactor")
    parser.add_argument("--backbone", default=str(ROOT / "models" / "backbone"))
    parser.add_argument("--data", default=str(ROOT / "data" / "processed"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report = compare(probe("old", args.old_src, args.backbone, args.data, Path(tmp)),
                         probe("new", ROOT / "src", args.backbone, args.data, Path(tmp)))
    print(json.dumps(report, indent=2) if args.json else "\n".join(f"{k}: {v}" for k, v in report.items()))


if __name__ == "__main__":
    main()
