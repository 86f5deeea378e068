"""Instrumentation behind the performance targets (run after training when ``RunSpec.probe``).

* **Dense GEMM rate**: MACs/s of plain ``x @ w.T`` at the shapes the two models' biggest GEMMs
  have on one rank (phantom's local block ``[B, n/p] x [n/p, n/p]``, TP's ``[B, n] x [n, n/p]``),
  measured by every rank at the same time, in the same processes and with the same threads as the
  run. The best of them is "the dense GEMM rate".
* **Interleaved timings** (phantom, ``p > 1``): the same training step timed several ways,
  interleaved in rounds in the same processes so load drift on a shared machine hits all alike:

  - ``real``: the step as it runs, with the time spent blocked in the ghost collectives'
    ``wait()`` recorded;
  - ``local``: the ghost all-gather / reduce-scatter replaced by a local copy of the same shape
    (no communication, same tensors);
  - ``tp``: a step of the megatron-core TP model of the same spec, built in the same processes;
  - the dense GEMM rate, per round;
  - ``alone``: the step's ghost collectives (``depth`` all-gathers of ``[B, k]`` and ``depth``
    reduce-scatters of ``[p, B, k]``) issued back to back with nothing to overlap.

  ``hidden_fraction_ab = 1 - (real - local) / alone`` and
  ``hidden_fraction_wait = 1 - wait / alone``. Both are noisy when ``alone`` is small.

Collectives here are bench instrumentation: they run outside the per-step byte counters of
:mod:`.runner`, so no run reports them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time

import torch
import torch.distributed as dist

from .. import comm

__all__ = ["probe_rank", "gemm_rate", "ghost_exchange"]


def gemm_rate(m: int, k: int, n: int, dtype, device, reps: int = 15) -> float:
    """Median MACs/s of ``[m, k] @ [k, n]`` on this rank."""
    a = torch.randn(m, k, dtype=dtype, device=device)
    w = torch.randn(n, k, dtype=dtype, device=device)
    for _ in range(3):
        a @ w.t()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        a @ w.t()
        sync(device)
        times.append(time.perf_counter() - t0)
    return m * k * n / statistics.median(times)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _TimedHandle:
    def __init__(self, handle, acc: list):
        self._h, self._acc = handle, acc

    def wait(self):
        t0 = time.perf_counter()
        out = self._h.wait()
        self._acc[0] += time.perf_counter() - t0
        return out


@contextlib.contextmanager
def ghost_exchange(mode: str, rank: int, p: int, acc: list):
    """Inside the block, the phantom layers' ghost collectives (tags ``ghosts_fwd`` /
    ``ghosts_bwd`` of :mod:`phantom_plugin.comm`) on rank ``rank`` of ``p`` run another way;
    every other collective is untouched.

    ``mode="real"``: they run as usual, and the seconds spent blocked in their ``wait()`` are added
    to ``acc[0]``. ``mode="local"``: each is replaced by a local copy of the shape it would return
    (all-gather ``[B, k] -> [p, B, k]``, reduce-scatter ``[p, B, k] -> [B, k]``): the step without
    ghost communication. Patches ``comm.all_gather`` / ``comm.reduce_scatter`` for the block
    (not thread-safe; bench instrumentation only).
    """
    ag, rs = comm.all_gather, comm.reduce_scatter

    def all_gather(x, group, *, async_op=False, tag=""):
        if tag != "ghosts_fwd":
            return ag(x, group, async_op=async_op, tag=tag)
        if mode == "local":
            out = x.unsqueeze(0).expand(p, *x.shape).clone()             # [p, B, k]
            return comm.Handle(None, out) if async_op else out
        h = ag(x, group, async_op=True, tag=tag)
        return _TimedHandle(h, acc) if async_op else h.wait()

    def reduce_scatter(x, group, *, async_op=False, tag=""):
        if tag != "ghosts_bwd":
            return rs(x, group, async_op=async_op, tag=tag)
        if mode == "local":
            out = x[rank].clone()                                        # [B, k]
            return comm.Handle(None, out) if async_op else out
        h = rs(x, group, async_op=True, tag=tag)
        return _TimedHandle(h, acc) if async_op else h.wait()

    comm.all_gather, comm.reduce_scatter = all_gather, reduce_scatter
    try:
        yield
    finally:
        comm.all_gather, comm.reduce_scatter = ag, rs


def _ghosts_alone(spec, group, device, dtype, p: int) -> None:
    g = torch.randn(spec.batch, spec.ghost_dim, dtype=dtype, device=device)      # [B, k]
    d = torch.randn(p, spec.batch, spec.ghost_dim, dtype=dtype, device=device)   # [p, B, k]
    for _ in range(spec.depth):
        comm.all_gather(g, group)
    for _ in range(spec.depth):
        comm.reduce_scatter(d, group)


def _mean_over_group(values: list[float], group) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=comm.collective_device(group))
    dist.all_reduce(t, group=group)
    return (t / dist.get_world_size(group)).tolist()


def _timed(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def probe_rank(model, opt, spec, group, device, dtype, rounds: int = 6, per_round: int = 5) -> dict:
    """Every rank of ``group`` calls this; returns the figures averaged over ranks.

    For phantom at ``p > 1`` each round times, back to back: ``per_round`` real steps, steps with
    the ghost exchange replaced by a local copy, steps of the TP model (megatron-core, built here
    in the same processes), the ghost collectives alone, and the dense GEMMs. Medians over rounds.
    Interleaving puts every variant under the same machine load, so their ratios are the robust
    figures on a shared machine.
    """
    from .workload import build_model, make_optimizer, teacher_batch, train_step
    p, rank = dist.get_world_size(group), dist.get_rank(group)
    n = spec.width
    shapes = {"phantom_local": (spec.batch, n // p, n // p), "tp_column": (spec.batch, n, n // p)}
    dist.barrier(group)
    out = {"gemm_shapes": {k: list(v) for k, v in shapes.items()}}
    if spec.mode != "phantom" or p == 1:
        rates = {name: gemm_rate(*s, dtype, device) for name, s in shapes.items()}
        vals = _mean_over_group(list(rates.values()), group)
        out["gemm_rate_macs_per_s"] = dict(zip(rates, vals))
        out["dense_gemm_rate_macs_per_s"] = max(vals)
        return out
    x, y = teacher_batch(0, spec.batch, spec.width, spec.seed, device, dtype)
    tp = build_model(dataclasses.replace(spec, mode="tp"), group, device, dtype)
    tp_opt = make_optimizer(tp, spec.lr)
    t = {k: [] for k in ("real", "local", "tp", "alone", "wait", *shapes)}
    for _ in range(rounds):
        for mode in ("real", "local"):
            dist.barrier(group)
            for _ in range(per_round):
                acc = [0.0]
                with ghost_exchange(mode, rank, p, acc):
                    t[mode].append(_timed(lambda: train_step(model, opt, x, y), device))
                if mode == "real":
                    t["wait"].append(acc[0])
        dist.barrier(group)
        t["tp"] += [_timed(lambda: train_step(tp, tp_opt, x, y), device) for _ in range(per_round)]
        dist.barrier(group)
        t["alone"] += [_timed(lambda: _ghosts_alone(spec, group, device, dtype, p), device)
                       for _ in range(per_round)]
        dist.barrier(group)
        for name, s in shapes.items():
            t[name].append(gemm_rate(*s, dtype, device, reps=per_round))
    names = list(t)
    m = dict(zip(names, _mean_over_group([statistics.median(t[k]) for k in names], group)))
    rate = max(m[k] for k in shapes)
    out.update({
        "gemm_rate_macs_per_s": {k: m[k] for k in shapes}, "dense_gemm_rate_macs_per_s": rate,
        "step_time_real_s": m["real"], "step_time_local_copy_s": m["local"], "step_time_tp_s": m["tp"],
        "ghost_comm_alone_s": m["alone"], "ghost_wait_per_step_s": m["wait"],
        "hidden_fraction_ab": 1 - (m["real"] - m["local"]) / m["alone"],
        "hidden_fraction_wait": 1 - m["wait"] / m["alone"],
        "probe_rounds": rounds, "probe_steps_per_round": per_round,
    })
    return out
