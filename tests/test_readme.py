"""The README's two set-up commands are the ones the Makefile and CI run, and its cheap `lingtune` commands work."""

import json
import re
import subprocess
import sys


def quick_start_commands(root):
    readme = (root / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]


def test_exactly_two_commands_pipeline_then_tests(root):
    assert quick_start_commands(root) == ["make pipeline", "make test"]


def test_ci_runs_the_readme_test_command(root):
    ci = (root / ".ci" / "run").read_text()
    test_command = quick_start_commands(root)[1]
    assert any(line.strip() == test_command for line in ci.splitlines())


def test_make_targets_install_first(root):
    makefile = (root / "Makefile").read_text()
    for target in ("pipeline", "test"):
        assert re.search(rf"^{target}: \$\(STAMP\)", makefile, re.M), target
    assert "dvc repro" in makefile
    assert re.search(r"^\$\(STAMP\):.*requirements/constraints.txt", makefile, re.M)


# -- the README's cheap commands, run as a user would: `lingtune ...` in a project folder -----------------
def lingtune(cwd, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lingtune.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def readme_command_lines(root, command: str) -> list[str]:
    """`lingtune <command> ...` as README.md and docs/*.md write it: in code spans and at the start of lines
    of fenced code blocks (prose such as "lingtune is ..." is not a command)."""
    found = []
    for page in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        text = page.read_text(encoding="utf-8")
        blocks = "\n".join(re.findall(r"```[a-z]*\n(.*?)```", text, re.S))
        prose = re.sub(r"```[a-z]*\n.*?```", "", text, flags=re.S)
        found += re.findall(rf"`(lingtune {command}\b[^`]*)`", prose)
        found += re.findall(rf"^(lingtune {command}\b.*?)(?:\s+#.*)?$", blocks, re.M)
    return found


def test_help_lists_every_command_the_readme_uses(root, tmp_path):
    done = lingtune(tmp_path, "--help")
    assert done.returncode == 0, done.stderr
    listed = set(re.findall(r"^│ ([a-z][a-z-]*)  ", done.stdout, re.M))
    documented = {word for line in readme_command_lines(root, r"[a-z]+") for word in line.split()[1].split("|")}
    assert {"sft", "rl", "eval", "data", "serve", "promote"} <= documented  # the extraction still finds them
    assert documented <= listed, documented - listed


def test_eval_help_has_the_readme_options(root, tmp_path):
    done = lingtune(tmp_path, "eval", "--help")
    assert done.returncode == 0, done.stderr
    options = {opt for line in readme_command_lines(root, "eval") for opt in re.findall(r"(--[a-z-]+)", line)}
    assert {"--data", "--task", "--model", "--json"} <= options
    shown = set(re.findall(r"(?<![\w-])(--[a-z-]+)", done.stdout))
    assert options <= shown, options - shown


def test_data_stats_on_a_small_project(root, tmp_path):
    """`lingtune data stats` in a folder whose params.yaml points data.out_dir at small train/val/test splits."""
    train = (root / "tests" / "data" / "train.jsonl").read_text(encoding="utf-8").splitlines()
    val = (root / "tests" / "data" / "val.jsonl").read_text(encoding="utf-8").splitlines()
    splits = {"train": train[:5] + train[-5:], "val": val[:10], "test": val[-10:]}
    for name, lines in splits.items():
        (tmp_path / "splits").mkdir(exist_ok=True)
        (tmp_path / "splits" / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "params.yaml").write_text("data:\n  out_dir: splits\n")
    done = lingtune(tmp_path, "data", "stats")
    assert done.returncode == 0, done.stderr
    tasks = [json.loads(line)["task"] for lines in splits.values() for line in lines]
    assert f"sentiment: {tasks.count('sentiment')} reviews" in done.stdout, done.stdout
    assert f"ner: {tasks.count('ner')} sentences" in done.stdout, done.stdout
    assert tasks.count("sentiment") and tasks.count("ner")


def test_data_stats_on_a_missing_folder_is_one_error_line(tmp_path):
    (tmp_path / "params.yaml").write_text("data:\n  out_dir: not-prepared-yet\n")
    done = lingtune(tmp_path, "data", "stats")
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "not-prepared-yet" in lines[0], done.stderr
