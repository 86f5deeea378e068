"""One table from several ``phantom-bench --task lm`` result folders: time to TP's held-out loss.

    python benchmarks/lm_study_table.py benchmarks/results/lm/study/*/ > table.md

One row per folder: width, ``k``, ranks, match, phantom's init and lr rule, base lr, seed, TP's
final held-out loss (the target), the step at which each model first reaches it, and phantom/TP
for steps, CPU-seconds and modeled energy (``never`` when phantom does not reach it within the
steps it was given), plus the median CPU-seconds per step of each model and their ratio. Reads
only the ``results.json`` that ``phantom-bench`` wrote; computes nothing but ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics


def _fmt(value, spec: str) -> str:
    return "never" if value is None else format(value, spec)


def row(folder: str) -> str:
    with open(os.path.join(folder, "results.json")) as f:
        doc = json.load(f)
    tp, ph = doc["runs"]
    ttl = doc["time_to_loss"]
    a, b = ttl["tp"], ttl["phantom"]
    step_ratio = None if b["step"] is None else b["step"] / a["step"]
    cpu_tp, cpu_ph = statistics.median(tp["step_cpu_s"]), statistics.median(ph["step_cpu_s"])
    lr_rule = ph.get("parametrization") or "default"
    return (f"| {os.path.basename(os.path.normpath(folder))} | {tp['width']} | {ph['ghost_dim']} | {tp['world_size']} "
            f"| {doc['summary']['match']['kind']} ({ph['ffn_hidden']}) | {ph.get('init', 'balanced')}, {lr_rule} "
            f"| {tp['lr']:g} | {tp['seed']} | {ttl['target_loss']:.3f} | {a['step']} / {_fmt(b['step'], 'd')} "
            f"| {_fmt(step_ratio, '.2f')} | **{_fmt(ttl['cpu_s_ratio'], '.2f')}** | {_fmt(ttl['energy_ratio'], '.2f')} "
            f"| {cpu_tp:.3f} / {cpu_ph:.3f} ({cpu_ph / cpu_tp:.2f}) |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", help="phantom-bench --task lm --out folders")
    args = ap.parse_args(argv)
    print("| run | width | k | ranks | match (phantom ffn) | phantom init, lr rule | lr | seed | target (TP final) "
          "| step reached TP / phantom | steps ratio | CPU-s ratio | energy ratio (modeled) "
          "| CPU-s/step TP / phantom (ratio) |")
    print("|---|---:|---:|---:|---|---|---:|---:|---:|---|---:|---:|---:|---|")
    for folder in args.folders:
        print(row(folder))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
