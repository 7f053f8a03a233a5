"""README and docs/: generated tables match the reports, links resolve, the README stays short."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "tables.py"
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
MEASUREMENT = re.compile(r"\d+(\.\d+)?\s?%|\d+(\.\d+)?\s?(ms|GB|MB|GiB|MiB|req/s|tokens/s|tok/s|min|minutes|seconds)\b"
                         r"|\b\d+(\.\d+)?\s?s\b|\b\d+(\.\d+)?x\b")
BENCHMARK_SETTINGS = ("64 clients for 60 s",)
"""Numbers in prose that are a benchmark's settings, not measurements."""


def load_tables():
    spec = importlib.util.spec_from_file_location("lingtune_tables", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def doc_files(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def run_tables(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(root / "scripts" / "tables.py"), "--root", str(root), *args],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def project_copy(tmp_path: Path) -> Path:
    """What scripts/tables.py reads and writes, copied: the tests edit the copy, never the project."""
    for rel in ("README.md", "scripts/tables.py", "data/processed/card.json", "data/ood/card.json"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, tmp_path / rel)
    for rel in ("docs", "reports"):
        shutil.copytree(ROOT / rel, tmp_path / rel, ignore=shutil.ignore_patterns("*.csv"))
    return tmp_path


def prose_lines(path: Path):
    """(line number, text) outside code blocks and generated tables."""
    fenced = generated = False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            fenced = not fenced
        elif stripped.startswith("<!-- table:"):
            generated = True
        elif stripped.startswith("<!-- /table:"):
            generated = False
        elif not fenced and not generated:
            yield number, line


def test_tables_match_the_reports():
    done = run_tables(ROOT, "--check")
    assert done.returncode == 0, f"stale tables, run `make tables`:\n{done.stdout}{done.stderr}"


def test_check_reports_a_hand_edited_number(project_copy):
    readme = project_copy / "README.md"
    text = readme.read_text(encoding="utf-8")
    start, end = text.index("<!-- table:eval -->"), text.index("<!-- /table:eval -->")
    table = text[start:end]
    number = re.search(r"\d+\.\d%", table).group(0)
    readme.write_text(text[:start] + table.replace(number, "99.9%", 1) + text[end:], encoding="utf-8")

    done = run_tables(project_copy, "--check")
    assert done.returncode == 1
    assert "README.md: stale table:eval" in done.stdout
    assert readme.read_text(encoding="utf-8") != text, "--check must not rewrite anything"

    assert run_tables(project_copy).returncode == 0
    assert readme.read_text(encoding="utf-8") == text
    assert run_tables(project_copy, "--check").returncode == 0


def test_check_reports_a_changed_report(project_copy):
    path = project_copy / "reports" / "eval" / "metrics.json"
    metrics = json.loads(path.read_text())
    variant = next(iter(metrics))
    metrics[variant]["ner.f1"] = 0.123
    path.write_text(json.dumps(metrics))

    done = run_tables(project_copy, "--check")
    assert done.returncode == 1
    assert "README.md: stale table:eval" in done.stdout
    assert "docs/stages.md: stale table:eval" in done.stdout
    assert run_tables(project_copy).returncode == 0
    assert "| 12.3% |" in (project_copy / "README.md").read_text(encoding="utf-8")


def test_out_of_domain_tables_wait_for_the_pipeline_then_show_the_gap(project_copy):
    """Until the evaluate stage has scored the out-of-domain set, its tables say so; then each variant's OOD
    score sits beside the change from its test score, and each sector gets a row."""
    (project_copy / "reports" / "eval" / "ood.json").unlink(missing_ok=True)
    assert run_tables(project_copy).returncode == 0
    readme = (project_copy / "README.md").read_text(encoding="utf-8")
    assert "_`reports/eval/ood.json` does not exist yet" in readme

    metrics = json.loads((project_copy / "reports" / "eval" / "metrics.json").read_text())
    variant = next(iter(metrics))
    metrics[variant].update({"sentiment.macro_f1": 0.9, "ner.f1": 0.8})
    (project_copy / "reports" / "eval" / "metrics.json").write_text(json.dumps(metrics))
    sectors = {"bank": {"n": 32, "accuracy": 0.75, "macro_f1": 0.7, "invalid_rate": 0.0}}
    ner_types = {t: {"precision": 0.5, "recall": 0.25, "f1": 1 / 3, "support": 10} for t in ("PER", "LOC", "ORG")}
    ood = {variant: {"sentiment": {"n": 32, "accuracy": 0.75, "macro_f1": 0.7, "invalid_rate": 0.0, "sectors": sectors},
                     "ner": {"n": 5, "precision": 0.5, "recall": 0.25, "f1": 1 / 3, "invalid_rate": 0.0,
                             "per_type": ner_types, "sectors": {"tech_news": {"n": 5, "f1": 1 / 3}}}}}
    (project_copy / "reports" / "eval" / "ood.json").write_text(json.dumps(ood))
    done = run_tables(project_copy, "--check")
    stale = dict(line.split(": stale ") for line in done.stdout.splitlines())
    assert done.returncode == 1 and "table:eval-ood" in stale["README.md"].split(", ")
    assert {"table:eval-ood", "table:eval-ood-sectors"} <= set(stale["docs/stages.md"].split(", "))
    assert run_tables(project_copy).returncode == 0
    readme = (project_copy / "README.md").read_text(encoding="utf-8")
    assert f"| {variant} | 75.0% | 70.0% | -20.0 pt | 0.0% | 50.0% | 25.0% | 33.3% | -46.7 pt | 0.0% |" in readme
    stages = (project_copy / "docs" / "stages.md").read_text(encoding="utf-8")
    assert "| sentiment: bank (32) | accuracy | 75.0% |" in stages and "| NER: ORG (10 gold) | recall | 25.0% |" in stages


def test_a_saved_benchmark_becomes_a_table(project_copy):
    bench = project_copy / "reports" / "benchmarks"
    bench.mkdir(exist_ok=True)
    (bench / "serve.json").write_text(json.dumps({"req_per_s": 37.114, "soak": {"clients": 64, "errors": 0},
                                                  "naive": None, "speedup_vs_naive": 2.56}))
    (bench / "serve-gpu.json").write_text(json.dumps({"req_per_s": 512.0}))

    done = run_tables(project_copy, "--check")
    assert done.returncode == 1
    assert "docs/benchmarks.md: stale table:bench-other, table:bench:serve" in done.stdout
    assert run_tables(project_copy).returncode == 0
    page = (project_copy / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    assert "from `reports/benchmarks/serve.json`" in page and "| soak.clients | 64 |" in page
    assert "from `reports/benchmarks/serve-gpu.json`" in page and "| req_per_s | 512.0 |" in page


def test_every_table_names_its_source():
    tables = load_tables()
    for path in doc_files():
        lines = path.read_text(encoding="utf-8").split("\n")
        for name, start, end in tables.regions("\n".join(lines), path.name):
            body = "\n".join(lines[start:end])
            not_yet = re.fullmatch(r"_`[^`]+` does not exist yet: run the pipeline .*_", body)  # names its source too
            assert "_Generated by `make tables` from `" in body or "_Not measured yet" in body \
                or "_No other saved results" in body or not_yet, (path.name, name)


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 220


def test_readme_shows_the_evaluation_and_links_the_docs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "<!-- table:eval -->" in readme
    for page in ("stages", "design", "serving", "data", "benchmarks"):
        assert f"(docs/{page}.md)" in readme, page


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(line.lstrip("#")) for _, line in prose_lines(path) if re.match(r"#{1,6} ", line)}


def test_relative_links_resolve():
    broken = []
    for path in doc_files():
        for number, line in prose_lines(path):
            for target in LINK.findall(line):
                if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                    continue
                file_part, _, anchor = target.partition("#")
                dest = (path.parent / file_part).resolve() if file_part else path
                if not dest.exists():
                    broken.append(f"{path.relative_to(ROOT)}:{number}: {target} (no such file)")
                elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                    broken.append(f"{path.relative_to(ROOT)}:{number}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_markers_are_paired_and_known():
    tables = load_tables()
    for path in doc_files():
        text = path.read_text(encoding="utf-8")
        found = tables.regions(text, path.name)  # raises for an unpaired, nested or stray marker
        assert len(found) == len(re.findall(r"<!--\s*table:", text)), path.name
        for name, _, _ in found:
            tables.render(ROOT, name, set())  # raises for an unknown table name


@pytest.mark.parametrize("text, problem", [
    ("<!-- table:eval -->\nx\n", "never closed"),
    ("x\n<!-- /table:eval -->\n", "closes no open"),
    ("<!-- table:eval -->\n<!-- table:data -->\n<!-- /table:data -->\n<!-- /table:eval -->\n", "opens inside"),
    ("see <!-- table:eval --> here\n", "alone on its line"),
])
def test_bad_markers_are_errors(text, problem):
    with pytest.raises(ValueError, match=problem):
        load_tables().regions(text, "page.md")


def test_every_benchmark_has_a_table_region():
    page = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    for script in sorted((ROOT / "benchmarks").glob("*.py")):
        if script.stem not in ("naive_server", "children"):  # serve.py's baseline server; a helper module
            assert f"<!-- table:bench:{script.stem} -->" in page, script.name


def test_no_measured_numbers_in_prose():
    found = []
    for path in doc_files():
        for number, line in prose_lines(path):
            for allowed in BENCHMARK_SETTINGS:
                line = line.replace(allowed, "")
            found += [f"{path.relative_to(ROOT)}:{number}: {m.group(0)!r} in {line.strip()[:100]!r}"
                      for m in MEASUREMENT.finditer(line)]
    assert not found, "measured numbers belong in generated tables:\n" + "\n".join(found)


def test_the_quality_curve_becomes_a_table_of_points(project_copy):
    """benchmarks/quality_curve.py's JSON (shape as the script writes it; numbers made up for the test only)."""
    point = {"step": 100, "examples_seen": 800, "epochs": 0.13, "train_seconds": 600.0, "sentiment_macro_f1": 0.8,
             "sentiment_invalid": 0.0, "ner_precision": 0.5, "ner_recall": 0.4, "ner_f1": 0.44, "ner_invalid": 0.01}
    later = {**point, "step": 200, "examples_seen": 1600, "epochs": 0.26, "train_seconds": 1200.0, "ner_f1": 0.5}
    saturation = importlib.util.spec_from_file_location("quality_curve", ROOT / "benchmarks" / "quality_curve.py")
    curve = importlib.util.module_from_spec(saturation)
    saturation.loader.exec_module(curve)
    report = {"examples": {"sentiment": 300, "ner": 300}, "points": [point, later],
              "saturation": curve.saturation([point, later])}
    (project_copy / "reports" / "benchmarks").mkdir(exist_ok=True)
    (project_copy / "reports" / "benchmarks" / "quality_curve.json").write_text(json.dumps(report))
    assert run_tables(project_copy).returncode == 0
    page = (project_copy / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    assert "| 200 | 1,600 | 0.26 | 20.0 | 80.0% | 50.0% | 40.0% | 50.0% | 0.0% / 1.0% |" in page
    assert "NER F1 +6.0 pt (+0.6 pt per minute)" in page and "Best step: sentiment 100, NER 200." in page
    assert "#### `quality_curve`" not in page  # its own region, not among the other saved results


def test_a_per_task_curve_shows_only_its_task(project_copy):
    """A per-task run's curve (`sft.tasks: [sentiment]`; numbers made up for the test only): the other task's
    columns are empty, not zero, and neither the note nor the summary speaks of it."""
    point = {"step": 100, "examples_seen": 800, "epochs": 0.1, "train_seconds": 60.0, "sentiment_macro_f1": 0.8,
             "sentiment_invalid": 0.0, "ner_precision": None, "ner_recall": None, "ner_f1": None, "ner_invalid": None}
    later = {**point, "step": 200, "examples_seen": 1600, "train_seconds": 120.0, "sentiment_macro_f1": 0.9}
    spec = importlib.util.spec_from_file_location("quality_curve", ROOT / "benchmarks" / "quality_curve.py")
    curve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(curve)
    report = {"examples": {"sentiment": 500}, "points": [point, later], "saturation": curve.saturation([point, later])}
    (project_copy / "reports" / "benchmarks").mkdir(exist_ok=True)
    (project_copy / "reports" / "benchmarks" / "quality_curve_one_task.json").write_text(json.dumps(report))
    assert run_tables(project_copy).returncode == 0
    page = (project_copy / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    assert "| 200 | 1,600 | 0.10 | 2.0 | 90.0% | – | – | – | 0.0% / – |" in page
    assert "validation split, 500 reviews; train min" in page
    assert "sentiment macro-F1 +10.0 pt (+10.0 pt per minute). Best step: sentiment 200." in page


def test_a_candidate_curve_and_a_comparison_get_their_own_tables(project_copy):
    """A candidate's quality curve (`quality_curve_NAME.json`) renders as a curve, `lingtune compare --json`
    output (`compare_NAME.json`) as one row per metric (numbers made up for the test only)."""
    point = {"step": 800, "examples_seen": 6400, "epochs": 0.55, "train_seconds": 5700.0, "sentiment_macro_f1": 0.8,
             "sentiment_invalid": 0.0, "ner_precision": 0.9, "ner_recall": 0.85, "ner_f1": 0.874, "ner_invalid": 0.0}
    lead = {"baseline": 0.8, "candidate": 0.85, "lead": 0.05, "low": 0.01, "high": 0.09, "examples": 272,
            "beyond_noise": True}
    compared = {"baseline": "a.jsonl", "candidate": "b.jsonl", "confidence": 0.95, "margin": 0.0,
                "bootstrap_samples": 2000, "metrics": {"ner.f1": lead}}
    bench = project_copy / "reports" / "benchmarks"
    bench.mkdir(exist_ok=True)
    (bench / "quality_curve_zz.json").write_text(json.dumps({"examples": {}, "points": [point], "saturation": None}))
    (bench / "compare_zz.json").write_text(json.dumps(compared))
    assert run_tables(project_copy).returncode == 0
    page = (project_copy / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    assert "| 800 | 6,400 | 0.55 | 95.0 | 80.0% | 90.0% | 85.0% | 87.4% | 0.0% / 0.0% |" in page
    assert "| ner.f1 | 80.0% | 85.0% | +5.0 pt | [+1.0 pt, +9.0 pt] | yes |" in page
    assert "`lingtune compare a.jsonl b.jsonl`" in page


def test_rl_recipes_get_one_row_each_with_their_leads(project_copy):
    """benchmarks/rl_reward.py's list of rows renders as one row per RL recipe (numbers made up for the test)."""
    def lead(value: float, beyond: bool) -> dict:
        return {"sft": 0.8, "rl": 0.8 + value, "lead": value, "low": value - 0.01, "high": value + 0.01,
                "beyond_noise": beyond}

    row = {"candidate": "rl_zz", "seed": 7, "ner_weight": [0.3, 0.1], "ner_metric": "f1", "steps": 24,
           "answers": "zz.jsonl", "ner_answers_changed": 5, "ner_entities_not_in_text": {"sft": 8, "rl": 2},
           "confidence": 0.9, "sentiment_macro_f1": lead(0.03, True), "ner_precision": lead(0.01, False),
           "ner_recall": lead(-0.02, False), "ner_f1": lead(-0.005, False), "gate_score": lead(0.012, True)}
    bench = project_copy / "reports" / "benchmarks"
    bench.mkdir(exist_ok=True)
    (bench / "rl_reward.json").write_text(json.dumps([row]))
    assert run_tables(project_copy).returncode == 0
    page = (project_copy / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    assert ("| rl_zz | 7 | 0.3 -> 0.1 | 24 | +3.0 pt [+2.0 pt, +4.0 pt] beyond noise | +1.0 pt | -2.0 pt "
            "| -0.5 pt [-1.5 pt, +0.5 pt] | +1.2 pt [+0.2 pt, +2.2 pt] beyond noise | 5 | 8 -> 2 |") in page
    assert "90.0% paired bootstrap interval" in page and "#### `rl_reward`" not in page
