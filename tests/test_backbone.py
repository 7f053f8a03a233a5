"""The backbone stage: local folders (tiny model), the shipped GGUFs (slow), and bad names."""

import json

import pytest

from lingtune.backbone import GEMMA_CHAT_TEMPLATE, BackboneError, build_backbone
from lingtune.config import BackboneConfig


def test_local_folder_is_copied_and_verified(tiny_model_dir, tmp_path):
    card = build_backbone(BackboneConfig(name=str(tiny_model_dir), out_dir=str(tmp_path / "bb"), dtype="float32",
                                         verify_tokens=5))
    assert card.greedy_matches_source is True and card.parameters > 0
    saved = json.loads((tmp_path / "bb" / "lingtune_backbone.json").read_text())
    assert saved["source"] == str(tiny_model_dir) and saved["greedy_text"] == card.greedy_text
    assert (tmp_path / "bb" / "model.safetensors").is_file()
    assert not (tmp_path / "bb.partial").exists()


def test_weights_that_fail_verification_never_replace_the_backbone(tiny_model_dir, tmp_path, monkeypatch):
    """A conversion that saves wrong weights (here: noise written over the saved tensors) fails the
    greedy check in its staging folder; the backbone already in `out_dir` stays, byte for byte."""
    import torch
    from safetensors.torch import load_file, save_file

    from lingtune import backbone
    from lingtune.artifacts import content_hash

    cfg = BackboneConfig(name=str(tiny_model_dir), out_dir=str(tmp_path / "bb"), dtype="float32", verify_tokens=5)
    build_backbone(cfg)
    before = content_hash(tmp_path / "bb")
    real_load, loads = backbone.load_hf, []

    def load_with_corrupting_save(name, dtype):
        model, tokenizer = real_load(name, dtype)
        loads.append(name)
        if len(loads) == 1:  # the source; the second load is the verification of the saved folder
            save = model.save_pretrained

            def corrupting_save(folder, **kwargs):
                save(folder, **kwargs)
                weights = f"{folder}/model.safetensors"
                torch.manual_seed(0)
                save_file({k: torch.randn_like(v) for k, v in load_file(weights).items()}, weights, {"format": "pt"})

            model.save_pretrained = corrupting_save
        return model, tokenizer

    monkeypatch.setattr(backbone, "load_hf", load_with_corrupting_save)
    with pytest.raises(BackboneError, match="the converted model generates"):
        build_backbone(cfg)
    assert len(loads) == 2 and content_hash(tmp_path / "bb") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bb"]  # no staging folder left behind


def test_unknown_backbone_is_a_clear_error(tmp_path):
    with pytest.raises(BackboneError, match="neither a shipped backbone"):
        build_backbone(BackboneConfig(name=str(tmp_path / "no-such-model"), out_dir=str(tmp_path / "bb")))
    assert not (tmp_path / "bb").exists()


def test_gemma_turn_template_folds_system_into_the_user_turn(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "问题"},
                {"role": "assistant", "content": "答案"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<bos><start_of_turn>user\nS\n\n问题<end_of_turn>\n<start_of_turn>model\n答案<end_of_turn>\n")
    assert tokenizer.apply_chat_template(messages[1:2], tokenize=False, add_generation_prompt=True).endswith(
        "<end_of_turn>\n<start_of_turn>model\n")


@pytest.mark.slow
def test_gemma_gguf_converts_and_matches_its_source(tmp_path):
    from transformers import AutoTokenizer, GenerationConfig

    out = tmp_path / "gemma"
    card = build_backbone(BackboneConfig(name="gemma3-270m", out_dir=str(out)))
    assert card.greedy_matches_source is True
    assert card.source_sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert 260e6 < card.parameters < 280e6
    assert "The The The" not in card.greedy_text  # the degenerate output of a tokenizer without BOS
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer("你好")["input_ids"][0] == tokenizer.bos_token_id
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "你好"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt == "<bos><start_of_turn>user\n你好<end_of_turn>\n<start_of_turn>model\n"
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert end_of_turn in GenerationConfig.from_pretrained(out).eos_token_id
    text = "中共中央总书记、国家主席江泽民发表1998年新年讲话"
    per_char = len(tokenizer(text, add_special_tokens=False)["input_ids"]) / len(text)
    assert per_char < 1.0  # Gemma's vocabulary covers Chinese well (SmolLM2 needs ~2 tokens per character)
