"""The step-time model's terms against the cost model, and ``phantom-plan --calibrate`` / ``--json``
end to end on 2 gloo ranks (tiny shapes)."""
import json

import pytest

from phantom_plugin import cost, plan, timing


def _gemm_macs(terms):
    return sum(t.macs * c for t, c in terms.items() if isinstance(t, timing.Gemm))


@pytest.mark.parametrize("p,k,depth", [(1, 0, 3), (2, 4, 4), (4, 3, 3), (3, 5, 2)])
def test_terms_cover_the_cost_model(p, k, depth):
    n, b = 24 * p, 5
    tp = timing.step_terms("tp", n, depth, p=p, batch=b)
    assert _gemm_macs(tp) == cost.tp_ffn_cost(n, depth, p=p, batch=b).macs   # megatron computes every dX
    ph_cost = cost.phantom_ffn_cost(n, depth, p=p, k=k, batch=b)
    ph = timing.step_terms("phantom", n, depth, p=p, batch=b, k=k)
    m = n // p
    first_dx = b * (m * m + (k * m if p > 1 else 0))       # the first layer's input needs no grad
    assert _gemm_macs(ph) == ph_cost.macs - first_dx
    for terms, c in ((tp, cost.tp_ffn_cost(n, depth, p=p, batch=b)), (ph, ph_cost)):
        colls = [(t, cnt) for t, cnt in terms.items() if isinstance(t, timing.Collective)]
        assert sum(t.bytes_sent * cnt for t, cnt in colls) == c.bytes_sent
        assert sum(cnt for _, cnt in colls) == len(c.messages)
        assert [t.numel for t in terms if isinstance(t, timing.Optimizer)] == [c.params_per_rank]
    acts = sum(c for t, c in ph.items() if isinstance(t, timing.Pointwise) and t.kind == "act")
    assert acts == depth - 1
    with pytest.raises(ValueError, match="mode"):
        timing.step_terms("dp", n, depth, p=p, batch=b)


def test_predict_sums_terms_by_kind():
    terms = timing.step_terms("phantom", 16, 2, p=2, batch=3, k=2)
    secs = {t: 1e-3 for t in terms}
    out = timing.predict(terms, secs)
    assert out["step_time_s"] == pytest.approx(1e-3 * sum(terms.values()))
    assert set(out["parts_s"]) == {"gemm", "pointwise", "optimizer", "collective", "framework"}


def test_plan_calibrate_json(capsys):
    assert plan.main(["--width", "64", "--depth", "3", "--ranks", "2", "--ghosts", "4", "--batch", "8",
                      "--calibrate", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    t = doc["predicted_step_time_s"]
    assert t["tp"] > 0 and t["phantom"] > 0 and doc["ratio"] == pytest.approx(t["phantom"] / t["tp"])
    for mode in ("tp", "phantom"):
        assert sum(doc["parts_s"][mode].values()) == pytest.approx(t[mode])
        assert doc["parts_s"][mode]["collective"] > 0 and doc["parts_s"][mode]["framework"] >= 0
    assert doc["link"]["latency_s"] > 0 and doc["link"]["bandwidth_bytes_per_s"] > 0
    assert doc["modeled"]["phantom"]["params"] == cost.phantom_ffn_cost(64, 3, p=2, k=4, batch=8).params


def test_plan_json_without_calibration_and_table(capsys):
    assert plan.main(["--width", "64", "--depth", "2", "--ranks", "2", "--ghosts", "4", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert "predicted_step_time_s" not in doc and doc["modeled"]["tp"]["collectives"] == 2
    assert plan.main(["--width", "64", "--depth", "2", "--ranks", "2", "--ghosts", "4", "--batch", "4",
                      "--calibrate"]) == 0
    out = capsys.readouterr().out
    assert "predicted step time (calibrated here)" in out and "not overlapped" in out
