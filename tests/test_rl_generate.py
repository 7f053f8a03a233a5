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
    ("aten::searchsorted", [[8, 300], [8, 1]], "sampling"), ("aten::copy_", [[8, 300], [8, 300]], "sampling"),
    ("aten::mm", [[8, 64], [64, 128]], "layers and loop"), ("aten::where", [[8, 64], [], [8, 64]], "layers and loop"),
])
def test_ops_are_sorted_into_kinds(name, shapes, kind):
    assert rl_generate.kind_of(name, shapes, vocab=300) == kind


def test_every_row_generates_the_same_tokens_and_the_breakdown_adds_up(tiny_sft):
    from lingtune.config import Params

    params = Params()
    result = rl_generate.measure(params, tiny_sft, ROOT / "tests" / "data" / "train.jsonl", tokens=3, trials=1)
    assert set(result["rows"]) == set(rl_generate.ROWS)
    assert all(row["ms_per_token"] > 0 for row in result["rows"].values())
    assert result["sequences"] == params.rl.prompts_per_step * params.rl.num_generations
    kinds = result["breakdown"]["kinds"]
    assert {"sampling", "lm_head"} <= set(kinds) <= {"sampling", "lm_head", "layers and loop"}
    assert sum(k["share"] for k in kinds.values()) == pytest.approx(1.0, abs=0.01)
    assert set(result["contiguous_head_speedup"]) == set(result["inverse_cdf_speedup"]) == {"fp32", "bf16"}
    assert result["speedup_vs_before"] > 0
