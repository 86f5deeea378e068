"""Per-rank compute time, NVML energy and GEMM efficiency of one phantom layer rank against one
TP layer rank, on a single GPU (the shapes a rank sees at ``n`` = 8192..32768, ``p`` = 8..64).

Run through ``benchmarks/gpu_check.sh`` (one H100/H200). Per shape it times one rank's **real**
forward + backward: ``phantom_plugin.ops.phantom_linear`` (the autograd Function the layers run,
with its index_select, send buffer and zero fill) with the ghost exchange replaced by resident
tensors of the right shapes (one GPU has no peers; as ``phantom_plugin/bench/probe.py``'s
local-copy mode), and a megatron column layer's ``F.linear`` forward + backward through
autograd. So these are **compute** figures. NVML energy is read over windows of at least
``--window-s`` seconds (default 5: the counter updates every ~10-100 ms). GEMM efficiency is
achieved FLOP/s over the card's dense BF16 datasheet rate and over a measured large square GEMM.
Results are written after every shape, so a timeout loses nothing measured.

Multi-GPU figures are then **extrapolated** (labelled so), with the link stated per ``p``:
``p <= --gpus-per-node`` (8) stays in one node on NVLink (``--nvlink-gbs``, 450 GB/s per direction
on H100 NVLink4); a larger group spans nodes and its ring collectives run at the inter-node
network rate per GPU (``--net-gbs``, 50 GB/s = one 400 Gb/s NDR InfiniBand NIC per GPU).
Communication bytes per rank come from the cost model (NCCL ring). Overlap is modelled as the
code allows it:

* phantom: only the GEMMs that do not need the exchange overlap it: the forward all-gather with
  the local GEMM ``x L^T``, the backward reduce-scatter with ``dL``, ``dD`` and ``dy L``
  (measured separately); the rest of the op waits for the exchange;
* TP (a column + row pair, reported per layer): the row layer's forward all-reduce is serial;
  the column layer's backward input-grad all-reduce overlaps its weight-grad GEMM, as
  megatron issues it.

Energy adds the bytes at the pJ/byte of the ``--preset`` device (:data:`phantom_plugin.modeling.devices.DEVICES`,
an assumption, labelled so) to the measured joules. ``--dry-run`` runs small
shapes on CPU (no energy, no card) to check the script end to end.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from phantom_plugin import comm, energy, ops  # noqa: E402
from phantom_plugin.modeling import counts, devices  # noqa: E402

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
            ph = counts.phantom_linear_cost(n, n, p=p, k=ghosts, batch=tokens, dtype_bytes=2, bias=False)
            tp_pair = counts.tp_ffn_cost(n, 2, p=p, batch=tokens, dtype_bytes=2, bias=False)
            rows.append({"n": n, "p": p, "k": ghosts, "tokens": tokens, "shard": n // p,
                         "phantom_macs": ph.macs, "tp_macs": tp_pair.macs // 2,
                         "phantom_bytes": ph.bytes_sent, "tp_bytes": tp_pair.bytes_sent // 2})
    return rows


_EXCHANGED = object()
"""Stands for a phantom group of ``p`` ranks whose exchange is replaced by resident tensors."""


@contextlib.contextmanager
def resident_exchange(p: int, rank: int, gathered: torch.Tensor, reduced: torch.Tensor):
    """Inside the block, ``phantom_linear(..., group=_EXCHANGED)`` takes its ``p``-rank path; the
    ghost all-gather writes this rank's ghosts into the resident ``gathered [p, B, k]`` (as NCCL
    would) and returns it, the reduce-scatter returns the resident ``reduced [B, k]``."""
    size, ag, rs = comm.group_size, comm.all_gather, comm.reduce_scatter

    def group_size(group):
        return p if group is _EXCHANGED else size(group)

    def all_gather(x, group, *, async_op=False, tag=""):
        gathered[rank].copy_(x)
        return comm.Handle(None, gathered) if async_op else gathered

    def reduce_scatter(x, group, *, async_op=False, tag=""):
        return comm.Handle(None, reduced) if async_op else reduced
    comm.group_size, comm.all_gather, comm.reduce_scatter = group_size, all_gather, reduce_scatter
    try:
        yield
    finally:
        comm.group_size, comm.all_gather, comm.reduce_scatter = size, ag, rs


def _phantom_step(x, L, C, D, dy, p):
    """One phantom rank's real forward + backward (``ops.phantom_linear``; resident exchange)."""
    y = ops.phantom_linear(x, L, C, D, None, _EXCHANGED, p // 2)
    return torch.autograd.grad(y, (x, L, C, D), dy)


def _phantom_forward(x, L, C, D, p):
    """One phantom rank's real forward only (inference; resident exchange)."""
    with torch.inference_mode():
        return ops.phantom_linear(x, L, C, D, None, _EXCHANGED, p // 2)


def _tp_forward(x, W):
    """One TP rank's forward only (inference): the column layer's GEMM."""
    with torch.inference_mode():
        return torch.nn.functional.linear(x, W)


def _phantom_overlappable(x, L, remote, dy):
    """The GEMMs that can run while the ghosts travel: forward ``x L^T``; backward ``dL``,
    ``dD`` and ``dy L`` (``dC`` and the ghost part of ``dx`` wait for the reduce-scatter)."""
    fwd = x @ L.t()
    dD = dy.t() @ remote if dy.device.type != "cpu" else (remote.t() @ dy).t()
    return fwd, dy.t() @ x, dD, dy @ L


def _tp_step(x, W, dy):
    """One TP rank of a megatron column layer, forward + backward through autograd (row layers
    cost the same)."""
    y = torch.nn.functional.linear(x, W)          # [B, n] x [n, n/p]
    return torch.autograd.grad(y, (x, W), dy)     # dx [B, n] (all-reduced in a real run), dW


def _tp_weight_grad(x, dy):
    """The column layer's weight-grad GEMM, which megatron overlaps with the dx all-reduce."""
    return dy.t() @ x                             # [n/p, n]


def _tensors(row, device, dtype):
    B, n, m, k, p = row["tokens"], row["n"], row["shard"], row["k"], row["p"]
    r = lambda *s: torch.randn(*s, device=device, dtype=dtype) * 0.02  # noqa: E731
    ph = (r(B, m).requires_grad_(), r(m, m).requires_grad_(), r(k, m).requires_grad_(),
          r(m, (p - 1) * k).requires_grad_(), r(B, m))
    exchange = (r(p, B, k), r(B, k))
    overlap = (ph[0].detach(), ph[1].detach(), r(B, (p - 1) * k), ph[4])
    tp = (r(B, n).requires_grad_(), r(m, n).requires_grad_(), r(B, m))
    return ph, exchange, overlap, tp


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
    return {"iters": iters, "time_s": dt / iters, "window_s": dt,
            "energy_j": None if m is None or m.energy_j is None else m.energy_j / iters,
            "energy_source": m.source if m else "none", "energy_reason": m.reason if m else "dry run",
            "energy_short_window": m.short_window if m else None}


def link_for(p: int, args) -> tuple[float, str]:
    """GB/s per direction per GPU for a group of ``p`` and the words that say which link it is."""
    if p <= args.gpus_per_node:
        return args.nvlink_gbs, f"NVLink within one node ({args.nvlink_gbs:g} GB/s per direction)"
    return args.net_gbs, (f"inter-node network, {p} GPUs span {math.ceil(p / args.gpus_per_node)} nodes "
                          f"({args.net_gbs:g} GB/s per GPU per direction)")


def extrapolate(row: dict, args) -> None:
    """Add the labelled multi-GPU extrapolation to ``row`` (see the module docstring)."""
    gbs, link = link_for(row["p"], args)
    ph, tp = row["phantom"], row["tp"]
    c_ag = c_rs = row["phantom_bytes"] / 2 / (gbs * 1e9)          # one all-gather, one reduce-scatter
    c_ar = row["tp_bytes"] / (gbs * 1e9)                           # per layer: one all-reduce of the pair
    ov_f, ov_b = row["overlap"]["phantom_fwd_s"], row["overlap"]["phantom_bwd_s"]
    ph["extrapolated_step_s_serial"] = ph["time_s"] + c_ag + c_rs
    ph["extrapolated_step_s_overlapped"] = (ph["time_s"] - ov_f - ov_b + max(ov_f, c_ag) + max(ov_b, c_rs))
    # a column + row pair: 2 layers of compute, the forward all-reduce serial, the backward one
    # overlapping the column layer's weight-grad GEMM; per layer = half the pair
    t_dw = row["overlap"]["tp_weight_grad_s"]
    tp["extrapolated_step_s_serial"] = tp["time_s"] + c_ar
    tp["extrapolated_step_s_overlapped"] = (2 * tp["time_s"] + c_ar + max(0.0, c_ar - t_dw)) / 2
    for m, nbytes, comm_s in ((ph, row["phantom_bytes"], c_ag + c_rs), (tp, row["tp_bytes"], c_ar)):
        m["extrapolated_comm_s"] = comm_s
        m["extrapolated_energy_j"] = (None if m["energy_j"] is None else
                                      m["energy_j"] + nbytes * args.pj_per_byte * 1e-12)
    row["link"], row["link_gbs_per_direction"] = link, gbs


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
    ap.add_argument("--window-s", type=float, default=5.0,
                    help="energy window per shape, seconds (NVML updates every ~100 ms: keep >= 5)")
    ap.add_argument("--gpus-per-node", type=int, default=8, help="groups up to this size stay on NVLink")
    ap.add_argument("--nvlink-gbs", type=float, default=450.0,
                    help="GB/s per direction per GPU within a node (H100 NVLink4: 900 GB/s total = 450 each way)")
    ap.add_argument("--net-gbs", type=float, default=50.0,
                    help="GB/s per direction per GPU across nodes (one 400 Gb/s NDR InfiniBand NIC per GPU)")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--preset", default="h100-sxm", choices=sorted(devices.DEVICES),
                    help="device whose pJ/byte prices the extrapolated bytes (modeled)")
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
    preset = devices.DEVICES[args.preset]
    args.pj_per_byte = preset.pj_per_byte
    big = 8192 if not args.dry_run else 256
    a, b = torch.randn(big, big, device=device, dtype=dtype), torch.randn(big, big, device=device, dtype=dtype)
    square = _time(torch.matmul, (a, b), device, min_s)
    square_tflops = 2 * big ** 3 / square["time_s"] / 1e12
    del a, b
    short = max(min_s / 10, 0.01) if not args.dry_run else 0.01      # overlap parts: time only
    doc = {"card": card, "dtype": str(dtype), "peak_bf16_tflops": peak, "peak_source": peak_src,
           "square_gemm": {"n": big, **square, "tflops": square_tflops},
           "gpus_per_node": args.gpus_per_node, "nvlink_gbs_per_direction": args.nvlink_gbs,
           "net_gbs_per_direction": args.net_gbs, "pj_per_byte": preset.pj_per_byte,
           "pj_per_byte_source": preset.byte_source, "window_s": min_s,
           "energy_source": getattr(meter, "source", "none"), "energy_reason": getattr(meter, "reason", "dry run"),
           "rows": []}
    for row in rows:
        if time.perf_counter() - start > args.budget_s:
            row["skipped"] = "time budget"
        else:
            _measure(row, device, dtype, min_s, short, meter, peak, square_tflops)
            extrapolate(row, args)
        doc["rows"].append(row)
        doc["elapsed_s"] = time.perf_counter() - start
        _write(args.out, doc)                                   # after every shape
    print(markdown(doc))
    return 0


def _measure(row, device, dtype, min_s, short, meter, peak, square_tflops) -> None:
    ph_args, (gathered, reduced), ov_args, tp_args = _tensors(row, device, dtype)
    with resident_exchange(row["p"], row["p"] // 2, gathered, reduced):
        ph = _time(_phantom_step, ph_args + (row["p"],), device, min_s, meter, "phantom")
    tp = _time(_tp_step, tp_args, device, min_s, meter, "tp")
    with resident_exchange(row["p"], row["p"] // 2, gathered, reduced):
        f_ph = _time(_phantom_forward, tuple(t.detach() for t in ph_args[:4]) + (row["p"],), device, short)
    f_tp = _time(_tp_forward, (tp_args[0].detach(), tp_args[1].detach()), device, short)
    row["forward"] = {"phantom_s": f_ph["time_s"], "tp_s": f_tp["time_s"],
                      "ratio": f_ph["time_s"] / f_tp["time_s"]}
    x, L, remote, dy = ov_args
    fwd = _time(lambda: x @ L.t(), (), device, short)
    both = _time(_phantom_overlappable, ov_args, device, short)
    t_dw = _time(_tp_weight_grad, (tp_args[0].detach(), tp_args[2]), device, short)
    row["overlap"] = {"phantom_fwd_s": fwd["time_s"], "phantom_bwd_s": max(0.0, both["time_s"] - fwd["time_s"]),
                      "tp_weight_grad_s": t_dw["time_s"]}
    del ph_args, gathered, reduced, ov_args, tp_args
    if device.type == "cuda":
        torch.cuda.empty_cache()
    for name, m, macs in (("phantom", ph, row["phantom_macs"]), ("tp", tp, row["tp_macs"])):
        tflops = 2 * macs / m["time_s"] / 1e12
        m.update(tflops=tflops, eff_vs_peak=None if peak is None else tflops / peak,
                 eff_vs_square=tflops / square_tflops)
        row[name] = m


def _write(out: str, doc: dict) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "gpu_layer_check.json"), "w") as f:
        json.dump(doc, f, indent=1)
    with open(os.path.join(out, "gpu_layer_check.md"), "w") as f:
        f.write(markdown(doc) + "\n")


def markdown(doc: dict) -> str:
    def j(x):
        return "n/a" if x is None else f"{x:.3g}"
    lines = [f"Card: {doc['card']} ({doc['dtype']}); dense peak {doc['peak_bf16_tflops']} TFLOP/s "
             f"({doc['peak_source']}); measured {doc['square_gemm']['n']}^3 GEMM "
             f"{doc['square_gemm']['tflops']:.1f} TFLOP/s; energy: {doc['energy_source']} "
             f"{doc['energy_reason'] or ''} (windows >= {doc['window_s']:g} s). Per rank, one layer, "
             "forward + backward of the real op, measured (compute only: the exchange is replaced by "
             "resident tensors).", "",
             "| n | p | k | tokens | phantom ms | TP ms | phantom/TP time | phantom J | TP J | "
             "phantom TFLOP/s (eff. vs peak) | TP TFLOP/s (eff. vs peak) |", "|" + "---|" * 11]
    ext = ["", "**Extrapolated, not measured**: per rank, one layer: the compute above plus the cost "
           "model's bytes over the link named per row; phantom overlaps only its local GEMMs with the "
           "ghost exchange, TP's forward all-reduce is serial and its backward one overlaps the weight-"
           f"grad GEMM; energy + {doc['pj_per_byte']} pJ/byte ({doc['pj_per_byte_source']}).", "",
           "| n | p | link model | phantom bytes | TP bytes | phantom s, serial / overlapped | "
           "TP s, serial / overlapped | phantom/TP time (overlapped) | phantom/TP energy |", "|" + "---|" * 9]
    fwd = ["", "Forward only (inference), per rank, one layer, measured (compute only, resident exchange):", "",
           "| n | p | k | tokens | phantom ms | TP ms | phantom/TP |", "|" + "---|" * 7]
    for r in doc["rows"]:
        if "forward" in r:
            f = r["forward"]
            fwd.append(f"| {r['n']} | {r['p']} | {r['k']} | {r['tokens']} | {f['phantom_s'] * 1e3:.3f} | "
                       f"{f['tp_s'] * 1e3:.3f} | {f['ratio']:.3f} |")
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
        ext.append(f"| {r['n']} | {r['p']} | {r['link']} | {r['phantom_bytes']} | {r['tp_bytes']} | "
                   f"{ph['extrapolated_step_s_serial']:.3g} / {ph['extrapolated_step_s_overlapped']:.3g} | "
                   f"{tp['extrapolated_step_s_serial']:.3g} / {tp['extrapolated_step_s_overlapped']:.3g} | "
                   f"{ph['extrapolated_step_s_overlapped'] / tp['extrapolated_step_s_overlapped']:.3f} | {er} |")
    return "\n".join(lines + fwd + ext)


if __name__ == "__main__":
    raise SystemExit(main())
