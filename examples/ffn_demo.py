"""``make demo``: the same FFN task trained with megatron-core TP and with phantom parallelism
on 2 CPU ranks (gloo), side by side, printing one table.

Task: Gaussian inputs and targets from a fixed random teacher network (see
``phantom_plugin.bench.runner``). Options: ``--width --depth --ghosts --batch --steps --ranks``.
"""
from __future__ import annotations

import argparse

from phantom_plugin.bench.report import demo_table
from phantom_plugin.bench.runner import train_rank
from phantom_plugin.bench.workload import RunSpec
from phantom_plugin.bench.launch import default_threads, run_ranks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--ghosts", type=int, default=16)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args()
    threads = default_threads(args.ranks)
    results = {}
    for mode in ("tp", "phantom"):
        spec = RunSpec(mode=mode, width=args.width, depth=args.depth, ghost_dim=args.ghosts,
                       batch=args.batch, steps=args.steps, lr=args.lr)
        results[mode] = run_ranks(train_rank, args.ranks, spec, timeout=3600, threads=threads)[0]
    print(demo_table(results["tp"], results["phantom"]))


if __name__ == "__main__":
    main()
