"""The step-time model's terms against the cost model, and ``phantom-plan --calibrate`` / ``--json``
end to end on 2 gloo ranks (tiny shapes)."""
import collections
import json
import math

import pytest

from phantom_plugin.cli import plan
from phantom_plugin.modeling import counts, step_model


def _gemm_macs(terms):
    return sum(t.macs * c for t, c in terms.items() if isinstance(t, step_model.Gemm))


@pytest.mark.fast
@pytest.mark.parametrize("p,k,depth", [(1, 0, 3), (2, 4, 4), (4, 3, 3), (3, 5, 2)])
def test_terms_cover_the_cost_model(p, k, depth):
    n, b = 24 * p, 5
    tp = step_model.step_terms("tp", n, depth, p=p, batch=b)
    assert _gemm_macs(tp) == counts.tp_ffn_cost(n, depth, p=p, batch=b).macs   # megatron computes every dX
    ph_cost = counts.phantom_ffn_cost(n, depth, p=p, k=k, batch=b)
    ph = step_model.step_terms("phantom", n, depth, p=p, batch=b, k=k)
    m = n // p
    first_dx = b * (m * m + (k * m if p > 1 else 0))       # the first layer's input needs no grad
    assert _gemm_macs(ph) == ph_cost.macs - first_dx
    for terms, c in ((tp, counts.tp_ffn_cost(n, depth, p=p, batch=b)), (ph, ph_cost)):
        colls = [(t, cnt) for t, cnt in terms.items() if isinstance(t, step_model.Collective)]
        assert sum(t.bytes_sent * cnt for t, cnt in colls) == c.bytes_sent
        assert sum(cnt for _, cnt in colls) == len(c.messages)
        assert [t.numel for t in terms if isinstance(t, step_model.Optimizer)] == [c.params_per_rank]
    acts = sum(c for t, c in ph.items() if isinstance(t, step_model.Pointwise) and t.kind == "act")
    assert acts == depth - 1
    with pytest.raises(ValueError, match="mode"):
        step_model.step_terms("dp", n, depth, p=p, batch=b)


@pytest.mark.fast
def test_predict_sums_terms_by_kind():
    terms = step_model.step_terms("phantom", 16, 2, p=2, batch=3, k=2)
    secs = {t: 1e-3 for t in terms}
    out = step_model.predict(terms, secs)
    assert out["step_time_s"] == pytest.approx(1e-3 * sum(terms.values()))
    assert set(out["parts_s"]) == {"gemm", "pointwise", "optimizer", "collective", "wait", "framework"}
    # the GEMMs as one chain: every occurrence of every shape, and its time replaces their sum
    chain = step_model.gemm_chain(terms)
    assert len(chain) == sum(c for t, c in terms.items() if isinstance(t, step_model.Gemm)) > len(
        {t for t in terms if isinstance(t, step_model.Gemm)})
    chained = step_model.predict(terms, secs, gemm_chain_s=0.5)
    assert chained["parts_s"]["gemm"] == 0.5
    no_gemms = {t: s for t, s in secs.items() if not isinstance(t, step_model.Gemm)}    # the chain stands for them
    assert step_model.predict(terms, no_gemms, gemm_chain_s=0.5) == chained
    assert chained["step_time_s"] == pytest.approx(out["step_time_s"] - out["parts_s"]["gemm"] + 0.5)


def test_plan_calibrate_json(capsys):
    assert plan.main(["--width", "64", "--depth", "3", "--ranks", "2", "--ghosts", "4", "--batch", "8",
                      "--calibrate", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    t = doc["predicted_step_time_s"]
    assert t["tp"] > 0 and t["phantom"] > 0 and doc["ratio"] == pytest.approx(t["phantom"] / t["tp"])
    for mode in ("tp", "phantom"):
        assert sum(doc["parts_s"][mode].values()) == pytest.approx(t[mode])
        assert doc["parts_s"][mode]["collective"] > 0
        # residuals of measured times: finite, of either sign (a tiny step can beat its terms' sum)
        assert math.isfinite(doc["parts_s"][mode]["framework"]) and math.isfinite(doc["parts_s"][mode]["wait"])
    assert doc["link"]["latency_s"] > 0 and doc["link"]["bandwidth_bytes_per_s"] > 0
    assert set(doc["link"]["fits"]) == {"all_gather", "reduce_scatter", "all_reduce"}
    assert doc["modeled"]["phantom"]["params"] == counts.phantom_ffn_cost(64, 3, p=2, k=4, batch=8).params


def test_calibrate_oversubscribed_leaves_waits_out():
    """More ranks x threads than usable cores: the waits are neither measured nor added, and the
    note says so (a rank blocked in a collective lends its core to another rank's compute)."""
    import os
    cores = len(os.sched_getaffinity(0))
    pred = plan.calibrated_prediction(64, 2, 2, 4, 8, "fp32", threads=cores)
    assert pred["oversubscribed"] and pred["cores"] == cores
    for mode in ("tp", "phantom"):
        assert pred["parts_s"][mode]["wait"] == 0.0
        assert pred["parts_s"][mode]["gemm"] > 0 and pred["parts_s"][mode]["collective"] > 0
    assert "wait not added" in plan._calibration_note(pred, 2)


def test_plan_json_without_calibration_and_table(capsys):
    assert plan.main(["--width", "64", "--depth", "2", "--ranks", "2", "--ghosts", "4", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert "predicted_step_time_s" not in doc and doc["modeled"]["tp"]["collectives"] == 2
    assert plan.main(["--width", "64", "--depth", "2", "--ranks", "2", "--ghosts", "4", "--batch", "4",
                      "--calibrate"]) == 0
    out = capsys.readouterr().out
    assert "predicted step time (calibrated here)" in out and "step-like rounds" in out


@pytest.mark.fast
def test_edge_and_bias_add_terms():
    n, b, p = 48, 5, 3
    ph = step_model.step_terms("phantom", n, 3, p=p, batch=b, k=2)
    copies = {t: c for t, c in ph.items() if isinstance(t, step_model.Pointwise) and t.kind == "copy"}
    assert copies == {step_model.Pointwise("copy", b, n // p): 1, step_model.Pointwise("copy", b, n): 1}
    assert not any(isinstance(t, step_model.Pointwise) and t.kind == "copy"
                   for t in step_model.step_terms("phantom", n, 3, p=1, batch=b))
    for depth in (2, 3):
        tp = step_model.step_terms("tp", n, depth, p=p, batch=b)
        adds = sum(c for t, c in tp.items() if isinstance(t, step_model.Pointwise) and t.kind == "bias_add")
        assert adds == depth                       # megatron adds each layer's bias in a pass of its own
        gathered = tp.get(step_model.Pointwise("copy", b, n), 0)
        assert gathered == depth % 2               # an odd last layer's output is gathered and concatenated


@pytest.mark.fast
@pytest.mark.parametrize("mode,p,k,depth", [("tp", 2, 0, 4), ("phantom", 2, 8, 4), ("phantom", 4, 3, 3),
                                             ("tp", 3, 0, 1)])
def test_wait_terms(mode, p, k, depth):
    """One Wait per collective, naming it and the GEMMs that run while it is in flight; its compute
    is the step's GEMM MACs split evenly between the collectives."""
    n, b = 48 * p, 16
    terms = step_model.step_terms(mode, n, depth, p=p, batch=b, k=k)
    waits = {t: c for t, c in terms.items() if isinstance(t, step_model.Wait)}
    colls = {t: c for t, c in terms.items() if isinstance(t, step_model.Collective)}
    per_coll = collections.Counter()
    for w, c in waits.items():
        per_coll[w.coll] += c
    assert per_coll == colls
    assert all(g in terms for w in waits for g in w.overlap)
    # async in the code: phantom's ghost all-gather and reduce-scatter (every layer), megatron's dX
    # all-reduce (every column layer); the rest (output all-reduce, edge gathers) synchronous
    hidden = sum(c for w, c in waits.items() if w.overlap)
    assert hidden == {"tp": (depth + 1) // 2, "phantom": 2 * depth}[mode]
    assert len({(w.gemm, w.calls) for w in waits}) == 1
    w = next(iter(waits))
    assert w.gemm in terms and w.p == p
    per_segment = _gemm_macs(terms) / sum(colls.values())
    assert abs(w.calls * w.gemm.macs - per_segment) <= w.gemm.macs / 2 or w.calls == 1
    assert not any(isinstance(t, step_model.Wait) for t in step_model.step_terms(mode, n, depth, p=1, batch=b, k=k))


def _noisy(alpha, beta, sizes, reps, rng, outliers=0.2):
    out = []
    for x in sizes:
        for _ in range(reps):
            t = (alpha + beta * x) * rng.uniform(0.95, 1.05)
            out.append((x, t * (rng.uniform(3, 10) if rng.random() < outliers else 1.0)))
    return out


@pytest.mark.fast
@pytest.mark.parametrize("alpha,beta", [(3e-4, 2e-9), (7e-4, 5e-10), (5e-5, 1e-8)])
def test_fit_alpha_beta_recovers_known_parameters(alpha, beta):
    import random
    rng = random.Random(0)
    sizes = [8, 100, 1_000, 10_000, 100_000, 1_000_000, 4_000_000]
    a, b = step_model.fit_alpha_beta(_noisy(alpha, beta, sizes, 15, rng))
    assert a == pytest.approx(alpha, rel=0.1) and b == pytest.approx(beta, rel=0.1)
    exact = [(x, alpha + beta * x) for x in sizes]
    assert step_model.fit_alpha_beta(exact) == pytest.approx((alpha, beta), rel=1e-9)


@pytest.mark.fast
def test_fit_alpha_beta_bounds_and_errors():
    flat = [(x, t) for x in (10, 100, 1000) for t in (1e-3, 1e-3, 5e-3)]    # no slope: alpha only
    assert step_model.fit_alpha_beta(flat) == pytest.approx((1e-3, 0.0))
    a, b = step_model.fit_alpha_beta([(x, 1e-9 * x) for x in (1e3, 1e4, 1e5)])   # through the origin
    assert a == pytest.approx(0.0, abs=1e-15) and b == pytest.approx(1e-9)
    a, b = step_model.fit_alpha_beta([(1e3, 2e-3), (1e4, 1e-3), (1e5, 5e-4)])    # falling: flat, not negative
    assert b == 0.0 and a > 0
    with pytest.raises(ValueError, match="two or more sizes"):
        step_model.fit_alpha_beta([(64, 1e-3), (64, 2e-3)])
    fit = step_model.LinkFit("all_gather", 2, 1e-4, 1e-9)
    assert fit.seconds(1000) == pytest.approx(1e-4 + 1e-6) and fit.bandwidth_bytes_per_s == pytest.approx(1e9)


@pytest.mark.fast
@pytest.mark.parametrize("largest,p", [(262144, 2), (8, 2), (3 * 1000, 3), (4, 4)])
def test_ladder(largest, p):
    sizes = step_model.ladder(largest, p)
    assert sizes == sorted(set(sizes)) and all(v % p == 0 for v in sizes)
    assert sizes[0] == p and sizes[-1] == -(-largest // p) * p and len(sizes) <= 7


def _fit_rank(rank, world_size, colls):
    import torch
    import torch.distributed as dist
    from phantom_plugin.bench.calibrate import _fit_links
    fits = _fit_links(colls, torch.float32, torch.device("cpu"), dist.group.WORLD, 3)
    return {op: (f.alpha_s, f.beta_s_per_byte, nb, md) for op, (f, nb, md) in fits.items()}


@pytest.mark.parametrize("p", [2, 3])
def test_link_fits_on_gloo_ranks(p):
    """Every op of the plan gets a fit from the sizes of its ladder and of the plan, the same on
    every rank (each size's median is the slowest rank's), and the fit is what fit_alpha_beta
    makes of those medians."""
    from dist_utils import run_ranks
    colls = [step_model.Collective("all_gather", 40 * p, p, 0), step_model.Collective("all_gather", 3 * p, p, 0),
             step_model.Collective("reduce_scatter", 16 * p, p, 0), step_model.Collective("all_reduce", 64 * p, p, 0)]
    out = run_ranks(_fit_rank, p, colls)
    assert all(o == out[0] for o in out)
    fits = out[0]
    assert set(fits) == {"all_gather", "reduce_scatter", "all_reduce"}
    for op, (alpha, beta, nbytes, med) in fits.items():
        values = set(step_model.ladder(max(c.values for c in colls if c.op == op), p)) | \
            {c.values for c in colls if c.op == op}
        chunks = 2 * (p - 1) if op == "all_reduce" else p - 1
        assert nbytes == [v * 4 // p * chunks for v in sorted(values)]
        assert len(med) == len(nbytes) and all(m > 0 for m in med)
        assert (alpha, beta) == pytest.approx(step_model.fit_alpha_beta(zip(nbytes, med)))


def _wait_rank(rank, world_size, waits, alpha):
    import torch
    import torch.distributed as dist
    from phantom_plugin.bench.calibrate import _wait_time
    fits = {w.coll.op: step_model.LinkFit(w.coll.op, world_size, alpha, 0.0) for w in waits}
    return [_wait_time(w, torch.float32, torch.device("cpu"), dist.group.WORLD, 3, fits) for w in waits]


def test_wait_time_on_gloo_ranks():
    """A Wait is measured on real ranks, with and without GEMMs hiding the collective, the same on
    every rank, and is the collective's in-step time less its fit: a round with a real collective
    takes longer than its GEMMs, so with a zero fit the wait is positive, and a fit of 10 s (far
    above any in-step time) leaves it negative."""
    from dist_utils import run_ranks
    g = step_model.Gemm(16, 32, 16)
    waits = [step_model.Wait(g, 2, step_model.Collective("all_gather", 64, 2, 128)),
             step_model.Wait(g, 1, step_model.Collective("reduce_scatter", 64, 2, 128), (g, g)),
             step_model.Wait(g, 1, step_model.Collective("all_reduce", 4096, 2, 16384), (g,))]
    for alpha, sign in ((0.0, 1), (10.0, -1)):
        out = run_ranks(_wait_rank, 2, waits, alpha)
        assert out[0] == out[1]
        assert all(sign * w > 0 for w in out[0]), out[0]


FN_S = 2.0 ** -10           # what one timed call takes on the fake clock below (exact in binary)


def _after_rank(rank, world_size):
    import types
    import torch
    import torch.distributed as dist
    from phantom_plugin.bench import calibrate
    calls, now = [], [0.0]

    def perf_counter():                # a fake clock: it moves only in before() and fn(); reads are logged
        calls.append("clock")
        return now[0]
    calibrate.time = types.SimpleNamespace(perf_counter=perf_counter)

    def before():                      # slow, and different on each rank: not in the time
        calls.append("before")
        now[0] += rank + 1.0

    def fn():
        calls.append("fn")
        now[0] += FN_S
    secs = calibrate._after_time(fn, before, torch.device("cpu"), dist.group.WORLD, 3)
    return secs, calls


@pytest.fixture(scope="module")
def after_time_ranks():
    """``(seconds, call log)`` of each of 2 ranks timing ``fn`` after ``before`` (:func:`_after_rank`)."""
    from dist_utils import run_ranks
    return run_ranks(_after_rank, 2)


def test_after_time_reads_the_clock_only_around_the_timed_call(after_time_ranks):
    """The optimizer is timed one call at a time right after the step's GEMM chain: the chain
    (here ``before``) runs before every timed call, on every rank, outside the clock reads."""
    for _, calls in after_time_ranks:
        assert calls == ["fn"] + ["before", "clock", "fn", "clock"] * 3


def test_after_time_is_the_timed_call_alone(after_time_ranks):
    """The seconds returned are one call of ``fn`` (the fake clock's ``FN_S``), none of the
    1-2 s that ``before`` takes on each rank."""
    for secs, _ in after_time_ranks:
        assert secs == FN_S


def _affinity_rank(rank, world_size):
    import os
    import torch
    torch.ones(64, 64) @ torch.ones(64, 64)
    return sorted(os.sched_getaffinity(0))


def test_run_ranks_bind_cores():
    """bind_cores: rank r runs on the r-th block of usable cores; too many ranks x threads is a
    ValueError naming the fix, before any rank starts."""
    import os
    from phantom_plugin.bench import launch
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("needs 2 usable cores")
    assert launch.run_ranks(_affinity_rank, 2, bind_cores=True) == [[cores[0]], [cores[1]]]
    assert launch.bound_cores(1, len(cores)) == [cores]
    with pytest.raises(ValueError, match="bind fewer ranks or threads"):
        launch.run_ranks(_affinity_rank, len(cores) + 1, bind_cores=True)
    with pytest.raises(SystemExit):
        plan.main(["--width", "64", "--depth", "2", "--ranks", "2", "--ghosts", "4", "--bind-cores"])


@pytest.mark.fast
def test_bench_bind_cores_checked_before_running(capsys):
    """phantom-bench --bind-cores refuses rank counts that do not fit the usable cores at parse time."""
    import os
    from phantom_plugin.cli import bench as cli
    too_many = len(os.sched_getaffinity(0)) + 1
    with pytest.raises(SystemExit):
        cli.parse_args(["--ranks", f"2,{too_many}", "--bind-cores"])
    assert f"--bind-cores with --ranks {too_many}" in capsys.readouterr().err
