"""`dvc repro` with the wall time of each stage: what `make pipeline` runs. Writes reports/pipeline.json.

DVC prints `Running stage 'NAME':` when a stage starts and `Stage 'NAME' didn't change, skipping` for one
it does not run; a stage's time runs from its line to the next stage line or the end of the command. The
output passes through unchanged. The report is written whether the pipeline succeeds or not (a failed
run says which stage failed), and the command's exit status is dvc's.

Usage: python scripts/timed_repro.py [dvc repro arguments...]   (standard library only)
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPORT = Path("reports/pipeline.json")
RUNNING = re.compile(r"^Running stage '(?P<stage>[^']+)'")
SKIPPED = re.compile(r"^Stage '(?P<stage>[^']+)' didn't change, skipping")


class StageClock:
    """Stage rows from DVC's output lines, timed by when each line arrives."""

    def __init__(self):
        self.rows: list[dict] = []
        self._running: tuple[dict, float] | None = None

    def line(self, text: str, now: float) -> None:
        ran, skipped = RUNNING.match(text), SKIPPED.match(text)
        if not (ran or skipped):
            return
        self._stop(now)
        if ran:
            row = {"stage": ran["stage"], "status": "ran"}
            self._running = (row, now)
        else:
            row = {"stage": skipped["stage"], "status": "skipped", "seconds": 0.0}
        self.rows.append(row)

    def finish(self, now: float, returncode: int) -> list[dict]:
        if returncode and self._running:
            self._running[0]["status"] = "failed"
        self._stop(now)
        return self.rows

    def _stop(self, now: float) -> None:
        if self._running:
            row, started = self._running
            row["seconds"] = round(now - started, 1)
            self._running = None


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")), None)
    return {"cpus": len(os.sched_getaffinity(0)), "cpu_model": model, "platform": platform.platform()}


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def main(argv: list[str]) -> int:
    cmd = ["dvc", "repro", *argv]
    clock, started = StageClock(), time.monotonic()
    began = datetime.now(timezone.utc).isoformat(timespec="seconds")
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, bufsize=1) as proc:
        for text in proc.stdout:
            sys.stdout.write(text)
            sys.stdout.flush()
            clock.line(text, time.monotonic())
    now = time.monotonic()
    rows = clock.finish(now, proc.returncode)
    report = {"command": " ".join(cmd), "started": began, "returncode": proc.returncode,
              "total_seconds": round(now - started, 1),
              "stages_seconds": round(sum(row["seconds"] for row in rows), 1), "stages": rows, "machine": machine()}
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    tmp = REPORT.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(REPORT)  # readers see the old report or the new one
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
