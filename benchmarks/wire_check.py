"""Check the byte counter against the wire: loopback transmit bytes for gloo collectives.

On one machine gloo's traffic goes through the loopback interface, whose transmit counter
(``/proc/net/dev``) counts every byte any rank sent (plus TCP/IP headers, well under 1% at these
sizes). For each collective and for one phantom FFN training step, this compares that counter
with the sum over ranks of what a :class:`phantom_plugin.comm.CommCounter` recorded. Needs a quiet
machine (other loopback traffic is counted too). Linux only.

    python benchmarks/wire_check.py [--ranks 2] [--out benchmarks/results/wire_check.json]
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist

from phantom_plugin import PhantomFFN, comm
from phantom_plugin.bench.launch import run_ranks


def _lo_tx() -> int:
    with open("/proc/net/dev") as f:
        for line in f:
            if line.strip().startswith("lo:"):
                return int(line.split(":", 1)[1].split()[8])
    raise RuntimeError("no loopback interface in /proc/net/dev")


def _torch_reduce_scatter(n, p):
    with comm.intercept_torch_collectives():
        dist.reduce_scatter_tensor(torch.empty(n // p), torch.ones(n))


def _measure(rank, p):
    g = dist.group.WORLD
    n = 1_000_000 * p
    cases = {
        "all_gather": lambda: comm.all_gather(torch.ones(n // p), g),
        "reduce_scatter": lambda: comm.reduce_scatter(torch.ones(p, n // p), g),
        "all_reduce": lambda: comm.all_reduce(torch.ones(n), g),
        "all_to_all": lambda: comm.all_to_all(torch.ones(p, n // p), g),
        "torch gloo reduce_scatter_tensor (intercepted)": lambda: _torch_reduce_scatter(n, p),
    }
    ffn = PhantomFFN(4096, 4, ghost_dim=256, group=g, seed=0)
    x = torch.randn(2048, 4096)
    cases["phantom FFN step (w4096 L4 k256 b2048)"] = lambda: ffn(x).sum().backward()
    rows = []
    for name, fn in cases.items():
        dist.barrier()
        before = _lo_tx()
        with comm.CommCounter() as counter:
            fn()
        dist.barrier()
        wire = _lo_tx() - before
        counted = torch.tensor([counter.sent_bytes], dtype=torch.int64)
        dist.all_reduce(counted)          # sum over ranks (plain torch call: not counted)
        algos = sorted({r.algorithm for r in counter.records})
        rows.append({"case": name, "counted_bytes_all_ranks": int(counted), "loopback_tx_bytes": wire,
                     "ratio": wire / int(counted), "algorithms": algos})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/wire_check.json")
    a = ap.parse_args()
    rows = run_ranks(_measure, a.ranks, timeout=600)[0]
    print(f"| case ({a.ranks} gloo ranks) | counted bytes (all ranks) | loopback tx bytes | wire/counted | algorithm |")
    print("|---|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['case']} | {r['counted_bytes_all_ranks']:,} | {r['loopback_tx_bytes']:,} | "
              f"{r['ratio']:.4f} | {', '.join(r['algorithms'])} |")
    with open(a.out, "w") as f:
        json.dump({"ranks": a.ranks, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
