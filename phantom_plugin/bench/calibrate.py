"""Measure the terms of :mod:`phantom_plugin.timing` on the ranks that will run the model
(``phantom-plan --calibrate``): every distinct GEMM shape, pointwise pass, optimizer step and
collective of a TP and a phantom training step, each timed by all ranks at once (as they run in
a real step, sharing the cores), median of a few repetitions after a warm-up.

Collectives are timed with the plugin's own :mod:`phantom_plugin.comm` calls for the phantom
messages (the gloo all-to-all reduce-scatter included) and ``torch.distributed.all_reduce`` for
megatron's. Collective latency and bandwidth are also reported: the time of a 1-value all-gather,
and bytes per second of the largest message. These collectives are instrumentation, not counted.
"""
from __future__ import annotations

import contextlib
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .. import comm, timing
from .runner import _DTYPES, quiet_third_party, sync

__all__ = ["calibrate_rank"]


def _median_time(fn, device, group, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        dist.barrier(group=group)
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _gemm_fn(t: timing.Gemm, dtype, device):
    a = torch.randn(t.k, t.m, dtype=dtype, device=device).t() if t.a_t else \
        torch.randn(t.m, t.k, dtype=dtype, device=device)
    b = torch.randn(t.n, t.k, dtype=dtype, device=device).t() if t.b_t else \
        torch.randn(t.k, t.n, dtype=dtype, device=device)
    return lambda: a @ b


def _pointwise_fn(t: timing.Pointwise, dtype, device):
    h = torch.randn(t.rows, t.cols, dtype=dtype, device=device)
    g = torch.randn_like(h)
    if t.kind == "bias_grad":
        return lambda: g.sum(0)
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


def _optimizer_fn(t: timing.Optimizer, dtype, device):
    w = torch.nn.Parameter(torch.randn(t.numel, dtype=dtype, device=device))
    w.grad = torch.randn_like(w)
    try:
        opt = torch.optim.Adam([w], lr=1e-6, fused=True)
    except (RuntimeError, TypeError, ValueError):
        opt = torch.optim.Adam([w], lr=1e-6)
    return opt.step


def _collective_fn(t: timing.Collective, dtype, device, group):
    if t.op == "all_gather":
        x = torch.randn(t.values // t.p, dtype=dtype, device=device)
        return lambda: comm.all_gather(x, group, tag="calibrate")
    if t.op == "reduce_scatter":
        x = torch.randn(t.p, t.values // t.p, dtype=dtype, device=device)
        return lambda: comm.reduce_scatter(x, group, tag="calibrate")
    x = torch.randn(t.values, dtype=dtype, device=device)
    return lambda: dist.all_reduce(x, group=group)


def _term_time(t, dt, device, group, reps: int) -> float:
    """Median seconds of one term on this rank (all ranks time it at once)."""
    if isinstance(t, timing.Framework):
        return _framework_time(t, dt, device, group, reps)
    if isinstance(t, timing.Gemm):
        fn = _gemm_fn(t, dt, device)
    elif isinstance(t, timing.Pointwise):
        fn = _pointwise_fn(t, dt, device)
    elif isinstance(t, timing.Optimizer):
        fn = _optimizer_fn(t, dt, device)
    else:
        fn = _collective_fn(t, dt, device, group)
    grad = isinstance(t, timing.Pointwise) and t.kind == "act"
    with torch.set_grad_enabled(grad):
        return _median_time(fn, device, group, reps)


def _framework_time(t: timing.Framework, dt, device, group, reps: int) -> float:
    """A tiny real training step of ``t.mode`` less the sum of its own terms (at least 0)."""
    from .runner import RunSpec, build_model, make_optimizer, teacher_batch, train_step
    width, batch = timing.TINY_WIDTH_PER_RANK * t.p, timing.TINY_BATCH
    spec = RunSpec(mode=t.mode, width=width, depth=t.depth, ghost_dim=1, batch=batch, steps=2, warmup=1)
    model = build_model(spec, group, device, dt)
    opt = make_optimizer(model, 1e-6)
    x, y = teacher_batch(0, batch, width, 0, device, dt)
    intercept = comm.intercept_torch_collectives() if t.mode == "tp" else contextlib.nullcontext()
    with torch.enable_grad(), intercept:
        step = _median_time(lambda: train_step(model, opt, x, y), device, group, max(reps, 11), warmup=3)
    tiny = timing.step_terms(t.mode, width, t.depth, p=t.p, batch=batch, k=1, framework=False)
    own = sum(c * _term_time(term, dt, device, group, reps) for term, c in tiny.items())
    return max(0.0, step - own)


def calibrate_rank(rank: int, world_size: int, terms: list, dtype: str = "fp32", reps: int = 7):
    """Time each of ``terms`` (:mod:`phantom_plugin.timing` terms) on every rank at once; rank 0
    returns ``(seconds per term in order, {"latency_s", "bandwidth_bytes_per_s"})``."""
    quiet_third_party()
    group = dist.group.WORLD
    device = comm.collective_device(group)   # the launcher set each NCCL rank's device
    dt = _DTYPES[dtype]
    torch.manual_seed(rank)
    out = [_term_time(t, dt, device, group, reps) for t in terms]
    comm.COUNTER.reset()
    link = {}
    if world_size > 1:
        one = torch.zeros(1, dtype=dt, device=device)
        link["latency_s"] = _median_time(lambda: comm.all_gather(one, group, tag="calibrate"), device, group, reps)
        colls = [(t, s) for t, s in zip(terms, out) if isinstance(t, timing.Collective)]
        if colls:
            t, s = max(colls, key=lambda ts: ts[0].values)
            link["bandwidth_bytes_per_s"] = t.bytes_sent / max(s - link["latency_s"], 1e-9)
        comm.COUNTER.reset()
    secs = torch.tensor(out, dtype=torch.float64, device=device)
    dist.all_reduce(secs, op=dist.ReduceOp.MAX, group=group)   # a step waits for its slowest rank
    return (secs.tolist(), link) if rank == 0 else None

