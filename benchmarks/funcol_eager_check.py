"""Eager step time of a PhantomFFN with the c10d path against the functional-collective path.

The phantom ops issue their collectives through ``phantom_plugin.comm`` (c10d work handles) in
eager mode and through torch's functional collectives under ``torch.compile``;
``phantom_plugin.ops.use_functional_collectives()`` forces the functional path in eager mode too.
This script times one forward+backward of the same model both ways, alternating the two paths
step by step in one run (so drift of a shared machine hits both alike), on ``--ranks`` gloo ranks
with one torch thread each, and prints the per-path median and quartiles (rank 0's clock, after a
barrier before every step).

    python benchmarks/funcol_eager_check.py --widths 1024 2048 --batch 256 --depth 4 --iters 30
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.distributed as dist

from phantom_plugin import PhantomFFN
from phantom_plugin.bench.launch import run_ranks
from phantom_plugin.ops import use_functional_collectives


def _step(ffn, x) -> None:
    ffn.zero_grad(set_to_none=True)
    ffn(x).pow(2).mean().backward()


def _rank(rank, p, widths, batch, depth, ghost_div, warmup, iters):
    out = []
    for width in widths:
        k = max(1, width // p // ghost_div)
        ffn = PhantomFFN(width, depth, ghost_dim=k, group=dist.group.WORLD, seed=0)
        x = torch.randn(batch, width, generator=torch.Generator().manual_seed(1))
        times = {"c10d": [], "functional": []}
        for i in range(warmup + iters):
            for path in ("c10d", "functional"):
                dist.barrier()
                t0 = time.perf_counter()
                with use_functional_collectives(path == "functional"):
                    _step(ffn, x)
                dist.barrier()
                if i >= warmup:
                    times[path].append((time.perf_counter() - t0) * 1e3)
        row = {"width": width, "k": k}
        for path, ts in times.items():
            q = statistics.quantiles(ts, n=4)
            row[path] = (statistics.median(ts), q[0], q[2])
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--ghost-div", type=int, default=8, help="ghost_dim k = width/p / this")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=30)
    a = ap.parse_args()
    rows = run_ranks(_rank, a.ranks, a.widths, a.batch, a.depth, a.ghost_div, a.warmup, a.iters,
                     timeout=3600, threads=1)[0]
    print(f"# torch {torch.__version__}, {platform.machine()}, {a.ranks} gloo ranks x 1 thread, "
          f"batch {a.batch}, depth {a.depth}, fp32, forward+backward, median of {a.iters} "
          f"after {a.warmup} warm-up (quartiles)")
    print("| width | k | c10d path (ms) | functional path (ms) | functional / c10d |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        (mc, lc, hc), (mf, lf, hf) = r["c10d"], r["functional"]
        print(f"| {r['width']} | {r['k']} | {mc:.1f} ({lc:.1f}-{hc:.1f}) | {mf:.1f} ({lf:.1f}-{hf:.1f}) "
              f"| {mf / mc:.3f} |")


if __name__ == "__main__":
    main()
