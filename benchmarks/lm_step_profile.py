"""Where a ``phantom-bench --task lm`` training step's CPU time goes: TP MLPs vs phantom MLPs.

Builds both models exactly as ``phantom-bench --task lm`` does (:func:`phantom_plugin.bench.lm_recipe.lm_plan`,
:func:`phantom_plugin.bench.lm_model.build_gpt`, the bench's optimizer, its batches, its
``CommCounter`` and ``intercept_torch_collectives``), on gloo ranks with 1 thread each, then

1. times ``--steps`` steps after ``--warmup`` (``time.process_time``, all threads of a rank, summed
   over the ranks as the bench's ``step_cpu_s``; medians), and
2. profiles ``--profile-steps`` more steps on rank 0 with ``torch.profiler``: each op's self CPU
   time is put in a category (GEMM, communication, copy/layout, elementwise/norm/softmax,
   autograd engine, Python and other) and in the module whose forward or backward range encloses
   it (attention, MLP, layer norms, embedding, output layer + loss, optimizer, other).

Prints both models side by side, the MLP's CPU time per modeled MAC, and a bound: TP's profiled
step with its GEMM time scaled by the modeled MAC ratio, the per-step ratio phantom would reach if
its GEMMs ran as fast per MAC as TP's and everything else cost what it costs in TP.
``process_time`` covers gloo's own threads, the profiler only the main thread, so the profiled
total is below the timed one; the profile's per-step numbers carry the profiler's overhead.

    python benchmarks/lm_step_profile.py [--width 256 --depth 4 --ranks 2 --ghosts 16 --batch 8 --seq 128 --steps 30]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CATS = ("gemm", "comm", "copy", "elementwise", "optimizer", "autograd", "python")
_MODS = ("attention", "mlp", "norm", "embedding", "output+loss", "optimizer", "other")  # output bwd: other
_GEMM = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::matmul",
         "aten::linear", "aten::_addmm_activation"}
_COPY = {"aten::copy_", "aten::cat", "aten::contiguous", "aten::index_select", "aten::clone",
         "aten::_to_copy", "aten::to", "aten::stack", "aten::empty_like", "aten::empty", "aten::zero_",
         "aten::fill_", "aten::zeros", "aten::new_empty", "aten::empty_strided", "aten::resize_"}
_COMM = ("gloo", "all_gather", "allgather", "all_reduce", "allreduce", "reduce_scatter", "all_to_all",
         "alltoall", "c10d", "wait", "record_param_comms")


def _category(name: str, in_opt: bool) -> str:
    low = name.lower()
    if in_opt:
        return "optimizer"
    if any(c in low for c in _COMM):
        return "comm"
    if name in _GEMM:
        return "gemm"
    if name in _COPY:
        return "copy"
    if name.startswith("autograd::") or "Backward" in name or name.startswith("torch::autograd"):
        return "autograd"
    if name.startswith("aten::"):
        return "elementwise"
    return "python"


def _module_of(name: str) -> str:
    if "self_attention" in name:
        return "attention"
    if ".mlp" in name:
        return "mlp"
    if "layernorm" in name or "final_layernorm" in name:
        return "norm"
    if "embedding" in name:
        return "embedding"
    if "output_layer" in name or "loss" in name:
        return "output+loss"
    return "other"


def _install_ranges(model):
    """record_function ranges ``mod::<name>::fwd`` / ``::bwd`` around the modules we attribute to."""
    from torch.autograd.profiler import record_function
    open_ranges = {}
    handles = []

    def enter(key):
        rf = record_function(key)
        rf.__enter__()
        open_ranges.setdefault(key, []).append(rf)

    def leave(key):
        stack = open_ranges.get(key)
        if stack:
            stack.pop().__exit__(None, None, None)

    for name, mod in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        if last not in ("self_attention", "mlp", "input_layernorm", "pre_mlp_layernorm", "final_layernorm",
                        "embedding", "output_layer"):
            continue
        handles.append(mod.register_forward_pre_hook(lambda m, a, n=name: enter(f"mod::{n}::fwd")))
        handles.append(mod.register_forward_hook(lambda m, a, o, n=name: leave(f"mod::{n}::fwd")))
        if last not in ("embedding", "output_layer"):   # hooks there break in-place loss grads
            handles.append(mod.register_full_backward_pre_hook(lambda m, g, n=name: enter(f"mod::{n}::bwd")))
            handles.append(mod.register_full_backward_hook(lambda m, gi, go, n=name: leave(f"mod::{n}::bwd")))
    return handles


def _breakdown(events, label: str, steps: int) -> dict:
    """ms per step by category and by module, from the events' self CPU time (main thread), of the
    steps in ``lm_step::<label>`` ranges; ``mlp_ops``: the MLP's ops by self time."""
    cats = dict.fromkeys(_CATS, 0.0)
    mods = dict.fromkeys(_MODS, 0.0)
    mlp_ops = {}
    total = 0.0
    top = f"lm_step::{label}"
    for ev in events:
        if ev.name == top:
            total += ev.cpu_time_total
        in_opt, module, mine = False, None, False
        e = ev
        while e is not None:
            if e.name.startswith("Optimizer.") or e.name == "optimizer":
                in_opt = True
            if module is None and e.name.startswith("mod::"):
                module = _module_of(e.name)
            mine = mine or e.name == top
            e = e.cpu_parent
        if not mine:
            continue
        self_us = ev.self_cpu_time_total
        if ev.name.startswith("mod::") or ev.name == "lm_step":
            cat = "python"
        else:
            cat = _category(ev.name, in_opt)
        cats[cat] += self_us
        mods["optimizer" if in_opt else (module or "other")] += self_us
        if module == "mlp" and not in_opt:
            mlp_ops[ev.name] = mlp_ops.get(ev.name, 0.0) + self_us
    scale = 1e-3 / steps
    return {"total": total * scale, "cats": {k: v * scale for k, v in cats.items()},
            "mods": {k: v * scale for k, v in mods.items()},
            "mlp_ops": {k: v * scale for k, v in sorted(mlp_ops.items(), key=lambda kv: -kv[1])[:14]}}


def _rank(rank, ws, specs, corpus, warmup, steps, prof_steps, counting):
    """Both models on these ranks, their steps interleaved (TP, phantom, TP, ...) so that the
    shared machine's load falls on both alike."""
    import contextlib

    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from phantom_plugin import comm
    from phantom_plugin.bench import lm
    from phantom_plugin.bench.lm_data import split_heldout, train_batch
    from phantom_plugin.bench.lm_model import build_gpt
    from phantom_plugin.bench.workload import quiet_third_party
    from torch.profiler import ProfilerActivity, profile, record_function
    quiet_third_party()
    warnings.filterwarnings("ignore")
    device = torch.device("cpu")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=ws)
    try:
        train, _ = split_heldout(corpus, specs[0].heldout)
        runs = []
        for spec in specs:
            model = build_gpt(hidden=spec.width, ffn_hidden=spec.ffn_hidden, layers=spec.depth, heads=spec.heads,
                              seq=spec.seq, tp=ws, seed=spec.seed, device=device,
                              ghost_dim=spec.ghost_dim if spec.mode == "phantom" else None)
            runs.append((spec, model, lm._optimizer(model, spec)))

        def one(run, step):
            spec, model, opt = run
            pos = torch.arange(spec.seq, device=device).expand(spec.batch, spec.seq)
            tok, lab = train_batch(train, step, spec.batch, spec.seq, spec.seed)
            dist.barrier()
            c0 = time.process_time()
            with record_function(f"lm_step::{spec.mode}"):
                with comm.CommCounter() if counting else contextlib.nullcontext():
                    loss = model(tok, pos, None, labels=lab).float().mean()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    with record_function("optimizer"):
                        opt.step()
            return time.process_time() - c0

        cpu = {spec.mode: [] for spec in specs}
        with comm.intercept_torch_collectives("megatron") if counting else contextlib.nullcontext():
            for s in range(warmup):
                for run in runs:
                    one(run, s)
            for s in range(steps):
                for run in runs:
                    cpu[run[0].mode].append(one(run, warmup + s))
            handles = [h for run in runs for h in _install_ranges(run[1])]
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for s in range(prof_steps):
                    for run in runs:
                        one(run, warmup + steps + s)
            for h in handles:
                h.remove()
        out = {}
        events = prof.events() if rank == 0 else None
        for spec in specs:
            t = torch.tensor(cpu[spec.mode], dtype=torch.float64)
            dist.all_reduce(t)                                  # CPU-seconds of all ranks, per step
            out[spec.mode] = {"cpu_s": statistics.median(t.tolist()), "cpu_all": t.tolist(),
                              "profile": _breakdown(events, spec.mode, prof_steps) if rank == 0 else None}
        return out
    finally:
        parallel_state.destroy_model_parallel()


def main() -> None:
    from phantom_plugin.bench.launch import run_ranks
    from phantom_plugin.bench.lm_model import gpt_step_macs
    from phantom_plugin.bench.lm_recipe import lm_plan
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default="/usr/share/vim/vim90/doc")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--ghosts", type=int, default=None, help="k (default as the bench: (width/ranks)/8)")
    ap.add_argument("--match", default="width", choices=["width", "compute"])
    ap.add_argument("--batch", type=int, default=8, help="sequences per step (the bench default 8)")
    ap.add_argument("--seq", type=int, default=128, help="bytes per sequence (the bench default 128)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=30, help="timed steps per model (medians)")
    ap.add_argument("--profile-steps", type=int, default=10)
    ap.add_argument("--no-counter", action="store_true", help="leave out the bench's CommCounter/intercept")
    a = ap.parse_args()
    k = a.ghosts if a.ghosts is not None else max(1, a.width // a.ranks // 8)
    plan = lm_plan(width=a.width, depth=a.depth, ranks=a.ranks, ghosts=k, batch=a.batch, seq=a.seq, steps=1, heads=None,
                   eval_every=25, eval_batches=4, heldout=0.1, lr=2e-3, seed=0, match=a.match, corpus=a.corpus,
                   corpus_limit=16_000_000, energy_preset="h100-sxm")
    specs = (plan.tp, plan.phantom)
    res = run_ranks(_rank, a.ranks, specs, plan.corpus, a.warmup, a.steps, a.profile_steps,
                    not a.no_counter, threads=1, timeout=1800)[0]
    for spec in specs:
        res[spec.mode]["macs"] = gpt_step_macs(
            hidden=spec.width, ffn_hidden=spec.ffn_hidden, layers=spec.depth, seq=spec.seq, batch=spec.batch,
            tp=a.ranks, ghost_dim=spec.ghost_dim if spec.mode == "phantom" else None)
    tp, ph = res["tp"], res["phantom"]
    print(f"\nwidth {a.width}, depth {a.depth}, p={a.ranks}, k={k}, match {a.match} (ffn TP {plan.tp.ffn_hidden}, "
          f"phantom {plan.phantom.ffn_hidden}), batch {a.batch} x seq {a.seq}, 1 thread/rank, counter "
          f"{'off' if a.no_counter else 'on'}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    q = lambda v: statistics.quantiles(v, n=4)  # noqa: E731
    print(f"timed CPU-s/step (sum over ranks, median of {a.steps}, interleaved): TP {tp['cpu_s']:.4f} "
          f"[IQR {q(tp['cpu_all'])[0]:.4f}-{q(tp['cpu_all'])[2]:.4f}]  phantom {ph['cpu_s']:.4f} "
          f"[IQR {q(ph['cpu_all'])[0]:.4f}-{q(ph['cpu_all'])[2]:.4f}]  phantom/TP {ph['cpu_s'] / tp['cpu_s']:.3f}")
    print(f"modeled MACs/step/rank: TP {tp['macs']['total']:.3e}  phantom {ph['macs']['total']:.3e}  "
          f"ratio {ph['macs']['total'] / tp['macs']['total']:.3f}")
    print(f"\nrank-0 profile, ms/step (self CPU time of the main thread, {a.profile_steps} steps each)")
    print(f"| {'part':<24} | {'TP':>8} | {'phantom':>8} | {'ph-TP':>7} |")
    print(f"|{'-' * 26}|{'-' * 10}|{'-' * 10}|{'-' * 9}|")
    for group, keys in (("cats", _CATS), ("mods", _MODS)):
        for key in keys:
            x, y = tp["profile"][group][key], ph["profile"][group][key]
            label = ("op: " if group == "cats" else "module: ") + key
            print(f"| {label:<24} | {x:8.2f} | {y:8.2f} | {y - x:+7.2f} |")
    x, y = tp["profile"]["total"], ph["profile"]["total"]
    print(f"| {'step (profiled)':<24} | {x:8.2f} | {y:8.2f} | {y - x:+7.2f} |")
    for name, r in (("TP", tp), ("phantom", ph)):
        mlp_ms = r["profile"]["mods"]["mlp"]
        print(f"MLP {name}: {mlp_ms:.2f} ms/step for {r['macs']['mlp']:.3e} modeled MACs -> "
              f"{mlp_ms * 1e6 / r['macs']['mlp']:.4f} ns/MAC")
    # the best phantom could do: TP's profiled step with its GEMM time scaled by the MAC ratio
    gemm_tp, mac_ratio = tp["profile"]["cats"]["gemm"], ph["macs"]["total"] / tp["macs"]["total"]
    ideal = x - gemm_tp + gemm_tp * mac_ratio
    print(f"bound: TP's profiled step with its GEMM time x the MAC ratio ({mac_ratio:.3f}) = {ideal:.2f} ms -> "
          f"per-step ratio >= {ideal / x:.3f} (GEMMs {gemm_tp / x:.2f} of TP's step)")
    for name, r in (("TP", tp), ("phantom", ph)):
        print(f"MLP ops, {name} (ms/step self): " +
              ", ".join(f"{k} {v:.2f}" for k, v in r["profile"]["mlp_ops"].items()))


if __name__ == "__main__":
    main()
