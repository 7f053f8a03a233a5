"""Adapter snapshots along an SFT run: the points of the learning curve (benchmarks/quality_curve.py).

Every `sft.snapshot_every_n_steps` optimizer steps, and at the last step, the adapter is saved the way
the stage saves `models/sft` (the same `save_weights`: adapter + tokenizer, published atomically), into
`snapshot_dir`/step-NNNNN/, so the evaluation loads a snapshot exactly as it loads `models/sft`. The
folder's `curve.json` lists them:

  {"fingerprint", "recipe" (the sft section of the run), "train_examples", "world_size", "examples_per_step",
   "snapshots": [{"step", "examples_seen", "train_seconds", "train_loss", "val_loss", "val_step", "path"}]}

* `examples_seen` = step x batch_size x accumulate_grad_batches x world size.
* `train_seconds`: wall seconds of the training loop (validation and checkpoint writes included, as they
  are part of what a run costs; model loading and the snapshot writes themselves left out). The clock is
  part of this callback's state in every Lightning checkpoint, so a resumed run continues from the time the
  checkpoint recorded plus the time since the resume: the work lost to the interruption (checkpoint to
  kill) is counted once, when it is redone, as an uninterrupted run would have spent it.
* `train_loss`: the mean training loss of the steps since the previous snapshot (one batch is noisy);
  `val_loss`: the latest validation loss, measured at `val_step` (validation runs on its own cadence; at
  a step that has both, Lightning validates after the snapshot, and the point is updated then).

A run that starts afresh empties the folder; a resumed run keeps the points its checkpoint knew and drops
any later ones (the interrupted run's), which it writes again when it gets there.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytorch_lightning as pl

from lingtune.artifacts import write_json

CURVE = "curve.json"


def snapshot_name(step: int) -> str:
    return f"step-{step:05d}"


class AdapterSnapshots(pl.Callback):
    """Saves the adapter every `every` steps and at the end, and keeps `curve.json` beside them (rank 0)."""

    def __init__(self, folder: str | Path, every: int, save: Callable, header: dict):
        self.folder, self.every, self.save, self.header = Path(folder), every, save, header
        self.points: list[dict] = []
        self.seconds_before = 0.0  # training seconds up to the checkpoint this run resumed from
        self.started: float | None = None
        self.paused = 0.0  # seconds spent writing snapshots, not training
        self.val: tuple[int, float] | None = None
        self.restored = False

    # -- the clock, carried by Lightning checkpoints ---------------------------------------------
    def train_seconds(self) -> float:
        running = time.monotonic() - self.started - self.paused if self.started is not None else 0.0
        return self.seconds_before + running

    def state_dict(self) -> dict:
        return {"train_seconds": self.train_seconds(), "points": self.points, "val": self.val}

    def load_state_dict(self, state: dict) -> None:
        self.seconds_before, self.points = state["train_seconds"], list(state["points"])
        self.val = tuple(state["val"]) if state.get("val") else None
        self.restored = True

    # -- hooks --------------------------------------------------------------------------------------
    def on_train_start(self, trainer, module) -> None:
        self.started, self.paused = time.monotonic(), 0.0
        recipe = self.header["recipe"]
        self.header = {**self.header, "world_size": trainer.world_size, "examples_per_step":
                       recipe["batch_size"] * recipe["accumulate_grad_batches"] * trainer.world_size}
        if not trainer.is_global_zero:
            return
        if not self.restored:
            shutil.rmtree(self.folder, ignore_errors=True)  # another run's snapshots
        self._drop_unlisted()
        self._write_curve()

    def on_validation_end(self, trainer, module) -> None:
        loss = trainer.callback_metrics.get("val/loss")
        if loss is None or trainer.sanity_checking:
            return
        self.val = (trainer.global_step, float(loss))
        # Lightning validates after the step's batch-end hooks: a snapshot of this very step gets its loss now
        if trainer.is_global_zero and self.points and self.points[-1]["step"] == trainer.global_step:
            self.points[-1] = {**self.points[-1], "val_loss": self.val[1], "val_step": self.val[0]}
            self._write_curve()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step  # counts optimizer steps: with accumulation, several batches share one
        if step % self.every == 0:
            self._snapshot(trainer, module, step)

    def on_train_end(self, trainer, module) -> None:
        self._snapshot(trainer, module, trainer.global_step)

    # -- writing ------------------------------------------------------------------------------------
    def _snapshot(self, trainer, module, step: int) -> None:
        if not trainer.is_global_zero or step == 0 or any(p["step"] == step for p in self.points):
            return
        seconds = self.train_seconds()
        began = time.monotonic()
        self.save(module, self.folder / snapshot_name(step))
        self.points.append(self._point(trainer, module, step, seconds))
        self._write_curve()
        self.paused += time.monotonic() - began

    def _point(self, trainer, module, step: int, seconds: float) -> dict:
        previous = self.points[-1]["step"] if self.points else -1
        losses = [row["loss"] for row in module.losses if previous <= row["step"] < step]
        return {"step": step, "examples_seen": step * self.header["examples_per_step"],
                "train_seconds": round(seconds, 2),
                "train_loss": sum(losses) / len(losses) if losses else None,
                "val_loss": self.val[1] if self.val else None, "val_step": self.val[0] if self.val else None,
                "path": snapshot_name(step)}

    def _write_curve(self) -> None:
        write_json(self.folder / CURVE, {**self.header, "snapshots": self.points})

    def _drop_unlisted(self) -> None:
        """Step folders the points do not list: written by an interrupted run after its last checkpoint."""
        listed = {p["path"] for p in self.points}
        for folder in self.folder.glob("step-*"):
            if folder.name not in listed:
                shutil.rmtree(folder, ignore_errors=True)


def curve_header(cfg, fingerprint: str, train_examples: int) -> dict:
    """What every point of one run shares: the recipe and the training set's size (the callback adds the
    world size and the examples a step is worth once the trainer knows them)."""
    return {"fingerprint": fingerprint, "recipe": cfg.model_dump(), "train_examples": train_examples}
