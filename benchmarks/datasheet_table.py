"""Phantom against TP on GPUs, **extrapolated from datasheet figures, not measured**
(:mod:`phantom_plugin.modeling.datasheet`, the terms ``phantom-plan --calibrate`` measures priced at a
card's published rates): step time per rank of a depth-``--depth`` FFN for each width and group
size, at the shapes ``benchmarks/gpu_layer_check.py`` times on a card.

    python benchmarks/datasheet_table.py [--device h100-sxm] [--efficiency 1.0] [--out benchmarks/results/datasheet]

Writes ``<device>.json`` and ``<device>.md`` into ``--out`` and prints the table. Arithmetic only:
it runs anywhere in a second.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from phantom_plugin.modeling import datasheet, devices  # noqa: E402

WIDTHS, RANKS = (8192, 16384, 32768), (8, 16, 32, 64)


def rows(device: str, depth: int, ghosts: int, tokens: int, dtype: str, efficiency: float) -> list[dict]:
    out = []
    for n in WIDTHS:
        for p in RANKS:
            if n % p or n // p < ghosts:
                continue
            ext = datasheet.extrapolate(n, depth, p, ghosts, tokens, dtype, device, efficiency=efficiency)
            out.append({"width": n, "ranks": p, **ext})
    return out


def markdown(recs: list[dict], device: str, depth: int, ghosts: int, tokens: int) -> str:
    info = recs[0]["extrapolation"]
    eff = "" if info["gemm_efficiency"] == 1 else f" x {info['gemm_efficiency']:g}"
    nvlink = devices.DEVICES[device].nvlink_bytes_per_s
    lines = [f"**Extrapolated from datasheet figures, not measured.** {info['device']}, {info['dtype']}, "
             f"FFN depth {depth}, k = {ghosts}, {tokens} tokens per step, per rank; GEMMs at "
             f"{info['matmul_flops_per_s'] / 1e12:g} TFLOP/s{eff} or memory-bound; NVLink "
             f"{nvlink / 1e9:g} GB/s per direction within {datasheet.GPUS_PER_NODE} GPUs, "
             f"{datasheet.NET_BYTES_PER_S / 1e9:g} GB/s per GPU across nodes (assumed); "
             "async collectives hidden under the GEMMs the code overlaps them with.", "",
             "| width | ranks | TP ms (of which collectives, after overlap) | phantom ms (of which collectives) | phantom/TP |",
             "|---:|---:|---|---|---:|"]
    for r in recs:
        t, parts = r["extrapolated_step_time_s"], r["extrapolated_parts_s"]
        cells = [f"{t[m] * 1e3:.2f} ({(parts[m]['collective'] + parts[m]['wait']) * 1e3:.2f})" for m in ("tp", "phantom")]
        lines.append(f"| {r['width']} | {r['ranks']} | {cells[0]} | {cells[1]} | {r['extrapolated_ratio']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="h100-sxm", choices=sorted(devices.DEVICES))
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--ghosts", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--efficiency", type=float, default=1.0, help="share of the peak GEMM rate, (0, 1]")
    ap.add_argument("--out", default="benchmarks/results/datasheet")
    a = ap.parse_args()
    recs = rows(a.device, a.depth, a.ghosts, a.tokens, a.dtype, a.efficiency)
    md = markdown(recs, a.device, a.depth, a.ghosts, a.tokens)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"{a.device}.json"), "w") as f:
        json.dump({"command": "python benchmarks/datasheet_table.py " + " ".join(sys.argv[1:]), "rows": recs}, f, indent=1)
    with open(os.path.join(a.out, f"{a.device}.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
