"""The cost model against docs/concepts.md's worked example, and the phantom-plan CLI."""
import pytest

from phantom_plugin.modeling import counts
from phantom_plugin.cli.plan import main as plan_main

pytestmark = pytest.mark.fast


def test_paper_example_ratios():
    n, p, k = 8192, 8, 64
    ph = counts.phantom_linear_cost(n, n, p=p, k=k, batch=1, bias=False)
    tp_macs, tp_params = n // p * n, n * n
    assert ph.macs_fwd / tp_macs == 0.1875
    assert ph.params / tp_params == 0.1875
    assert ph.macs_bwd == 2 * ph.macs_fwd
    assert sum(m.values for m in ph.messages if m.direction == "fwd") / n == 0.0625
    # ring all-gather of p*k values sends (p-1)*k per rank
    assert [m.bytes_sent for m in ph.messages] == [(p - 1) * k * 4] * 2


def test_p1_is_dense_and_silent():
    c = counts.phantom_linear_cost(64, 32, p=1, k=8, batch=3, bias=True)
    assert c.messages == () and c.macs_fwd == 3 * 64 * 32 and c.params == 64 * 32 + 32


def test_mlp_traffic_ratio_matches_the_formula():
    h, f, p, k, t = 4096, 16384, 8, 16, 10
    ph = counts.phantom_mlp_cost(h, f, p=p, k=k, tokens=t)
    tp = counts.tp_mlp_cost(h, f, p=p, tokens=t)
    values_ph = sum(m.values for m in ph.messages)
    values_tp = sum(m.values for m in tp.messages)
    # docs/concepts.md: (2h + 4pk) / (4h) of TP's traffic, counting an all-reduce as two all-gathers
    assert values_ph / (2 * values_tp) == pytest.approx((2 * h + 4 * p * k) / (4 * h))


def test_suggest_ghost_dim_respects_budgets():
    k = counts.suggest_ghost_dim(2048, 4, p=8, param_budget=0.25)
    assert counts.phantom_ffn_cost(2048, 4, p=8, k=k, batch=1).params <= 0.25 * counts.tp_ffn_cost(2048, 4, p=8, batch=1).params
    assert counts.phantom_ffn_cost(2048, 4, p=8, k=k + 1, batch=1).params > 0.25 * counts.tp_ffn_cost(2048, 4, p=8, batch=1).params
    with pytest.raises(ValueError, match="raise the budget"):
        counts.suggest_ghost_dim(2048, 4, p=2, param_budget=0.1)
    # rounded down to a multiple when one fits (127 -> 120), the largest k otherwise
    assert counts.suggest_ghost_dim(2048, 4, p=4, param_budget=0.5) == 127
    assert counts.suggest_ghost_dim(2048, 4, p=4, param_budget=0.5, multiple_of=8) == 120
    small = counts.suggest_ghost_dim(64, 2, p=4, param_budget=0.4)
    assert small == 2 and counts.suggest_ghost_dim(64, 2, p=4, param_budget=0.4, multiple_of=8) == small


def test_phantom_plan_prints_the_cost_table(capsys):
    assert plan_main(["--width", "8192", "--depth", "2", "--ranks", "8", "--ghosts", "64", "--dtype", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "| parameters (whole group) |" in out and "phantom/TP" in out


def test_phantom_plan_suggests_ghosts_for_a_param_budget(capsys):
    assert plan_main(["--width", "2048", "--depth", "4", "--ranks", "8", "--param-budget", "0.25"]) == 0
    assert "suggested --ghosts" in capsys.readouterr().out


def test_phantom_plan_suggestion_is_a_multiple_of_8_and_names_the_largest_k(capsys):
    assert plan_main(["--width", "2048", "--depth", "4", "--ranks", "4", "--param-budget", "0.5"]) == 0
    assert "suggested --ghosts 120 (largest multiple of 8 within the budget; the largest k is 127" in \
        capsys.readouterr().out


def test_phantom_plan_width_not_divisible_by_ranks_exits(capsys):
    with pytest.raises(SystemExit):
        plan_main(["--width", "100", "--depth", "2", "--ranks", "8", "--ghosts", "4"])
    assert "not divisible" in capsys.readouterr().err


# (n/p)/8 and (n/p)/4, placed against the k in use
@pytest.mark.parametrize("width, ranks, ghosts, want", [
    (1024, 2, 32, "below"), (1024, 2, 64, "inside"), (1024, 2, 128, "inside"), (1024, 2, 256, "above"),
    (8192, 8, 200, "inside"), (16, 2, 1, "inside")])
def test_time_to_loss_hint_range_and_placement(width, ranks, ghosts, want):
    from phantom_plugin.cli.plan import k_time_to_loss_hint
    hint = k_time_to_loss_hint(width, ranks, ghosts)
    local = width // ranks
    assert (hint["early_loss"], hint["later_loss"]) == (max(1, local // 8), max(1, local // 4))
    assert hint["ghosts_vs_hint"] == want and "one task" in hint["basis"]


def test_phantom_plan_json_carries_the_hint(capsys):
    import json
    assert plan_main(["--width", "2048", "--depth", "4", "--ranks", "2", "--param-budget", "0.625", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["k_time_to_loss_hint"]["early_loss"] == 128 and doc["k_time_to_loss_hint"]["later_loss"] == 256
    assert doc["k_time_to_loss_hint"]["ghosts_vs_hint"] == ("inside" if 128 <= doc["ghosts"] <= 256 else "below")


def test_phantom_plan_table_places_k_against_the_hint(capsys):
    assert plan_main(["--width", "2048", "--depth", "4", "--ranks", "2", "--ghosts", "512"]) == 0
    out = capsys.readouterr().out
    assert "rule of thumb from one task" in out and "(n/p)/8 = 128" in out and "k=512 is above that range" in out


def test_phantom_plan_has_no_hint_without_phantom(capsys):
    import json
    assert plan_main(["--width", "64", "--depth", "2", "--ranks", "1", "--ghosts", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["k_time_to_loss_hint"] is None    # no phantom at p = 1
