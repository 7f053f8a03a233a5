"""The learning curve of an SFT run: validation scores against examples seen and training minutes.

Scores every adapter snapshot the SFT stage kept (`sft.snapshot_every_n_steps`, listed in
`<snapshots>/curve.json`, lingtune.train.snapshots) on the VALIDATION split (never test): sentiment
macro-F1 and NER precision / recall / F1 (strict spans), with the evaluate stage's own code (each
snapshot merged into the backbone as `evaluate.merge_adapters` says, decoding as `evaluate.constrained`
says), so the last point is what the evaluate stage reports as `val/` for `sft` on the same examples. It shows where the recipe saturates and what each minute of training buys: `saturation` is the
change of both scores over the last two points, per training minute, and the step of each score's best.

The stage writes a snapshot at its last step too, so the last point is the final adapter; `final_is_last_snapshot`
says whether the recipe's `out_dir` (`models/sft`) still holds exactly that adapter.

Usage (from the project root, after `dvc repro sft`):

  python benchmarks/quality_curve.py --json > reports/benchmarks/quality_curve.json
  make tables
  python benchmarks/quality_curve.py --max-examples 0           # the whole validation split (slow)

A candidate recipe is a separate SFT run with folders of its own, so it never touches the pipeline's:

  cp params.yaml params.candidate.yaml
  # edit the recipe under `sft:` (lr, lora.r, batch_size, ...) and give the run its own folders:
  #   out_dir: models/candidate, checkpoint_dir: models/candidate_checkpoints,
  #   snapshot_dir: models/candidate_snapshots, metrics: reports/candidate.json,
  #   loss_curve: reports/candidate_loss.csv   (a higher lora.r needs evaluate.max_lora_rank as high)
  lingtune sft --params params.candidate.yaml
  python benchmarks/quality_curve.py --snapshots models/candidate_snapshots --params params.candidate.yaml \\
      --json > reports/benchmarks/quality_curve_candidate.json

A per-task run (`sft.tasks: [ner]`, a per-task adapter) is scored on its own tasks only; the other task's
scores are null in the JSON and empty in the table.

Both curves use the same validation examples (the first `--max-examples` of each task), so the points of
two runs compare directly; each report carries the recipe it measured.

Options: `--snapshots` (models/sft_snapshots), `--params` (params.yaml: the data folder and `evaluate`'s
engine and decoding), `--max-examples` (300 per task; 0 = all), `--steps` (only these snapshots, e.g.
`400,800`: each costs an engine start and a pass over the examples), `--json`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

CURVE = "curve.json"
SCORES = {"sentiment_macro_f1": ("sentiment", "macro_f1"), "sentiment_invalid": ("sentiment", "invalid_rate"),
          "ner_precision": ("ner", "precision"), "ner_recall": ("ner", "recall"), "ner_f1": ("ner", "f1"),
          "ner_invalid": ("ner", "invalid_rate")}
"""Point key -> (task, metric of lingtune.tasks)."""


def read_curve(folder: Path) -> dict:
    path = folder / CURVE
    if not path.is_file():
        raise SystemExit(f"error: {path} does not exist: train with sft.snapshot_every_n_steps > 0 (`lingtune sft`)")
    curve = json.loads(path.read_text(encoding="utf-8"))
    if not curve.get("snapshots"):
        raise SystemExit(f"error: {path} lists no snapshots yet")
    return curve


def base_points(curve: dict) -> list[dict]:
    """One point per snapshot, in step order, with what training had cost by then."""
    size = curve.get("train_examples") or 0
    return [{"step": s["step"], "examples_seen": s["examples_seen"],
             "epochs": round(s["examples_seen"] / size, 3) if size else None,
             "train_seconds": s["train_seconds"], "train_loss": s.get("train_loss"), "val_loss": s.get("val_loss"),
             "snapshot": s["path"]} for s in sorted(curve["snapshots"], key=lambda s: s["step"])]


def chosen_points(points: list[dict], steps: list[int] | None) -> list[dict]:
    """The points of `steps` (all of them for None); a step without a snapshot is an error naming those there are."""
    if steps is None:
        return points
    have = {p["step"] for p in points}
    if missing := sorted(set(steps) - have):
        raise SystemExit(f"error: no snapshot at step {', '.join(map(str, missing))}; "
                         f"the run has {', '.join(map(str, sorted(have)))}")
    return [p for p in points if p["step"] in set(steps)]


def scored(point: dict, metrics: dict) -> dict:
    """A point with its validation scores (`metrics`: per task, as lingtune.tasks computes them); None for
    a task the run did not train (a per-task adapter, `sft.tasks`)."""
    return {**point, **{key: metrics[task][metric] if task in metrics else None
                        for key, (task, metric) in SCORES.items()}}


def trained_tasks(curve: dict) -> list[str]:
    """The tasks the run trained on (`sft.tasks` of its recipe; every task for runs that predate the key)."""
    from lingtune.tasks import names

    return list(curve["recipe"].get("tasks") or names())


def saturation(points: list[dict]) -> dict | None:
    """What the last stretch of training bought: each score's change over the last two points, per training
    minute and per thousand examples, and the step where each score peaked. None with fewer than two points."""
    if len(points) < 2:
        return None
    before, last = points[-2], points[-1]
    minutes = (last["train_seconds"] - before["train_seconds"]) / 60
    thousands = (last["examples_seen"] - before["examples_seen"]) / 1000
    summary = {"from_step": before["step"], "to_step": last["step"], "train_minutes": round(minutes, 2)}
    for key in ("sentiment_macro_f1", "ner_f1"):
        if last[key] is None:
            continue
        gain = last[key] - before[key]
        summary[f"{key}_gain"] = round(gain, 4)
        summary[f"{key}_gain_per_minute"] = round(gain / minutes, 5) if minutes > 0 else None
        summary[f"{key}_gain_per_1k_examples"] = round(gain / thousands, 5) if thousands > 0 else None
        summary[f"{key}_best_step"] = max(points, key=lambda p: p[key])["step"]
    return summary


def final_is_last_snapshot(curve: dict, folder: Path) -> bool | None:
    """Whether the recipe's output folder holds the last snapshot's adapter (None: there is no such folder)."""
    from lingtune.artifacts import content_hash

    out = Path(curve["recipe"]["out_dir"])
    if not out.is_dir():
        return None
    last = max(curve["snapshots"], key=lambda s: s["step"])["path"]
    return content_hash(out) == content_hash(folder / last)


def score_points(params, folder: Path, points: list[dict], records: dict) -> list[dict]:
    """Every snapshot on the validation `records` (per task), run as the evaluate stage runs a variant
    (`evaluate.merge_adapters`: merged into the base, one engine at a time; else adapters per request)."""
    from lingtune.evaluate.run import Engines, answer_split, engine_config, scoring_ref
    from lingtune.models import folder_ref

    refs = [folder_ref(folder / p["snapshot"]) for p in points]
    if missing := [p["snapshot"] for p, ref in zip(points, refs) if ref is None or ref.adapter is None]:
        raise SystemExit(f"error: {folder}: no LoRA adapter in {', '.join(missing)}")
    runs = [scoring_ref(ref, params.evaluate) for ref in refs]
    engines = Engines(engine_config(params), runs)
    out = []
    for i, (point, ref) in enumerate(zip(points, runs)):
        metrics, _ = answer_split(engines, f"step {point['step']}", ref, records, params.evaluate.constrained)
        out.append(scored(point, metrics))
        engines.release(runs[i + 1 :])
    return out


def check_rank(curve: dict, params) -> None:
    rank, limit = curve["recipe"]["lora"]["r"], params.evaluate.max_lora_rank
    if rank > limit:
        raise SystemExit(f"error: the snapshots have LoRA rank {rank}, above evaluate.max_lora_rank ({limit}) "
                         "of the --params file: raise it there")


def measure(folder: Path, params_file: Path, max_examples: int, steps: list[int] | None = None) -> dict:
    from lingtune.config import load_params
    from lingtune.evaluate.run import split_records

    params = load_params(params_file)
    curve = read_curve(folder)
    check_rank(curve, params)
    every_task = split_records(Path(params.data.out_dir) / "val.jsonl", max_examples)
    records = {task: recs for task, recs in every_task.items() if task in trained_tasks(curve)}
    points = score_points(params, folder, chosen_points(base_points(curve), steps), records)
    return {"split": "validation", "max_examples": max_examples, "snapshots": str(folder),
            "constrained": params.evaluate.constrained, "examples": {task: len(r) for task, r in records.items()},
            "tasks": list(records), "fingerprint": curve.get("fingerprint"), "recipe": curve["recipe"],
            "train_examples": curve.get("train_examples"),
            "final_is_last_snapshot": final_is_last_snapshot(curve, folder), "points": points,
            "saturation": saturation(points)}


def percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def table(report: dict) -> str:
    header = ["step", "examples", "epochs", "train min", "sentiment macro-F1", "NER P", "NER R", "NER F1", "invalid S/N"]
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for p in report["points"]:
        lines.append(" | ".join([str(p["step"]), f"{p['examples_seen']:,}", f"{p['epochs'] or 0:.2f}",
                                 f"{p['train_seconds'] / 60:.1f}", *(percent(p[k]) for k in
                                 ("sentiment_macro_f1", "ner_precision", "ner_recall", "ner_f1")),
                                 f"{percent(p['sentiment_invalid'])} / {percent(p['ner_invalid'])}"]))
    if s := report["saturation"]:
        gains = [f"{label} {100 * s[key + '_gain']:+.1f} pt" for label, key in
                 (("sentiment macro-F1", "sentiment_macro_f1"), ("NER F1", "ner_f1")) if key + "_gain" in s]
        lines.append(f"\nlast {s['train_minutes']:.1f} training min (step {s['from_step']} -> {s['to_step']}): "
                     + ", ".join(gains))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--snapshots", type=Path, default=Path("models/sft_snapshots"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--max-examples", type=int, default=300, help="per task, from the validation split; 0 = all")
    parser.add_argument("--steps", type=lambda v: [int(x) for x in v.split(",")],
                        help="score only these snapshots, e.g. 400,800 (default: every one)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.max_examples < 0:
        parser.error("--max-examples must be >= 0")
    # vLLM logs to stdout, resolved when it is imported (inside `measure`): there they go to stderr, so that
    # `--json > FILE` holds the report only
    with contextlib.redirect_stdout(sys.stderr):
        report = measure(args.snapshots, args.params, args.max_examples, args.steps)
    print(json.dumps(report, indent=2) if args.json else table(report))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
