"""dvc.yaml's code deps cannot go stale: every lingtune source file a stage runs (the module its
`lingtune <command>` imports, and everything that module imports, transitively) is a dep of the stage,
and every listed source file exists. The same file list is the code part of the SFT/RL checkpoint
fingerprint (lingtune.artifacts.stage_code), so resume and `dvc repro` agree on what changed."""

import ast

import pytest
import yaml

from lingtune.artifacts import stage_code


def command_modules(root, command: str) -> list[str]:
    """The lingtune modules the CLI function of `lingtune <command>` imports."""
    tree = ast.parse((root / "src/lingtune/cli.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef):
            continue
        names = [d.args[0].value if d.args else node.name for d in node.decorator_list
                 if isinstance(d, ast.Call) and getattr(d.func, "attr", "") == "command"]
        if command in names:
            return sorted({n.module for n in ast.walk(node)
                           if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("lingtune")})
    raise AssertionError(f"no `lingtune {command}` in cli.py")


def stages(root) -> dict:
    return yaml.safe_load((root / "dvc.yaml").read_text())["stages"]


def needed(root, stage: dict) -> set[str]:
    command = stage["cmd"].split()[1]
    return {f"src/{path.as_posix()}" for module in command_modules(root, command) for path in stage_code(module)}


@pytest.mark.parametrize("name", ["backbone", "prepare", "validate", "ood", "sft", "sft_full", "evaluate", "reward",
                                  "rl", "quantize", "register"])
def test_every_imported_source_file_is_a_dep(root, name):
    stage = stages(root)[name]
    deps = set(stage.get("deps", []))
    missing = sorted(needed(root, stage) - deps)
    assert not missing, f"dvc.yaml stage {name} lacks deps:\n" + "\n".join(f"      - {m}" for m in missing)


@pytest.mark.parametrize("name", ["backbone", "prepare", "validate", "ood", "sft", "sft_full", "evaluate", "reward",
                                  "rl", "quantize", "register"])
def test_no_source_dep_the_stage_does_not_run(root, name):
    """A listed lingtune file the stage no longer imports would rerun it for nothing (quantize_worker.py is
    run by path in its own environment, not imported)."""
    stage = stages(root)[name]
    listed = {d for d in stage.get("deps", []) if d.startswith("src/lingtune/")}
    extra = sorted(listed - needed(root, stage) - {"src/lingtune/quantize_worker.py"})
    assert not extra, f"dvc.yaml stage {name} lists code it does not import: {extra}"


def test_listed_source_deps_exist_and_are_files(root):
    for name, stage in stages(root).items():
        for dep in stage.get("deps", []):
            if dep.startswith("src/"):
                assert (root / dep).is_file(), f"{name}: {dep} is not a file (list files, so the check above holds)"


def test_every_stage_is_checked(root):
    assert set(stages(root)) == {"backbone", "prepare", "validate", "ood", "sft", "sft_full", "evaluate", "reward",
                                 "rl", "quantize", "register"}


def test_stage_code_follows_lazy_imports_and_packages():
    files = {p.as_posix() for p in stage_code("lingtune.evaluate.run")}
    assert "lingtune/registry.py" in files  # imported inside a function only
    assert {"lingtune/__init__.py", "lingtune/evaluate/__init__.py", "lingtune/tasks/ner.py"} <= files
    assert "lingtune/serve/app.py" not in files and "lingtune/cli.py" not in files
