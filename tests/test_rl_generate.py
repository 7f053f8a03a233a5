"""benchmarks/rl_generate.py: per-token generation time of the RL policy (tiny backbone and adapter), each row
the same number of tokens, and a breakdown that sorts the profiled ops into head, sampling and the rest."""

import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import rl_generate  # noqa: E402


@pytest.mark.parametrize("name, shapes, kind", [
    ("aten::exponential_", [[8, 300]], "sampling"), ("aten::multinomial", [[8, 300]], "sampling"),
    ("aten::mm", [[8, 64], [64, 300]], "lm_head"), ("aten::bmm", [[8, 1, 64], [8, 64, 300]], "lm_head"),
    ("aten::copy_", [[8, 64, 300], [8, 64, 300]], "lm_head"), ("aten::mm", [[8, 64], [64, 128]], "layers and loop"),
    ("aten::where", [[300], [], [8, 300]], "layers and loop"),
])
def test_ops_are_sorted_into_kinds(name, shapes, kind):
    assert rl_generate.kind_of(name, shapes, vocab=300) == kind


@pytest.fixture(scope="module")
def tiny_adapter(tiny_model_dir, tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    out = tmp_path_factory.mktemp("rl-generate-adapter")
    model.save_pretrained(out)
    return out


def test_every_row_generates_the_same_tokens_and_the_breakdown_adds_up(tiny_adapter):
    from lingtune.config import Params

    params = Params()
    result = rl_generate.measure(params, tiny_adapter, ROOT / "tests" / "data" / "train.jsonl", tokens=3, trials=1)
    assert set(result["rows"]) == set(rl_generate.ROWS)
    assert all(row["ms_per_token"] > 0 for row in result["rows"].values())
    assert result["sequences"] == params.rl.prompts_per_step * params.rl.num_generations
    kinds = result["breakdown"]["kinds"]
    assert {"sampling", "lm_head"} <= set(kinds) <= {"sampling", "lm_head", "layers and loop"}
    assert sum(k["share"] for k in kinds.values()) == pytest.approx(1.0, abs=0.01)
    assert set(result["contiguous_head_speedup"]) == {"fp32", "bf16"}
