"""Train one FFN configuration on a group of ranks and measure it: the core of ``make demo`` and
``phantom-bench``.

The task: Gaussian inputs ``x ~ N(0, I) [batch, width]`` and targets from a fixed random teacher
``y = tanh(x A^T) B^T`` (``A [width/4, width]``, ``B [width, width/4]``, entries ``N(0, 1/fan_in)``,
seeded), fitted with MSE and Adam. Every rank of the group sees the same batch (the group splits
the model, not the data). Both modes start from the same seed: TP's diagonal blocks are the
phantom model's local blocks (:mod:`phantom_plugin.init`).

Measured per step on rank 0: wall time of forward + backward + optimizer step (device
synchronized, data generation excluded), bytes sent by this rank (every collective counted by
:mod:`phantom_plugin.comm`; megatron's own calls intercepted), loss. Reported: medians after
``warmup`` steps.
"""
from __future__ import annotations

import dataclasses
import platform
import resource
import statistics
import time
from typing import Optional

import torch
import torch.distributed as dist

from .. import comm, cost
from ..layers import PhantomFFN

__all__ = ["RunSpec", "teacher_batch", "train_rank", "machine_description"]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunSpec:
    """One training run. ``mode`` is ``"tp"`` (megatron-core layers) or ``"phantom"``."""
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

    def __post_init__(self):
        if self.mode not in ("tp", "phantom"):
            raise ValueError(f"RunSpec.mode must be 'tp' or 'phantom', got {self.mode!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"RunSpec.dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.steps <= self.warmup:
            raise ValueError(f"RunSpec.steps={self.steps} must exceed warmup={self.warmup}")


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
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    import os
    return (f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, "
            f"torch {torch.__version__}, gloo")


def count_params(model: torch.nn.Module, p: int) -> int:
    """Parameters of the whole group: sharded ones (tagged) times ``p``, replicated ones once."""
    return sum(t.numel() * (p if getattr(t, "tensor_model_parallel", False) else 1)
               for t in model.parameters())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(spec: RunSpec, group, device, dtype) -> torch.nn.Module:
    if spec.mode == "phantom":
        return PhantomFFN(spec.width, spec.depth, ghost_dim=spec.ghost_dim, group=group,
                          activation=spec.activation, seed=spec.seed, device=device, dtype=dtype)
    from .tp_baseline import MegatronTPFFN
    return MegatronTPFFN(spec.width, spec.depth, group=group, activation=spec.activation,
                         seed=spec.seed, dtype=dtype).to(device)


def train_rank(rank: int, world_size: int, spec: RunSpec, progress: bool = True,
               meter=None) -> Optional[dict]:
    """Run ``spec`` on the default group (already initialized); rank 0 returns the result dict.

    ``meter``: an optional energy meter with ``begin_window(name)`` / ``end_window(name)``.
    """
    group = dist.group.WORLD
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
        else torch.device("cpu")
    dtype = _DTYPES[spec.dtype]
    model = build_model(spec, group, device, dtype)
    opt = torch.optim.Adam(model.parameters(), lr=spec.lr)
    losses, times, sent = [], [], []
    bar = range(spec.steps)
    if progress and rank == 0:
        from tqdm import tqdm
        bar = tqdm(bar, desc=f"{spec.mode:>7} p={world_size}", leave=False)
    intercept = comm.intercept_torch_collectives() if spec.mode == "tp" else _null()
    energy = None
    with intercept:
        for step in bar:
            x, y = teacher_batch(step, spec.batch, spec.width, spec.seed, device, dtype)
            if step == spec.warmup and meter is not None:
                meter.begin_window("train")
            _sync(device)
            t0 = time.perf_counter()
            with comm.COUNTER.window() as records:
                loss = torch.nn.functional.mse_loss(model(x).float(), y.float())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            _sync(device)
            times.append(time.perf_counter() - t0)
            sent.append(sum(r.sent_bytes for r in records))
            losses.append(loss.item())
        if meter is not None:
            energy = meter.end_window("train")
    comm.COUNTER.reset()
    if rank != 0:
        return None
    p = world_size
    timed = times[spec.warmup:]
    elt = torch.tensor([], dtype=dtype).element_size()
    model_cost = (cost.phantom_ffn_cost(spec.width, spec.depth, p=p, k=spec.ghost_dim, batch=spec.batch,
                                        dtype_bytes=elt)
                  if spec.mode == "phantom" else
                  cost.tp_ffn_cost(spec.width, spec.depth, p=p, batch=spec.batch, dtype_bytes=elt))
    step_time = statistics.median(timed)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {
        **dataclasses.asdict(spec), "world_size": p,
        "step_time_s": step_time, "step_times_s": times,
        "tokens_or_samples_per_s": spec.batch / step_time,
        "comm_bytes_per_step": statistics.median(sent[spec.warmup:]),
        "comm_bytes_per_step_model": model_cost.bytes_sent,
        "macs_per_step": model_cost.macs, "params": count_params(model, p),
        "peak_memory_bytes": peak,
        "peak_memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process max RSS",
        "losses": losses, "final_loss": statistics.fmean(losses[-10:]),
        "energy_j": getattr(energy, "energy_j", None),
        "energy_source": getattr(energy, "source", "none"),
        "energy_reason": getattr(energy, "reason", "no energy meter was used"),
        "machine": machine_description(device),
    }


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
