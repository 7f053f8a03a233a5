"""Shared fixtures: the project root, small configs, and a tiny model built from a config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lingtune.env import apply_offline_defaults

apply_offline_defaults()

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write((row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama with a character-level tokenizer and Gemma's turn template, saved as a
    normal Hugging Face folder. Built from a config in seconds; used wherever a test needs a
    model and the real backbone would only make it slower."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from lingtune.backbone import GEMMA_CHAT_TEMPLATE

    out = tmp_path_factory.mktemp("tiny-model")
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    corpus = ["江泽民在北京会见新华社记者。", "这本书很好看，推荐！", '{"label": "positive"}',
              '{"entities": [{"text": "北京", "type": "LOC"}]}', "任务：情感分类 命名实体识别 文本 negative PER ORG"]
    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    raw.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=specials))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        add_bos_token=True,
    )
    tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
