"""Train one FFN configuration on a group of ranks and measure it: the core of ``make demo`` and
``phantom-bench``.

The task and the models are :mod:`.workload`'s.

Measured per step on every rank: wall time of forward + backward + optimizer step (device
synchronized, data generation excluded), CPU seconds of the process, bytes sent by this rank
(every collective counted by :mod:`phantom_plugin.comm`; megatron's own calls intercepted), loss.
Energy: one :class:`~phantom_plugin.energy.EnergyMeter` window over the steps after ``warmup``,
summed over the group explicitly at the end. Reported by rank 0: medians after ``warmup`` steps.
"""
from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from typing import Optional

import torch
import torch.distributed as dist

from .. import comm, dtypes, energy
from ..modeling import counts, energy_model
from .workload import (SMOOTH, RunSpec, build_model, count_params, machine_description, make_optimizer,
                       model_cost, peak_memory, quiet_third_party, sync, teacher_batch, train_step)

__all__ = ["train_rank", "energy_fields"]

def _reached(losses: list, target: Optional[float]) -> bool:
    return target is not None and len(losses) >= SMOOTH and statistics.fmean(losses[-SMOOTH:]) <= target


def train_rank(rank: int, world_size: int, spec: RunSpec, progress: bool = True,
               meter=None) -> Optional[dict]:
    """Run ``spec`` on the default group (already initialized); rank 0 returns the result dict.

    ``meter``: an energy meter with ``begin_window(name)`` / ``end_window(name)`` (default: an
    :class:`~phantom_plugin.energy.EnergyMeter` on this rank's device).
    """
    quiet_third_party()
    group = dist.group.WORLD
    # the launcher sets each NCCL rank's CUDA device first; a gloo run stays on the CPU
    device = comm.collective_device(group)
    dtype = dtypes.torch_dtype(spec.dtype)
    meter = meter if meter is not None else energy.EnergyMeter(device)
    model = build_model(spec, group, device, dtype)
    opt = make_optimizer(model, spec.lr)
    losses, times, cpu, sent = [], [], [], []
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=spec.steps, desc=f"{spec.mode:>7} p={world_size} w={spec.width}", leave=False)
    intercept = comm.intercept_torch_collectives() if spec.mode == "tp" else contextlib.nullcontext()
    reached_at = None
    with intercept:
        for step in range(spec.steps):
            x, y = teacher_batch(step, spec.batch, spec.width, spec.seed, device, dtype)
            if step == spec.warmup:
                meter.begin_window("train")
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            with comm.CommCounter() as counter:
                loss = train_step(model, opt, x, y)
            sync(device)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            sent.append(counter.sent_bytes)
            losses.append(loss.item())
            if bar is not None:
                bar.update(1)
            if reached_at is None and _reached(losses, spec.target_loss):
                reached_at = step
            if spec.target_loss is not None and step > spec.warmup and _all_agree(reached_at is not None, group):
                break
        window = meter.end_window("train")
    if bar is not None:
        bar.close()
    total = energy.sum_over_group(window, group) if isinstance(window, energy.Measurement) else window
    cpu_sum = torch.tensor(cpu, dtype=torch.float64, device=comm.collective_device(group))
    dist.all_reduce(cpu_sum, group=group)                  # CPU-seconds of all ranks, per step
    probe = None
    if spec.probe:
        from .probe import probe_rank
        probe = probe_rank(model, opt, spec, group, device, dtype)
    if rank != 0:
        return None
    res = _result(spec, world_size, model, device, losses, times, cpu_sum.tolist(), sent, total,
                  reached_at, probe)
    res["optimizer"] = "Adam (fused)" if opt.defaults.get("fused") else "Adam"
    return res


def _all_agree(flag: bool, group) -> bool:
    """True when every rank's ``flag`` is (outside the timed step; not counted as model traffic)."""
    t = torch.tensor([0 if flag else 1], dtype=torch.int64, device=comm.collective_device(group))
    dist.all_reduce(t, group=group)
    return int(t.item()) == 0


def energy_fields(window, n_timed: int, mc: counts.Cost, p: int, preset_name: str) -> dict:
    """The energy fields of a run record: ``window`` measured over ``n_timed`` steps (all ranks,
    or a reason why not), and the modeled energy of ``mc`` on ``p`` ranks, labelled as modeled."""
    e_meas = getattr(window, "energy_j", None)
    modeled_step = energy_model.modeled_energy_j(mc.flops, mc.bytes_sent, preset_name)
    return {
        "energy_j": e_meas,
        "energy_j_per_step": None if e_meas is None else e_meas / n_timed,
        "energy_source": getattr(window, "source", "none"),
        "energy_scope": getattr(window, "scope", "none"),
        "energy_reason": getattr(window, "reason", "no energy meter was used"),
        "energy_short_window": getattr(window, "short_window", None),
        "energy_window_s": getattr(window, "time_s", None), "energy_window_steps": n_timed,
        "energy_j_modeled": modeled_step * n_timed * p,
        "energy_j_modeled_per_step": modeled_step * p,
        "energy_model": f"modeled, all {p} ranks, {energy_model.describe(preset_name)}",
    }


def _result(spec, p, model, device, losses, times, cpu_sum, sent, window, reached_at, probe) -> dict:
    w = spec.warmup
    timed = times[w:]
    mc = model_cost(spec, p)
    step_time = statistics.median(timed)
    return {
        **dataclasses.asdict(spec), "world_size": p, "steps_run": len(losses),
        "step_time_s": step_time, "step_times_s": times,
        "tokens_or_samples_per_s": spec.batch / step_time,
        "cpu_seconds_per_step": statistics.median(cpu_sum[w:]), "step_cpu_s": cpu_sum,
        "comm_bytes_per_step": statistics.median(sent[w:]),
        "comm_bytes_per_step_model": mc.bytes_sent,
        "macs_per_step": mc.macs, "flops_per_step": mc.flops, "params": count_params(model, p),
        **peak_memory(device),
        "losses": losses, "final_loss": statistics.fmean(losses[-SMOOTH:]),
        "reached_target_at_step": reached_at,
        **energy_fields(window, len(timed), mc, p, spec.energy_preset),
        "probe": probe,
        "machine": machine_description(device),
    }
