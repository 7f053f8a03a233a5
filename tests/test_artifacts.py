"""Publishing stage outputs: readers see the old or the new version, a failure keeps the old one, a crash
between the two renames is recovered; content hashes; fingerprint + resume of checkpoint folders."""

import hashlib
import os

import pytest

from lingtune import artifacts
from lingtune.artifacts import CheckpointDir, content_hash, publishing, write_json


def test_publish_replaces_the_folder_and_leaves_nothing_beside_it(tmp_path):
    out = tmp_path / "models" / "sft"
    for version in ("old", "new"):
        with publishing(out) as staging:
            (staging / "weights").write_text(version)
    assert (out / "weights").read_text() == "new"
    assert sorted(p.name for p in out.parent.iterdir()) == ["sft"]
    assert oct(out.stat().st_mode & 0o777) == "0o755"


def test_a_failure_keeps_the_old_version(tmp_path):
    out = tmp_path / "sft"
    with publishing(out) as staging:
        (staging / "weights").write_text("old")
    with pytest.raises(RuntimeError):
        with publishing(out) as staging:
            (staging / "weights").write_text("half")
            raise RuntimeError("killed mid-write")
    assert (out / "weights").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["sft"]


def test_a_crash_between_the_renames_is_recovered(tmp_path, monkeypatch):
    out = tmp_path / "sft"
    with publishing(out) as staging:
        (staging / "weights").write_text("old")
    real_replace = os.replace

    def die_after_moving_the_old_aside(src, dst):
        real_replace(src, dst)
        if str(dst).endswith(".old"):
            raise KeyboardInterrupt  # the process dies between its two renames

    monkeypatch.setattr(artifacts.os, "replace", die_after_moving_the_old_aside)
    with pytest.raises(KeyboardInterrupt):
        with publishing(out) as staging:
            (staging / "weights").write_text("new")
    monkeypatch.setattr(artifacts.os, "replace", real_replace)
    assert not out.exists()  # what a reader would see now
    artifacts.recover(out)
    assert (out / "weights").read_text() == "old"


def test_files_are_replaced_whole(tmp_path):
    path = write_json(tmp_path / "r" / "m.json", {"a": "中"})
    assert path.read_text(encoding="utf-8") == '{\n  "a": "中"\n}' and [p.name for p in path.parent.iterdir()] == ["m.json"]


def test_content_hash_of_files_and_folders(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_bytes(b"1")
    first = content_hash(tmp_path / "a")
    (tmp_path / "a" / "x").rename(tmp_path / "a" / "y")  # same bytes, another name
    second = content_hash(tmp_path / "a")
    assert second != first
    assert content_hash(tmp_path / "a" / "y") == hashlib.sha256(b"1").hexdigest()
    with pytest.raises(FileNotFoundError):
        content_hash(tmp_path / "missing")
    (tmp_path / "a" / ".complete").write_text("bookkeeping")
    assert content_hash(tmp_path / "a", exclude={".complete"}) == second != content_hash(tmp_path / "a")


def test_checkpoints_resume_only_their_own_fingerprint(tmp_path):
    folder = tmp_path / "ckpt"
    messages = []
    first = CheckpointDir(folder, "aaa", messages.append)
    assert first.resume(lambda d: None) == (None, None)
    first.record("run-1")
    (folder / "last.ckpt").write_text("x")
    latest = lambda d: str(d / "last.ckpt") if (d / "last.ckpt").is_file() else None  # noqa: E731
    assert CheckpointDir(folder, "aaa", messages.append).resume(latest) == (str(folder / "last.ckpt"), "run-1")
    assert CheckpointDir(folder, "bbb", messages.append).resume(latest) == (None, None)
    assert not (folder / "last.ckpt").exists() and "another configuration" in messages[-1]
