"""How well ``phantom-plan --calibrate`` predicts: for each point, ``--repeats`` times the calibrated
prediction (``phantom-plan ... --calibrate --json``) and right after it a short ``phantom-bench`` of
TP and phantom at the same point (medians of ``--steps`` steps after ``--warmup``), alternating;
compared as the median prediction against the median measurement, with the measurements' range
(the benchmark's own run-to-run spread) and each single calibration's error. The machine's load
average is read before and after each point. Writes ``check.json``, ``check.md`` and ``check.png``
(predicted against measured) into ``--out``.

    python benchmarks/calibrate_check.py [--points 2048,4,2,32,256 1024,4,2,16,256 ...]
                                         [--steps 35] [--repeats 3] [--out benchmarks/results/calibrate]

A point is ``width,depth,ranks,ghosts,batch``. About 10 minutes on the 2-core CPU machine for the
four default points; run it on a quiet machine (the load columns say how quiet it was).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

DEFAULT_POINTS = ["2048,4,2,32,256", "1024,4,2,16,256", "2048,4,4,32,256", "1024,2,2,64,128"]
MODES = ("tp", "phantom")


def _point(s: str) -> dict:
    vals = [int(v) for v in s.split(",")]
    if len(vals) != 5:
        raise argparse.ArgumentTypeError(f"a point is width,depth,ranks,ghosts,batch; got {s!r}")
    return dict(zip(("width", "depth", "ranks", "ghosts", "batch"), vals))


def _args(pt: dict) -> list[str]:
    return [a for name, v in pt.items() for a in (f"--{name}", str(v))]


def _run(cmd: list[str]) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed (rc {res.returncode}):\n{res.stderr[-4000:]}")
    return res.stdout


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _bench(pt: dict, steps: int, warmup: int, bind: list) -> dict:
    with tempfile.TemporaryDirectory() as out:
        _run([sys.executable, "-m", "phantom_plugin.cli.bench", *_args(pt), "--steps", str(steps),
              "--warmup", str(warmup), "--no-progress", "--out", out, *bind])
        with open(os.path.join(out, "results.json")) as f:
            return {r["mode"]: r["step_time_s"] for r in json.load(f)["runs"]}


def _fits_cores(ranks: int) -> bool:
    """Whether ``ranks`` ranks can be bound to cores here, as phantom-plan and phantom-bench decide it."""
    from phantom_plugin.bench.launch import bound_cores, default_threads
    try:
        bound_cores(ranks, default_threads(ranks))
    except ValueError:
        return False
    return True


def check_point(pt: dict, steps: int, warmup: int, repeats: int, bind_cores: bool = False) -> dict:
    """``repeats`` times a calibration then a benchmark, alternating; the medians of each side.
    ``bind_cores``: both with ``--bind-cores`` where the point's ranks fit the usable cores."""
    bind = ["--bind-cores"] if bind_cores and _fits_cores(pt["ranks"]) else []
    rec = {**pt, "load_before": _load(), "calibrations": [], "benches": [], "bind_cores": bool(bind)}
    t0 = time.perf_counter()
    for _ in range(repeats):
        plan = json.loads(_run([sys.executable, "-m", "phantom_plugin.cli.plan", *_args(pt), "--calibrate", "--json",
                                *bind]))
        rec["calibrations"].append({"predicted_s": plan["predicted_step_time_s"], "parts_s": plan["parts_s"],
                                    "link": plan["link"], "load": _load()})
        rec["benches"].append({"measured_s": _bench(pt, steps, warmup, bind), "load": _load()})
    rec["wall_s"] = round(time.perf_counter() - t0, 1)
    rec["load_after"] = _load()
    med = statistics.median
    predicted = {m: med(c["predicted_s"][m] for c in rec["calibrations"]) for m in MODES}
    measured = {m: med(b["measured_s"][m] for b in rec["benches"]) for m in MODES}
    ratios = [b["measured_s"]["phantom"] / b["measured_s"]["tp"] for b in rec["benches"]]
    rec.update(predicted_s=predicted, measured_s=measured, machine=plan["machine"],
               threads_per_rank=plan["threads_per_rank"], oversubscribed=plan["oversubscribed"],
               measured_range_s={m: [min(b["measured_s"][m] for b in rec["benches"]),
                                     max(b["measured_s"][m] for b in rec["benches"])] for m in MODES},
               error_pct={m: 100.0 * (predicted[m] / measured[m] - 1.0) for m in MODES},
               single_error_pct={m: [100.0 * (c["predicted_s"][m] / measured[m] - 1.0) for c in rec["calibrations"]]
                                 for m in MODES},
               ratio_predicted=predicted["phantom"] / predicted["tp"],
               ratio_measured=measured["phantom"] / measured["tp"], ratio_measured_range=[min(ratios), max(ratios)])
    return rec


def markdown(recs: list[dict], steps: int, warmup: int, repeats: int) -> str:
    head = (f"Machine: {recs[0]['machine']} ({platform.node()}). Per point, {repeats} x (phantom-plan "
            f"--calibrate, then phantom-bench: medians of {steps - warmup} steps after {warmup} warm-up), "
            "alternating; the table gives the median of the predictions and of the measured medians, and "
            "the range of the measured ones (the benchmark's own run-to-run spread). Load: the 1-minute "
            "load average before / after the point."
            + (" Ranks bound to cores (--bind-cores) at the points marked *." if any(r["bind_cores"] for r in recs)
               else "") + "\n")
    rows = ["| width | depth | ranks | k | batch | TP predicted / measured ms (range) | phantom predicted / "
            "measured ms (range) | phantom/TP predicted / measured (range) | load |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in recs:
        p, m, e, rg = r["predicted_s"], r["measured_s"], r["error_pct"], r["measured_range_s"]
        cells = [f"{p[x] * 1e3:.1f} / {m[x] * 1e3:.1f} ({rg[x][0] * 1e3:.1f}-{rg[x][1] * 1e3:.1f}) "
                 f"**{e[x]:+.0f}%**" for x in MODES]
        lo, hi = r["ratio_measured_range"]
        rows.append(f"| {r['width']} | {r['depth']} | {r['ranks']}{'*' if r['bind_cores'] else ''} | {r['ghosts']} | "
                    f"{r['batch']} | "
                    f"{cells[0]} | {cells[1]} | {r['ratio_predicted']:.3f} / {r['ratio_measured']:.3f} "
                    f"({lo:.3f}-{hi:.3f}) | {r['load_before']:.1f} / {r['load_after']:.1f} |")
    worst = max(abs(r["error_pct"][x]) for r in recs for x in MODES)
    worst_single = max(abs(v) for r in recs for x in MODES for v in r["single_error_pct"][x])
    worst_ratio = max(abs(r["ratio_predicted"] - r["ratio_measured"]) for r in recs)
    spread = max((r["measured_range_s"][x][1] / r["measured_range_s"][x][0] - 1) * 100 for r in recs for x in MODES)
    return head + "\n" + "\n".join(rows) + (
        f"\n\nLargest step-time error {worst:.0f}% (target 15%; a single calibration against the measured "
        f"median: {worst_single:.0f}%); largest ratio error {worst_ratio:.3f} (target 0.05). The benchmark's "
        f"own spread: up to {spread:.0f}% between its runs at one point.\n")


def plot(recs: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ms = [r["measured_s"][x] * 1e3 for r in recs for x in MODES]
    lo, hi = min(ms) * 0.6, max(ms) * 1.6
    ax.plot([lo, hi], [lo, hi], "k-", lw=0.8, label="predicted = measured")
    ax.fill_between([lo, hi], [lo * 0.85, hi * 0.85], [lo * 1.15, hi * 1.15], color="0.9", label="+-15%")
    for mode, marker in zip(MODES, "os"):
        for r in recs:
            x, y = r["measured_s"][mode] * 1e3, r["predicted_s"][mode] * 1e3
            r_lo, r_hi = (v * 1e3 for v in r["measured_range_s"][mode])
            ax.errorbar([x], [y], xerr=[[x - r_lo], [r_hi - x]], fmt=marker, color="C0" if mode == "tp" else "C1",
                        elinewidth=0.8, capsize=2)
            ax.annotate(f"{r['width']}/L{r['depth']}/p{r['ranks']}/k{r['ghosts']}/b{r['batch']}",
                        (r["measured_s"][mode] * 1e3, r["predicted_s"][mode] * 1e3), fontsize=6,
                        xytext=(4, -9 if mode == "phantom" else 4), textcoords="offset points")
        ax.scatter([], [], marker=marker, color="C0" if mode == "tp" else "C1",
                   label=f"{mode} (bar: measured range)")
    ax.set(xscale="log", yscale="log", xlim=(lo, hi), ylim=(lo, hi), xlabel="measured step time (ms)",
           ylabel="predicted step time (ms)", title="phantom-plan --calibrate against phantom-bench")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", nargs="+", type=_point, default=[_point(p) for p in DEFAULT_POINTS],
                    help="width,depth,ranks,ghosts,batch (several)")
    ap.add_argument("--steps", type=int, default=35, help="phantom-bench steps per mode")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3, help="calibrations and benchmarks per point")
    ap.add_argument("--bind-cores", action="store_true",
                    help="calibrate and benchmark with --bind-cores (points whose ranks fit the usable cores)")
    ap.add_argument("--out", default="benchmarks/results/calibrate")
    a = ap.parse_args()
    recs = []
    t0 = time.perf_counter()
    for i, pt in enumerate(a.points):
        print(f"[{i + 1}/{len(a.points)}] {pt} (load {_load():.2f}) ...", flush=True)
        r = check_point(pt, a.steps, a.warmup, a.repeats, a.bind_cores)
        recs.append(r)
        print("    " + "; ".join(f"{x} predicted {r['predicted_s'][x] * 1e3:.1f} ms, measured "
                                  f"{r['measured_s'][x] * 1e3:.1f} ms ({r['error_pct'][x]:+.0f}%)" for x in MODES)
              + f"; ratio {r['ratio_predicted']:.3f} / {r['ratio_measured']:.3f} "
                f" [{r['wall_s']} s]", flush=True)
    os.makedirs(a.out, exist_ok=True)
    md = markdown(recs, a.steps, a.warmup, a.repeats)
    doc = {"command": "python benchmarks/calibrate_check.py " + " ".join(sys.argv[1:]),
           "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "host": platform.node(), "machine": recs[0]["machine"], "cores": os.cpu_count(),
           "steps": a.steps, "warmup": a.warmup, "repeats": a.repeats, "bind_cores": a.bind_cores, "wall_s": round(time.perf_counter() - t0, 1), "points": recs}
    paths = [os.path.join(a.out, f) for f in ("check.json", "check.md", "check.png")]
    with open(paths[0], "w") as f:
        json.dump(doc, f, indent=1)
    with open(paths[1], "w") as f:
        f.write(md)
    plot(recs, paths[2])
    print("\n" + md + "\nwrote " + ", ".join(paths) + f" in {doc['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
