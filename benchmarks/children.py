"""One process per benchmark configuration: peak RSS is per process, and a configuration must not
inherit another's allocator state, compiled code or threads."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def run_configs(script: str | Path, configs: list[str], argv: list[str]) -> dict[str, dict]:
    """`script --child CONFIG *argv` for each configuration; each child prints its row as the last line
    of its stdout (JSON). The first failing configuration stops the run with its stderr's tail."""
    rows = {}
    for config in configs:
        print(f"{Path(script).stem}: {config} ...", file=sys.stderr, flush=True)
        out = subprocess.run([sys.executable, str(script), "--child", config, *argv], capture_output=True, text=True,
                             check=False)  # a failure is reported below, with its stderr
        if out.returncode != 0:
            sys.exit(f"{config} failed:\n{out.stderr[-3000:]}")
        rows[config] = json.loads(out.stdout.strip().splitlines()[-1])
    return rows


def add_config_arguments(parser: argparse.ArgumentParser, configs: tuple[str, ...]) -> None:
    """`--configs` (which to run, default all), `--json`, and the hidden `--child` a run starts itself with."""
    parser.add_argument("--configs", default=",".join(configs))
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", choices=configs, help=argparse.SUPPRESS)
