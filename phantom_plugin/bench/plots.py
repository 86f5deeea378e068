"""PNG plots of run results (matplotlib, Agg backend; the ``bench`` extra).

* ``loss_vs_step.png``: loss against step, one line per run;
* ``loss_vs_cost.png``: loss against cumulative wall seconds and against cumulative energy
  (measured joules when every run has them, otherwise CPU-seconds of all ranks, labelled);
* ``per_step_vs_ranks.png``: step time, bytes sent and energy per step (measured, else modeled,
  labelled) against the number of ranks, one line per mode / width / depth / ``k``.

Forward-only records (``phantom-bench --inference``) get their own two plots instead:

* ``inference_time.png``: median and 99th-percentile forward time per phase, one bar per run;
* ``inference_latency_cdf.png``: the distribution of forward times, one line per run, per phase.

Language-model records (``phantom-bench --task lm``) get ``lm_heldout_loss.png``: held-out loss
against step, against CPU-seconds (all ranks, training steps only) and against modeled GPU energy,
with TP's final held-out loss (the target) as a dotted line.
"""
from __future__ import annotations

import itertools
import os

__all__ = ["write_plots", "write_inference_plots", "write_lm_plots"]


def _label(r: dict) -> str:
    k = f" k={r['ghost_dim']}" if r["mode"] == "phantom" else ""
    return f"{r['mode']} p={r['world_size']} n={r['width']} L={r['depth']}{k}"


def _smooth(xs: list, w: int = 10) -> list:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= w:
            acc -= xs[i - w]
        out.append(acc / min(i + 1, w))
    return out


def write_plots(runs: list[dict], out_dir: str, title: str = "") -> list[str]:
    """Write the three PNGs into ``out_dir``; returns their paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    style = {"tp": "-", "phantom": "--"}

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in runs:
        ax.plot(range(1, len(r["losses"]) + 1), _smooth(r["losses"]), style[r["mode"]], label=_label(r))
    ax.set(xlabel="step", ylabel="MSE loss (running mean of 10)", yscale="log", title=title or "loss against step")
    ax.legend(fontsize=7)
    paths.append(_save(fig, out_dir, "loss_vs_step.png"))

    measured = all(r.get("energy_j_per_step") is not None for r in runs)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.5))
    for r in runs:
        loss = _smooth(r["losses"])
        a1.plot(list(itertools.accumulate(r["step_times_s"])), loss, style[r["mode"]], label=_label(r))
        cost = ([r["energy_j_per_step"]] * len(loss) if measured else r["step_cpu_s"])
        a2.plot(list(itertools.accumulate(cost)), loss, style[r["mode"]], label=_label(r))
    a1.set(xlabel="wall seconds (sum of measured step times)", ylabel="MSE loss", yscale="log")
    a2.set(xlabel="energy, J (measured)" if measured else
           "CPU-seconds, all ranks (no energy counter on this machine)", yscale="log")
    a1.legend(fontsize=7)
    fig.suptitle(title or "loss against time and energy")
    paths.append(_save(fig, out_dir, "loss_vs_cost.png"))

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    groups: dict = {}
    for r in runs:
        key = (r["mode"], r["width"], r["depth"], r["ghost_dim"] if r["mode"] == "phantom" else None)
        groups.setdefault(key, []).append(r)
    e_key, e_label = (("energy_j_per_step", "energy/step, J (measured, all ranks)") if measured else
                      ("energy_j_modeled_per_step", "energy/step, J (MODELED, all ranks)"))
    for (mode, n, depth, k), rs in sorted(groups.items(), key=str):
        rs = sorted(rs, key=lambda r: r["world_size"])
        ps = [r["world_size"] for r in rs]
        lab = f"{mode} n={n} L={depth}" + (f" k={k}" if k else "")
        for ax, key, scale in zip(axes, ("step_time_s", "comm_bytes_per_step", e_key), (1e3, 2 ** -20, 1)):
            ax.plot(ps, [r[key] * scale for r in rs], "o" + style[mode], label=lab)
    for ax, yl in zip(axes, ("median step time, ms", "bytes sent/step/rank, MiB (measured)", e_label)):
        ax.set(xlabel="ranks", ylabel=yl)
        ax.set_xticks(sorted({r["world_size"] for r in runs}))
    axes[0].legend(fontsize=7)
    fig.suptitle(title or "per step against ranks")
    paths.append(_save(fig, out_dir, "per_step_vs_ranks.png"))
    return paths


def write_inference_plots(runs: list[dict], out_dir: str, title: str = "") -> list[str]:
    """Write the two forward-only PNGs into ``out_dir``; returns their paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(out_dir, exist_ok=True)
    phases = sorted({r["phase"] for r in runs}, reverse=True)     # throughput, latency
    style = {"tp": "-", "phantom": "--"}
    paths = []
    fig, axes = plt.subplots(1, len(phases), figsize=(6 * len(phases), 4.5), squeeze=False)
    for ax, phase in zip(axes[0], phases):
        rs = [r for r in runs if r["phase"] == phase]
        xs = range(len(rs))
        ax.bar([x - 0.2 for x in xs], [r["latency_p50_s"] * 1e3 for r in rs], 0.4, label="p50")
        ax.bar([x + 0.2 for x in xs], [r["latency_p99_s"] * 1e3 for r in rs], 0.4, label="p99")
        ax.set_xticks(list(xs), [_label(r) for r in rs], rotation=20, ha="right", fontsize=7)
        ax.set(ylabel="forward time, ms", title=f"{phase} (batch {rs[0]['batch']})")
        ax.legend(fontsize=7)
    fig.suptitle(title or "forward time")
    paths.append(_save(fig, out_dir, "inference_time.png"))

    fig, axes = plt.subplots(1, len(phases), figsize=(6 * len(phases), 4.5), squeeze=False)
    for ax, phase in zip(axes[0], phases):
        for r in (r for r in runs if r["phase"] == phase):
            ts = sorted(t * 1e3 for t in r["step_times_s"][r["warmup"]:])
            ax.plot(ts, [(i + 1) / len(ts) for i in range(len(ts))], style[r["mode"]], label=_label(r))
        ax.set(xlabel="forward time, ms", ylabel="fraction of forward passes", xscale="log",
               title=f"{phase}: distribution of forward times")
        ax.legend(fontsize=7)
    paths.append(_save(fig, out_dir, "inference_latency_cdf.png"))
    return paths


def write_lm_plots(runs: list[dict], out_dir: str, title: str = "") -> list[str]:
    """Write ``lm_heldout_loss.png`` (three panels) into ``out_dir``; returns its path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(out_dir, exist_ok=True)
    style = {"tp": "-o", "phantom": "--s"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    target = next(r for r in runs if r["mode"] == "tp")["evals"][-1]["loss"]
    for r in runs:
        steps = [e["step"] for e in r["evals"]]
        loss = [e["loss"] for e in r["evals"]]
        cpu = [0.0, *itertools.accumulate(r["step_cpu_s"])]
        joules = [0.0, *itertools.accumulate(r["step_energy_j_modeled"])]
        label = f"{r['mode']} ffn={r['ffn_hidden']}" + (f" k={r['ghost_dim']}" if r["mode"] == "phantom" else "")
        for ax, xs in zip(axes, (steps, [cpu[s] for s in steps], [joules[s] for s in steps])):
            ax.plot(xs, loss, style[r["mode"]], markersize=3, label=label)
    # the loss before training (step 0) is far above the rest: leave it off the scale
    later = [e["loss"] for r in runs for e in r["evals"][1:]]
    low = min([target, *later])
    top = max(later) if later else None
    for ax, xl in zip(axes, ("step", "CPU-seconds, all ranks (training steps only, measured)",
                             "GPU energy, J (MODELED from FLOPs and bytes)")):
        ax.axhline(target, color="grey", linestyle=":", linewidth=1)
        ax.set(xlabel=xl, ylabel="held-out loss (nats/byte); dotted: TP's final")
        if top is not None and top > low:
            ax.set_ylim(low - 0.05 * (top - low), top + 0.05 * (top - low))
    axes[0].legend(fontsize=8)
    fig.suptitle(title or "held-out loss")
    return [_save(fig, out_dir, "lm_heldout_loss.png")]


def _save(fig, out_dir: str, name: str) -> str:
    path = os.path.join(out_dir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path
