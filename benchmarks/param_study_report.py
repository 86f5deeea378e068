"""Tables and plots from ``param_study.py`` runs: loss against steps per variant, and the modeled
cost for phantom at each ``k`` to reach the dense model's loss at a given step.

    python benchmarks/param_study_report.py benchmarks/results/param_study/*.json --out benchmarks/results/param_study

Cost of a step: the cost model's MACs (``counts.phantom_ffn_cost`` / ``counts.tp_ffn_cost``), which the
E1 run shows tracks CPU-seconds per step (0.531 of TP's MACs, 0.534 of its CPU-seconds at k=32).
"Reached" uses the running mean of 10 steps, as ``phantom-bench`` does. A warm-started run
(``param_study.py --warm S0``) costs one TP step per dense step, then phantom's MACs per step.
"""
from __future__ import annotations

import argparse
import json
import os

from phantom_plugin.modeling import counts


def smooth(losses, i, n=10):
    window = losses[max(0, i - n + 1):i + 1]
    return sum(window) / len(window)


def first_reach(losses, target, n=10):
    for i in range(n - 1, len(losses)):
        if smooth(losses, i, n) <= target:
            return i + 1
    return None


def cost_at(r, n):
    """Modeled cost (in TP steps) of the run's first ``n`` steps."""
    s0 = r.get("warm_steps", 0)
    return min(n, s0) + max(0, n - s0) * r["mac_ratio"]


def cost_table(runs, dense, at):
    """Rows: each run's modeled cost to the dense model's loss at step s, over TP's s steps."""
    md = ["| k | variant | " + " | ".join(f"s={s}" for s in at) + " |", "|" + "---|" * (2 + len(at))]
    for r in sorted(runs, key=lambda r: (r["k"], r.get("variant", r["label"]), r.get("warm_steps", 0))):
        if r["width"] != dense["width"]:
            continue
        cells = []
        for s in at:
            n = first_reach(r["losses"], smooth(dense["losses"], s - 1))
            if n is not None and n <= r.get("warm_steps", 0):
                cells.append(f"({n}: in the dense phase)")
            else:
                cells.append("-" if n is None else f"{cost_at(r, n) / s:.2f} ({n})")
        md.append(f"| {r['k']} | {r['label']} | " + " | ".join(cells) + " |")
    return md


def warm_plot(runs, dense, path):
    """Loss against modeled cost per ``k``: dense, cold starts, warm starts."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ks = sorted({r["k"] for r in runs if "warm_steps" in r and r["width"] == dense["width"]})
    if not ks:
        return
    fig, axes = plt.subplots(1, len(ks), figsize=(5 * len(ks), 4.2), sharey=True, squeeze=False)
    for ax, k in zip(axes[0], ks):
        xs = list(range(1, len(dense["losses"]) + 1))
        ax.plot(xs, [smooth(dense["losses"], i) for i in range(len(xs))], "k-", lw=2, label="dense (TP)")
        for r in sorted((r for r in runs if r["k"] == k and r["width"] == dense["width"]
                         and r.get("variant", r["label"]) in ("defaults", "base")),
                        key=lambda r: (r.get("warm_steps", 0), r["label"])):
            s0 = r.get("warm_steps", 0)
            xs = [cost_at(r, i) for i in range(max(1, s0), len(r["losses"]) + 1)]
            ys = [smooth(r["losses"], i - 1) for i in range(max(1, s0), len(r["losses"]) + 1)]
            style = ("-." if r.get("warmup") else "-") if s0 else ("--" if r["label"] == "defaults" else ":")
            name = (f"warm after {s0} dense steps" + (f", lr warm-up {r['warmup']}" if r.get("warmup") else "")
                    if s0 else f"cold ({'param_groups' if r['label'] == 'defaults' else 'lr x1'})")
            color = {0: "tab:orange" if r["label"] == "defaults" else "tab:blue", 10: "tab:green",
                     25: "tab:red", 50: "tab:purple"}.get(s0)
            ax.plot(xs, ys, style, color=color, label=name)
        ax.set_xlabel("modeled cost (TP steps of MACs)")
        ax.set_title(f"width {dense['width']}, p=2, k={k}")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("train loss (mean of 10)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--out", required=True)
    ap.add_argument("--at", default="50,100,200,300", help="dense steps whose loss is the target")
    a = ap.parse_args()
    runs, denses = [], {}
    for path in a.files:
        d = json.load(open(path))
        args = d["args"]
        for r in d["results"]:
            r = dict(r, width=args["width"], p=args["ranks"], k=args["ghosts"], batch=args["batch"],
                     depth=args["depth"])
            if r["label"] == "dense":
                denses.setdefault(r["width"], r)       # deterministic: every dense run of a width is the same
                continue
            if not any((q["width"], q["k"], q["label"]) == (r["width"], r["k"], r["label"]) for q in runs):
                runs.append(r)                          # deterministic: a repeated variant is identical
    md = ["| width | p | k | variant | loss @50 | @100 | @200 | @300 | MACs/TP |", "|" + "---|" * 9]
    for r in sorted(runs, key=lambda r: (r["width"], r["k"], r["label"])):
        ratio = (counts.phantom_ffn_cost(r["width"], r["depth"], p=r["p"], k=r["k"], batch=r["batch"]).macs
                 / counts.tp_ffn_cost(r["width"], r["depth"], p=r["p"], batch=r["batch"]).macs)
        r["mac_ratio"] = ratio
        cells = [f"{smooth(r['losses'], s - 1):.4f}" if s <= len(r["losses"]) else "-" for s in (50, 100, 200, 300)]
        md.append(f"| {r['width']} | {r['p']} | {r['k']} | {r['label']} | " + " | ".join(cells) + f" | {ratio:.3f} |")
    for _, dense in sorted(denses.items()):
        cells = [f"{smooth(dense['losses'], s - 1):.4f}" for s in (50, 100, 200, 300)]
        md.append(f"| {dense['width']} | dense | - | dense (TP) | " + " | ".join(cells) + " | 1.000 |")
    dense = denses.get(1024)
    for width, d in sorted(denses.items(), key=lambda kv: kv[0] != 1024):
        md += ["", f"Width {width}: phantom's modeled cost (steps x MACs/step; a warm start's dense steps "
               "at TP's cost) to the dense model's loss at step s, over TP's (s steps); `-`: not reached "
               "in the run:", ""]
        md += cost_table(runs, d, list(map(int, a.at.split(","))))
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "summary.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    for width, d in denses.items():
        warm_plot(runs, d, os.path.join(a.out, "warm_start.png" if width == 1024 else f"warm_start_w{width}.png"))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    base = [r for r in runs if r["width"] == 1024 and r["label"] == "base"]
    for ax, x_of in zip(axes, ("steps", "cost")):
        if dense is not None:
            xs = list(range(1, len(dense["losses"]) + 1))
            ax.plot(xs, [smooth(dense["losses"], i) for i in range(len(xs))], "k-", lw=2, label="dense (TP)")
        for r in sorted(base, key=lambda r: r["k"]):
            xs = [i * (1 if x_of == "steps" else r["mac_ratio"]) for i in range(1, len(r["losses"]) + 1)]
            ax.plot(xs, [smooth(r["losses"], i) for i in range(len(xs))], label=f"phantom k={r['k']}")
        ax.set_xlabel("step" if x_of == "steps" else "modeled cost (TP steps of MACs)")
        ax.set_ylabel("train loss (mean of 10)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title("teacher FFN, width 1024, depth 4, p=2: loss vs step")
    axes[1].set_title("same, against modeled cost")
    fig.tight_layout()
    fig.savefig(os.path.join(a.out, "loss_vs_k.png"), dpi=110)


if __name__ == "__main__":
    main()
