"""The cost model against PHANTOM_MATH.md's worked example, and the phantom-plan CLI."""
import pytest

from phantom_plugin import cost
from phantom_plugin.plan import main as plan_main


def test_paper_example_ratios():
    n, p, k = 8192, 8, 64
    ph = cost.phantom_linear_cost(n, n, p=p, k=k, batch=1, bias=False)
    tp_macs, tp_params = n // p * n, n * n
    assert ph.macs_fwd / tp_macs == 0.1875
    assert ph.params / tp_params == 0.1875
    assert ph.macs_bwd == 2 * ph.macs_fwd
    assert sum(m.values for m in ph.messages if m.direction == "fwd") / n == 0.0625
    # ring all-gather of p*k values sends (p-1)*k per rank
    assert [m.bytes_sent for m in ph.messages] == [(p - 1) * k * 4] * 2


def test_p1_is_dense_and_silent():
    c = cost.phantom_linear_cost(64, 32, p=1, k=8, batch=3, bias=True)
    assert c.messages == () and c.macs_fwd == 3 * 64 * 32 and c.params == 64 * 32 + 32


def test_mlp_traffic_ratio_matches_the_formula():
    h, f, p, k, t = 4096, 16384, 8, 16, 10
    ph = cost.phantom_mlp_cost(h, f, p=p, k=k, tokens=t)
    tp = cost.tp_mlp_cost(h, f, p=p, tokens=t)
    values_ph = sum(m.values for m in ph.messages)
    values_tp = sum(m.values for m in tp.messages)
    # PHANTOM_MATH.md: (2h + 4pk) / (4h) of TP's traffic, counting an all-reduce as two all-gathers
    assert values_ph / (2 * values_tp) == pytest.approx((2 * h + 4 * p * k) / (4 * h))


def test_suggest_ghost_dim_respects_budgets():
    k = cost.suggest_ghost_dim(2048, 4, p=8, param_budget=0.25)
    assert cost.phantom_ffn_cost(2048, 4, p=8, k=k, batch=1).params <= 0.25 * cost.tp_ffn_cost(2048, 4, p=8, batch=1).params
    assert cost.phantom_ffn_cost(2048, 4, p=8, k=k + 1, batch=1).params > 0.25 * cost.tp_ffn_cost(2048, 4, p=8, batch=1).params
    with pytest.raises(ValueError, match="raise the budget"):
        cost.suggest_ghost_dim(2048, 4, p=2, param_budget=0.1)


def test_phantom_plan_cli(capsys):
    assert plan_main(["--width", "8192", "--depth", "2", "--ranks", "8", "--ghosts", "64", "--dtype", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "| parameters (whole group) |" in out and "phantom/TP" in out
    assert plan_main(["--width", "2048", "--depth", "4", "--ranks", "8", "--param-budget", "0.25"]) == 0
    assert "suggested --ghosts" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        plan_main(["--width", "100", "--depth", "2", "--ranks", "8", "--ghosts", "4"])
    assert "not divisible" in capsys.readouterr().err

