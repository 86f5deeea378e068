"""Measure the terms of :mod:`phantom_plugin.modeling.step_model` on the ranks that will run the model
(``phantom-plan --calibrate``): every distinct GEMM shape, pointwise pass and optimizer step of a
TP and a phantom training step, each timed by all ranks at once in windows of back-to-back calls
(as a step runs them, sharing the cores), the median of a few windows after a warm-up.

Collectives: each op the plan uses (the plugin's own :mod:`phantom_plugin.comm` calls, the gloo
all-to-all reduce-scatter included; ``torch.distributed.all_reduce`` for megatron's) is timed at a
ladder of sizes up to its largest message and at the plan's sizes, back to back, the sizes in
turn within each repetition, and fitted as ``alpha + beta * bytes`` (:func:`step_model.fit_alpha_beta`);
each collective's time is its fit's. :class:`step_model.Wait` is what the same collective costs more
right after a step's worth of compute. The fits are reported (``link``). These collectives are
instrumentation, not counted.
"""
from __future__ import annotations

import contextlib
import math
import statistics
import time
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .. import comm, dtypes
from ..modeling import step_model
from .workload import quiet_third_party, sync

__all__ = ["calibrate_rank"]

WINDOW_S, MAX_CALLS = 0.01, 200     # a timing window: at least 10 ms of back-to-back calls, at most 200
WAIT_CALLS = 3                       # rounds of (GEMMs, collective) per window of a Wait
SLOW_S = 1.0                         # at least this long per Wait and per tiny step (Framework)
TRIM = 0.1                           # the slowest rounds' share left out of a Wait's mean


def _trimmed_mean(x: torch.Tensor) -> float:
    """The mean of ``x`` less its largest ``TRIM`` share. A step holds several collectives, and a
    collective's in-step time is skewed (most rounds fast, some much slower): the median step
    holds its share of slow rounds, which a sum of medians would leave out; the mean keeps them,
    trimmed so that a burst of another process's work does not."""
    v = x.flatten().sort().values
    return v[:max(1, math.ceil(v.numel() * (1 - TRIM)))].mean().item()


def _calls(fn, device, group, window_s: float = WINDOW_S) -> int:
    """How many back-to-back calls of ``fn`` fill ``window_s`` (the most any rank needs)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    calls = max(1, min(MAX_CALLS, math.ceil(window_s / max(time.perf_counter() - t0, 1e-7))))
    n = torch.tensor([calls], dtype=torch.int64, device=comm.collective_device(group))
    dist.all_reduce(n, op=dist.ReduceOp.MAX, group=group)
    return int(n.item())


def _window(fn, calls: int, device, group) -> float:
    """Seconds per call of ``calls`` back-to-back calls, every rank starting together."""
    dist.barrier(group=group)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / calls


def _median_time(fn, device, group, reps: int, warmup: int = 2, min_s: float = 0.0) -> float:
    """Median over ``reps`` windows (more if they take less than ``min_s`` together) of the
    seconds per call of ``fn`` (:func:`_window`). A window
    runs ``fn`` back to back for at least ``WINDOW_S``, as a step runs its terms: a term short
    against the scheduler's time slice pays its share of whatever else runs (other ranks, other
    processes), and a collective pays the hand-off between ranks that a barrier just before a
    single call would hide."""
    for _ in range(warmup):
        fn()
    calls = _calls(fn, device, group)
    reps = max(reps, math.ceil(min_s / WINDOW_S))      # a window lasts at least WINDOW_S
    return statistics.median(_window(fn, calls, device, group) for _ in range(reps))


def _gemm_fn(t: step_model.Gemm, dtype, device):
    a = torch.randn(t.k, t.m, dtype=dtype, device=device).t() if t.a_t else \
        torch.randn(t.m, t.k, dtype=dtype, device=device)
    b = torch.randn(t.n, t.k, dtype=dtype, device=device).t() if t.b_t else \
        torch.randn(t.k, t.n, dtype=dtype, device=device)
    return lambda: a @ b


def _pointwise_fn(t: step_model.Pointwise, dtype, device):
    h = torch.randn(t.rows, t.cols, dtype=dtype, device=device)
    g = torch.randn_like(h)
    if t.kind == "bias_grad":
        return lambda: g.sum(0)
    if t.kind == "bias_add":
        bias = g[0].clone()
        return lambda: h + bias
    if t.kind == "copy":
        return lambda: h.clone()
    if t.kind == "loss":
        def loss():
            diff = h - g
            (diff * diff).mean()
            diff.mul(2.0 / diff.numel())
        return loss
    act = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "tanh": torch.tanh}[t.activation]
    hr = h.clone().requires_grad_()

    def act_fwd_bwd():
        y = act(hr)
        torch.autograd.grad(y, hr, g)
    return act_fwd_bwd


def _optimizer_fn(t: step_model.Optimizer, dtype, device):
    w = torch.nn.Parameter(torch.randn(t.numel, dtype=dtype, device=device))
    w.grad = torch.randn_like(w)
    try:
        opt = torch.optim.Adam([w], lr=1e-6, fused=True)
    except (RuntimeError, TypeError, ValueError):
        opt = torch.optim.Adam([w], lr=1e-6)
    return opt.step


def _collective_fn(t: step_model.Collective, dtype, device, group, async_op: bool = False):
    """``t`` as a call; ``async_op``: the call launches it and returns what to ``wait()`` on."""
    if t.op == "all_gather":
        x = torch.randn(t.values // t.p, dtype=dtype, device=device)
        return lambda: comm.all_gather(x, group, async_op=async_op, tag="calibrate")
    if t.op == "reduce_scatter":
        x = torch.randn(t.p, t.values // t.p, dtype=dtype, device=device)
        return lambda: comm.reduce_scatter(x, group, async_op=async_op, tag="calibrate")
    x = torch.randn(t.values, dtype=dtype, device=device)
    return lambda: dist.all_reduce(x, group=group, async_op=async_op)


def _compute_fn(t, dt, device):
    """A GEMM, pointwise or optimizer term as a call."""
    if isinstance(t, step_model.Gemm):
        return _gemm_fn(t, dt, device)
    if isinstance(t, step_model.Pointwise):
        return _pointwise_fn(t, dt, device)
    if isinstance(t, step_model.Optimizer):
        return _optimizer_fn(t, dt, device)
    raise TypeError(f"not a timed term: {t!r}")


def _term_time(t, dt, device, group, reps: int, fits: dict) -> float:
    """Seconds of one term on this rank: collectives from their op's fit, the rest the median of
    ``reps`` timings (all ranks time it at once)."""
    if isinstance(t, step_model.Collective):
        return fits[t.op].seconds(t.bytes_sent)
    if isinstance(t, step_model.Framework):
        return _framework_time(t, dt, device, group, reps, fits)
    if isinstance(t, step_model.Wait):
        return _wait_time(t, dt, device, group, reps, fits)
    fn = _compute_fn(t, dt, device)
    grad = isinstance(t, step_model.Pointwise) and t.kind == "act"
    with torch.set_grad_enabled(grad):
        return _median_time(fn, device, group, reps)


def _wait_time(t: step_model.Wait, dt, device, group, reps: int, fits: dict) -> float:
    """What ``t.coll`` costs in a step beyond its fit. Each of ``reps`` repetitions runs a window of
    ``WAIT_CALLS`` rounds of (``t.calls`` GEMMs, the collective launched, ``t.overlap`` GEMMs, its
    wait), every rank timing each round, and a window of as many rounds' GEMMs back to back, as
    the GEMM terms are timed. A round costs every rank the slowest rank's round; the model counts
    the GEMMs as timed back to back (the slowest rank's median) and the collective at its fit, so
    the wait is the trimmed mean (:func:`_trimmed_mean`) over rounds of the slowest rank's round
    less both (of either sign). The two windows alternate, so slow drift of the load cancels."""
    gemm = _gemm_fn(t.gemm, dt, device)
    hidden = [_gemm_fn(g, dt, device) for g in t.overlap]
    launch = _collective_fn(t.coll, dt, device, group, async_op=True)

    def under():
        for fn in hidden:
            fn()

    def coll():
        pending = launch()
        under()
        pending.wait()

    def compute():
        for _ in range(t.calls):
            gemm()
        under()

    def one_round():
        for _ in range(t.calls):
            gemm()
        coll()
    for _ in range(2):
        compute()
        coll()
    # a collective's in-step time comes and goes with the machine's state (seconds at a time):
    # at least SLOW_S of rounds, at least ``reps`` windows
    reps = max(reps, math.ceil(_calls(one_round, device, group, SLOW_S) / WAIT_CALLS))
    rounds, alone = [], []
    for _ in range(reps):
        alone.append(_window(compute, WAIT_CALLS, device, group))
        dist.barrier(group=group)
        for _ in range(WAIT_CALLS):
            sync(device)
            t0 = time.perf_counter()
            one_round()
            sync(device)
            rounds.append(time.perf_counter() - t0)
    mine = torch.tensor(rounds + alone, dtype=torch.float64, device=comm.collective_device(group))
    every = comm.all_gather(mine, group, tag="calibrate")                # [p, rounds + reps]
    slowest = _trimmed_mean(every[:, :len(rounds)].max(dim=0).values)
    counted = every[:, len(rounds):].median(dim=1).values.max().item()
    return slowest - counted - fits[t.coll.op].seconds(t.coll.bytes_sent)


def _tiny_terms(t: step_model.Framework) -> dict:
    """The tiny step's own terms, less its Wait: with next to no compute between its collectives,
    what its ranks lose meeting is the framework's (and timing it would only add noise)."""
    width, batch = step_model.TINY_WIDTH_PER_RANK * t.p, step_model.TINY_BATCH
    terms = step_model.step_terms(t.mode, width, t.depth, p=t.p, batch=batch, k=1, framework=False)
    return {term: c for term, c in terms.items() if not isinstance(term, step_model.Wait)}


def _framework_time(t: step_model.Framework, dt, device, group, reps: int, fits: dict) -> float:
    """A tiny real training step of ``t.mode`` less the sum of its own terms: of either sign (a
    negative one says the tiny step's collectives cost less in the step than their fits)."""
    from .workload import RunSpec, build_model, make_optimizer, teacher_batch, train_step
    width, batch = step_model.TINY_WIDTH_PER_RANK * t.p, step_model.TINY_BATCH
    spec = RunSpec(mode=t.mode, width=width, depth=t.depth, ghost_dim=1, batch=batch, steps=2, warmup=1)
    model = build_model(spec, group, device, dt)
    opt = make_optimizer(model, 1e-6)
    x, y = teacher_batch(0, batch, width, 0, device, dt)
    intercept = comm.intercept_torch_collectives() if t.mode == "tp" else contextlib.nullcontext()
    with torch.enable_grad(), intercept:
        step = _median_time(lambda: train_step(model, opt, x, y), device, group, reps, warmup=3, min_s=SLOW_S)
    own = sum(c * _term_time(term, dt, device, group, reps, fits) for term, c in _tiny_terms(t).items())
    return step - own


def _fit_links(colls: list, dt, device, group, reps: int) -> dict:
    """One :class:`step_model.LinkFit` per op in ``colls``: each op timed at the sizes of
    :func:`step_model.ladder` up to its largest message and at every size of ``colls``, the sizes
    taken in turn within each repetition (so load that comes and goes hits them alike), each
    size's median the slowest rank's."""
    p = comm.group_size(group)
    elt = torch.empty((), dtype=dt).element_size()
    fits = {}
    for op in sorted({c.op for c in colls}):
        sizes = sorted(set(step_model.ladder(max(c.values for c in colls if c.op == op), p))
                       | {c.values for c in colls if c.op == op})
        fns = [_collective_fn(step_model.Collective(op, v, p, 0), dt, device, group) for v in sizes]
        for fn in fns:
            fn()
        calls = [_calls(fn, device, group) for fn in fns]
        times = [[] for _ in sizes]
        for _ in range(reps):
            for fn, n, ts in zip(fns, calls, times):
                ts.append(_window(fn, n, device, group))
        med = torch.tensor([statistics.median(ts) for ts in times], dtype=torch.float64, device=device)
        dist.all_reduce(med, op=dist.ReduceOp.MAX, group=group)
        chunks = 2 * (p - 1) if op == "all_reduce" else p - 1
        nbytes = [v * elt // p * chunks for v in sizes]
        alpha, beta = step_model.fit_alpha_beta(zip(nbytes, med.tolist()))
        fits[op] = (step_model.LinkFit(op, p, alpha, beta), nbytes, med.tolist())
    return fits


def _chain_fn(gemms: list, dt, device):
    """``gemms`` run back to back, each with operands of its own (a step's GEMMs), as one call."""
    fns = [_gemm_fn(t, dt, device) for t in gemms]

    def chain():
        with torch.no_grad():
            for fn in fns:
                fn()
    return chain


def _after_time(fn, before, device, group, reps: int) -> float:
    """Median over ``reps`` of one call of ``fn`` (every rank at once) right after an untimed
    ``before()``: a term a step runs once, on memory the step's other work has since evicted.
    Adam's moments are touched once a step: timed back to back they stay in cache (at width 1024,
    depth 2 on the 2-core CPU machine, 0.28 ms against 0.6-0.7 ms inside real steps)."""
    fn()
    times = []
    for _ in range(reps):
        before()
        times.append(_window(fn, 1, device, group))
    return statistics.median(times)


def calibrate_rank(rank: int, world_size: int, terms: list, dtype: str = "fp32", reps: int = 7,
                   chains: Optional[dict] = None, after_chain: Optional[dict] = None):
    """Time each of ``terms`` (:mod:`phantom_plugin.modeling.step_model` terms) on every rank at once; rank 0
    returns ``(seconds per term in order, link, chain seconds)``, ``link`` holding ``latency_s`` (a
    one-value all-gather), ``bandwidth_bytes_per_s`` (of the fit of the largest message's op) and
    ``fits`` (per op: ``alpha_s``, ``beta_s_per_byte``, the sizes timed and their medians).
    ``chains``: ``{name: [Gemm, ...]}`` (:func:`phantom_plugin.modeling.step_model.gemm_chain`), each timed as
    one chain; the third value is ``{name: seconds}``. ``after_chain``: ``{term: name}``, compute
    terms timed one call at a time right after chain ``name`` (:func:`_after_time`; the optimizer)."""
    quiet_third_party()
    group = dist.group.WORLD
    device = comm.collective_device(group)   # the launcher set each NCCL rank's device
    dt = dtypes.torch_dtype(dtype)
    torch.manual_seed(rank)
    colls = [t for t in terms if isinstance(t, step_model.Collective)]
    for f in terms:
        if isinstance(f, step_model.Framework):
            colls += [t for t in _tiny_terms(f) if isinstance(t, step_model.Collective)]
    fits = _fit_links(colls, dt, device, group, max(reps, 15)) if world_size > 1 else {}
    link_fits = {op: f for op, (f, _, _) in fits.items()}
    names = sorted(chains or {})
    chain_fns = {name: _chain_fn(chains[name], dt, device) for name in names}
    after_chain = after_chain or {}
    out = [_after_time(_compute_fn(t, dt, device), chain_fns[after_chain[t]], device, group, reps)
           if t in after_chain else _term_time(t, dt, device, group, reps, link_fits) for t in terms]
    out += [_median_time(chain_fns[name], device, group, reps) for name in names]
    secs = torch.tensor(out, dtype=torch.float64, device=device)
    dist.all_reduce(secs, op=dist.ReduceOp.MAX, group=group)   # a step waits for its slowest rank
    if rank != 0:
        return None
    link = {}
    if fits:
        ag = fits.get("all_gather")
        link["latency_s"] = (ag or next(iter(fits.values())))[2][0]
        top = max(colls, key=lambda c: c.bytes_sent)
        fit, nbytes, med = fits[top.op]
        link["bandwidth_bytes_per_s"] = (fit.bandwidth_bytes_per_s if fit.beta_s_per_byte > 0
                                         else nbytes[-1] / med[-1])
        link["fits"] = {op: {"alpha_s": f.alpha_s, "beta_s_per_byte": f.beta_s_per_byte,
                             "bytes_sent": nb, "median_s": md} for op, (f, nb, md) in fits.items()}
    secs = secs.tolist()
    return secs[:len(terms)], link, dict(zip(names, secs[len(terms):]))
