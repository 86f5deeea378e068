"""Per-rank compute time, NVML energy and GEMM efficiency of one phantom layer rank against one
TP layer rank, on a single GPU (the shapes a rank sees at ``n`` = 8192..32768, ``p`` = 8..64).

Run through ``benchmarks/gpu_check.sh`` (one H100/H200, under 8 minutes). Per shape it times the
forward + backward GEMMs of one rank, exactly as ``phantom_plugin.ops._PhantomLinear`` and
megatron's column/row layers issue them, with the ghost exchange replaced by a resident tensor of
the same shape (one GPU has no peers): so these are **compute** figures. NVML energy is read over
a window of at least ``--window-s`` seconds per shape (the counter updates every ~10-100 ms).
GEMM efficiency is achieved FLOP/s over the card's dense BF16 datasheet rate and over a measured
large square GEMM.

Multi-GPU figures are then **extrapolated**: communication bytes per rank from the cost model
(NCCL ring) at ``--link-gbs`` GB/s per direction, added to the measured compute time without
overlap (TP's collectives sit between dependent GEMMs) and, for phantom, also with the ghost
exchange fully overlapped; energy adds the bytes at the preset's pJ/byte. Labelled extrapolated.

``--dry-run`` runs small shapes on CPU (no energy, no card) to check the script end to end.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from phantom_plugin import cost, energy  # noqa: E402

# Dense BF16 tensor-core peak without sparsity, NVIDIA datasheets (TFLOP/s).
PEAK_BF16_TFLOPS = {"H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 PCIe": 756.0, "H100 NVL": 835.0,
                    "H200": 989.4, "A100": 312.0}
WIDTHS = (8192, 16384, 32768)
RANKS = (8, 16, 32, 64)


def shape_table(widths=WIDTHS, ranks=RANKS, ghosts: int = 64, tokens: int = 8192) -> list[dict]:
    """Every ``(n, p)`` with ``n/p >= k``: what one rank multiplies (per-rank GEMM dims)."""
    rows = []
    for n in widths:
        for p in ranks:
            if n % p or n // p < ghosts:
                continue
            ph = cost.phantom_linear_cost(n, n, p=p, k=ghosts, batch=tokens, dtype_bytes=2, bias=False)
            tp_pair = cost.tp_ffn_cost(n, 2, p=p, batch=tokens, dtype_bytes=2, bias=False)
            rows.append({"n": n, "p": p, "k": ghosts, "tokens": tokens, "shard": n // p,
                         "phantom_macs": ph.macs, "tp_macs": tp_pair.macs // 2,
                         "phantom_bytes": ph.bytes_sent, "tp_bytes": tp_pair.bytes_sent // 2})
    return rows


def _phantom_step(x, L, C, D, G, dy, dg):
    """One phantom rank, forward + backward (ops._PhantomLinear's GEMMs; exchange excluded)."""
    ghosts = x @ C.t()                       # [B, k] -> all-gathered in a real run
    y = x @ L.t()                            # [B, n/p]
    y.addmm_(G, D.t())                       # [B, (p-1)k] x [(p-1)k, n/p]
    d_remote = dy @ D                        # [B, (p-1)k] -> reduce-scattered in a real run
    dL = dy.t() @ x                          # [n/p, n/p]
    dD = dy.t() @ G                          # [n/p, (p-1)k]
    dx = dy @ L                              # [B, n/p]
    dC = dg.t() @ x                          # [k, n/p]
    dx.addmm_(dg, C)
    return y, ghosts, d_remote, dL, dD, dC, dx


def _tp_step(x, W, dy):
    """One TP rank of a megatron column layer, forward + backward (row layers cost the same)."""
    y = x @ W.t()                            # [B, n] x [n, n/p]
    dW = dy.t() @ x                          # [n/p, n]
    dx = dy @ W                              # [B, n] (all-reduced in a real run)
    return y, dW, dx


def _tensors(row, device, dtype):
    B, n, m, k, p = row["tokens"], row["n"], row["shard"], row["k"], row["p"]
    r = lambda *s: torch.randn(*s, device=device, dtype=dtype) * 0.02  # noqa: E731
    ph = (r(B, m), r(m, m), r(k, m), r(m, (p - 1) * k), r(B, (p - 1) * k), r(B, m), r(B, k))
    tp = (r(B, n), r(m, n), r(B, m))
    return ph, tp


def _time(fn, args, device, min_s: float, meter=None, name: str = "w") -> dict:
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        fn(*args)
    sync()
    t0 = time.perf_counter()
    fn(*args)
    sync()
    one = max(time.perf_counter() - t0, 1e-6)
    iters = max(5, math.ceil(min_s / one))
    if meter is not None:
        meter.begin_window(name)
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn(*args)
    sync()
    dt = time.perf_counter() - t0
    m = meter.end_window(name) if meter is not None else None
    return {"iters": iters, "time_s": dt / iters,
            "energy_j": None if m is None or m.energy_j is None else m.energy_j / iters,
            "energy_source": m.source if m else "none", "energy_reason": m.reason if m else "dry run",
            "energy_short_window": m.short_window if m else None}


def peak_tflops(name: str, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, "given with --peak-tflops"
    for key, v in PEAK_BF16_TFLOPS.items():
        if key.lower() in name.lower():
            return v, f"NVIDIA datasheet dense BF16 for {key}"
    return None, f"unknown card {name!r}: pass --peak-tflops"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/gpu")
    ap.add_argument("--ghosts", type=int, default=64, help="k per rank")
    ap.add_argument("--tokens", type=int, default=8192, help="B, tokens (samples) per rank per step")
    ap.add_argument("--window-s", type=float, default=1.0, help="energy window per shape, seconds")
    ap.add_argument("--link-gbs", type=float, default=450.0,
                    help="GB/s per direction per GPU for the extrapolation (H100 NVLink4: 900 GB/s total = 450 each way)")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--preset", default="h100-sxm-bf16", help="energy preset for the bytes' pJ/byte")
    ap.add_argument("--budget-s", type=float, default=420, help="stop measuring new shapes after this")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU, no energy")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    if args.dry_run:
        device, dtype = torch.device("cpu"), torch.float32
        rows = shape_table((256, 512), (8, 16), ghosts=8, tokens=64)
        card, meter, min_s = "CPU (dry run)", None, 0.01
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run on a GPU, or pass --dry-run")
        device, dtype = torch.device("cuda", 0), torch.bfloat16
        torch.cuda.set_device(device)
        rows = shape_table(ghosts=args.ghosts, tokens=args.tokens)
        card, min_s = torch.cuda.get_device_name(device), args.window_s
        meter = energy.EnergyMeter(device)
    peak, peak_src = peak_tflops(card, args.peak_tflops)
    big = 8192 if not args.dry_run else 256
    a, b = torch.randn(big, big, device=device, dtype=dtype), torch.randn(big, big, device=device, dtype=dtype)
    square = _time(torch.matmul, (a, b), device, min_s)
    square_tflops = 2 * big ** 3 / square["time_s"] / 1e12
    del a, b
    preset = energy.PRESETS[args.preset]
    results = []
    for row in rows:
        if time.perf_counter() - start > args.budget_s:
            row["skipped"] = "time budget"
            results.append(row)
            continue
        ph_args, tp_args = _tensors(row, device, dtype)
        ph = _time(_phantom_step, ph_args, device, min_s, meter, "phantom")
        tp = _time(_tp_step, tp_args, device, min_s, meter, "tp")
        del ph_args, tp_args
        if device.type == "cuda":
            torch.cuda.empty_cache()
        for name, m, macs, nbytes in (("phantom", ph, row["phantom_macs"], row["phantom_bytes"]),
                                      ("tp", tp, row["tp_macs"], row["tp_bytes"])):
            tflops = 2 * macs / m["time_s"] / 1e12
            comm_s = nbytes / (args.link_gbs * 1e9)
            m.update(tflops=tflops, eff_vs_peak=None if peak is None else tflops / peak,
                     eff_vs_square=tflops / square_tflops,
                     extrapolated_step_s_serial=m["time_s"] + comm_s,
                     extrapolated_comm_s=comm_s,
                     extrapolated_energy_j=None if m["energy_j"] is None else
                     m["energy_j"] + nbytes * preset.pj_per_byte * 1e-12)
            if name == "phantom":
                m["extrapolated_step_s_overlapped"] = max(m["time_s"], comm_s)
            row[name] = m
        results.append(row)
    doc = {"card": card, "dtype": str(dtype), "peak_bf16_tflops": peak, "peak_source": peak_src,
           "square_gemm": {"n": big, **square, "tflops": square_tflops},
           "link_gbs_per_direction": args.link_gbs, "pj_per_byte": preset.pj_per_byte,
           "pj_per_byte_source": preset.byte_source, "elapsed_s": time.perf_counter() - start,
           "energy_source": getattr(meter, "source", "none"), "energy_reason": getattr(meter, "reason", "dry run"),
           "rows": results}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_layer_check.json"), "w") as f:
        json.dump(doc, f, indent=1)
    md = markdown(doc)
    with open(os.path.join(args.out, "gpu_layer_check.md"), "w") as f:
        f.write(md + "\n")
    print(md)
    return 0


def markdown(doc: dict) -> str:
    def j(x):
        return "n/a" if x is None else f"{x:.3g}"
    lines = [f"Card: {doc['card']} ({doc['dtype']}); dense peak {doc['peak_bf16_tflops']} TFLOP/s "
             f"({doc['peak_source']}); measured {doc['square_gemm']['n']}^3 GEMM "
             f"{doc['square_gemm']['tflops']:.1f} TFLOP/s; energy: {doc['energy_source']} "
             f"{doc['energy_reason'] or ''}. Per rank, one layer, forward + backward, measured "
             "(compute only: the exchange is replaced by resident tensors).", "",
             "| n | p | k | tokens | phantom ms | TP ms | phantom/TP time | phantom J | TP J | "
             "phantom TFLOP/s (eff. vs peak) | TP TFLOP/s (eff. vs peak) |", "|" + "---|" * 11]
    ext = ["", f"**Extrapolated** (not measured) per rank, one layer: compute above + cost-model bytes at "
           f"{doc['link_gbs_per_direction']} GB/s per direction; energy + {doc['pj_per_byte']} pJ/byte "
           f"({doc['pj_per_byte_source']}).", "",
           "| n | p | phantom bytes | TP bytes | phantom s, serial / overlapped | TP s, serial | phantom/TP time | "
           "phantom/TP energy |", "|" + "---|" * 8]
    for r in doc["rows"]:
        if "phantom" not in r:
            lines.append(f"| {r['n']} | {r['p']} | {r['k']} | {r['tokens']} | skipped ({r.get('skipped')}) |" + " |" * 6)
            continue
        ph, tp = r["phantom"], r["tp"]
        e = lambda m: "n/a" if m["eff_vs_peak"] is None else f"{m['eff_vs_peak']:.2f}"  # noqa: E731
        lines.append(f"| {r['n']} | {r['p']} | {r['k']} | {r['tokens']} | {ph['time_s'] * 1e3:.3f} | "
                     f"{tp['time_s'] * 1e3:.3f} | {ph['time_s'] / tp['time_s']:.3f} | {j(ph['energy_j'])} | "
                     f"{j(tp['energy_j'])} | {ph['tflops']:.3g} ({e(ph)}) | {tp['tflops']:.3g} ({e(tp)}) |")
        er = ("n/a" if ph["extrapolated_energy_j"] is None or tp["extrapolated_energy_j"] is None else
              f"{ph['extrapolated_energy_j'] / tp['extrapolated_energy_j']:.3f}")
        ext.append(f"| {r['n']} | {r['p']} | {r['phantom_bytes']} | {r['tp_bytes']} | "
                   f"{ph['extrapolated_step_s_serial']:.3g} / {ph['extrapolated_step_s_overlapped']:.3g} | "
                   f"{tp['extrapolated_step_s_serial']:.3g} | "
                   f"{ph['extrapolated_step_s_serial'] / tp['extrapolated_step_s_serial']:.3f} | {er} |")
    return "\n".join(lines + ext)


if __name__ == "__main__":
    raise SystemExit(main())
