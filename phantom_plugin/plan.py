"""``phantom-plan``: the cost model of TP versus phantom for an FFN, side by side.

    phantom-plan --width 8192 --depth 4 --ranks 8 --ghosts 64 [--batch 1] [--dtype bf16]
    phantom-plan --width 8192 --depth 4 --ranks 8 --param-budget 0.25     # suggest k

Numbers are modeled (see :mod:`phantom_plugin.cost`), per training step; bytes are what one
rank sends under ring collectives.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from . import cost

__all__ = ["main", "plan_table"]


def _fmt(n: float) -> str:
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3f}{unit}"
    return f"{n:.0f}"


def plan_table(width: int, depth: int, ranks: int, ghosts: int, batch: int, dtype: str) -> str:
    """Markdown table of :func:`cost.tp_ffn_cost` against :func:`cost.phantom_ffn_cost`."""
    elt = cost.DTYPE_BYTES[dtype]
    tp = cost.tp_ffn_cost(width, depth, p=ranks, batch=batch, dtype_bytes=elt)
    ph = cost.phantom_ffn_cost(width, depth, p=ranks, k=ghosts, batch=batch, dtype_bytes=elt)
    rows = [
        ("parameters (whole group)", tp.params, ph.params),
        ("parameters per rank", tp.params_per_rank, ph.params_per_rank),
        ("MACs forward (per rank)", tp.macs_fwd, ph.macs_fwd),
        ("MACs backward (per rank)", tp.macs_bwd, ph.macs_bwd),
        ("FLOPs per step (per rank)", tp.flops, ph.flops),
        ("bytes sent forward (per rank, ring)", tp.bytes_by("fwd"), ph.bytes_by("fwd")),
        ("bytes sent backward (per rank, ring)", tp.bytes_by("bwd"), ph.bytes_by("bwd")),
        ("collectives per step", len(tp.messages), len(ph.messages)),
        ("saved activations (values per rank)", tp.activation_values, ph.activation_values),
    ]
    out = [f"FFN width {width}, depth {depth}, {ranks} ranks, k={ghosts}, batch {batch}, {dtype} "
           "(modeled, per training step)", "",
           "| | TP (Megatron column/row) | phantom | phantom/TP |", "|---|---:|---:|---:|"]
    for name, a, b in rows:
        ratio = f"{b / a:.4f}" if a else "-"
        out.append(f"| {name} | {_fmt(a)} | {_fmt(b)} | {ratio} |")
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="phantom-plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, required=True, help="FFN width n")
    ap.add_argument("--depth", type=int, required=True, help="number of layers L")
    ap.add_argument("--ranks", type=int, required=True, help="group size p")
    ap.add_argument("--ghosts", type=int, help="ghost neurons per rank k (omit with a budget to get a suggestion)")
    ap.add_argument("--batch", type=int, default=1, help="samples (or tokens) per step")
    ap.add_argument("--dtype", default="fp32", choices=sorted(cost.DTYPE_BYTES))
    ap.add_argument("--param-budget", type=float, help="suggest the largest k with params <= this fraction of TP's")
    ap.add_argument("--traffic-budget", type=float, help="suggest the largest k with bytes <= this fraction of TP's")
    a = ap.parse_args(argv)
    for name in ("width", "depth", "ranks", "batch"):
        if getattr(a, name) < 1:
            ap.error(f"--{name} must be >= 1")
    if a.width % a.ranks:
        ap.error(f"--width {a.width} is not divisible by --ranks {a.ranks}")
    ghosts = a.ghosts
    if a.param_budget is not None or a.traffic_budget is not None:
        try:
            ghosts = cost.suggest_ghost_dim(a.width, a.depth, p=a.ranks, batch=a.batch,
                                            param_budget=a.param_budget, traffic_budget=a.traffic_budget)
        except ValueError as e:
            ap.error(str(e))
        print(f"suggested --ghosts {ghosts} (largest k within the budget)\n")
    if ghosts is None:
        ap.error("give --ghosts K, or --param-budget / --traffic-budget to have k suggested")
    if not 1 <= ghosts <= a.width // a.ranks:
        ap.error(f"--ghosts must be between 1 and width/ranks = {a.width // a.ranks}")
    print(plan_table(a.width, a.depth, a.ranks, ghosts, a.batch, a.dtype))
    return 0


if __name__ == "__main__":
    sys.exit(main())
