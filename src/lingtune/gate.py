"""The promotion gate of `lingtune register` and `lingtune promote`: does the candidate beat the
champion on the VALIDATION split by more than that split's noise?

* Validation only. The gate score is the mean of `register.gate_metrics` on the validation split (the
  `val/` keys of reports/eval/metrics.json; for the decision, recomputed from the answers themselves).
  Test-split numbers are never read here: they report the final result, and choosing on them would tune
  the model to the test split.
* Paired bootstrap. The evaluate stage keeps every scored model's answer to every validation example
  (`register.validation_dir`, lingtune.predictions); a registered version's answers are found by its
  content hash. The candidate's and the champion's answers to the same examples are resampled together
  (`bootstrap_samples` times, each task's examples on their own), and the candidate's lead in gate
  score over each resample gives a `confidence` interval. `@champion` moves only when the interval's
  lower bound is above `register.margin`: a lead of a few examples out of a few hundred moves nothing.
* Fail closed. A candidate without validation answers is not promoted. Nor is one whose champion has
  none (promoted by hand since the last `lingtune evaluate`, or a model that cannot run here): comparing
  with nothing would wave the candidate through, and refusing for good would block every candidate, so
  the decision says how to proceed: `lingtune evaluate` scores the registry's champion beside the
  variants, `lingtune promote --force` promotes deliberately. Only when there is no champion at all
  does a scored candidate become champion unopposed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lingtune import tasks
from lingtune.bootstrap import percentile_interval, resample_counts
from lingtune.config import RegisterConfig
from lingtune.errors import ConfigError, DataError
from lingtune.predictions import validation_rows
from lingtune.registry import CONTENT_TAG, FORMAT, FORMAT_TAG, alias_version, get_version, set_alias

VAL = "val/"
"""Prefix of the validation-split metrics in reports/eval/metrics.json."""


@dataclass
class GateDecision:
    promoted: bool
    reason: str
    candidate: str
    champion_before: str | None


@dataclass(frozen=True)
class Lead:
    """Gate scores of both models on the same validation examples, and the interval of the difference."""

    candidate: float
    champion: float
    low: float
    high: float
    examples: int

    @property
    def difference(self) -> float:
        return self.candidate - self.champion

    def beyond_noise(self, margin: float) -> bool:
        """The whole interval lies above `margin`: the lead is not the examples' noise."""
        return self.low > margin


class NotComparable(Exception):
    """The two models' validation answers are not to the same examples."""


def gate_score(metrics: dict, keys: list[str]) -> float | None:
    """Mean of the gate metrics on the validation split; None when any is missing (not evaluated there)."""
    values = [metrics.get(VAL + key) for key in keys]
    return None if any(v is None for v in values) else sum(values) / len(values)


def pick_candidate(cfg: RegisterConfig, scores: dict[str, float | None]) -> str | None:
    if cfg.candidate != "best":
        return cfg.candidate if cfg.candidate in scores else None
    scored = {name: s for name, s in scores.items() if s is not None}
    return max(scored, key=scored.get) if scored else None


def _by_task(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in rows:
        out.setdefault(row["task"], []).append(row)
    return out


def resampled_scores(rows: dict[str, list[dict]], metrics: list[str], weights: dict[str, np.ndarray]) -> np.ndarray:
    """The gate score (mean of the `task.metric` names) of every resample."""
    values = []
    for metric in metrics:
        task, _, key = metric.partition(".")
        resampled = tasks.get(task).resampled_metrics(rows[task], weights[task])
        if key not in resampled:
            raise ConfigError(f"register.gate_metrics: {metric!r} is not a metric the gate can recompute per "
                              f"example (for {task}: {', '.join(resampled)})")
        values.append(resampled[key])
    return np.mean(values, axis=0)


def _same_examples(candidate: dict[str, list[dict]], champion: dict[str, list[dict]], needed: set[str]) -> None:
    for task in sorted(needed):
        texts = [r["text"] for r in candidate.get(task, [])]
        if not texts:
            raise NotComparable(f"no {task} examples among the validation answers")
        if texts != [r["text"] for r in champion.get(task, [])]:
            raise NotComparable(f"their {task} validation answers are not to the same examples "
                                "(scored on different validation splits: run `lingtune evaluate`)")


def paired_difference(candidate_rows: list[dict], baseline_rows: list[dict], metrics: list[str], samples: int,
                      confidence: float, seed: int) -> Lead:
    """Both models' score (the mean of the `task.metric` names) on the same examples, and the paired
    bootstrap interval of the candidate's lead: both answer sets resampled together, each task on its own."""
    candidate, baseline = _by_task(candidate_rows), _by_task(baseline_rows)
    needed = {metric.partition(".")[0] for metric in metrics}
    _same_examples(candidate, baseline, needed)
    sizes = {task: len(candidate[task]) for task in needed}
    draws = {task: resample_counts(n, samples, seed + i) for i, (task, n) in enumerate(sorted(sizes.items()))}
    lead = resampled_scores(candidate, metrics, draws) - resampled_scores(baseline, metrics, draws)
    low, high = percentile_interval(lead, confidence)
    everything = {task: np.ones((1, n)) for task, n in sizes.items()}
    return Lead(float(resampled_scores(candidate, metrics, everything)[0]),
                float(resampled_scores(baseline, metrics, everything)[0]), low, high, sum(sizes.values()))


def paired_lead(candidate_rows: list[dict], champion_rows: list[dict], cfg: RegisterConfig, seed: int) -> Lead:
    """Both gate scores and the paired bootstrap interval of the candidate's lead (module docstring)."""
    return paired_difference(candidate_rows, champion_rows, cfg.gate_metrics, cfg.bootstrap_samples, cfg.confidence,
                             seed)


def compare_answers(baseline_rows: list[dict], candidate_rows: list[dict], metrics: list[str] | None,
                    cfg: RegisterConfig, seed: int) -> dict[str, Lead]:
    """`lingtune compare`: the candidate's lead on each metric (default: every summary metric of the tasks
    both answer files hold) and on the gate score when both hold its tasks, each with the paired bootstrap
    interval of `register.confidence` and `bootstrap_samples`. Answers to different examples, or rows that
    are not per-example answers (`lingtune eval --predictions`), are a DataError."""
    present = sorted(set(_by_task(baseline_rows)) & set(_by_task(candidate_rows)))
    if not present:
        raise DataError("the two answer files share no task")
    chosen = metrics or [f"{task}.{key}" for task in present for key in tasks.get(task).summary_keys]
    names = {metric: [metric] for metric in chosen}
    if not metrics and {m.partition(".")[0] for m in cfg.gate_metrics} <= set(present):
        names["gate score"] = list(cfg.gate_metrics)
    try:
        return {name: paired_difference(candidate_rows, baseline_rows, group, cfg.bootstrap_samples, cfg.confidence,
                                        seed) for name, group in names.items()}
    except NotComparable as exc:
        raise DataError(f"the answer files cannot be compared: {exc}") from None
    except KeyError as exc:
        raise DataError(f"an answer row has no {exc} key: compare the per-example files of `lingtune eval "
                        "--predictions` (or the evaluate stage's validation answers)") from None


def describe(lead: Lead, cfg: RegisterConfig, champion: str) -> str:
    return (f"scores {lead.candidate:.4f} on validation, champion {champion} {lead.champion:.4f}: lead "
            f"{lead.difference:+.4f}, {cfg.confidence:.0%} interval [{lead.low:+.4f}, {lead.high:+.4f}] "
            f"(paired bootstrap, {cfg.bootstrap_samples} resamples of {lead.examples} examples)")


def gate(mlflow_client, cfg: RegisterConfig, candidate_version: str, seed: int) -> GateDecision:
    """Move `champion` to the candidate only when its validation lead is beyond noise (module docstring)."""
    name = cfg.model_name
    cand = get_version(mlflow_client, name, version=candidate_version)
    champ = alias_version(mlflow_client, name, cfg.champion_alias)
    before, c = (str(champ.version) if champ else None), str(cand.version)

    def decide(promoted: bool, reason: str) -> GateDecision:
        if promoted:
            set_alias(mlflow_client, name, cfg.champion_alias, c)
        return GateDecision(promoted, reason, c, before)

    found = validation_rows(cfg.validation_dir, cand.tags.get(CONTENT_TAG))
    if found is None:
        return decide(False, f"v{c} has no validation answers in {cfg.validation_dir} (`lingtune evaluate` "
                             "scores every variant folder); champion unchanged")
    if champ is None:
        return decide(True, f"no champion yet: v{c} becomes champion")
    if before == c:
        return decide(False, f"v{c} is already the champion")
    if champ.tags.get(FORMAT_TAG) != FORMAT:  # nothing loads it any more: keeping it would serve nothing
        return decide(True, f"champion v{before} is not an MLflow model lingtune can load (registered by an older "
                            f"lingtune): v{c} replaces it")
    held = validation_rows(cfg.validation_dir, champ.tags.get(CONTENT_TAG))
    if held is None:
        return decide(False, f"champion v{before} has no validation answers in {cfg.validation_dir}, so candidate "
                             f"v{c} cannot be compared with it; champion unchanged. Run `lingtune evaluate` (it "
                             "scores the registry's champion too), then `lingtune promote`; or promote "
                             f"deliberately: `lingtune promote --version {c} --force`")
    try:
        lead = paired_lead(found[1], held[1], cfg, seed)
    except NotComparable as exc:
        return decide(False, f"candidate v{c} and champion v{before}: {exc}; champion unchanged")
    summary = f"candidate v{c} {describe(lead, cfg, f'v{before}')}"
    if not lead.beyond_noise(cfg.margin):
        return decide(False, f"{summary}: the lower bound is not above the margin {cfg.margin}, so the lead may be "
                             "the validation set's noise; champion unchanged")
    return decide(True, f"{summary}: better beyond the noise and the margin {cfg.margin}: v{c} is champion")
