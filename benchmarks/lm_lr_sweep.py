"""TP's (or phantom's) final held-out loss at several learning rates: the lr sweep behind
``phantom-bench --task lm``'s default lr (:func:`phantom_plugin.bench.lm_recipe.default_lr`).

Trains one model per ``--lr`` exactly as ``phantom-bench --task lm`` does (:func:`lm_plan`, then
:func:`phantom_plugin.bench.lm.lm_rank` on gloo ranks, 1 thread each), one after the other, and
writes ``OUT/MODE_wWIDTH_lrLR_sSEED.json`` per run (final and per-evaluation held-out losses,
median CPU-seconds per step) plus a markdown table on stdout. A time-to-loss comparison is only as
fair as TP's lr: run this for TP at a new width before reading ``cpu_s_ratio`` there.

    python benchmarks/lm_lr_sweep.py --width 512 --lr 1.25e-4 --lr 2.5e-4 --lr 5e-4 --lr 1e-3 \\
        --corpus /usr/share/vim/vim90/doc --out benchmarks/results/lm/lr_sweep
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
    from phantom_plugin.bench.lm_recipe import lm_plan
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--ghosts", type=int, default=None, help="k of phantom (default as the bench: (width/ranks)/8)")
    ap.add_argument("--lr", type=float, action="append", required=True, help="repeat for several")
    ap.add_argument("--mode", default="tp", choices=["tp", "phantom"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--corpus", default=None, help="as phantom-bench --corpus (default: the stdlib sources)")
    ap.add_argument("--out", default="lr_sweep")
    a = ap.parse_args()
    k = a.ghosts or max(1, (a.width // a.ranks) // 8)
    os.makedirs(a.out, exist_ok=True)
    rows = []
    for lr in a.lr:
        plan = lm_plan(width=a.width, depth=a.depth, ranks=a.ranks, ghosts=k, batch=a.batch, seq=128,
                       steps=a.steps, heads=None, eval_every=10, eval_batches=8, heldout=0.1, lr=lr, seed=a.seed,
                       match="width", corpus=a.corpus, corpus_limit=16_000_000, energy_preset="h100-sxm")
        spec = plan.tp if a.mode == "tp" else plan.phantom
        t0 = time.time()
        rec = run_ranks(lm_rank, a.ranks, spec, plan.corpus, False, timeout=7200, backend="gloo", threads=1)[0]
        doc = {"width": a.width, "lr": lr, "seed": a.seed, "batch": a.batch, "mode": a.mode,
               "ghost_dim": k if a.mode == "phantom" else None, "corpus": plan.corpus_description,
               "final": rec["evals"][-1]["loss"], "cpu_s_step_median": statistics.median(rec["step_cpu_s"]),
               "evals": {e["step"]: round(e["loss"], 4) for e in rec["evals"]}, "wall": time.time() - t0,
               "machine": rec["machine"]}
        with open(os.path.join(a.out, f"{a.mode}_w{a.width}_lr{lr:g}_s{a.seed}.json"), "w") as f:
            json.dump(doc, f)
        rows.append(doc)
    print("| mode | width | lr | seed | final held-out loss | CPU-s/step (median) |\n|---|---:|---:|---:|---:|---:|")
    for d in rows:
        print(f"| {d['mode']} | {d['width']} | {d['lr']:g} | {d['seed']} | {d['final']:.3f} | "
              f"{d['cpu_s_step_median']:.3f} |")


if __name__ == "__main__":
    main()
