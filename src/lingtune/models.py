"""Model references: what a folder, a LoRA adapter or a `models:/` URI means, and loading,
merging and hashing them. Shared by evaluation, RL, quantization and serving.

A reference resolves to a `ModelRef`: a base model folder and, for LoRA, an adapter folder on top.
An adapter runs on the base it was trained on, the one its `adapter_config.json` records (a
registered version: the registered base version its `lingtune.base_model` tag names, checked against
the content hash it was registered with). When that base does not exist here the reference fails
with a ModelError: an adapter on another base computes something else.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from lingtune.artifacts import content_hash, publishing
from lingtune.errors import ModelError

ADAPTER_CONFIG = "adapter_config.json"
MODEL_CONFIG = "config.json"


@dataclass(frozen=True)
class ModelRef:
    """A base model folder and, for LoRA, an adapter folder on top of it."""

    base: Path
    adapter: Path | None = None


def is_adapter(folder: str | Path) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def is_model(folder: str | Path) -> bool:
    return (Path(folder) / MODEL_CONFIG).is_file()


def recorded_base(adapter: str | Path) -> str | None:
    """The base model path an adapter's config records (peft's `base_model_name_or_path`)."""
    config = Path(adapter) / ADAPTER_CONFIG
    if not config.is_file():
        raise ModelError(f"{adapter}: no LoRA adapter there ({ADAPTER_CONFIG} missing); run `lingtune sft`")
    try:
        return json.loads(config.read_text()).get("base_model_name_or_path") or None
    except (json.JSONDecodeError, AttributeError) as exc:
        raise ModelError(f"{config}: not a readable adapter config ({exc})") from None


def existing_base(base: str | None, adapter: str | Path) -> Path:
    if not base:
        raise ModelError(f"{adapter}: the adapter does not record the base model it was trained on")
    if not is_model(base):
        raise ModelError(f"{adapter}: trained on the base model {base}, which is not a model folder here "
                         "(run `dvc repro backbone`, or train the adapter on a base that exists)")
    return Path(base)


def adapter_base(adapter: str | Path) -> Path:
    """The base model folder an adapter was trained on; a ModelError when it is not here."""
    return existing_base(recorded_base(adapter), adapter)


def folder_ref(folder: str | Path) -> ModelRef | None:
    """A model folder or an adapter folder (on its recorded base); None when the folder holds neither."""
    folder = Path(folder)
    if is_adapter(folder):
        return ModelRef(adapter_base(folder), folder)
    if is_model(folder):
        return ModelRef(folder)
    return None


def resolve(spec: str, tracking_uri: str = "sqlite:///mlflow.db", cache_dir: str = ".cache/registry") -> ModelRef:
    """A folder (model or LoRA adapter), or a registered version: `models:/name@alias`, `models:/name/3`
    (downloaded to `cache_dir`, checked against its registered content hash; an adapter runs on the
    registered base its version's tags name). A registered version that does not exist raises
    RegistryMissing; a registry that fails, or an adapter whose base is gone or changed, a plain RegistryError."""
    from lingtune.registry import PREFIX

    if spec.startswith(PREFIX):
        return registered(spec, tracking_uri, cache_dir)[0]
    ref = folder_ref(spec)
    if ref is None:
        raise ModelError(f"{spec}: neither a model folder ({MODEL_CONFIG}) nor a LoRA adapter ({ADAPTER_CONFIG})")
    return ref


def registered(spec: str, tracking_uri: str, cache_dir: str | Path):
    """A `models:/` URI as (ModelRef, registry.Fetched): the folders, and which version they are (number,
    kind, tags), for callers that must say what they loaded. Raises as `resolve` does."""
    from lingtune.registry import BASE_SHA_TAG, fetch, fetch_base

    got = fetch(spec, tracking_uri, cache_dir)
    if got.kind != "lora":
        return ModelRef(got.folder), got
    base = fetch_base(got.base_model, got.tags.get(BASE_SHA_TAG), f"{spec} (v{got.version})", tracking_uri, cache_dir)
    return ModelRef(base, got.folder), got


def load(ref: ModelRef, dtype=None, trainable: bool = False):
    """(model, tokenizer) of a reference with transformers (+ peft for an adapter); pad = eos when the
    tokenizer has none."""
    tokenizer = load_tokenizer(ref.base)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return load_model(ref, dtype, trainable), tokenizer


def load_tokenizer(folder: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def load_model(ref: ModelRef, dtype=None, trainable: bool = False):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ref.base, dtype=dtype or torch.float32)
    if ref.adapter is None:
        return model
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(ref.adapter), is_trainable=trainable)


def merge(ref: ModelRef, out: Path) -> Path:
    """An adapter merged into its base (bf16), saved with the base's tokenizer into `out`; a plain model
    folder is returned as it is."""
    if ref.adapter is None:
        return ref.base
    import torch

    load_model(ref, dtype=torch.bfloat16).merge_and_unload().save_pretrained(out, safe_serialization=True)
    load_tokenizer(ref.base).save_pretrained(out)
    return out


def merged_model(base: Path, adapter: Path, cache_dir: Path) -> Path:
    """The adapter merged into its base (bf16), once per (base, adapter content) under `cache_dir`."""
    digest = hashlib.sha256(f"{base.resolve()}\0{content_hash(adapter)}".encode()).hexdigest()
    out = cache_dir / f"merged-{digest[:16]}"
    if not (out / "config.json").is_file():
        with publishing(out) as staging:
            merge(ModelRef(base, adapter), staging)
    return out


def same_model(a: Path, b: Path) -> bool:
    """The same folder, or folders with the same content (a registered base downloaded to a cache)."""
    return a.resolve() == b.resolve() or content_hash(a) == content_hash(b)


def unsupported_here(model_dir: str | Path) -> str | None:
    """Why vLLM cannot run this model folder on this machine, or None. An INT4 W4A16 (compressed-tensors)
    model runs on vLLM's CPU kernel `cpu_gemm_wna16`, which vLLM's AVX2 build does not have: the model
    loads, then its first forward fails."""
    config = Path(model_dir) / "config.json"
    if not config.is_file() or "quantization_config" not in json.loads(config.read_text()):
        return None
    import torch

    if torch.cuda.is_available():
        return None
    import vllm._custom_ops  # noqa: F401  (registers vLLM's CPU kernels under torch.ops._C)

    if hasattr(torch.ops._C, "cpu_gemm_wna16"):
        return None
    return (f"{model_dir} is an INT4 model, and this CPU's vLLM build has no INT4 kernel (cpu_gemm_wna16 comes "
            "with vLLM's AVX-512 build); run it on a CPU with AVX-512 or on a GPU")
