"""SFT stage: LoRA / QLoRA / full fine-tuning of the backbone with PyTorch Lightning.

Features and their cost:
* LoRA (peft, rank `sft.lora.r` on every linear layer by default): only the adapter trains and
  only the adapter is saved (`models/sft/adapter_model.safetensors`, a few MB).
* QLoRA (`sft.quantization: nf4`): the frozen base is loaded in bitsandbytes 4-bit NormalFloat.
* Full fine-tuning (`sft.method: full`): the baseline the evaluation compares against; saves the
  whole model.
* Answer-only loss, and logits only for the answer positions (`logits_to_keep`), left padding,
  length-bucketed batches. Precision `auto`: bf16 autocast (bf16 LoRA base) where bf16 matmuls are
  native (AVX-512 BF16 / AMX CPUs, bf16 GPUs), float32 elsewhere (an AVX2-only CPU runs bf16 matmuls
  on a fallback path ~100x slower than fp32: benchmarks/matmul_peak.py).
* DDP: `strategy`, `devices`, `num_nodes` (gloo on CPU, NCCL on GPU); a multi-node run is the
  same command with MASTER_ADDR/MASTER_PORT/NODE_RANK set.
* Fault tolerance: `ModelCheckpoint(every_n_train_steps, save_last=True)` + `fit(ckpt_path="last")`
  and a `StatefulDataLoader`, so the same command starts or resumes a run and a resumed run
  continues on exactly the next batch. Checkpoints keep trainable weights only.
* Learning curve: `sft.snapshot_every_n_steps` (LoRA only) saves the adapter every n steps and at the
  last one into `sft.snapshot_dir`, with `curve.json` (steps, examples seen, training seconds, losses);
  lingtune.train.snapshots. A few MB per snapshot; training is unchanged (the golden and resume tests).
* Monitoring: MLFlowLogger (params, live metrics, system metrics, the adapter as an artifact, the
  dataset hash as a tag, `compute_hours` and `cost_usd` at the end) and Lightning's progress bar.

Errors: ValueError for a non-finite loss under `on_nonfinite: stop` (nothing is written to
`out_dir`); ConfigError-like ValueErrors for an impossible combination (nf4 without CUDA-free
bitsandbytes support is reported by bitsandbytes itself).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from lingtune.artifacts import CheckpointDir, code_hash, content_hash, fingerprint, publishing, write_json, write_text
from lingtune.config import CostConfig, SFTConfig
from lingtune.errors import DataError, StageError
from lingtune.tracking import flatten, run_cost
from lingtune.train.head_loss import WHOLE_OR_CHUNKED, HeadLoss, capped_cross_entropy, chunk_loss_and_grad
from lingtune.train.loader import IGNORE, BucketBatchSampler, SFTDataset, collate_left_padded
from lingtune.train.snapshots import AdapterSnapshots, curve_header


class NonFiniteLoss(StageError):
    """The loss became NaN or infinite; the run stopped before writing any weights."""


def load_model(backbone_dir: str, cfg: SFTConfig):
    """The backbone, quantized and wrapped for the configured method."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {"dtype": torch.float32 if cfg.method == "full" or cfg.precision == "32-true" else torch.bfloat16,
              "attn_implementation": cfg.attention}
    if cfg.quantization == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(backbone_dir, **kwargs)
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if cfg.method == "full":
        return model
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    for param in model.parameters():  # adapter weights in fp32, whatever the base dtype
        if param.requires_grad:
            param.data = param.data.float()
    return model


def answer_loss(model, batch: dict, head_loss: HeadLoss = WHOLE_OR_CHUNKED) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over answer tokens; the LM head runs on answer positions only.

    The decoder's hidden states are gathered at the positions that predict an answer token and
    only those rows go through the LM head: with a 262k vocabulary the head dominates a step.
    (`logits_to_keep` slices a non-contiguous 3-D tensor, which sends the head through a batched
    matmul that copies the whole weight matrix per sequence: measured 20 s of a 29 s step.)
    `head_loss` applies the head and the cross-entropy a chunk of rows at a time (lingtune.train.head_loss;
    its compiled form: `compile_for_training`).
    """
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    keep = int(batch["answer_span"])
    hidden = causal_lm.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                     position_ids=batch["position_ids"]).last_hidden_state
    hidden = hidden[:, -keep:-1, :]
    targets = batch["labels"][:, -keep + 1 :]
    rows = targets != IGNORE
    cap = getattr(causal_lm.config, "final_logit_softcapping", None)
    return head_loss(hidden[rows], causal_lm.get_output_embeddings(), targets[rows], cap), int(rows.sum())


def compile_for_training(model, cfg: SFTConfig) -> HeadLoss:
    """Apply `sft.compile` to `model` in place; returns the `HeadLoss` (`sft.loss_chunk_rows`) `answer_loss`
    should use, its per-chunk math compiled unless `sft.compile` is none.

    Shapes vary with every bucket, so both are compiled with dynamic shapes (one graph, not one per
    length). Layers are compiled one by one (`Module.compile`, state-dict keys unchanged, so checkpoints
    and the saved adapter are those of the eager model); they share one compiled code."""
    if cfg.compile == "none":
        return HeadLoss(cfg.loss_chunk_rows)
    if cfg.compile == "layers":
        causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        layers = getattr(causal_lm.get_decoder(), "layers", None)
        if layers is None:
            raise StageError(f"sft.compile: layers needs a decoder with a `layers` list; "
                             f"{type(causal_lm).__name__} has none (use loss or none)")
        for layer in layers:
            layer.compile(dynamic=True)
    return HeadLoss(cfg.loss_chunk_rows, torch.compile(chunk_loss_and_grad, dynamic=True),
                    torch.compile(capped_cross_entropy, dynamic=True))


def build_optimizer(model: torch.nn.Module, cfg: SFTConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters with torch's fused kernel: one pass per tensor for the whole
    update instead of a dozen element-wise ops, each reading and writing the tensor again. That matters
    for full fine-tuning (270M parameters: benchmarks/train_speed.py `fused_adamw_speedup_full`) and is a wash
    for LoRA (same losses, same step time). TRL's trainers (the rl stage) pick the same kernel by default.
    Not under fp16 (`16-mixed`): there the fused step unscales the gradients itself, after Lightning's
    clipping would have clipped the scaled ones, so Lightning refuses the pair."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=cfg.precision != "16-mixed")


class SFTModule(pl.LightningModule):
    def __init__(self, backbone_dir: str, cfg: SFTConfig, tokenizer, train_set: SFTDataset,
                 val_set: SFTDataset, seed: int):
        super().__init__()
        self.cfg, self.tokenizer, self.seed = cfg, tokenizer, seed
        self.train_set, self.val_set = train_set, val_set
        self.model = load_model(backbone_dir, cfg).train()  # from_pretrained leaves it in eval mode
        self.head_loss = compile_for_training(self.model, cfg)
        self.strict_loading = False  # checkpoints hold trainable weights only
        self.losses: list[dict] = []
        self.skipped = 0

    # -- data -----------------------------------------------------------------------------
    def _loader(self, dataset: SFTDataset, shuffle: bool) -> StatefulDataLoader:
        sampler = BucketBatchSampler(dataset.lengths(), self.cfg.batch_size, self.seed,
                                     rank=self.global_rank, world_size=self.trainer.world_size, shuffle=shuffle)
        return StatefulDataLoader(dataset, batch_sampler=sampler, num_workers=0,
                                  collate_fn=lambda b: collate_left_padded(b, self.tokenizer.pad_token_id))

    def train_dataloader(self):
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self):
        return self._loader(self.val_set, shuffle=False)

    # -- steps ------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        # Dropout masks depend on (seed, rank, step, batch) only, not on the RNG's history, so a
        # resumed run draws exactly the masks the uninterrupted run would have drawn.
        torch.manual_seed(self.seed + 1_000_003 * self.global_rank + 7919 * self.global_step + batch_idx)
        loss, tokens = answer_loss(self.model, batch, self.head_loss)
        if not torch.isfinite(loss):
            message = f"non-finite loss ({loss.item()}) at step {self.global_step}"
            if self.cfg.on_nonfinite == "stop":
                raise NonFiniteLoss(message + "; stopping without writing weights (sft.on_nonfinite: stop)")
            self.print(message + "; batch skipped (sft.on_nonfinite: skip)")
            self.skipped += 1
            return None
        self.log("train/loss", loss, prog_bar=True, batch_size=self.cfg.batch_size)
        self.log("train/answer_tokens", float(tokens), reduce_fx="sum", batch_size=self.cfg.batch_size)
        if self.global_rank == 0:
            self.losses.append({"step": self.global_step, "loss": float(loss.detach())})
        return loss

    def validation_step(self, batch, batch_idx):
        loss, _ = answer_loss(self.model, batch, self.head_loss)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=self.cfg.batch_size)

    def configure_optimizers(self):
        optimizer = build_optimizer(self.model, self.cfg)
        warmup, total = self.cfg.warmup_steps, self.cfg.max_steps

        def schedule(step: int) -> float:  # linear warm-up, then cosine to 10% of the peak
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Norm clipping as Lightning does it, also for the fused optimizer: Lightning's mixed-precision
        plugin refuses any fused optimizer because of fp16's gradient scaler, but bf16 has no scaler, so
        the gradients are true values here (fp16 keeps Lightning's path and the unfused optimizer)."""
        if not gradient_clip_val or gradient_clip_algorithm not in (None, "norm") or self.cfg.precision == "16-mixed":
            return self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)

    # -- checkpoints: trainable weights only (the frozen base is the backbone folder) --------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["lingtune_losses"] = self.losses

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.losses = checkpoint.get("lingtune_losses", [])

    def weights_are_finite(self) -> bool:
        return all(torch.isfinite(p).all() for p in self.model.parameters() if p.requires_grad)

    @torch.no_grad()
    def final_val_loss(self) -> float:
        """Mean loss of the first `val_batches` validation batches with the final weights."""
        self.model.eval()
        sampler = BucketBatchSampler(self.val_set.lengths(), self.cfg.batch_size, self.seed, shuffle=False)
        losses = []
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16-mixed"):
            for _, indices in zip(range(self.cfg.val_batches), sampler):
                batch = collate_left_padded([self.val_set[i] for i in indices], self.tokenizer.pad_token_id)
                batch = {k: v.to(self.device) for k, v in batch.items()}
                losses.append(float(answer_loss(self.model, batch, self.head_loss)[0]))
        return sum(losses) / len(losses)


def save_weights(module: SFTModule, out_dir: Path) -> list[Path]:
    """Adapter (lora) or whole model (full) plus tokenizer, published atomically."""
    if not module.weights_are_finite():
        raise NonFiniteLoss("trained weights contain NaN/inf; nothing written")
    with publishing(out_dir) as staging:
        module.model.save_pretrained(staging, safe_serialization=True)
        module.tokenizer.save_pretrained(staging)
    return sorted(out_dir.iterdir())


def write_loss_curve(path: Path, losses: list[dict]) -> None:
    lines = ["step,loss"] + [f"{row['step']},{row['loss']:.6f}" for row in losses]
    write_text(path, "\n".join(lines) + "\n")


def checkpoint_fingerprint(params, cfg: SFTConfig, data_sha: str) -> str:
    """What a checkpoint belongs to: the variant's config, seed, backbone, training data and the
    code the stage runs (a changed recipe must retrain, not resume a finished run of the old one)."""
    return fingerprint(sft=cfg.model_dump(exclude={"checkpoint_every_n_steps", "metrics", "loss_curve",
                                                   "snapshot_every_n_steps", "snapshot_dir"}),
                       seed=params.seed, backbone=params.backbone.model_dump(), data=data_sha,
                       code=code_hash(__name__))


def last_checkpoint(folder: Path) -> str | None:
    return str(folder / "last.ckpt") if (folder / "last.ckpt").is_file() else None


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def task_rows(path: Path, tasks: Sequence[str]) -> list:
    """The records of `path` whose task is one of `tasks`; a DataError if one of them has no row there
    (a per-task adapter trained on nothing must not be written as if it had learnt its task)."""
    from lingtune.formats import read_jsonl

    records = read_jsonl(path)
    kept = [record for record in records if record.task in tasks]
    missing = sorted(set(tasks) - {record.task for record in kept})
    if missing:
        raise DataError(f"{path}: no {' or '.join(missing)} rows, but sft.tasks lists {list(tasks)}")
    return kept


def load_data(backbone_dir: str, data_dir: Path, max_len: int, tasks: Sequence[str]):
    """Tokenizer (pad = eos when the model has no pad token) and the encoded train/val splits of `tasks`."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(backbone_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return (tokenizer, SFTDataset(tokenizer, task_rows(data_dir / "train.jsonl", tasks), max_len),
            SFTDataset(tokenizer, task_rows(data_dir / "val.jsonl", tasks), max_len))


class ProgressLines(pl.Callback):
    """One line per `every` steps (step, loss, seconds per step) where no progress bar is drawn (DVC, CI, logs)."""

    def __init__(self, every: int):
        self.every, self.started, self.first_step = every, None, None

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.started is None:
            self.started, self.first_step = time.time(), step
        if step % self.every or not trainer.is_global_zero or step == self.first_step:
            return
        rate = (time.time() - self.started) / (step - self.first_step)
        loss = module.losses[-1]["loss"] if module.losses else float("nan")
        print(f"sft step {step}/{trainer.max_steps}: loss {loss:.4f}, {rate:.2f} s/step", file=sys.stderr, flush=True)


def build_trainer(cfg: SFTConfig, logger, ckpt_dir: Path, extra: Sequence[pl.Callback] = ()) -> pl.Trainer:
    """Lightning does the distributed set-up, precision, checkpoints and resuming. A callback in `extra`
    runs before the checkpoint (Lightning runs ModelCheckpoint last), so a checkpoint holds its state
    as of that step."""
    from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint

    bar = sys.stderr.isatty()
    return pl.Trainer(enable_progress_bar=bar, enable_model_summary=bar,
        accelerator=cfg.accelerator, strategy=cfg.strategy, devices=cfg.devices, num_nodes=cfg.num_nodes,
        precision=cfg.precision, max_steps=cfg.max_steps, accumulate_grad_batches=cfg.accumulate_grad_batches,
        val_check_interval=cfg.val_every_n_steps, check_val_every_n_epoch=None, limit_val_batches=cfg.val_batches,
        num_sanity_val_steps=0, log_every_n_steps=cfg.log_every_n_steps, gradient_clip_val=1.0,
        use_distributed_sampler=False, logger=logger, default_root_dir=str(ckpt_dir),
        callbacks=[ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=cfg.checkpoint_every_n_steps,
                                   save_last=True, save_top_k=1),
                   LearningRateMonitor(logging_interval="step"),
                   *([] if bar else [ProgressLines(cfg.log_every_n_steps * 5)]), *extra],
    )


def resolve_precision(cfg: SFTConfig) -> SFTConfig:
    """`precision: auto` made concrete for this machine (bf16 only where its matmuls are native)."""
    if cfg.precision != "auto":
        return cfg
    from lingtune.env import native_bf16

    gpu = cfg.accelerator == "gpu" or (cfg.accelerator == "auto" and torch.cuda.is_available())
    precision = "bf16-mixed" if native_bf16(gpu) else "32-true"
    print(f"sft precision: {precision} (auto: bf16 matmuls are {'' if precision == 'bf16-mixed' else 'not '}native "
          f"on this {'GPU' if gpu else 'CPU'})", file=sys.stderr, flush=True)
    return cfg.model_copy(update={"precision": precision})


def run_sft(params, full_baseline: bool = False) -> dict:
    """DVC stage `sft` (`sft_full` with full_baseline): the same command starts a run or resumes the last one."""
    from pytorch_lightning.loggers import MLFlowLogger

    started = time.time()  # the stage's wall time, loading included: what `compute_hours` counts
    cfg = resolve_precision(params.sft_full if full_baseline else params.sft)
    data_dir = Path(params.data.out_dir)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    pl.seed_everything(params.seed, workers=True, verbose=False)
    tokenizer, train_set, val_set = load_data(params.backbone.out_dir, data_dir, cfg.max_seq_len, cfg.tasks)
    data_sha = content_hash(data_dir / "train.jsonl")
    stamp = checkpoint_fingerprint(params, cfg, data_sha)
    checkpoints = CheckpointDir(cfg.checkpoint_dir, stamp)
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)))
    run_id = checkpoints.resume(last_checkpoint)[1] if rank == 0 else None
    logger = MLFlowLogger(experiment_name=params.tracking.experiment, tracking_uri=params.tracking.uri,
                          run_name=f"sft-{cfg.method}{'-nf4' if cfg.quantization == 'nf4' else ''}",
                          run_id=run_id, tags={"lingtune.stage": "sft", "data.train.sha256": data_sha})
    module = SFTModule(params.backbone.out_dir, cfg, tokenizer, train_set, val_set, params.seed)
    snapshots = [AdapterSnapshots(cfg.snapshot_dir, cfg.snapshot_every_n_steps, save_weights,
                                  curve_header(cfg, stamp, len(train_set)))] if cfg.snapshot_every_n_steps else []
    trainer = build_trainer(cfg, logger, checkpoints.path, snapshots)
    if trainer.is_global_zero:
        logger.log_hyperparams({"seed": params.seed, "backbone": params.backbone.name,
                                **flatten("sft", cfg.model_dump())})
        checkpoints.record(logger.run_id)
    monitor = _system_metrics(logger.run_id, params.tracking) if trainer.is_global_zero else None
    try:
        trainer.fit(module, ckpt_path="last")
    finally:
        if monitor:
            monitor.finish()
    if not trainer.is_global_zero:
        return {}
    return _finish(module, trainer, logger, cfg, started, train_set, params.cost)


def _system_metrics(run_id: str, tracking):
    import mlflow
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    mlflow.set_tracking_uri(tracking.uri)
    monitor = SystemMetricsMonitor(run_id, sampling_interval=tracking.system_metrics_seconds,
                                   samples_before_logging=1)
    monitor.start()
    return monitor


def _gpus(trainer) -> int:
    """CUDA devices this run trained on (0 on CPU), for the price of its compute."""
    return trainer.num_devices if trainer.strategy.root_device.type == "cuda" else 0


def _finish(module: SFTModule, trainer, logger, cfg: SFTConfig, started: float, train_set: SFTDataset,
            cost: CostConfig) -> dict:
    val_loss = module.final_val_loss()
    if not math.isfinite(val_loss):
        raise NonFiniteLoss(f"validation loss of the trained weights is {val_loss}; nothing written "
                            f"({module.skipped} batches were skipped for a non-finite loss)")
    files = save_weights(module, Path(cfg.out_dir))
    losses = module.losses
    write_loss_curve(Path(cfg.loss_curve), losses)
    tail = [row["loss"] for row in losses[-10:]]
    wall = time.time() - started
    metrics = {
        "method": cfg.method, "tasks": list(cfg.tasks), "quantization": cfg.quantization,
        "precision": cfg.precision, "steps": trainer.global_step,
        "first_loss": losses[0]["loss"] if losses else None,
        "final_loss": sum(tail) / len(tail) if tail else None,
        "val_loss": val_loss, "skipped_batches": module.skipped,
        "trainable_parameters": sum(p.numel() for p in module.model.parameters() if p.requires_grad),
        "dropped_long_examples": train_set.dropped, "wall_seconds_this_run": round(wall, 1),
        **run_cost(cost, wall, _gpus(trainer)), "peak_rss_mb": round(_peak_rss_mb()), "mlflow_run_id": logger.run_id,
    }
    write_json(cfg.metrics, metrics)
    logger.experiment.log_metric(logger.run_id, "val/final_loss", val_loss, step=trainer.global_step)
    for key in ("compute_hours", "cost_usd"):
        logger.experiment.log_metric(logger.run_id, key, metrics[key], step=trainer.global_step)
    logger.experiment.log_dict(logger.run_id, metrics, "sft_metrics.json")
    for path in files:
        logger.experiment.log_artifact(logger.run_id, str(path), "adapter" if cfg.method == "lora" else "model")
    return metrics
