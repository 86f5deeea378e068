"""The paper's two experiments as ``phantom-bench`` recipes, and the plain grid.

* **E1, same width**: phantom against TP at equal ``n`` and ``p``: time, bytes and energy per
  step, and steps / seconds / CPU-seconds / energy until both reach a common target loss (the
  higher of the two final losses, so both get there).
* **E2, smaller phantom model on fewer ranks**: TP on ``p`` ranks trains ``--steps`` steps; phantom
  (same width, ``k`` ghosts, fewer parameters) on ``p/2`` ranks trains until the running mean of its
  loss reaches TP's final loss (at most ``--max-factor`` times the steps). Energy to get there:
  measured where a counter exists, else CPU-seconds of all ranks, and the modeled energy.

Each recipe returns ``(runs, markdown, summary, plot title)``; ratios come only from runs of the
same invocation.
"""
from __future__ import annotations


from tqdm import tqdm

from .report import fmt_bytes, inference_pair_table, inference_table, pair_table, pairs, runs_table, to_target

__all__ = ["RECIPES", "grid", "e1", "e2", "inference", "targets_markdown"]


def _header(runs: list[dict], what: str) -> str:
    r = runs[0]
    over = sorted({x["world_size"] for x in runs if x.get("oversubscribed")})
    note = (f" Runs with {', '.join(map(str, over))} ranks are **oversubscribed** (more ranks x threads "
            "than cores): their wall times include time-slicing.") if over else ""
    return (f"### {what}\n\nMachine: {r['machine']}; backend {r['backend']}, "
            f"{r['threads_per_rank']} intra-op thread(s) per rank at p={r['world_size']}; {r['dtype']}; "
            f"step times are medians after {r['warmup']} warm-up steps.{note} Energy: "
            f"{r['energy_reason'] or r['energy_source']}. Modeled energy: {r['energy_model']}.\n")


def _run_all(args, specs) -> list[dict]:
    from .runs import run_one
    runs = []
    bar = tqdm(specs, desc="phantom-bench", disable=args.no_progress)
    for p, spec in bar:
        bar.set_postfix_str(f"{spec.mode} p={p} n={spec.width} L={spec.depth} k={spec.ghost_dim}")
        runs.append(run_one(args, p, spec))
    return runs


def targets_markdown(runs: list[dict]) -> str:
    """Where the performance figures land, for every probed (TP, phantom) pair."""
    out = []
    for tp, ph in pairs(runs):
        pr, tr = ph.get("probe"), tp.get("probe")
        if not pr or not tr:
            continue
        rate = max(pr["dense_gemm_rate_macs_per_s"], tr["dense_gemm_rate_macs_per_s"])
        ideal_ph, ideal_tp = ph["macs_per_step"] / rate, tp["macs_per_step"] / rate
        lines = [
            f"p={ph['world_size']}, n={ph['width']}, L={ph['depth']}, k={ph['ghost_dim']}, "
            f"batch {ph['batch']}:", "",
            "| figure | value |", "|---|---:|",
            f"| phantom/TP step time (separate runs, training medians) | {ph['step_time_s'] / tp['step_time_s']:.3f} |",
            f"| phantom/TP MACs | {ph['macs_per_step'] / tp['macs_per_step']:.3f} |",
            f"| bytes/step measured == model (TP; phantom) | {tp['comm_bytes_per_step'] == tp['comm_bytes_per_step_model']} "
            f"({fmt_bytes(tp['comm_bytes_per_step'])}); {ph['comm_bytes_per_step'] == ph['comm_bytes_per_step_model']} "
            f"({fmt_bytes(ph['comm_bytes_per_step'])}) |",
            f"| dense GEMM rate (best of {', '.join(pr['gemm_rate_macs_per_s'])}) | {rate / 1e9:.2f} GMAC/s per rank |",
            f"| phantom step time / (its MACs at the dense rate) | {ph['step_time_s'] / ideal_ph:.3f} "
            f"({ph['step_time_s'] * 1e3:.1f} ms / {ideal_ph * 1e3:.1f} ms) |",
            f"| TP step time / (its MACs at the dense rate) | {tp['step_time_s'] / ideal_tp:.3f} "
            f"({tp['step_time_s'] * 1e3:.1f} ms / {ideal_tp * 1e3:.1f} ms) |",
            f"| phantom/TP if both ran at the dense rate, comm hidden | {ideal_ph / ideal_tp:.3f} |",
        ]
        if "hidden_fraction_ab" in pr:
            prate = pr["dense_gemm_rate_macs_per_s"]
            lines += [
                f"| interleaved: phantom/TP step time | {pr['step_time_real_s'] / pr['step_time_tp_s']:.3f} "
                f"({pr['step_time_real_s'] * 1e3:.1f} / {pr['step_time_tp_s'] * 1e3:.1f} ms) |",
                f"| interleaved: dense GEMM rate | {prate / 1e9:.2f} GMAC/s per rank |",
                f"| interleaved: phantom step / (its MACs at that rate) | "
                f"{pr['step_time_real_s'] * prate / ph['macs_per_step']:.3f} |",
                f"| interleaved: TP step / (its MACs at that rate) | "
                f"{pr['step_time_tp_s'] * prate / tp['macs_per_step']:.3f} |",
                f"| probe: step with ghost exchange / with local copy / ghost collectives alone | "
                f"{pr['step_time_real_s'] * 1e3:.2f} / {pr['step_time_local_copy_s'] * 1e3:.2f} / "
                f"{pr['ghost_comm_alone_s'] * 1e3:.2f} ms |",
                f"| ghost communication hidden, 1 - (real - local)/alone | {pr['hidden_fraction_ab']:.2f} |",
                f"| ghost communication hidden, 1 - (time blocked in wait)/alone | {pr['hidden_fraction_wait']:.2f} "
                f"({pr['ghost_wait_per_step_s'] * 1e3:.2f} ms blocked/step) |",
            ]
        out.append("\n".join(lines))
    return "\n\n".join(out)


def grid(args):
    from .runs import grid_specs
    runs = _run_all(args, grid_specs(args))
    md = [_header(runs, "phantom-bench grid"), runs_table(runs), "", "phantom/TP:", "", pair_table(runs)]
    if args.probe:
        md += ["", "#### Performance figures", "", targets_markdown(runs)]
    return runs, "\n".join(md), {"pairs": len(pairs(runs))}, "phantom-bench"


def e1(args):
    from .runs import grid_specs
    runs = _run_all(args, grid_specs(args))
    rows, summary = [], []
    for tp, ph in pairs(runs):
        target = max(tp["final_loss"], ph["final_loss"])
        a, b = to_target(tp, target), to_target(ph, target)
        summary.append({"world_size": tp["world_size"], "width": tp["width"], "ghost_dim": ph["ghost_dim"],
                        "target_loss": target, "tp": a, "phantom": b})
        rows.append(f"| {tp['world_size']} | {tp['width']} | {ph['ghost_dim']} | {target:.4f} | "
                    f"{a['steps']} / {b['steps']} | {a['seconds']:.1f} / {b['seconds']:.1f} | "
                    f"{a['cpu_seconds']:.1f} / {b['cpu_seconds']:.1f} | "
                    f"{a['energy_j_modeled']:.2f} / {b['energy_j_modeled']:.2f} | "
                    f"{b['seconds'] / a['seconds']:.3f} | {b['cpu_seconds'] / a['cpu_seconds']:.3f} |")
    md = [_header(runs, "E1: phantom vs TP at the same width and ranks"), "Per step:", "", pair_table(runs),
          "", "To a common target loss (the higher final loss; running mean of 10 steps), TP / phantom:", "",
          "| ranks | width | k | target loss | steps | wall s | CPU-s (all ranks) | energy J (modeled) | "
          "phantom/TP wall | phantom/TP CPU-s |", "|" + "---|" * 10, *rows, "", "All runs:", "", runs_table(runs)]
    if args.probe:
        md += ["", "#### Performance figures", "", targets_markdown(runs)]
    return runs, "\n".join(md), {"to_target": summary}, "E1: phantom vs TP, same width and ranks"


def e2(args):
    from .runs import run_one
    from .workload import RunSpec
    runs, rows, summary = [], [], []
    for p in args.ranks:
        if p < 2 or p % 2:
            raise SystemExit(f"E2 needs an even --ranks >= 2 (phantom runs on p/2), got {p}")
        for n in args.width:
            for depth in args.depth:
                for b in args.batch:
                    common = dict(width=n, depth=depth, batch=b, warmup=args.warmup, lr=args.lr, seed=args.seed,
                                  dtype=args.dtype, energy_preset=args.energy_preset)
                    tp = run_one(args, p, RunSpec(mode="tp", ghost_dim=args.ghosts[0], steps=args.steps, **common))
                    runs.append(tp)
                    for k in args.ghosts:
                        spec = RunSpec(mode="phantom", ghost_dim=k, steps=int(args.max_factor * args.steps),
                                       target_loss=tp["final_loss"], **common)
                        ph = run_one(args, p // 2, spec)
                        runs.append(ph)
                        rows.append(_e2_row(tp, ph, summary))
    md = [_header(runs, "E2: phantom on p/2 ranks trained to the loss of TP on p ranks"),
          "TP / phantom to TP's final loss (running mean of 10 steps); `-` when phantom did not get there:", "",
          "| TP ranks | phantom ranks | width | k | params phantom/TP | target loss | steps | wall s | "
          "CPU-s (all ranks) | energy J measured | energy J modeled | phantom/TP wall | phantom/TP CPU-s | "
          "phantom/TP modeled J |", "|" + "---|" * 14, *rows, "", "All runs:", "", runs_table(runs)]
    if any(r["world_size"] == 1 for r in runs):
        md.append("\nphantom on 1 rank has no ghosts: it is a dense model of the same width.")
    return runs, "\n".join(md), {"to_target": summary}, "E2: phantom on p/2 ranks vs TP on p ranks"


def _e2_row(tp: dict, ph: dict, summary: list) -> str:
    target = tp["final_loss"]
    a, b = to_target(tp, target), to_target(ph, target)
    summary.append({"tp_ranks": tp["world_size"], "phantom_ranks": ph["world_size"], "width": tp["width"],
                    "ghost_dim": ph["ghost_dim"], "target_loss": target, "tp": a, "phantom": b,
                    "phantom_best_loss": min(ph["losses"])})
    def j(x):
        return "n/a" if x is None or x["energy_j"] is None else f"{x['energy_j']:.1f}"
    if b is None:
        return (f"| {tp['world_size']} | {ph['world_size']} | {tp['width']} | {ph['ghost_dim']} | "
                f"{ph['params'] / tp['params']:.3f} | {target:.4f} | {a['steps']} / - ({ph['steps_run']} run, "
                f"final {ph['final_loss']:.4f}) | {a['seconds']:.1f} / - | {a['cpu_seconds']:.1f} / - | - | - | - | - | - |")
    return (f"| {tp['world_size']} | {ph['world_size']} | {tp['width']} | {ph['ghost_dim']} | "
            f"{ph['params'] / tp['params']:.3f} | {target:.4f} | {a['steps']} / {b['steps']} | "
            f"{a['seconds']:.1f} / {b['seconds']:.1f} | {a['cpu_seconds']:.1f} / {b['cpu_seconds']:.1f} | "
            f"{j(a)} / {j(b)} | {a['energy_j_modeled']:.2f} / {b['energy_j_modeled']:.2f} | "
            f"{b['seconds'] / a['seconds']:.3f} | {b['cpu_seconds'] / a['cpu_seconds']:.3f} | "
            f"{b['energy_j_modeled'] / a['energy_j_modeled']:.3f} |")


def inference(args):
    """``--inference``: every grid point forward-only, both phases from one launch per mode."""
    from .runs import grid_specs, run_one
    from .inference import infer_rank
    runs = []
    bar = tqdm(grid_specs(args), desc="phantom-bench --inference", disable=args.no_progress)
    for p, spec in bar:
        bar.set_postfix_str(f"{spec.mode} p={p} n={spec.width} L={spec.depth} k={spec.ghost_dim}")
        runs += run_one(args, p, spec, infer_rank)
    md = [_header(runs, "phantom-bench --inference: forward only (torch.inference_mode)").replace(
              "step times are medians", "forward times are medians (p50) and 99th percentiles"),
          "Throughput phase at the given batch, latency phase at batch 1; one launch per mode runs both.", "",
          inference_table(runs), "", "phantom/TP:", "", inference_pair_table(runs)]
    summary = {"pairs": [{"phase": ph["phase"], "world_size": ph["world_size"], "width": ph["width"],
                          "ghost_dim": ph["ghost_dim"], "batch": ph["batch"],
                          "forward_time_ratio": ph["latency_p50_s"] / tp["latency_p50_s"],
                          "p99_ratio": ph["latency_p99_s"] / tp["latency_p99_s"]} for tp, ph in pairs(runs)]}
    return runs, "\n".join(md), summary, "phantom-bench --inference"


RECIPES = {"grid": grid, "e1": e1, "e2": e2}
