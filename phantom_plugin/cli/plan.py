"""``phantom-plan``: the cost model of TP versus phantom for an FFN, side by side.

    phantom-plan --width 8192 --depth 4 --ranks 8 --ghosts 64 [--batch 1] [--dtype bf16]
    phantom-plan --width 8192 --depth 4 --ranks 8 --param-budget 0.25     # suggest k
    phantom-plan --width 2048 --depth 4 --ranks 2 --ghosts 32 --batch 256 --calibrate [--json]
    phantom-plan --width 8192 --depth 4 --ranks 8 --ghosts 64 --batch 8192 --dtype bf16 --datasheet h100-sxm
    phantom-plan --width 4096 --depth 4 --ranks 8 --ghosts 64 --ffn-hidden 16384   # equal-compute MLP width

Numbers are modeled (see :mod:`phantom_plugin.modeling.counts`), per training step; bytes are what one
rank sends under ring collectives. ``--calibrate`` starts ``--ranks`` ranks on this machine (gloo;
NCCL with one GPU per rank when enough are visible), times every GEMM shape, pointwise pass,
optimizer step and collective of both models' training step there (a few seconds), and predicts
each model's step time from them (:mod:`phantom_plugin.modeling.step_model`). ``--datasheet DEVICE`` prices the
same terms at a GPU's datasheet rates and a stated link instead (:mod:`phantom_plugin.modeling.datasheet`):
extrapolated, not measured, and labelled so. ``--json`` prints the same as JSON.

Every plan also names the equal-compute width of a transformer MLP (``hidden = --width``,
``ffn_hidden_size = --ffn-hidden``, default ``4 * --width``): the widest phantom MLP whose per-rank
MACs do not exceed TP's (:func:`phantom_plugin.modeling.counts.equal_compute_ffn_hidden`; what
``phantom-bench --task lm --match compute`` trains).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from .. import dtypes
from ..modeling import counts
from ..modeling.datasheet import GPUS_PER_NODE, extrapolate
from ..modeling.devices import DEVICES
from ..shapes import divisibility_error, ghost_dim_error

__all__ = ["main", "plan_table", "k_time_to_loss_hint", "equal_compute_hint"]


def _fmt(n: float) -> str:
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3f}{unit}"
    return f"{n:.0f}"


def plan_table(width: int, depth: int, ranks: int, ghosts: int, batch: int, dtype: str) -> str:
    """Markdown table of :func:`counts.tp_ffn_cost` against :func:`counts.phantom_ffn_cost`."""
    elt = dtypes.lookup(dtype).bytes
    tp = counts.tp_ffn_cost(width, depth, p=ranks, batch=batch, dtype_bytes=elt)
    ph = counts.phantom_ffn_cost(width, depth, p=ranks, k=ghosts, batch=batch, dtype_bytes=elt)
    rows = [
        ("parameters (whole group)", tp.params, ph.params),
        ("parameters per rank", tp.params_per_rank, ph.params_per_rank),
        ("MACs forward (per rank)", tp.macs_fwd, ph.macs_fwd),
        ("MACs backward (per rank)", tp.macs_bwd, ph.macs_bwd),
        ("FLOPs per step (per rank)", tp.flops, ph.flops),
        ("bytes sent forward (per rank, ring)", tp.bytes_by("fwd"), ph.bytes_by("fwd")),
        ("bytes sent backward (per rank, ring)", tp.bytes_by("bwd"), ph.bytes_by("bwd")),
        ("collectives per step", len(tp.messages), len(ph.messages)),
        ("saved activations (values per rank)", tp.activation_values, ph.activation_values),
    ]
    out = [f"FFN width {width}, depth {depth}, {ranks} ranks, k={ghosts}, batch {batch}, {dtype} "
           "(modeled, per training step)", "",
           "| | TP (Megatron column/row) | phantom | phantom/TP |", "|---|---:|---:|---:|"]
    for name, a, b in rows:
        ratio = f"{b / a:.4f}" if a else "-"
        out.append(f"| {name} | {_fmt(a)} | {_fmt(b)} | {ratio} |")
    return "\n".join(out)


def k_time_to_loss_hint(width: int, ranks: int, ghosts: Optional[int] = None) -> dict:
    """Rule of thumb for the ``k`` at which phantom reaches a loss soonest (``docs/choosing-k.md``).

    From one task only (the teacher FFN, width 1024, ``p = 2``, Adam, ``param_study.py``): a loss
    a dense model reaches early (~50 steps) needed ``k ~ (n/p)/8``, one it reaches later (100-200
    steps) ``k ~ (n/p)/4``; a larger ``k`` only added cost per step. Returns ``{"early_loss",
    "later_loss", "n_over_p", "ghosts_vs_hint", "basis"}``; ``ghosts_vs_hint`` places ``ghosts``
    (if given) below, inside or above that range.
    """
    local = width // ranks
    early, later = max(1, local // 8), max(1, local // 4)
    where = None
    if ghosts is not None:
        where = "below" if ghosts < early else "above" if ghosts > later else "inside"
    return {"early_loss": early, "later_loss": later, "n_over_p": local, "ghosts_vs_hint": where,
            "basis": "rule of thumb from one task (teacher FFN, width 1024, p=2, Adam, 300 steps): "
                     "k ~ (n/p)/8 reached a dense model's early loss soonest, (n/p)/4 its later "
                     "losses; larger k only added cost per step. Check with a short sweep on your task"}


def equal_compute_hint(width: int, ranks: int, ghosts: int, ffn_hidden: Optional[int] = None) -> dict:
    """The phantom MLP ``ffn_hidden_size`` at which a transformer MLP (``hidden = width``) costs TP's
    per-rank MACs: ``{"hidden", "tp_ffn_hidden", "phantom_ffn_hidden", "mlp_macs_ratio", "error"}``
    (``phantom_ffn_hidden`` ``None`` and ``error`` the reason when it cannot be met)."""
    ffn = 4 * width if ffn_hidden is None else ffn_hidden
    out = {"hidden": width, "tp_ffn_hidden": ffn, "ghosts": ghosts, "phantom_ffn_hidden": None,
           "mlp_macs_ratio": None, "error": None}
    try:
        f = counts.equal_compute_ffn_hidden(width, ffn, p=ranks, k=ghosts)
    except ValueError as e:
        return {**out, "error": str(e)}
    ratio = (counts.phantom_mlp_cost(width, f, p=ranks, k=ghosts, tokens=1).macs
             / counts.tp_mlp_cost(width, ffn, p=ranks, tokens=1).macs)
    return {**out, "phantom_ffn_hidden": f, "mlp_macs_ratio": ratio}


def _equal_compute_note(eq: dict) -> str:
    if eq["error"]:
        return f"Equal compute (transformer MLP, hidden {eq['hidden']}, ffn {eq['tp_ffn_hidden']}): {eq['error']}."
    return (f"Equal compute: a transformer MLP of hidden {eq['hidden']} and ffn_hidden_size {eq['tp_ffn_hidden']} "
            f"in TP costs what a phantom MLP (k={eq['ghosts']}) of ffn_hidden_size {eq['phantom_ffn_hidden']} costs "
            f"(MLP MACs/rank phantom/TP = {eq['mlp_macs_ratio']:.4f}; phantom-bench --task lm --match compute).")


def _hint_note(hint: dict, ghosts: int) -> str:
    where = {"below": "below that range (on that task a smaller k reached dense-level losses later)",
             "inside": "inside that range",
             "above": "above that range (on that task a larger k only added cost per step)"}[hint["ghosts_vs_hint"]]
    return (f"Time to a loss (a rule of thumb from one task, not a guarantee): k ~ (n/p)/8 = "
            f"{hint['early_loss']} for a loss a dense model reaches early, (n/p)/4 = {hint['later_loss']} "
            f"for later ones;\nk={ghosts} is {where}. Check with a short sweep on your task "
            "(docs/choosing-k.md).")


def plan_dict(width: int, depth: int, ranks: int, ghosts: int, batch: int, dtype: str,
              prediction: Optional[dict] = None) -> dict:
    """The plan as JSON-ready data: both models' counts, and the calibrated prediction if given."""
    elt = dtypes.lookup(dtype).bytes
    models = {"tp": counts.tp_ffn_cost(width, depth, p=ranks, batch=batch, dtype_bytes=elt),
              "phantom": counts.phantom_ffn_cost(width, depth, p=ranks, k=ghosts, batch=batch, dtype_bytes=elt)}
    out = {"width": width, "depth": depth, "ranks": ranks, "ghosts": ghosts, "batch": batch, "dtype": dtype,
           "modeled": {m: {"params": c.params, "params_per_rank": c.params_per_rank, "macs_fwd": c.macs_fwd,
                           "macs_bwd": c.macs_bwd, "flops": c.flops, "bytes_sent_fwd": c.bytes_by("fwd"),
                           "bytes_sent_bwd": c.bytes_by("bwd"), "collectives": len(c.messages),
                           "activation_values": c.activation_values} for m, c in models.items()}}
    if prediction is not None:
        out.update(prediction)
    return out


def calibrated_prediction(width: int, depth: int, ranks: int, ghosts: int, batch: int, dtype: str,
                          activation: str = "gelu", threads: int = 0, bind_cores: bool = False) -> dict:
    """Measure the step terms of both models on ``ranks`` fresh ranks and predict their step times.

    Returns ``{"predicted_step_time_s": {"tp", "phantom"}, "ratio", "parts_s": {...},
    "link": {"latency_s", "bandwidth_bytes_per_s", "fits"}, "machine", "threads_per_rank", "cores",
    "oversubscribed", "bind_cores"}``. ``bind_cores``: each rank on cores of its own
    (:func:`phantom_plugin.bench.launch.run_ranks`), as ``phantom-bench --bind-cores`` runs them. More
    ranks x threads than ``cores`` (the CPUs this process may run on) share the cores: every term
    is timed by all ranks at once, so the sharing is in the times, and the waits are not added (a
    rank blocked in a collective lends its core to another's compute; adding them overestimated
    phantom by 54 % at 4 ranks on 2 cores).
    """
    import torch
    from ..modeling import step_model
    from ..bench.calibrate import calibrate_rank
    from ..bench.workload import machine_description
    from ..bench.launch import default_threads, run_ranks
    terms = {mode: step_model.step_terms(mode, width, depth, p=ranks, batch=batch, k=ghosts,
                                     activation=activation, dtype=dtype) for mode in ("tp", "phantom")}
    nccl = torch.cuda.is_available() and torch.cuda.device_count() >= ranks
    threads = threads or default_threads(ranks)                      # as phantom-bench chooses them
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    oversubscribed = not nccl and ranks * threads > cores
    # GEMMs are timed as each model's chain (below), not shape by shape. Ranks sharing cores: a rank
    # blocked in a collective gives its core to another rank's compute, so what a collective costs
    # beyond its fit overlaps the compute (counted at the shared rate) and is not added.
    skip = (step_model.Gemm, step_model.Wait) if oversubscribed else (step_model.Gemm,)
    distinct = sorted({t for m in terms.values() for t in m if not isinstance(t, skip)}, key=repr)
    chains = {mode: step_model.gemm_chain(terms[mode]) for mode in terms}
    # Adam runs once a step, its moments evicted by the step's GEMMs since: timed after the chain
    after = {t: mode for mode in terms for t in terms[mode] if isinstance(t, step_model.Optimizer)}
    secs, link, chain_s = run_ranks(calibrate_rank, ranks, distinct, dtype, 7, chains, after, timeout=600,
                                    backend="nccl" if nccl else "gloo", threads=threads, bind_cores=bind_cores)[0]
    measured = dict(zip(distinct, secs))
    measured.update({t: 0.0 for m in terms.values() for t in m if isinstance(t, step_model.Wait) and t not in measured})
    pred = {mode: step_model.predict(terms[mode], measured, gemm_chain_s=chain_s[mode]) for mode in terms}
    device = torch.device("cuda", 0) if nccl else torch.device("cpu")
    return {"predicted_step_time_s": {m: pred[m]["step_time_s"] for m in pred},
            "ratio": pred["phantom"]["step_time_s"] / pred["tp"]["step_time_s"],
            "parts_s": {m: pred[m]["parts_s"] for m in pred}, "link": link,
            "machine": machine_description(device), "threads_per_rank": threads, "cores": cores,
            "oversubscribed": oversubscribed, "bind_cores": bind_cores}


def _time_rows(label: str, step_s: dict, ratio: float, parts_s: dict, parts: tuple, fmt) -> list[str]:
    """A step time row of both models and one row per part, each time written by ``fmt``."""
    rows = [f"| {label} | {fmt(step_s['tp'])} | {fmt(step_s['phantom'])} | {ratio:.4f} |"]
    for part in parts:
        a, b = (parts_s[m].get(part, 0.0) for m in ("tp", "phantom"))
        rows.append(f"| - of which {part} | {fmt(a)} | {fmt(b)} | {f'{b / a:.4f}' if a else '-'} |")
    return rows


def _prediction_rows(pred: dict) -> list[str]:
    return _time_rows("predicted step time (calibrated here)", pred["predicted_step_time_s"], pred["ratio"],
                      pred["parts_s"], ("gemm", "pointwise", "optimizer", "collective", "wait", "framework"),
                      lambda s: f"{s * 1e3:.1f} ms")


def _time(s: float) -> str:
    return f"{s * 1e3:.2f} ms" if abs(s) >= 1e-3 else f"{s * 1e6:.1f} us"


def _extrapolation_rows(ext: dict) -> list[str]:
    return _time_rows(f"step time extrapolated ({ext['extrapolation']['device']} datasheet, not measured)",
                      ext["extrapolated_step_time_s"], ext["extrapolated_ratio"], ext["extrapolated_parts_s"],
                      ("gemm", "pointwise", "optimizer", "collective", "wait"), _time)


def _extrapolation_note(ext: dict) -> str:
    info = ext["extrapolation"]
    eff = "" if info["gemm_efficiency"] == 1 else f" x {info['gemm_efficiency']:g} (given efficiency)"
    return (f"Extrapolated, not measured: {info['device']}, {info['dtype']} GEMMs at "
            f"{info['matmul_flops_per_s'] / 1e12:g} TFLOP/s{eff} or memory-bound at "
            f"{info['memory_bytes_per_s'] / 1e12:g} TB/s; {info['link']}. {info['model']}. "
            f"Figures: {info['source']}.")


def _calibration_note(pred: dict, ranks: int) -> str:
    over = f" on {pred['cores']} usable cores (oversubscribed)" if pred["oversubscribed"] else ""
    over += ", each on cores of its own (--bind-cores)" if pred.get("bind_cores") else ""
    fits = []
    for op, f in sorted(pred["link"].get("fits", {}).items()):
        bw = f"{1e-9 / f['beta_s_per_byte']:.2f} GB/s" if f["beta_s_per_byte"] > 0 else "no size effect"
        fits.append(f"{op} {f['alpha_s'] * 1e6:.0f} us + bytes at {bw}")
    wait = ("wait not added: ranks sharing cores lend theirs to others' compute while they wait"
            if pred["oversubscribed"] else
            "wait: what each collective costs more in step-like rounds (after the step's compute between "
            "collectives; async ones under the GEMMs the code runs while they fly)")
    return (f"Calibrated on {pred['machine']}, {ranks} ranks x {pred['threads_per_rank']} thread(s){over}; "
            f"collectives fitted as latency + bytes / bandwidth: {'; '.join(fits) or 'none (one rank)'}; "
            f"{wait}.")


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="phantom-plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, required=True, help="FFN width n")
    ap.add_argument("--depth", type=int, required=True, help="number of layers L")
    ap.add_argument("--ranks", type=int, required=True, help="group size p")
    ap.add_argument("--ghosts", type=int, help="ghost neurons per rank k (omit with a budget to get a suggestion)")
    ap.add_argument("--batch", type=int, default=1, help="samples (or tokens) per step")
    ap.add_argument("--dtype", default="fp32", choices=dtypes.names(torch_names=True))
    ap.add_argument("--ffn-hidden", type=int, default=None,
                    help="inner width of a transformer MLP of hidden size --width, for the equal-compute line "
                         "(default 4 x --width)")
    ap.add_argument("--param-budget", type=float, help="suggest the largest k with params <= this fraction of TP's")
    ap.add_argument("--traffic-budget", type=float, help="suggest the largest k with bytes <= this fraction of TP's")
    ap.add_argument("--calibrate", action="store_true",
                    help="measure this machine's GEMM, pointwise, optimizer and collective times on --ranks "
                         "ranks and predict both models' step time")
    ap.add_argument("--bind-cores", action="store_true",
                    help="--calibrate with each rank on cores of its own, as phantom-bench --bind-cores")
    ap.add_argument("--activation", default="gelu", choices=["gelu", "relu", "silu", "tanh"],
                    help="activation between layers (--calibrate)")
    ap.add_argument("--datasheet", choices=sorted(DEVICES),
                    help="also extrapolate both models' step time on --ranks GPUs of this device from its "
                         "datasheet rates (not measured)")
    ap.add_argument("--gemm-efficiency", type=float,
                    help="--datasheet: share of the peak GEMM rate reached, in (0, 1] (default 1: a lower bound)")
    ap.add_argument("--link-gbs", type=float,
                    help="--datasheet: link GB/s per direction per GPU (default: NVLink from the datasheet "
                         "within --gpus-per-node, 50 GB/s network across nodes)")
    ap.add_argument("--link-latency-us", type=float, help="--datasheet: latency per collective in us "
                                                          "(default 10 within a node, 20 across nodes)")
    ap.add_argument("--gpus-per-node", type=int, default=GPUS_PER_NODE,
                    help="--datasheet: GPUs a node links with NVLink")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    a = ap.parse_args(argv)
    for name in ("width", "depth", "ranks", "batch"):
        if getattr(a, name) < 1:
            ap.error(f"--{name} must be >= 1")
    if a.ffn_hidden is not None:
        error = divisibility_error("--ffn-hidden", a.ffn_hidden, a.ranks, by="group size (--ranks)") \
            if a.ffn_hidden >= 1 else f"--ffn-hidden must be >= 1, got {a.ffn_hidden}"
        if error:
            ap.error(error)
    error = divisibility_error("--width", a.width, a.ranks, by="group size (--ranks)",
                               fix=f"choose a --width that is a multiple of {a.ranks}, or --ranks that divides it")
    if error:
        ap.error(error)
    ghosts = a.ghosts
    if a.param_budget is not None or a.traffic_budget is not None:
        try:
            budgets = dict(p=a.ranks, batch=a.batch, param_budget=a.param_budget, traffic_budget=a.traffic_budget)
            largest = counts.suggest_ghost_dim(a.width, a.depth, **budgets)
            ghosts = counts.suggest_ghost_dim(a.width, a.depth, multiple_of=8, **budgets)
        except ValueError as e:
            ap.error(str(e))
        if not a.json:
            why = ("largest k within the budget" if ghosts == largest else
                   f"largest multiple of 8 within the budget; the largest k is {largest}, but odd k slows "
                   "the k-wide GEMMs and tensor cores want multiples of 8")
            print(f"suggested --ghosts {ghosts} ({why})\n")
    if ghosts is None:
        ap.error("give --ghosts K, or --param-budget / --traffic-budget to have k suggested")
    error = ghost_dim_error(ghosts, a.width, a.ranks, name="--ghosts", bound="--width/--ranks")
    if error:
        ap.error(error)
    given = [f"--{n.replace('_', '-')}" for n in ("gemm_efficiency", "link_gbs", "link_latency_us")
             if getattr(a, n) is not None]
    if given and not a.datasheet:
        ap.error(f"{', '.join(given)} apply to --datasheet; add --datasheet DEVICE")
    if a.gemm_efficiency is not None and not 0 < a.gemm_efficiency <= 1:
        ap.error(f"--gemm-efficiency must be in (0, 1] (a share of the datasheet's peak), got {a.gemm_efficiency}")
    if a.link_gbs is not None and a.link_gbs <= 0:
        ap.error(f"--link-gbs must be > 0, got {a.link_gbs}")
    if a.link_latency_us is not None and a.link_latency_us < 0:
        ap.error(f"--link-latency-us must be >= 0, got {a.link_latency_us}")
    if a.gpus_per_node < 1:
        ap.error("--gpus-per-node must be >= 1")
    if a.bind_cores and not a.calibrate:
        ap.error("--bind-cores applies to --calibrate; add --calibrate")
    if a.bind_cores:
        from ..bench.launch import bound_cores, default_threads
        try:
            bound_cores(a.ranks, default_threads(a.ranks))
        except ValueError as e:
            ap.error(f"--bind-cores: {e}")
    ext = None
    if a.datasheet:
        try:
            ext = extrapolate(a.width, a.depth, a.ranks, ghosts, a.batch, a.dtype, a.datasheet,
                              activation=a.activation, efficiency=a.gemm_efficiency or 1.0,
                              link_bytes_per_s=None if a.link_gbs is None else a.link_gbs * 1e9,
                              link_latency_s=None if a.link_latency_us is None else a.link_latency_us * 1e-6,
                              gpus_per_node=a.gpus_per_node)
        except ValueError as e:
            ap.error(str(e))
    # arithmetic first, so that a refusal comes before the ranks start
    pred = (calibrated_prediction(a.width, a.depth, a.ranks, ghosts, a.batch, a.dtype, a.activation,
                                  bind_cores=a.bind_cores) if a.calibrate else None)
    hint = k_time_to_loss_hint(a.width, a.ranks, ghosts) if a.ranks > 1 else None
    equal = equal_compute_hint(a.width, a.ranks, ghosts, a.ffn_hidden) if a.ranks > 1 else None
    if a.json:
        out = plan_dict(a.width, a.depth, a.ranks, ghosts, a.batch, a.dtype, pred)
        if ext is not None:
            out.update(ext)
        out["k_time_to_loss_hint"] = hint
        out["equal_compute_mlp"] = equal
        print(json.dumps(out, indent=1))
        return 0
    table = plan_table(a.width, a.depth, a.ranks, ghosts, a.batch, a.dtype)
    if pred is not None:
        table += "\n" + "\n".join(_prediction_rows(pred))
    if ext is not None:
        table += "\n" + "\n".join(_extrapolation_rows(ext))
    if pred is not None:
        table += "\n\n" + _calibration_note(pred, a.ranks)
    if ext is not None:
        table += "\n\n" + _extrapolation_note(ext)
    if hint is not None:
        table += "\n\n" + _hint_note(hint, ghosts)
    if equal is not None:
        table += "\n\n" + _equal_compute_note(equal)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
