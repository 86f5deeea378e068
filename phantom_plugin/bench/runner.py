"""Train one FFN configuration on a group of ranks and measure it: the core of ``make demo`` and
``phantom-bench``.

The task: Gaussian inputs ``x ~ N(0, I) [batch, width]`` and targets from a fixed random teacher
``y = tanh(x A^T) B^T`` (``A [width/4, width]``, ``B [width, width/4]``, entries ``N(0, 1/fan_in)``,
seeded), fitted with MSE and Adam. Every rank of the group sees the same batch (the group splits
the model, not the data). Both modes start from the same seed: TP's diagonal blocks are the
phantom model's local blocks (:mod:`phantom_plugin.init`).

Measured per step on every rank: wall time of forward + backward + optimizer step (device
synchronized, data generation excluded), CPU seconds of the process, bytes sent by this rank
(every collective counted by :mod:`phantom_plugin.comm`; megatron's own calls intercepted), loss.
Energy: one :class:`~phantom_plugin.energy.EnergyMeter` window over the steps after ``warmup``,
summed over the group explicitly at the end. Reported by rank 0: medians after ``warmup`` steps.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import resource
import statistics
import time
import warnings
from typing import Optional

import torch
import torch.distributed as dist

from .. import comm, cost, energy
from ..layers import PhantomFFN
from ..optim import param_groups

__all__ = ["RunSpec", "teacher_batch", "train_rank", "machine_description", "model_cost"]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
SMOOTH = 10   # steps in the running mean that defines "final loss" and "reached the target"


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunSpec:
    """One training run. ``mode`` is ``"tp"`` (megatron-core layers) or ``"phantom"``.

    ``target_loss``: stop once the mean of the last ``SMOOTH`` losses is at or below it (``steps``
    is then the limit). ``probe``: after training, measure the dense GEMM rate and (phantom) how
    much ghost communication the local GEMMs hide (:mod:`.probe`). ``energy_preset``: device
    preset of the modeled energy (:data:`phantom_plugin.energy.PRESETS`).
    """
    mode: str
    width: int
    depth: int
    ghost_dim: int
    batch: int
    steps: int
    warmup: int = 5
    lr: float = 1e-3
    seed: int = 0
    dtype: str = "fp32"
    activation: str = "gelu"
    target_loss: Optional[float] = None
    probe: bool = False
    energy_preset: str = "h100-sxm-bf16"

    def __post_init__(self):
        if self.mode not in ("tp", "phantom"):
            raise ValueError(f"RunSpec.mode must be 'tp' or 'phantom', got {self.mode!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"RunSpec.dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.steps <= self.warmup:
            raise ValueError(f"RunSpec.steps={self.steps} must exceed warmup={self.warmup}")
        if self.energy_preset not in energy.PRESETS:
            raise ValueError(f"RunSpec.energy_preset must be one of {sorted(energy.PRESETS)}")


# Third-party warnings that say nothing about a run: megatron-core's import-time notice that neither
# Transformer Engine nor apex is installed (true on every CPU machine), and its per-call advice
# about a CUDA environment variable, printed on CPU too.
_NOISE = ("Transformer Engine and Apex are not installed", "CUDA_DEVICE_MAX_CONNECTIONS")


def quiet_third_party() -> None:
    """Hide the :data:`_NOISE` warnings in this rank process; every other warning still shows."""
    for text in _NOISE:
        warnings.filterwarnings("ignore", message=f".*{text}")


def teacher_batch(step: int, batch: int, width: int, seed: int, device=None,
                  dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` for ``step``: the same on every rank for the same arguments."""
    hidden = max(1, width // 4)
    g = torch.Generator().manual_seed(seed * 7_777_777 + 12345)
    a = torch.randn(hidden, width, generator=g) / width ** 0.5
    b = torch.randn(width, hidden, generator=g) / hidden ** 0.5
    gx = torch.Generator().manual_seed(seed * 1_000_003 + step)
    x = torch.randn(batch, width, generator=gx)
    y = torch.tanh(x @ a.t()) @ b.t()
    return x.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype)


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__}, nccl)"
    return (f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, "
            f"torch {torch.__version__}, gloo")


def count_params(model: torch.nn.Module, p: int) -> int:
    """Parameters of the whole group: sharded ones (tagged) times ``p``, replicated ones once."""
    return sum(t.numel() * (p if getattr(t, "tensor_model_parallel", False) else 1)
               for t in model.parameters())


def model_cost(spec: RunSpec, p: int) -> cost.Cost:
    """The cost model's figures for ``spec`` on ``p`` ranks (per rank, per step)."""
    elt = _DTYPES[spec.dtype].itemsize
    if spec.mode == "phantom":
        return cost.phantom_ffn_cost(spec.width, spec.depth, p=p, k=spec.ghost_dim, batch=spec.batch,
                                     dtype_bytes=elt)
    return cost.tp_ffn_cost(spec.width, spec.depth, p=p, batch=spec.batch, dtype_bytes=elt)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(spec: RunSpec, group, device, dtype) -> torch.nn.Module:
    if spec.mode == "phantom":
        return PhantomFFN(spec.width, spec.depth, ghost_dim=spec.ghost_dim, group=group,
                          activation=spec.activation, seed=spec.seed, device=device, dtype=dtype)
    from .tp_baseline import MegatronTPFFN
    return MegatronTPFFN(spec.width, spec.depth, group=group, activation=spec.activation,
                         seed=spec.seed, dtype=dtype).to(device)


def make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """Adam, fused where torch has a fused kernel for the device (CPU too since torch 2.4): the
    same optimizer for both modes, on :func:`phantom_plugin.param_groups`. Unfused CPU Adam costs
    about as much as the GEMMs of a small model."""
    try:
        return torch.optim.Adam(param_groups(model, lr), lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(param_groups(model, lr), lr=lr)


def train_step(model, opt, x, y) -> torch.Tensor:
    loss = torch.nn.functional.mse_loss(model(x).float(), y.float())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


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
    dtype = _DTYPES[spec.dtype]
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
            with comm.COUNTER.window() as records:
                loss = train_step(model, opt, x, y)
            sync(device)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            sent.append(sum(r.sent_bytes for r in records))
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
    comm.COUNTER.reset()
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


def peak_memory(device: torch.device) -> dict:
    """``peak_memory_bytes`` and what it counts on this device."""
    if device.type == "cuda":
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated(device),
                "peak_memory_kind": "cuda max_memory_allocated"}
    return {"peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "peak_memory_kind": "rank 0 process max RSS"}


def energy_fields(window, n_timed: int, mc: cost.Cost, p: int, preset_name: str) -> dict:
    """The energy fields of a run record: ``window`` measured over ``n_timed`` steps (all ranks,
    or a reason why not), and the modeled energy of ``mc`` on ``p`` ranks, labelled as modeled."""
    e_meas = getattr(window, "energy_j", None)
    modeled_step = energy.modeled_energy_j(mc.flops, mc.bytes_sent, preset_name)
    preset = energy.PRESETS[preset_name]
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
        "energy_model": (f"modeled, all {p} ranks, preset {preset.name}: {preset.pj_per_flop:.3g} pJ/FLOP "
                         f"({preset.flop_source}); {preset.pj_per_byte:.3g} pJ/byte ({preset.byte_source})"),
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
