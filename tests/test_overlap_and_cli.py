"""`lingtune data overlap/stats/convert` and how the CLI treats bad input."""

import json
import subprocess
import sys

import pytest

from conftest import write_jsonl
from lingtune.formats import Record
from lingtune.data.overlap import overlap_report

TRAIN = [Record(text="这家酒店的服务非常好，房间干净整洁，早餐也很丰富。", label="positive"),
         Record(text="书的印刷质量很差，纸张发黄，装订也有问题。", label="negative")]


def lingtune(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "lingtune.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_overlap_counts_exact_and_ngram_contamination():
    evaluation = [
        Record(text="这家酒店的服务非常好，房间干净整洁，早餐也很丰富！", label="positive"),  # exact after normalising
        Record(text="书的印刷质量很差，纸张发黄，别买。", label="negative"),                 # shares 8-grams
        Record(text="物流很快，包装完好，孩子很喜欢这套绘本。", label="positive"),            # clean
    ]
    report = overlap_report(TRAIN, evaluation, n=8, threshold=0.5)
    assert (report.eval, report.exact, report.ngram_contaminated) == (3, 1, 2)
    assert 0 < report.mean_ngram_overlap < 1
    assert report.examples[0].startswith("这家酒店")
    clean = overlap_report(TRAIN, evaluation[2:])
    assert (clean.exact, clean.ngram_contaminated, clean.mean_ngram_overlap) == (0, 0, 0.0)


def test_overlap_command_json(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [r.model_dump(exclude_none=True, mode="json") for r in TRAIN])
    result = lingtune("data", "overlap", str(train), str(train), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["exact"] == 2 and report["exact_rate"] == 1.0


def test_stats_command_json(tmp_path):
    for split in ("train", "val", "test"):
        write_jsonl(tmp_path / "d" / f"{split}.jsonl", [
            {"text": f"{split}好书", "label": "positive"},
            {"text": f"{split}江泽民", "entities": [{"start": len(split), "end": len(split) + 3,
                                                     "type": "PER", "text": "江泽民"}]}])
    (tmp_path / "params.yaml").write_text(f"data:\n  out_dir: {tmp_path}/d\n")
    result = lingtune("data", "stats", "--json", "--params", str(tmp_path / "params.yaml"))
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert stats["sentiment"]["total"] == 3 and stats["ner"]["entities"] == {"PER": 3, "LOC": 0, "ORG": 0}
    assert stats["ner"]["characters"] == sum(len(s) + 3 for s in ("train", "val", "test"))


def test_bad_input_gives_one_clear_line_and_no_traceback(tmp_path):
    cases = [
        (["data", "overlap", str(tmp_path / "missing.jsonl"), str(tmp_path / "x.jsonl")], 2, "no such file"),
        (["data", "convert", str(tmp_path / "missing.jsonl"), str(tmp_path / "o.jsonl")], 2, "no such file"),
        (["prepare", "--params", str(tmp_path / "nope.yaml")], 2, "no such file"),
    ]
    bad_params = tmp_path / "bad.yaml"
    bad_params.write_text("data:\n  sentiment:\n    total: lots\n")
    cases.append((["prepare", "--params", str(bad_params)], 2, "data.sentiment.total"))
    broken = write_jsonl(tmp_path / "broken.jsonl", ['{"text": "x", "label": "positive"}', "{oops"])
    cases.append((["data", "overlap", str(broken), str(broken)], 2, "broken.jsonl:2: not JSON"))
    for args, code, text in cases:
        result = lingtune(*args)
        assert result.returncode == code, (args, result.stderr)
        assert text in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.startswith("error: "), result.stderr


def test_only_lingtune_errors_become_one_line_other_exceptions_keep_their_traceback(tmp_path, monkeypatch, capsys):
    import lingtune.data.card
    from lingtune import cli
    from lingtune.errors import DataError

    (tmp_path / "params.yaml").write_text(f"data:\n  out_dir: {tmp_path}\n")
    args = ["data", "stats", "--params", str(tmp_path / "params.yaml")]

    def user_error(out_dir):
        raise DataError("the splits are unusable")

    monkeypatch.setattr(lingtune.data.card, "read_splits", user_error)
    with pytest.raises(SystemExit) as stopped:
        cli.main(args)
    assert stopped.value.code == 2 and capsys.readouterr().err == "error: the splits are unusable\n"

    def bug(out_dir):
        raise KeyError("a bug")

    monkeypatch.setattr(lingtune.data.card, "read_splits", bug)
    with pytest.raises(KeyError):  # not swallowed into a one-line message
        cli.main(args)


def test_convert_command_round_trip(tmp_path):
    src = write_jsonl(tmp_path / "n.jsonl", [{"text": "江泽民访问上海", "entities": [
        {"start": 0, "end": 3, "type": "PER", "text": "江泽民"}, {"start": 5, "end": 7, "type": "LOC", "text": "上海"}]}])
    assert lingtune("data", "convert", str(src), str(tmp_path / "c.jsonl"), "--to", "chat").returncode == 0
    back = lingtune("data", "convert", str(tmp_path / "c.jsonl"), str(tmp_path / "b.jsonl"),
                    "--from", "chat", "--to", "neutral")
    assert back.returncode == 0, back.stderr
    assert json.loads((tmp_path / "b.jsonl").read_text()) == {**json.loads(src.read_text()), "task": "ner"}
