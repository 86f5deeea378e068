"""TP's (or phantom's) final held-out loss at several learning rates: the lr sweep behind
``phantom-bench --task lm``'s default lr (:func:`phantom_plugin.bench.lm_recipe.default_lr`).

Trains one model per ``--lr`` exactly as ``phantom-bench --task lm`` does (its own argument parsing,
so its defaults, ``k`` rule and input checks; its backend and threads; then
:func:`phantom_plugin.bench.lm.lm_rank`), one after the other, and writes
``OUT/MODE_wWIDTH_lrLR_sSEED.json`` per run (final and per-evaluation held-out losses,
median CPU-seconds per step) plus a markdown table on stdout. A time-to-loss comparison is only as
fair as TP's lr: run this for TP at a new width before reading ``cpu_s_ratio`` there.

    python benchmarks/lm_lr_sweep.py --width 512 --lr 1.25e-4 --lr 2.5e-4 --lr 5e-4 --lr 1e-3 \\
        --corpus /usr/share/vim/vim90/doc --out benchmarks/results/lm/lr_sweep

Every flag other than ``--lr``, ``--mode`` and ``--out`` goes to ``phantom-bench --task lm``
(``--width``, ``--ghosts``, ``--seed``, ``--steps``, ``--batch``, ``--corpus``, ...).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    from phantom_plugin.bench.launch import run_ranks
    from phantom_plugin.bench.lm import lm_rank
    from phantom_plugin.bench.runs import backend_for
    from phantom_plugin.cli.bench import parse_args
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lr", type=float, action="append", required=True, help="repeat for several")
    ap.add_argument("--mode", default="tp", choices=["tp", "phantom"])
    ap.add_argument("--out", default="lr_sweep")
    a, bench_flags = ap.parse_known_args()      # the rest (--width, --corpus, --seed, ...) is phantom-bench's
    os.makedirs(a.out, exist_ok=True)
    rows = []
    for lr in a.lr:
        args = parse_args(["--task", "lm", "--no-progress", *bench_flags, "--lr", repr(lr)])
        plan = args.lm_plan
        spec = plan.tp if a.mode == "tp" else plan.phantom
        t0 = time.time()
        p = args.ranks[0]
        rec = run_ranks(lm_rank, p, spec, plan.corpus, False, timeout=args.timeout, backend=backend_for(args, p),
                        threads=args.threads or 1, bind_cores=args.bind_cores)[0]
        doc = {"width": spec.width, "lr": lr, "seed": spec.seed, "batch": spec.batch, "mode": a.mode,
               "ghost_dim": spec.ghost_dim if a.mode == "phantom" else None, "corpus": plan.corpus_description,
               "final": rec["evals"][-1]["loss"], "cpu_s_step_median": statistics.median(rec["step_cpu_s"]),
               "evals": {e["step"]: round(e["loss"], 4) for e in rec["evals"]}, "wall": time.time() - t0,
               "machine": rec["machine"]}
        with open(os.path.join(a.out, f"{a.mode}_w{spec.width}_lr{lr:g}_s{spec.seed}.json"), "w") as f:
            json.dump(doc, f)
        rows.append(doc)
    print("| mode | width | lr | seed | final held-out loss | CPU-s/step (median) |\n|---|---:|---:|---:|---:|---:|")
    for d in rows:
        print(f"| {d['mode']} | {d['width']} | {d['lr']:g} | {d['seed']} | {d['final']:.3f} | "
              f"{d['cpu_s_step_median']:.3f} |")


if __name__ == "__main__":
    main()
