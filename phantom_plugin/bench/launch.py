"""Start ranks on this machine: ``run_ranks(fn, world_size, *args)``.

Spawns ``world_size`` processes, initializes a process group in each (gloo on CPU, NCCL with one
GPU per rank when ``backend="nccl"``), calls ``fn(rank, world_size, *args)`` and returns the
per-rank return values in rank order. Any rank's exception fails the call with that rank's
traceback. ``fn`` must be a module-level function (it is pickled by name). Used by the tests,
``make demo``, ``phantom-bench`` and ``phantom-plan --calibrate``.

``bind_cores``: each rank's compute thread (and the intra-op threads it starts) runs on cores of
its own, rank ``r`` on the ``r``-th block of ``threads`` usable cores, like DeepSpeed's
``--bind_cores_to_rank``; the process group's I/O threads, started before, keep every core. On
the 2-core CPU machine it narrowed a small step's run-to-run spread (width 1024, depth 2, 8 runs:
phantom 9.4-10.9 ms pinned against 9.4-13.2 free).
"""
from __future__ import annotations

import datetime
import os
import queue as queue_mod
import socket
import traceback

import torch.multiprocessing as mp

__all__ = ["run_ranks", "default_threads", "bound_cores", "free_port"]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a process group's rendezvous (:func:`run_ranks`, tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_threads(world_size: int) -> int:
    """Intra-op threads per rank when none are asked for: this machine's CPUs split between the
    ranks, at least one (``make demo``, ``phantom-bench``, ``phantom-plan --calibrate``)."""
    return max(1, (os.cpu_count() or 1) // world_size)


def bound_cores(world_size: int, threads: int) -> list[list[int]]:
    """Each rank's block of ``threads`` usable cores (``os.sched_getaffinity``), in rank order.
    Raises ``ValueError`` when ``world_size * threads`` exceeds the usable cores, or where the OS
    cannot bind threads (``os.sched_setaffinity`` is Linux's)."""
    if not hasattr(os, "sched_setaffinity"):
        raise ValueError("bind_cores needs os.sched_setaffinity (Linux); leave bind_cores off here")
    cores = sorted(os.sched_getaffinity(0))
    if world_size * threads > len(cores):
        raise ValueError(f"bind_cores: {world_size} ranks x {threads} thread(s) need {world_size * threads} "
                         f"cores, {len(cores)} are usable; bind fewer ranks or threads, or leave "
                         "bind_cores off (ranks then share the cores)")
    return [cores[r * threads:(r + 1) * threads] for r in range(world_size)]


def _child(rank, world_size, port, fn, args, queue, pg_timeout_s, backend, threads, cores):
    import torch
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(threads)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=pg_timeout_s))
        if cores is not None:
            os.sched_setaffinity(0, cores)       # this thread, and the threads it starts from now on
        result = fn(rank, world_size, *args)
        queue.put((rank, "ok", result))
    except BaseException:  # report every failure, including SystemExit, to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world_size: int, *args, timeout: float = 180, pg_timeout_s: float = 60,
              allow_failures: bool = False, backend: str = "gloo", threads: int = 1, bind_cores: bool = False):
    """Run ``fn`` on ``world_size`` ranks; see the module docstring.

    ``threads`` is each rank's intra-op thread count. ``bind_cores``: see the module docstring
    (``ValueError`` before any rank starts when the ranks' threads outnumber the usable cores).
    With ``allow_failures`` the per-rank ``("ok"|"error"|"died", value)`` pairs are returned
    instead of raising, for tests of failure paths.
    """
    blocks = bound_cores(world_size, threads) if bind_cores else [None] * world_size
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(r, world_size, port, fn, args, queue, pg_timeout_s, backend, threads,
                                              blocks[r]))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results = {}
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
    try:
        while len(results) < world_size:
            remaining = (deadline - datetime.datetime.now()).total_seconds()
            if remaining <= 0:
                break
            try:
                rank, status, value = queue.get(timeout=min(remaining, 1.0))
                results[rank] = (status, value)
            except queue_mod.Empty:  # check for ranks that died without reporting
                if all(not p.is_alive() for p in procs) and queue.empty():
                    break
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    for r in range(world_size):
        results.setdefault(r, ("died", f"exit code {procs[r].exitcode}"))
    if allow_failures:
        return [results[r] for r in range(world_size)]
    errors = [f"rank {r}: {v}" for r, (s, v) in sorted(results.items()) if s != "ok"]
    if errors:
        raise RuntimeError("a rank failed\n" + "\n".join(errors))
    return [results[r][1] for r in range(world_size)]
