"""Start the ranks of one benchmark run and collect rank 0's record; the grid of runs a
``phantom-bench`` invocation asks for. Used by :mod:`.experiments` and ``phantom-bench``."""
from __future__ import annotations

import os

__all__ = ["grid_specs", "backend_for", "run_one"]


def grid_specs(args) -> list[tuple[int, "object"]]:
    """``(ranks, RunSpec)`` for every grid point: TP once per (n, L, p, B), phantom once per ``k``."""
    from .workload import RunSpec
    out = []
    for n in args.width:
        for depth in args.depth:
            for p in args.ranks:
                for b in args.batch:
                    common = dict(width=n, depth=depth, batch=b, steps=args.steps, warmup=args.warmup,
                                  lr=args.lr, seed=args.seed, dtype=args.dtype, probe=args.probe,
                                  energy_preset=args.energy_preset)
                    if "tp" in args.modes:
                        out.append((p, RunSpec(mode="tp", ghost_dim=args.ghosts[0], **common)))
                    if "phantom" in args.modes:
                        out += [(p, RunSpec(mode="phantom", ghost_dim=k, **common)) for k in args.ghosts]
    return out


def backend_for(args, p: int) -> str:
    if args.backend != "auto":
        return args.backend
    import torch
    return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= p else "gloo"


def run_one(args, p: int, spec, fn=None):
    """Start ``p`` ranks, run ``fn`` (default: train ``spec``), return rank 0's result (a record,
    or a list of records for :func:`.inference.infer_rank`) with the launch conditions."""
    from .launch import default_threads, run_ranks
    from .runner import train_rank
    cores = os.cpu_count() or 1
    backend = backend_for(args, p)
    threads = args.threads or default_threads(p)
    out = run_ranks(fn or train_rank, p, spec, not args.no_progress, timeout=args.timeout, backend=backend,
                    threads=threads, bind_cores=args.bind_cores)[0]
    for r in out if isinstance(out, list) else [out]:
        r.update(backend=backend, threads_per_rank=threads, bind_cores=args.bind_cores,
                 oversubscribed=backend == "gloo" and p * threads > cores)
    return out
