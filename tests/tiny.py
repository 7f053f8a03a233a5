"""A tiny causal LM built from a config: 2-layer, 64-wide Llama, character-level tokenizer, Gemma's turn
template. Seconds to build and to train; used wherever a test needs a model and the real
backbone would only make it slower. Run as a script to write one: `python tests/tiny.py DIR`."""

from __future__ import annotations

import sys
from pathlib import Path

CORPUS = [
    "江泽民在北京会见新华社记者。李鹏朱镕基上海广州国务院外交部中国人民银行", "这本书很好看，推荐！质量太差了，不推荐。",
    '{"label": "positive"}', '{"label": "negative"}', '{"entities": [{"text": "北京", "type": "LOC"}]}',
    "任务：情感分类 命名实体识别 判断这条评论的情感倾向。只输出 JSON 文本 PER LOC ORG",
    "按出现顺序找出文本中的人名(PER)、地名(LOC)和机构名(ORG)。没有实体时输出 或 原文",
    "0123456789abcdefghijklmnopqrstuvwxyz ,.!?:;[]{}\"'\n",
]
DATA = Path(__file__).parent / "data" / "train.jsonl"  # a slice of the prepared data: its characters


def build_tiny_model(out: Path, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from lingtune.backbone import GEMMA_CHAT_TEMPLATE

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    raw.decoder = decoders.Fuse()
    corpus = CORPUS + (DATA.read_text(encoding="utf-8").splitlines() if DATA.is_file() else [])
    raw.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=3000, special_tokens=specials))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        add_bos_token=True,
    )
    tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,  # bnb nf4 needs widths of 64+
        num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


if __name__ == "__main__":
    print(build_tiny_model(Path(sys.argv[1])))
