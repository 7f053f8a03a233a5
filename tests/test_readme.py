"""The README's two set-up commands are the ones the Makefile and CI run."""

import re


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
