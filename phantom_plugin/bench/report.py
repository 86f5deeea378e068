"""Text tables of run results."""
from __future__ import annotations

__all__ = ["demo_table", "fmt_bytes", "fmt_count"]


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
        return f"n/a ({r.get('energy_reason')})"
    return f"{r['energy_j']:.1f} J ({r['energy_source']})"


def demo_table(tp: dict, ph: dict) -> str:
    """Markdown table: TP vs phantom for one width/depth/ranks/k, with phantom/TP ratios."""
    rows = [
        ("parameters (whole group)", fmt_count(tp["params"]), fmt_count(ph["params"]), ph["params"] / tp["params"]),
        ("MACs/step (per rank, model)", fmt_count(tp["macs_per_step"]), fmt_count(ph["macs_per_step"]),
         ph["macs_per_step"] / tp["macs_per_step"]),
        ("bytes sent/step (per rank, measured)", fmt_bytes(tp["comm_bytes_per_step"]),
         fmt_bytes(ph["comm_bytes_per_step"]), ph["comm_bytes_per_step"] / max(1, tp["comm_bytes_per_step"])),
        ("median step time", f"{tp['step_time_s'] * 1e3:.1f} ms", f"{ph['step_time_s'] * 1e3:.1f} ms",
         ph["step_time_s"] / tp["step_time_s"]),
        ("final loss (mean of last 10 steps)", f"{tp['final_loss']:.4f}", f"{ph['final_loss']:.4f}",
         ph["final_loss"] / tp["final_loss"]),
    ]
    head = (f"width {tp['width']}, depth {tp['depth']}, ranks {tp['world_size']}, ghosts k={ph['ghost_dim']}, "
            f"batch {tp['batch']}, {tp['steps']} steps, {tp['dtype']} -- {tp['machine']}")
    lines = [head, "", "| | TP (megatron-core) | phantom | phantom/TP |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {a} | {b} | {ratio:.3f} |" for name, a, b, ratio in rows]
    lines.append(f"| energy | {_energy(tp)} | {_energy(ph)} | |")
    lines.append(f"| bytes sent/step (cost model) | {fmt_bytes(tp['comm_bytes_per_step_model'])} | "
                 f"{fmt_bytes(ph['comm_bytes_per_step_model'])} | |")
    return "\n".join(lines)
