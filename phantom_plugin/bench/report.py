"""Markdown tables of run results (dicts from :func:`phantom_plugin.bench.runner.train_rank`)."""
from __future__ import annotations

import statistics
from typing import Optional

__all__ = ["demo_table", "lm_table", "runs_table", "inference_table", "inference_pair_table", "pairs", "pair_table", "to_target", "fmt_bytes", "fmt_count"]


def fmt_count(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def fmt_bytes(n: float) -> str:
    for unit, div in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} B"


def _energy(r: dict) -> str:
    if r.get("energy_j") is None:
        why = r.get("energy_reason") or ""
        return "n/a (no energy counter)" if "no energy counter" in why else f"n/a ({why})"
    return f"{r['energy_j']:.1f} J ({r['energy_source']})"


def demo_table(tp: dict, ph: dict) -> str:
    """Markdown table: TP vs phantom for one width/depth/ranks/k, with phantom/TP ratios, per step and
    to a common loss (the higher of the two final losses, so both reach it: :func:`to_target`)."""
    rows = [
        ("parameters (whole group)", fmt_count(tp["params"]), fmt_count(ph["params"]), ph["params"] / tp["params"]),
        ("MACs/step (per rank, model)", fmt_count(tp["macs_per_step"]), fmt_count(ph["macs_per_step"]),
         ph["macs_per_step"] / tp["macs_per_step"]),
        ("bytes sent/step (per rank, measured)", fmt_bytes(tp["comm_bytes_per_step"]),
         fmt_bytes(ph["comm_bytes_per_step"]), ph["comm_bytes_per_step"] / max(1, tp["comm_bytes_per_step"])),
        ("median step time", f"{tp['step_time_s'] * 1e3:.1f} ms", f"{ph['step_time_s'] * 1e3:.1f} ms",
         ph["step_time_s"] / tp["step_time_s"]),
        ("CPU-seconds/step (all ranks)", f"{tp['cpu_seconds_per_step']:.3f}", f"{ph['cpu_seconds_per_step']:.3f}",
         ph["cpu_seconds_per_step"] / tp["cpu_seconds_per_step"]),
        ("energy/step, modeled (J, all ranks)", f"{tp['energy_j_modeled_per_step']:.4f}",
         f"{ph['energy_j_modeled_per_step']:.4f}", ph["energy_j_modeled_per_step"] / tp["energy_j_modeled_per_step"]),
        ("final loss (mean of last 10 steps)", f"{tp['final_loss']:.4f}", f"{ph['final_loss']:.4f}",
         ph["final_loss"] / tp["final_loss"]),
    ]
    head = (f"width {tp['width']}, depth {tp['depth']}, ranks {tp['world_size']}, ghosts k={ph['ghost_dim']}, "
            f"batch {tp['batch']}, {tp['steps']} steps, {tp['dtype']} -- {tp['machine']}")
    lines = [head, "", "| | TP (megatron-core) | phantom | phantom/TP |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {a} | {b} | {ratio:.3f} |" for name, a, b, ratio in rows]
    lines.append(f"| energy, measured | {_energy(tp)} | {_energy(ph)} | |")
    lines.append(f"| bytes sent/step (cost model) | {fmt_bytes(tp['comm_bytes_per_step_model'])} | "
                 f"{fmt_bytes(ph['comm_bytes_per_step_model'])} | |")
    target = max(tp["final_loss"], ph["final_loss"])
    a, b = to_target(tp, target), to_target(ph, target)
    lines += ["", f"To a common loss {target:.4f} (the higher final loss, so both reach it; running mean of 10 steps):",
              "", "| | TP (megatron-core) | phantom | phantom/TP |", "|---|---:|---:|---:|"]
    for name, key, fmt in (("steps", "steps", "d"), ("wall seconds (sum of step times)", "seconds", ".2f"),
                           ("CPU-seconds (all ranks)", "cpu_seconds", ".2f"),
                           ("energy, modeled (J, all ranks)", "energy_j_modeled", ".4f")):
        x, y = (None if r is None else r[key] for r in (a, b))
        ratio = None if x is None or y is None or not x else y / x
        lines.append(f"| {name} | {_opt(x, fmt)} | {_opt(y, fmt)} | {_opt(ratio, '.3f')} |")
    lines.append(f"\nMeasured energy: {ph['energy_reason'] or ph['energy_scope']}.\nModeled energy: {ph['energy_model']}.")
    lines.append(f"\nThe losses differ at equal steps because the two are different models: phantom's off-diagonal "
                 f"blocks have rank k={ph['ghost_dim']}, so it holds {ph['params'] / tp['params']:.2f}x TP's "
                 "parameters. What users pay for is the time and energy to a loss (the second table); a larger k "
                 "narrows the gap in loss per step: see docs/choosing-k.md.")
    return "\n".join(lines)


def runs_table(runs: list[dict]) -> str:
    """One row per run."""
    head = ("| mode | ranks | width | depth | k | batch | steps | step time (median) | samples/s | "
            "bytes/step measured | bytes/step model | MACs/step/rank | params | peak mem | final loss | "
            "CPU-s/step | energy (measured) | energy/step (modeled) |")
    lines = [head, "|" + "---|" * 18]
    for r in runs:
        k = r["ghost_dim"] if r["mode"] == "phantom" else "-"
        lines.append(
            f"| {r['mode']} | {r['world_size']} | {r['width']} | {r['depth']} | {k} | {r['batch']} | "
            f"{r['steps_run']} | {r['step_time_s'] * 1e3:.1f} ms | {r['tokens_or_samples_per_s']:.0f} | "
            f"{fmt_bytes(r['comm_bytes_per_step'])} | {fmt_bytes(r['comm_bytes_per_step_model'])} | "
            f"{fmt_count(r['macs_per_step'])} | {fmt_count(r['params'])} | {fmt_bytes(r['peak_memory_bytes'])} | "
            f"{r['final_loss']:.4f} | {r['cpu_seconds_per_step']:.3f} | "
            f"{_joules(r['energy_j'])} | "
            f"{r['energy_j_modeled_per_step']:.4f} J |")
    return "\n".join(lines)


def _joules(j: Optional[float]) -> str:
    return "n/a" if j is None else f"{j:.1f} J"


def _key(r: dict) -> tuple:
    return (r["world_size"], r["width"], r["depth"], r["batch"], r["dtype"])


def pairs(runs: list[dict]) -> list[tuple[dict, dict]]:
    """``(tp, phantom)`` pairs with the same ranks, width, depth, batch and dtype (every phantom ``k``)."""
    tps = {_key(r): r for r in runs if r["mode"] == "tp"}
    return [(tps[_key(r)], r) for r in runs if r["mode"] == "phantom" and _key(r) in tps]


def pair_table(runs: list[dict]) -> str:
    """phantom/TP ratios for each matched pair (from runs of the same invocation)."""
    lines = ["| ranks | width | depth | k | MACs | params | bytes/step | step time | CPU-s/step | "
             "energy/step modeled | energy measured | final loss (TP, phantom) |", "|" + "---|" * 12]
    for tp, ph in pairs(runs):
        e = ("n/a" if tp["energy_j"] is None or ph["energy_j"] is None else
             f"{ph['energy_j_per_step'] / tp['energy_j_per_step']:.3f}")
        lines.append(
            f"| {tp['world_size']} | {tp['width']} | {tp['depth']} | {ph['ghost_dim']} | "
            f"{ph['macs_per_step'] / tp['macs_per_step']:.3f} | {ph['params'] / tp['params']:.3f} | "
            f"{ph['comm_bytes_per_step'] / max(1, tp['comm_bytes_per_step']):.3f} | "
            f"{ph['step_time_s'] / tp['step_time_s']:.3f} | "
            f"{ph['cpu_seconds_per_step'] / tp['cpu_seconds_per_step']:.3f} | "
            f"{ph['energy_j_modeled_per_step'] / tp['energy_j_modeled_per_step']:.3f} | {e} | "
            f"{tp['final_loss']:.4f}, {ph['final_loss']:.4f} |")
    return "\n".join(lines)


def to_target(r: dict, target: float, smooth: int = 10) -> Optional[dict]:
    """Steps, wall seconds, CPU-seconds and energy until the running mean of ``smooth`` losses
    first reaches ``target`` (``None`` if it never does). Seconds are sums of measured step times
    (warm-up included); energy is measured J/step times steps when measured, and modeled always."""
    losses = r["losses"]
    for i in range(smooth - 1, len(losses)):
        if statistics.fmean(losses[i - smooth + 1:i + 1]) <= target:
            n = i + 1
            return {"steps": n, "seconds": sum(r["step_times_s"][:n]), "cpu_seconds": sum(r["step_cpu_s"][:n]),
                    "energy_j": None if r["energy_j_per_step"] is None else r["energy_j_per_step"] * n,
                    "energy_j_modeled": r["energy_j_modeled_per_step"] * n}
    return None


def inference_table(runs: list[dict]) -> str:
    """One row per forward-only record (:mod:`.inference`)."""
    lines = ["| mode | phase | ranks | width | depth | k | batch | forward p50 | forward p99 | samples/s | "
             "bytes/forward measured | bytes/forward model | collectives/forward | energy (measured) | "
             "energy/forward (modeled) |", "|" + "---|" * 15]
    for r in runs:
        k = r["ghost_dim"] if r["mode"] == "phantom" else "-"
        lines.append(
            f"| {r['mode']} | {r['phase']} | {r['world_size']} | {r['width']} | {r['depth']} | {k} | {r['batch']} | "
            f"{r['latency_p50_s'] * 1e3:.3f} ms | {r['latency_p99_s'] * 1e3:.3f} ms | "
            f"{r['tokens_or_samples_per_s']:.0f} | {fmt_bytes(r['comm_bytes_per_step'])} | "
            f"{fmt_bytes(r['comm_bytes_per_step_model'])} | {r['collectives_per_step']} | "
            f"{_joules(r['energy_j'])} | {r['energy_j_modeled_per_step']:.3g} J |")
    return "\n".join(lines)


def inference_pair_table(runs: list[dict]) -> str:
    """phantom/TP ratios of forward-only records, per phase (same ranks, width, depth, batch)."""
    lines = ["| phase | ranks | width | depth | k | batch | forward p50 | forward p99 | samples/s | MACs | "
             "bytes/forward | energy/forward modeled | energy measured |", "|" + "---|" * 13]
    for tp, ph in pairs(runs):
        e = ("n/a" if tp["energy_j"] is None or ph["energy_j"] is None else
             f"{ph['energy_j_per_step'] / tp['energy_j_per_step']:.3f}")
        lines.append(
            f"| {ph['phase']} | {tp['world_size']} | {tp['width']} | {tp['depth']} | {ph['ghost_dim']} | "
            f"{tp['batch']} | {ph['latency_p50_s'] / tp['latency_p50_s']:.3f} | "
            f"{ph['latency_p99_s'] / tp['latency_p99_s']:.3f} | "
            f"{ph['tokens_or_samples_per_s'] / tp['tokens_or_samples_per_s']:.3f} | "
            f"{ph['macs_per_step'] / tp['macs_per_step']:.3f} | "
            f"{ph['comm_bytes_per_step'] / max(1, tp['comm_bytes_per_step']):.3f} | "
            f"{ph['energy_j_modeled_per_step'] / tp['energy_j_modeled_per_step']:.3f} | {e} |")
    return "\n".join(lines)


def _opt(x: Optional[float], fmt: str) -> str:
    return "never" if x is None else format(x, fmt)


def lm_table(tp: dict, ph: dict, summary: dict) -> str:
    """Markdown of ``phantom-bench --task lm``: per step and to TP's final held-out loss."""
    ttl, match = summary["time_to_loss"], summary["match"]
    med = statistics.median

    def row(name, f, fmt):
        a, b = f(tp), f(ph)
        return f"| {name} | {format(a, fmt)} | {format(b, fmt)} | {b / a if a else float('nan'):.3f} |"
    rows = [
        row("steps trained", lambda r: r["steps_run"], "d"),
        row("parameters (whole group)", lambda r: r["params"], ","),
        row("MLP parameters (whole group)", lambda r: r["mlp_params"], ","),
        row("MLP inner width (ffn_hidden_size)", lambda r: r["ffn_hidden"], "d"),
        row("MACs/step/rank (model: MLPs, attention, output)", lambda r: r["macs_per_step"], ".4g"),
        row("bytes sent/step/rank (measured, median)", lambda r: med(r["step_bytes_sent"]), ",.0f"),
        row("wall s/step (median)", lambda r: med(r["step_times_s"]), ".4f"),
        row("CPU-s/step, all ranks (median)", lambda r: med(r["step_cpu_s"]), ".4f"),
        row("energy/step, J (modeled, all ranks)", lambda r: med(r["step_energy_j_modeled"]), ".4g"),
        row("train loss (mean of last 10 steps)", lambda r: statistics.fmean(r["losses"][-10:]), ".4f"),
        row("held-out loss (last evaluation)", lambda r: r["evals"][-1]["loss"], ".4f"),
    ]
    a, b = ttl["tp"], ttl["phantom"]
    to = [f"| steps | {a['step']} | {_opt(b['step'], 'd')} | {_opt(None if b['step'] is None else b['step'] / a['step'], '.3f')} |",
          f"| CPU-s, all ranks | {a['cpu_s']:.2f} | {_opt(b['cpu_s'], '.2f')} | {_opt(ttl['cpu_s_ratio'], '.3f')} |",
          f"| wall s (training steps) | {a['wall_s']:.2f} | {_opt(b['wall_s'], '.2f')} | "
          f"{_opt(None if b['wall_s'] is None else b['wall_s'] / a['wall_s'], '.3f')} |",
          f"| energy, J (modeled) | {a['energy_j']:.4g} | {_opt(b['energy_j'], '.4g')} | {_opt(ttl['energy_ratio'], '.3f')} |"]
    k = ph["ghost_dim"]
    head = (f"### phantom-bench --task lm: byte-level GPT (megatron-core GPTModel, TP attention), TP MLPs vs "
            f"phantom MLPs\n\nCorpus: {tp['corpus']}; last {tp['heldout']:.0%} held out "
            f"({tp['eval_batches']} x {tp['batch']} windows of {tp['seq']} bytes, the same for both). "
            f"width {tp['width']}, depth {tp['depth']}, heads {tp['heads']}, ranks {tp['world_size']}, k={k}, "
            f"phantom init {ph.get('init', 'balanced')}, lr rule {ph.get('parametrization') or 'param_groups default'}"
            + (f" with multipliers {dict(ph['multipliers'])}" if ph.get("multipliers") else "") + ", "
            f"batch {tp['batch']} x seq {tp['seq']}, {tp['steps']} steps"
            + (f" (phantom: up to {ph['steps']}, stopping at TP's final held-out loss)" if ph["steps"] > tp["steps"] else "")
            + f", lr {tp['lr']}, seed {tp['seed']}. "
            f"Match: {match['kind']} (MLP MACs/rank phantom/TP = {match['mlp_macs_ratio']:.4f}). "
            f"Machine: {tp['machine']}; backend {tp['backend']}, {tp['threads_per_rank']} intra-op thread(s) per "
            f"rank{' (oversubscribed)' if tp['oversubscribed'] else ''}. CPU-seconds: process CPU time (user+sys, "
            f"all threads) of the training steps, summed over ranks; evaluation excluded. "
            f"Energy: {tp['energy_model']}.\n")
    return "\n".join([head, "Per step:", "", "| | TP | phantom | phantom/TP |", "|---|---:|---:|---:|", *rows, "",
                      f"To TP's final held-out loss {ttl['target_loss']:.4f} (first evaluation at or below it; "
                      f"evaluated every {tp['eval_every']} steps):", "",
                      "| | TP | phantom | phantom/TP |", "|---|---:|---:|---:|", *to])
