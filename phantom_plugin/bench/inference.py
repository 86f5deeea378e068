"""Forward-only (inference) measurement of one FFN configuration: ``phantom-bench --inference``.

The same models, initialisation, launcher and input distribution as training
(:mod:`.runner`), run under ``torch.inference_mode`` in two phases on the same ranks:

* ``"throughput"``: batches of ``spec.batch`` samples; samples per second at the median time;
* ``"latency"``: batch 1, the decode case, where the number and latency of collectives decide
  rather than their bytes (phantom issues one ghost all-gather per layer, TP one all-reduce per
  layer pair).

Each phase runs ``spec.steps`` forward passes, times the ones after ``spec.warmup`` (device
synchronized, input generation excluded), counts every byte sent (megatron's own calls
intercepted for TP) against the cost model's forward messages, and measures energy in one window
per phase. Rank 0 returns one record per phase.
"""
from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time

import torch
import torch.distributed as dist

from .. import comm, dtypes, energy
from .runner import energy_fields
from .workload import (RunSpec, build_model, count_params, machine_description, model_cost,
                       peak_memory, quiet_third_party, sync)

__all__ = ["PHASES", "infer_rank", "percentile"]

PHASES = ("throughput", "latency")


def percentile(xs: list, q: float) -> float:
    """The ``q``-th percentile (0-100) of ``xs``, linear between order statistics."""
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _inputs(phase_seed: int, batch: int, width: int, device, dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(phase_seed)
    return torch.randn(batch, width, generator=g).to(device=device, dtype=dtype)


def infer_rank(rank: int, world_size: int, spec: RunSpec, progress: bool = True, meter=None):
    """Run both phases of ``spec`` forward-only on the default group; rank 0 returns
    ``[throughput_record, latency_record]``, the other ranks ``None``."""
    quiet_third_party()
    group = dist.group.WORLD
    device = comm.collective_device(group)   # the launcher set each NCCL rank's device
    dtype = dtypes.torch_dtype(spec.dtype)
    meter = meter if meter is not None else energy.EnergyMeter(device)
    model = build_model(spec, group, device, dtype).eval()
    records = []
    for phase, batch in zip(PHASES, (spec.batch, 1)):
        bar = None
        if progress and rank == 0:
            from tqdm import tqdm
            bar = tqdm(total=spec.steps, leave=False,
                       desc=f"{spec.mode:>7} {phase} p={world_size} w={spec.width}")
        times, sent = [], []
        intercept = comm.intercept_torch_collectives() if spec.mode == "tp" else contextlib.nullcontext()
        with intercept, torch.inference_mode():
            for step in range(spec.steps):
                x = _inputs(spec.seed * 1_000_003 + step, batch, spec.width, device, dtype)
                if step == spec.warmup:
                    meter.begin_window(phase)
                sync(device)
                t0 = time.perf_counter()
                with comm.CommCounter() as counter:
                    model(x)
                sync(device)
                times.append(time.perf_counter() - t0)
                sent.append(counter.sent_bytes)
                if bar is not None:
                    bar.update(1)
            window = meter.end_window(phase)
        if bar is not None:
            bar.close()
        total = energy.sum_over_group(window, group) if isinstance(window, energy.Measurement) else window
        records.append(_record(spec, phase, batch, world_size, model, device, times, sent, total))
    return records if rank == 0 else None


def _record(spec: RunSpec, phase: str, batch: int, p: int, model, device, times, sent, window) -> dict:
    timed = times[spec.warmup:]
    mc = dataclasses.replace(spec, batch=batch)
    mc = model_cost(mc, p).forward_only()
    median = statistics.median(timed)
    return {
        **dataclasses.asdict(spec), "batch": batch, "phase": phase, "world_size": p,
        "steps_run": len(times), "step_time_s": median, "step_times_s": times,
        "latency_p50_s": percentile(timed, 50), "latency_p99_s": percentile(timed, 99),
        "tokens_or_samples_per_s": batch / median,
        "comm_bytes_per_step": statistics.median(sent[spec.warmup:]),
        "comm_bytes_per_step_model": mc.bytes_sent,
        "collectives_per_step": len(mc.messages),
        "macs_per_step": mc.macs, "flops_per_step": mc.flops, "params": count_params(model, p),
        **peak_memory(device),
        **energy_fields(window, len(timed), mc, p, spec.energy_preset),
        "machine": machine_description(device),
    }
