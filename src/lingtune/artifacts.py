"""Stage outputs: publishing them so readers never see half of one, content hashes, and the
fingerprint + resume rule every resumable stage follows.

* `publishing(out)`: a staging folder beside `out`; on success the old `out` is renamed aside, the new
  one renamed in, then the old one deleted. A crash between the two renames leaves the old version
  aside, and the next `publishing` (or `recover`) puts it back: a reader sees the old or the new folder.
* `write_text` / `write_json` / `write_jsonl`: a temporary file in the same folder, then `os.replace`.
* `content_hash`: sha256 of a file's bytes, or of a folder's relative names and bytes.
* `stage_code(module)`: the lingtune source files a module imports, transitively (AST, lazy imports
  included). It is both the code part of a checkpoint fingerprint and what dvc.yaml must list as the
  stage's deps (tests/test_stage_deps.py), so the two cannot drift apart.
* `CheckpointDir`: keep checkpoints whose fingerprint matches (resume), drop any others (start afresh).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Collection, Iterable, Iterator

PACKAGE = Path(__file__).resolve().parent
_ASIDE = ".{name}.old"


def _aside(out: Path) -> Path:
    return out.with_name(_ASIDE.format(name=out.name))


def recover(out: Path) -> None:
    """Put back a version left aside by a publish that died between its two renames."""
    aside = _aside(out)
    if aside.exists() and not out.exists():
        os.replace(aside, out)
    elif aside.exists():
        shutil.rmtree(aside, ignore_errors=True)


def swap_in(staging: Path, out: Path) -> None:
    """Replace `out` by `staging`: old aside, new in, old deleted."""
    recover(out)
    aside = _aside(out)
    if out.exists():
        os.replace(out, aside)
    os.replace(staging, out)
    shutil.rmtree(aside, ignore_errors=True)


@contextmanager
def publishing(out: str | Path) -> Iterator[Path]:
    """Yield an empty staging folder; when the block ends without an exception it becomes `out`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    recover(out)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    staging.chmod(0o755)  # mkdtemp makes it 0700; a published folder is readable like any other
    swap_in(staging, out)


def write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: object) -> Path:
    return write_text(path, json.dumps(obj, indent=2, ensure_ascii=False))


def write_jsonl(path: str | Path, rows: Iterable[object]) -> Path:
    return write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _update_with_file(digest, path: Path) -> None:
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)


def content_hash(path: str | Path, exclude: Collection[str] = ()) -> str:
    """sha256 of a file's bytes; of a folder: every file's relative name and bytes, in name order
    (leaving out the relative names in `exclude`: a folder's own bookkeeping files)."""
    path = Path(path)
    digest = hashlib.sha256()
    if path.is_file():
        _update_with_file(digest, path)
        return digest.hexdigest()
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: nothing to hash")
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        name = file.relative_to(path).as_posix()
        if name not in exclude:
            digest.update(name.encode() + b"\0")
            _update_with_file(digest, file)
    return digest.hexdigest()


def fingerprint(**parts: object) -> str:
    """A short stable hash of JSON-able parts (config sections, data hashes, code hash)."""
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# -- the code a stage runs ---------------------------------------------------------------------
def _module_file(name: str) -> Path | None:
    """The source file of a lingtune module, found on disk (nothing is imported)."""
    base = PACKAGE.parent.joinpath(*name.split("."))
    for file in (base.with_suffix(".py"), base / "__init__.py"):
        if file.is_file():
            return file
    return None


def _imported_lingtune_modules(file: Path, module: str) -> set[str]:
    package = module if file.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}  # `from pkg import module`
    return {name for name in found if name == "lingtune" or name.startswith("lingtune.")}


def stage_code(module: str) -> list[Path]:
    """Source files of `module` and of every lingtune module it imports, transitively, with the
    `__init__.py` of each package on the way. Sorted, relative to the package's parent (`lingtune/...`)."""
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        file = _module_file(name)
        if file is None:  # `from lingtune.x import function` names no module
            continue
        seen[name] = file
        parents = [".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)]
        todo += parents + sorted(_imported_lingtune_modules(file, name))
    return sorted({f.relative_to(PACKAGE.parent) for f in seen.values()})


def code_hash(module: str) -> str:
    digest = hashlib.sha256()
    for relative in stage_code(module):
        digest.update(relative.as_posix().encode() + b"\0" + (PACKAGE.parent / relative).read_bytes())
    return digest.hexdigest()


# -- checkpoints -------------------------------------------------------------------------------
class CheckpointDir:
    """A stage's checkpoint folder, tagged with the fingerprint of what its checkpoints belong to."""

    META = "lingtune_run.json"

    def __init__(self, path: str | Path, stamp: str, log: Callable[[str], None] = print):
        self.path, self.stamp, self.log = Path(path), stamp, log

    def resume(self, latest: Callable[[Path], str | None]) -> tuple[str | None, str | None]:
        """(checkpoint to resume, MLflow run id) when the folder holds a complete checkpoint of this
        fingerprint (`latest` finds it); else the folder is emptied and (None, None)."""
        meta = self.path / self.META
        if meta.is_file():
            saved = json.loads(meta.read_text())
            if saved.get("fingerprint") == self.stamp:
                last = latest(self.path) if self.path.is_dir() else None
                if last:
                    self.log(f"resuming from {last}")
                    return last, saved.get("mlflow_run_id")
            else:
                self.log(f"{self.path}: checkpoints of another configuration; starting afresh")
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir(parents=True, exist_ok=True)
        return None, None

    def record(self, run_id: str | None) -> None:
        write_json(self.path / self.META, {"fingerprint": self.stamp, "mlflow_run_id": run_id})
