"""How well ``phantom-plan --calibrate`` predicts: for each point, the calibrated prediction
(``phantom-plan ... --calibrate --json``) and then, right after, a short ``phantom-bench`` of TP and
phantom at the same point (medians of ``--steps`` steps after ``--warmup``); the machine's load
average is read before and after each point. Writes ``check.json``, ``check.md`` and
``check.png`` (predicted against measured) into ``--out``.

    python benchmarks/calibrate_check.py [--points 2048,4,2,32,256 1024,4,2,16,256 ...]
                                         [--steps 35] [--out benchmarks/results/calibrate]

A point is ``width,depth,ranks,ghosts,batch``. About 5-6 minutes on the 2-core CPU machine for the
four default points; run it on a quiet machine (the load columns say how quiet it was).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
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


def check_point(pt: dict, steps: int, warmup: int) -> dict:
    rec = {**pt, "load_before": _load()}
    t0 = time.perf_counter()
    plan = json.loads(_run([sys.executable, "-m", "phantom_plugin.plan", *_args(pt), "--calibrate", "--json"]))
    rec["calibrate_s"] = round(time.perf_counter() - t0, 1)
    rec["load_between"] = _load()
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        _run([sys.executable, "-m", "phantom_plugin.bench.cli", *_args(pt), "--steps", str(steps),
              "--warmup", str(warmup), "--no-progress", "--out", out])
        rec["bench_s"] = round(time.perf_counter() - t0, 1)
        with open(os.path.join(out, "results.json")) as f:
            runs = json.load(f)["runs"]
    rec["load_after"] = _load()
    measured = {r["mode"]: r["step_time_s"] for r in runs}
    predicted = plan["predicted_step_time_s"]
    rec.update(predicted_s=predicted, measured_s=measured, parts_s=plan["parts_s"], link=plan["link"],
               machine=plan["machine"], threads_per_rank=plan["threads_per_rank"],
               error_pct={m: 100.0 * (predicted[m] / measured[m] - 1.0) for m in MODES},
               ratio_predicted=predicted["phantom"] / predicted["tp"],
               ratio_measured=measured["phantom"] / measured["tp"])
    return rec


def markdown(recs: list[dict], steps: int, warmup: int) -> str:
    head = (f"Machine: {recs[0]['machine']} ({platform.node()}); measured: phantom-bench medians of "
            f"{steps - warmup} steps after {warmup} warm-up; predicted: phantom-plan --calibrate, run just "
            "before. Load: the 1-minute load average before / between / after each point.\n")
    rows = ["| width | depth | ranks | k | batch | TP predicted / measured ms | phantom predicted / measured ms "
            "| phantom/TP predicted / measured | load |", "|---|---|---|---|---|---|---|---|---|"]
    for r in recs:
        p, m, e = r["predicted_s"], r["measured_s"], r["error_pct"]
        cells = [f"{p[x] * 1e3:.1f} / {m[x] * 1e3:.1f} ({e[x]:+.0f}%)" for x in MODES]
        rows.append(f"| {r['width']} | {r['depth']} | {r['ranks']} | {r['ghosts']} | {r['batch']} | "
                    f"{cells[0]} | {cells[1]} | {r['ratio_predicted']:.3f} / {r['ratio_measured']:.3f} | "
                    f"{r['load_before']:.1f} / {r['load_between']:.1f} / {r['load_after']:.1f} |")
    worst = max(abs(r["error_pct"][x]) for r in recs for x in MODES)
    worst_ratio = max(abs(r["ratio_predicted"] - r["ratio_measured"]) for r in recs)
    return head + "\n" + "\n".join(rows) + (f"\n\nLargest step-time error {worst:.0f}% (target 15%); largest "
                                            f"ratio error {worst_ratio:.3f} (target 0.05).\n")


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
            ax.scatter(r["measured_s"][mode] * 1e3, r["predicted_s"][mode] * 1e3, marker=marker,
                       color="C0" if mode == "tp" else "C1")
            ax.annotate(f"{r['width']}/L{r['depth']}/p{r['ranks']}/k{r['ghosts']}/b{r['batch']}",
                        (r["measured_s"][mode] * 1e3, r["predicted_s"][mode] * 1e3), fontsize=6,
                        xytext=(4, -9 if mode == "phantom" else 4), textcoords="offset points")
        ax.scatter([], [], marker=marker, color="C0" if mode == "tp" else "C1", label=mode)
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
    ap.add_argument("--out", default="benchmarks/results/calibrate")
    a = ap.parse_args()
    recs = []
    t0 = time.perf_counter()
    for i, pt in enumerate(a.points):
        print(f"[{i + 1}/{len(a.points)}] {pt} (load {_load():.2f}) ...", flush=True)
        r = check_point(pt, a.steps, a.warmup)
        recs.append(r)
        print("    " + "; ".join(f"{x} predicted {r['predicted_s'][x] * 1e3:.1f} ms, measured "
                                  f"{r['measured_s'][x] * 1e3:.1f} ms ({r['error_pct'][x]:+.0f}%)" for x in MODES)
              + f"; ratio {r['ratio_predicted']:.3f} / {r['ratio_measured']:.3f} "
                f"[calibrate {r['calibrate_s']} s, bench {r['bench_s']} s]", flush=True)
    os.makedirs(a.out, exist_ok=True)
    md = markdown(recs, a.steps, a.warmup)
    doc = {"command": "python benchmarks/calibrate_check.py " + " ".join(sys.argv[1:]),
           "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "host": platform.node(), "machine": recs[0]["machine"], "cores": os.cpu_count(),
           "steps": a.steps, "warmup": a.warmup, "wall_s": round(time.perf_counter() - t0, 1), "points": recs}
    paths = [os.path.join(a.out, f) for f in ("check.json", "check.md", "check.png")]
    with open(paths[0], "w") as f:
        json.dump(doc, f, indent=1)
    with open(paths[1], "w") as f:
        f.write(md)
    plot(recs, paths[2])
    print("\n" + md + "\nwrote " + ", ".join(paths) + f" in {doc['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
