"""The cost metrics every training, reward and evaluation run logs: machine-hours at the CPU or GPU
price of params `cost`, plus the judge's API cost. The stages' own tests check their runs carry them."""

import pytest

from lingtune.config import ConfigError, CostConfig, parse_params
from lingtune.tracking import run_cost

PRICES = CostConfig(usd_per_cpu_hour=0.2, usd_per_gpu_hour=3.0)


def test_without_a_gpu_hours_are_at_the_cpu_price():
    assert run_cost(PRICES, 1800) == {"compute_hours": 0.5, "cost_usd": 0.1}


def test_each_gpu_in_use_is_paid_and_the_judge_is_added():
    assert run_cost(PRICES, 3600, gpus=1) == {"compute_hours": 1.0, "cost_usd": 3.0}
    assert run_cost(PRICES, 3600, gpus=2, judge_usd=0.25)["cost_usd"] == pytest.approx(6.25)
    assert run_cost(PRICES, 0.0, judge_usd=0.01) == {"compute_hours": 0.0, "cost_usd": 0.01}


def test_cost_equals_the_logged_hours_times_the_price():
    """Rounded hours x price: a reader recomputing cost_usd from compute_hours gets the same number."""
    out = run_cost(PRICES, 12.345, gpus=1)
    assert out["compute_hours"] > 0 and out["cost_usd"] == pytest.approx(out["compute_hours"] * 3.0, abs=1e-6)


def test_prices_are_not_negative():
    with pytest.raises(ConfigError, match="cost.usd_per_gpu_hour"):
        parse_params({"cost": {"usd_per_gpu_hour": -1}})
