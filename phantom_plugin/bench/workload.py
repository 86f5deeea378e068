"""What a benchmark rank trains: the run specification, the teacher task, the two models and one
training step. Shared by :mod:`.runner` (timed runs), :mod:`.probe` and :mod:`.calibrate`.

The task: Gaussian inputs ``x ~ N(0, I) [batch, width]`` and targets from a fixed random teacher
``y = tanh(x A^T) B^T`` (``A [width/4, width]``, ``B [width, width/4]``, entries ``N(0, 1/fan_in)``,
seeded), fitted with MSE and Adam. Every rank of the group sees the same batch (the group splits
the model, not the data). Both modes start from the same seed: TP's diagonal blocks are the
phantom model's local blocks up to the factor ``sqrt(p)`` of phantom's ``init="spectral"``, the
study's winner (:mod:`phantom_plugin.init`, ``docs/choosing-k.md``).
"""
from __future__ import annotations

import dataclasses
import os
import platform
import resource
import warnings
from typing import Optional

import torch

from .. import dtypes
from ..layers import PhantomFFN
from ..modeling import counts, devices
from ..optim import param_groups

__all__ = ["RunSpec", "SMOOTH", "teacher_batch", "machine_description", "count_params", "model_cost",
           "sync", "build_model", "make_optimizer", "train_step", "peak_memory", "quiet_third_party"]

SMOOTH = 10   # steps in the running mean that defines "final loss" and "reached the target"


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunSpec:
    """One training run. ``mode`` is ``"tp"`` (megatron-core layers) or ``"phantom"``.

    ``target_loss``: stop once the mean of the last ``SMOOTH`` losses is at or below it (``steps``
    is then the limit). ``probe``: after training, measure the dense GEMM rate and (phantom) how
    much ghost communication the local GEMMs hide (:mod:`.probe`). ``dtype``: a short name of
    :data:`phantom_plugin.dtypes.DTYPES`.
    ``energy_preset``: the device whose figures price the modeled energy (a key of
    :data:`phantom_plugin.modeling.devices.DEVICES`).
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
    energy_preset: str = "h100-sxm"

    def __post_init__(self):
        if self.mode not in ("tp", "phantom"):
            raise ValueError(f"RunSpec.mode must be 'tp' or 'phantom', got {self.mode!r}")
        if self.dtype not in dtypes.DTYPES:
            raise ValueError(f"RunSpec.dtype must be one of {', '.join(dtypes.DTYPES)}, got {self.dtype!r}")
        if self.steps <= self.warmup:
            raise ValueError(f"RunSpec.steps={self.steps} must exceed warmup={self.warmup}")
        if self.energy_preset not in devices.DEVICES:
            raise ValueError(f"RunSpec.energy_preset must be one of {', '.join(sorted(devices.DEVICES))} "
                             f"(device keys; phantom-bench --energy-preset), got {self.energy_preset!r}")


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


def model_cost(spec: RunSpec, p: int) -> counts.Cost:
    """The cost model's figures for ``spec`` on ``p`` ranks (per rank, per step)."""
    elt = dtypes.DTYPES[spec.dtype].bytes
    if spec.mode == "phantom":
        return counts.phantom_ffn_cost(spec.width, spec.depth, p=p, k=spec.ghost_dim, batch=spec.batch,
                                     dtype_bytes=elt)
    return counts.tp_ffn_cost(spec.width, spec.depth, p=p, batch=spec.batch, dtype_bytes=elt)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(spec: RunSpec, group, device, dtype) -> torch.nn.Module:
    if spec.mode == "phantom":
        return PhantomFFN(spec.width, spec.depth, ghost_dim=spec.ghost_dim, group=group,
                          activation=spec.activation, seed=spec.seed, device=device, dtype=dtype,
                          init="spectral")
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


def peak_memory(device: torch.device) -> dict:
    """``peak_memory_bytes`` and what it counts on this device."""
    if device.type == "cuda":
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated(device),
                "peak_memory_kind": "cuda max_memory_allocated"}
    return {"peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "peak_memory_kind": "rank 0 process max RSS"}
