"""Tokenised examples, left padding with answer-only labels, and the bucketed sampler."""

from transformers import AutoTokenizer

from lingtune.formats import Entity, Record
from lingtune.train.loader import IGNORE, BucketBatchSampler, SFTDataset, collate_left_padded, encode_example

SENT = Record(text="这本书很好看，推荐！", label="positive")
NER = Record(text="江泽民在北京", entities=(Entity(start=0, end=3, type="PER", text="江泽民"),
                                             Entity(start=4, end=6, type="LOC", text="北京")))


def test_only_the_answer_and_end_of_turn_carry_labels(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    encoded = encode_example(tokenizer, SENT)
    answer = [t for t, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE]
    assert tokenizer.decode(answer) == '{"label": "positive"}<end_of_turn>'
    prompt = encoded.input_ids[: len(encoded.input_ids) - len(answer)]
    assert prompt[0] == tokenizer.bos_token_id
    assert tokenizer.decode(prompt).endswith("<start_of_turn>model\n")


def test_left_padding_puts_every_answer_at_the_end(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    a, b = encode_example(tokenizer, SENT), encode_example(tokenizer, NER)
    batch = collate_left_padded([a, b], tokenizer.pad_token_id)
    width = batch["input_ids"].shape[1]
    assert width == max(len(a.input_ids), len(b.input_ids))
    for row, example in enumerate((a, b)):
        n = len(example.input_ids)
        assert batch["input_ids"][row, width - n :].tolist() == example.input_ids
        assert batch["attention_mask"][row].sum() == n
        assert batch["position_ids"][row, -1] == n - 1 and batch["position_ids"][row, width - n] == 0
    longest_answer = max(sum(label != IGNORE for label in e.labels) for e in (a, b))
    assert int(batch["answer_span"]) == longest_answer + 1


def test_too_long_examples_are_dropped_and_counted(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    longest = max(len(encode_example(tokenizer, r).input_ids) for r in (SENT, NER))
    dataset = SFTDataset(tokenizer, [SENT, NER, Record(text="很" * 400, label="positive")], max_len=longest)
    assert len(dataset) == 2 and dataset.dropped == 1


def test_sampler_is_seeded_bucketed_and_sharded():
    lengths = [((i * 37) % 101) + 1 for i in range(103)]
    sampler = BucketBatchSampler(lengths, batch_size=4, seed=3, bucket_batches=5)
    first = list(sampler)
    assert first == list(BucketBatchSampler(lengths, batch_size=4, seed=3, bucket_batches=5))
    sampler.set_epoch(1)
    assert list(sampler) != first
    def spread(batches):  # mean (longest - shortest) in a batch: the padding a batch carries
        return sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)

    unbucketed = BucketBatchSampler(lengths, batch_size=4, seed=3, bucket_batches=1)
    assert spread(first) < spread(list(unbucketed)) / 2
    ranks = [list(BucketBatchSampler(lengths, 4, 3, rank=r, world_size=2, bucket_batches=5)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(BucketBatchSampler(lengths, 4, 3, rank=0, world_size=2))
    seen = [i for rank in ranks for batch in rank for i in batch]
    assert len(seen) == len(set(seen))
