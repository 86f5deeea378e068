"""``phantom-bench``: TP (megatron-core layers) and phantom side by side, same launcher, data,
seed and steps, over a grid; writes ``results.json``, ``results.md`` and PNG plots into ``--out``.

One point::

    phantom-bench --width 2048 --depth 4 --ranks 2 --ghosts 32 --batch 256 --steps 200 --out DIR

Comma-separated values make a grid (``--ranks 2,4 --ghosts 16,32``). Ranks are started here
(gloo on CPU; NCCL, one GPU per rank, when enough GPUs are visible). ``--recipe e1`` / ``e2`` run
the paper's two experiments (:mod:`phantom_plugin.bench.experiments`); ``--probe`` adds the GEMM-rate and
hidden-communication measurements (:mod:`phantom_plugin.bench.probe`). ``--inference`` measures forward passes only
(:mod:`phantom_plugin.bench.inference`): a throughput phase at ``--batch`` and a latency phase at batch 1, ``--steps``
forward passes each.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys

from ..dtypes import DTYPES
from ..modeling.devices import DEVICES

__all__ = ["main", "parse_args"]


def _ints(s: str) -> list[int]:
    return [int(v) for v in str(s).split(",") if v.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="phantom-bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=_ints, default=[1024], help="n, comma-separated for a grid")
    ap.add_argument("--depth", type=_ints, default=[4], help="layers")
    ap.add_argument("--ranks", type=_ints, default=[2], help="p (TP ranks; E2: phantom gets p/2)")
    ap.add_argument("--ghosts", type=_ints, default=[16], help="k, ghost neurons per rank")
    ap.add_argument("--batch", type=_ints, default=[256], help="samples per step")
    ap.add_argument("--steps", type=int, default=100, help="training steps per run (E2: TP's steps)")
    ap.add_argument("--warmup", type=int, default=5, help="steps excluded from the timings")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    ap.add_argument("--modes", default="tp,phantom", help="tp, phantom or both")
    ap.add_argument("--recipe", default="grid", choices=["grid", "e1", "e2"],
                    help="grid: every point; e1: phantom vs TP at equal n and p, with time to a target "
                         "loss; e2: phantom on p/2 ranks trained to TP-on-p's final loss")
    ap.add_argument("--max-factor", type=float, default=4.0,
                    help="E2: phantom may run up to this many times TP's steps to reach its loss")
    ap.add_argument("--inference", action="store_true",
                    help="forward only (torch.inference_mode): throughput at --batch and latency at batch 1; "
                         "--steps forward passes per phase")
    ap.add_argument("--probe", action="store_true",
                    help="also measure the dense GEMM rate and the hidden ghost communication")
    ap.add_argument("--backend", default="auto", choices=["auto", "gloo", "nccl"])
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads per rank (0: cores/ranks)")
    ap.add_argument("--bind-cores", action="store_true",
                    help="run each rank's compute on cores of its own (ranks x threads <= usable cores; "
                         "steadier CPU timings)")
    ap.add_argument("--energy-preset", default="h100-sxm", choices=sorted(DEVICES),
                    help="device whose datasheet figures price the modeled energy (pJ/FLOP from its max "
                         "board power over its peak BF16 rate, pJ/byte an assumption; labelled modeled)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    ap.add_argument("--out", default="bench_out", help="output folder")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.inference and args.recipe != "grid":
        ap.error(f"--inference runs the grid only (got --recipe {args.recipe}): time to a loss needs training")
    if args.inference and args.probe:
        ap.error("--probe measures training steps; drop it with --inference")
    if args.bind_cores:
        from ..bench.launch import bound_cores, default_threads
        for p in args.ranks:
            try:
                bound_cores(p, args.threads or default_threads(p))
            except ValueError as e:
                ap.error(f"--bind-cores with --ranks {p}: {e}")
    args.modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in args.modes if m not in ("tp", "phantom")]
    if bad:
        ap.error(f"--modes: unknown {bad}; use tp and/or phantom")
    return args


def write_outputs(out: str, runs: list[dict], markdown: str, summary: dict, title: str) -> list[str]:
    from ..bench.plots import write_inference_plots, write_plots
    os.makedirs(out, exist_ok=True)
    doc = {"command": "phantom-bench " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
           "created": datetime.datetime.now().isoformat(timespec="seconds"),
           "machine": runs[0]["machine"] if runs else None, "summary": summary, "runs": runs}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(doc, f, indent=1, default=str)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(markdown + "\n")
    plots = write_inference_plots if runs and "phase" in runs[0] else write_plots
    return [os.path.join(out, "results.json"), os.path.join(out, "results.md")] + plots(runs, out, title)


def main(argv=None) -> int:
    args = parse_args(argv)
    from ..bench import experiments
    recipe = experiments.inference if args.inference else experiments.RECIPES[args.recipe]
    runs, markdown, summary, title = recipe(args)
    paths = write_outputs(args.out, runs, markdown, summary, title)
    print(markdown)
    print("\nwrote " + ", ".join(paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
