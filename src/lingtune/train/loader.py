"""Tokenised SFT examples and seeded, resumable, length-bucketed batches.

* An example is the chat template's prompt (user turn + generation prompt) followed by the
  answer and the end-of-turn text; only answer tokens carry labels (prompt labels are -100).
* Batches are LEFT-padded so every answer ends at the last position: the model then computes
  logits for the last `answer_span` positions only (`logits_to_keep`), which halves a step on a
  262k-token vocabulary.
* `BucketBatchSampler` shuffles with `seed + epoch`, groups examples of similar length (little
  padding), shards batches across DDP ranks, and is deterministic, so torchdata's
  `StatefulDataLoader` can resume mid-epoch on exactly the next batch.
"""

from __future__ import annotations

import random

import torch
from torch.utils.data import Dataset, Sampler

from lingtune.errors import DataError
from lingtune.records import Record
from lingtune.tasks.base import IGNORE, Encoded, encode_example


class SFTDataset(Dataset):
    """Encoded records; those longer than `max_len` tokens are dropped and counted."""

    def __init__(self, tokenizer, records: list[Record], max_len: int):
        encoded = [encode_example(tokenizer, r) for r in records]
        self.items = [e for e in encoded if len(e.input_ids) <= max_len]
        self.dropped = len(encoded) - len(self.items)
        if not self.items:
            raise DataError(f"no example fits in sft.max_seq_len={max_len} tokens")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Encoded:
        return self.items[index]

    def lengths(self) -> list[int]:
        return [len(e.input_ids) for e in self.items]


class BucketBatchSampler(Sampler[list[int]]):
    """Seeded batches of similar-length examples, sharded by rank (every rank: same count)."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, bucket_batches: int = 50):
        self.lengths, self.batch_size, self.seed = lengths, batch_size, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.bucket = batch_size * bucket_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        order = list(range(len(self.lengths)))
        rng = random.Random(self.seed + self.epoch)
        if self.shuffle:
            rng.shuffle(order)
        batches = []
        for start in range(0, len(order), self.bucket):
            chunk = sorted(order[start : start + self.bucket], key=self.lengths.__getitem__)
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        if self.shuffle:
            rng.shuffle(batches)
        usable = len(batches) - len(batches) % self.world_size
        return batches[:usable]

    def __iter__(self):
        return iter(self._batches()[self.rank :: self.world_size])

    def __len__(self) -> int:
        return len(self._batches()) // self.world_size


def collate_left_padded(batch: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, example in enumerate(batch):
        n = len(example.input_ids)
        ids[row, width - n :] = torch.tensor(example.input_ids)
        labels[row, width - n :] = torch.tensor(example.labels)
        mask[row, width - n :] = 1
    first_label = (labels != IGNORE).float().argmax(dim=1)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": (mask.cumsum(dim=1) - 1).clamp(min=0),
        "labels": labels,
        # positions needed for the loss: from the token before the first answer token to the end
        "answer_span": torch.tensor(int(width - first_label.min().item()) + 1),
    }
