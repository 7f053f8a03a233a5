"""RL recipes against the pipeline's SFT adapter, on the validation split (issue 14.3: RL must raise BOTH
sentiment macro-F1 and NER F1 over SFT, beyond the noise of the split where it can).

Each candidate is a params file `benchmarks/candidates/NAME.yaml`: the RL recipe to measure (reward weights,
seed, steps, ...) with RL folders of its own (`rl.out_dir`, `rl.checkpoint_dir`, `rl.metrics`) and
`rl.sft_dir` the pipeline's SFT adapter. Per candidate, one after the other (never two heavy jobs at once):

1. `lingtune rl -p FILE` (RL from that SFT adapter);
2. `lingtune eval --predictions` of the result on each task's validation examples, concatenated into
   `ANSWERS/NAME.jsonl` (`--answers`, default `.cache/compare`);
3. the comparison `lingtune compare reports/eval/validation/sft.jsonl ANSWERS/NAME.jsonl` makes (paired
   bootstrap, `register.confidence` and `register.bootstrap_samples`, the gate's rule for "beyond noise").

With `--reuse`, a candidate whose answers file exists skips steps 1 and 2 (e.g. the pipeline's own RL
answers, copied from `reports/eval/validation/rl.jsonl`, for the recipe the pipeline ran).

  python benchmarks/rl_reward.py rl_ner rl_ner_seed1 rl_ner_05 rl_ner_off rl_ner_off_seed1 --reuse --json \\
      > reports/benchmarks/rl_reward.json
  make tables

JSON: a list, one row per candidate: `candidate`, `seed`, `ner_weight` (start and end), `ner_metric`,
`steps`, `answers`, `ner_answers_changed` (NER answers that differ from SFT's), `ner_entities_not_in_text`
(`{sft, rl}`: answer entities with no place in the sentence, e.g. a name listed twice), `confidence`, and per metric
(`sentiment_macro_f1`, `ner_precision`, `ner_recall`, `ner_f1`, `gate_score`) `{sft, rl, lead, low, high,
beyond_noise}`. Each RL run takes about the `rl` stage's minutes (7-8 on a quiet AMX machine).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from lingtune import tasks
from lingtune.records import Record

BASELINE = Path("reports/eval/validation/sft.jsonl")
CANDIDATES = Path("benchmarks/candidates")
METRICS = {"sentiment_macro_f1": "sentiment.macro_f1", "ner_precision": "ner.precision",
           "ner_recall": "ner.recall", "ner_f1": "ner.f1", "gate_score": "gate score"}
"""Row key -> the name `lingtune compare` gives the metric."""


def run(*args: str) -> None:
    """A lingtune command; its output goes to stderr so that `--json > FILE` holds the report only."""
    subprocess.run(["lingtune", *args], check=True, stdout=sys.stderr)


def validation_files(params, answers: Path) -> dict[str, Path]:
    """The validation split, one file per task (`lingtune eval --task` reads one task's examples)."""
    rows = Path(params.data.out_dir, "val.jsonl").read_text(encoding="utf-8").splitlines()
    files = {}
    for task in ("sentiment", "ner"):
        path = answers / f"val_{task}.jsonl"
        path.write_text("".join(r + "\n" for r in rows if json.loads(r)["task"] == task), encoding="utf-8")
        files[task] = path
    return files


def answer_validation(name: str, params_file: Path, params, answers: Path) -> Path:
    """Steps 1 and 2: RL, then the candidate's answers to every validation example."""
    run("rl", "-p", str(params_file))
    parts = []
    for task, data in validation_files(params, answers).items():
        part = answers / f"{name}_{task}.jsonl"
        run("eval", "--model", params.rl.out_dir, "--data", str(data), "--task", task, "--predictions", str(part),
            "-p", str(params_file))
        parts.append(part.read_text(encoding="utf-8"))
    out = answers / f"{name}.jsonl"
    out.write_text("".join(parts), encoding="utf-8")
    return out


def changed_ner_answers(baseline: list[dict], candidate: list[dict]) -> int:
    sft = {r["id"]: r["answer"] for r in baseline if r["task"] == "ner"}
    return sum(1 for r in candidate if r["task"] == "ner" and r["answer"] != sft.get(r["id"]))


def entities_not_in_text(rows: list[dict], gold: dict[str, Record]) -> int:
    """Answer entities that have no place in the sentence: a name listed more often than the text has it, or
    one the text does not contain (each a false positive that a recall-only reward would not see)."""
    ner = tasks.get("ner")
    return sum(1 for r in rows if r["task"] == "ner"
               for e in ner.explain(gold[r["id"]], r["answer"])["predicted"] if e["start"] is None)


def validation_records(params) -> dict[str, Record]:
    rows = Path(params.data.out_dir, "val.jsonl").read_text(encoding="utf-8").splitlines()
    return {r.id: r for r in map(Record.model_validate_json, rows)}


def row(name: str, params, answers_file: Path, shipped) -> dict:
    from lingtune.gate import compare_answers
    from lingtune.predictions import read_rows

    baseline, candidate = read_rows(BASELINE), read_rows(answers_file)
    gold = validation_records(shipped)
    leads = compare_answers(baseline, candidate, None, shipped.register_, shipped.seed)
    reward = params.reward
    out = {"candidate": name, "seed": params.seed,
           "ner_weight": [reward.weights_start.ner, reward.weights_end.ner], "ner_metric": reward.ner_metric,
           "steps": params.rl.max_steps, "answers": str(answers_file),
           "ner_answers_changed": changed_ner_answers(baseline, candidate),
           "ner_entities_not_in_text": {"sft": entities_not_in_text(baseline, gold),
                                        "rl": entities_not_in_text(candidate, gold)},
           "confidence": shipped.register_.confidence}
    for key, metric in METRICS.items():
        lead = leads[metric]
        out[key] = {"sft": lead.champion, "rl": lead.candidate, "lead": lead.difference, "low": lead.low,
                    "high": lead.high, "beyond_noise": lead.beyond_noise(shipped.register_.margin)}
    return out


def main() -> None:
    from lingtune.config import load_params

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("candidates", nargs="+", help="names of benchmarks/candidates/NAME.yaml")
    parser.add_argument("--answers", type=Path, default=Path(".cache/compare"), help="folder of answer files")
    parser.add_argument("--reuse", action="store_true", help="skip RL and eval where ANSWERS/NAME.jsonl exists")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not BASELINE.is_file():
        raise SystemExit(f"error: {BASELINE} does not exist: run the evaluate stage first (`dvc repro evaluate`)")
    shipped = load_params(Path("params.yaml"))  # the gate's confidence and resamples, as `lingtune compare`
    files = {name: CANDIDATES / f"{name}.yaml" for name in args.candidates}
    if missing := [str(f) for f in files.values() if not f.is_file()]:
        raise SystemExit(f"error: no such candidate: {', '.join(missing)}")
    args.answers.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, params_file in files.items():
        params = load_params(params_file)
        answers_file = args.answers / f"{name}.jsonl"
        if not (args.reuse and answers_file.is_file()):
            answers_file = answer_validation(name, params_file, params, args.answers)
        rows.append(row(name, params, answers_file, shipped))
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    for r in rows:
        print(f"{r['candidate']}: seed {r['seed']}, NER weight {r['ner_weight']}: " + ", ".join(
            f"{k} {100 * r[k]['lead']:+.1f} pt [{100 * r[k]['low']:+.1f}, {100 * r[k]['high']:+.1f}]"
            for k in METRICS))


if __name__ == "__main__":
    main()
