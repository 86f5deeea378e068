"""Where a training step's time goes, per rank: forward, backward and optimizer of the phantom FFN
(ghost exchange replaced by a local copy of the same shape, as in ``phantom-bench --probe``) and of
the megatron-core TP FFN, on 2 gloo ranks. Medians of 20 steps after 5 warm-up steps, in ms.

    python benchmarks/step_breakdown.py [--width 2048 --depth 4 --ghosts 32 --batch 256 --ranks 2]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _rank(rank, ws, mode, width, depth, ghosts, batch):
    import torch
    import torch.distributed as dist
    from phantom_plugin.bench.probe import ghost_exchange
    from phantom_plugin.bench.workload import RunSpec, build_model, make_optimizer, teacher_batch
    spec = RunSpec(mode=mode, width=width, depth=depth, ghost_dim=ghosts, batch=batch, steps=10)
    model = build_model(spec, dist.group.WORLD, torch.device("cpu"), torch.float32)
    opt = make_optimizer(model, 1e-3)
    x, y = teacher_batch(0, batch, width, 0)
    t = {"fwd": [], "bwd": [], "adam": [], "total": []}
    for i in range(25):
        dist.barrier()
        local = ghost_exchange("local", rank, ws, [0.0]) if mode == "phantom" else contextlib.nullcontext()
        with local:
            t0 = time.perf_counter()
            loss = torch.nn.functional.mse_loss(model(x), y)
            t1 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            t2 = time.perf_counter()
            opt.step()
            t3 = time.perf_counter()
        if i >= 5:
            for k, v in (("fwd", t1 - t0), ("bwd", t2 - t1), ("adam", t3 - t2), ("total", t3 - t0)):
                t[k].append(v)
    return {k: round(statistics.median(v) * 1e3, 1) for k, v in t.items()}


def main() -> None:
    from phantom_plugin.bench.launch import default_threads, run_ranks
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in (("width", 2048), ("depth", 4), ("ghosts", 32), ("batch", 256), ("ranks", 2)):
        ap.add_argument(f"--{name}", type=int, default=default)
    a = ap.parse_args()
    threads = default_threads(a.ranks)
    for mode in ("phantom", "tp"):
        per_rank = run_ranks(_rank, a.ranks, mode, a.width, a.depth, a.ghosts, a.batch, threads=threads)
        print(mode, "ms per rank:", per_rank)


if __name__ == "__main__":
    main()
