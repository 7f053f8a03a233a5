"""CPU cost of the RL stage's pieces on the real SFT adapter: sampling (the consistency check and the
reward stage) and one RLOO step (generation, old/reference log-probs, the update).

CPU seconds (`time.process_time`) are reported next to wall seconds: on a busy machine the wall time
says little, the CPU time still sizes a run (a 2-thread run on a quiet machine takes roughly the CPU
seconds of a 1-thread run divided by 1.6). Nothing is written outside a temporary folder; no MLflow.

Usage: python benchmarks/rl_step.py [--steps 2] [--threads 1] [--precision fp32|bf16] [--json]
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path


class Clock:
    def __enter__(self):
        self.cpu, self.wall = time.process_time(), time.time()
        return self

    def __exit__(self, *exc):
        self.cpu, self.wall = time.process_time() - self.cpu, time.time() - self.wall

    def row(self) -> dict:
        return {"cpu_s": round(self.cpu, 1), "wall_s": round(self.wall, 1)}


def step_clock():
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        rows: list = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.clock = Clock().__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            self.clock.__exit__()
            self.rows.append({"step": state.global_step, **self.clock.row()})

    return StepClock()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from lingtune.env import apply_offline_defaults

    apply_offline_defaults()
    import torch
    from transformers.integrations import MLflowCallback

    from lingtune.config import load_params
    from lingtune.judge import make_judge
    from lingtune.train.rl import build_trainer, prompt_dataset
    from lingtune.train.scoring import load_policy, policy_precision, prompt_set, sample_answers

    torch.set_num_threads(args.threads)
    params = load_params(args.params)
    rl = params.rl.model_copy(update={"max_steps": args.steps, "save_steps": 10_000,
                                      "precision": policy_precision(args.precision or params.rl.precision)})
    params = params.model_copy(update={"rl": rl})
    model, tokenizer = load_policy(rl.sft_dir, trainable=True, precision=rl.precision)
    records = prompt_set(Path(params.data.out_dir) / "val.jsonl", 1)  # one review, one sentence
    with Clock() as sampling:
        sample_answers(model, tokenizer, records, params.reward.samples, params.reward.temperature,
                       params.reward.max_new_tokens, params.seed)
    with tempfile.TemporaryDirectory() as out:
        trainer = build_trainer(params, model, tokenizer, prompt_dataset(Path(params.data.out_dir) / "train.jsonl",
                                rl.max_prompts, params.seed), make_judge(params.reward.judge), out)
        trainer.remove_callback(MLflowCallback)
        clock = step_clock()
        trainer.add_callback(clock)
        trainer.train()
    result = {"threads": args.threads, "precision": rl.precision,
              "completions_per_step": rl.prompts_per_step * rl.num_generations,
              "sampling_2_prompts": {"answers": 2 * params.reward.samples, **sampling.row()},
              "rl_steps": clock.rows, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"sampling {result['sampling_2_prompts']['answers']} answers: {sampling.cpu:.1f} CPU s ({sampling.wall:.1f} s wall)")
    for row in clock.rows:
        print(f"rl step {row['step']} ({result['completions_per_step']} completions, {rl.precision}): "
              f"{row['cpu_s']} CPU s ({row['wall_s']} s wall)")
    print(f"peak RSS {result['peak_rss_mb']} MB")


if __name__ == "__main__":
    main()
