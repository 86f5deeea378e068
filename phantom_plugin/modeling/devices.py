"""The GPUs the models price work on: one :class:`Device` record per key of :data:`DEVICES`, each
holding a card's published figures and the energies per FLOP and per byte derived from them,
every figure with where it comes from.

Two models read it: :mod:`.datasheet` (``phantom-plan --datasheet KEY``: step time at the peak
rates) and :mod:`.energy_model` (``phantom-bench --energy-preset KEY``: the *modeled* energy of
a run). Nothing here is measured. To price a device of your own, build a :class:`Device` (or
``dataclasses.replace`` one of :data:`DEVICES`) and pass it where a key is taken.
Leaf module: torch-free.
"""
from __future__ import annotations

import dataclasses
from typing import Union

__all__ = ["Device", "DEVICES", "device"]

_LINK = ("assumption, not a measurement: 10 pJ/bit = 80 pJ/byte sent, the order of magnitude of "
         "off-package SerDes signalling plus switching; override with dataclasses.replace(device, "
         "pj_per_byte=...)")
_FP32 = "fp32 at the CUDA-core FP32 rate (torch's default: TF32 off for matmuls)"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Device:
    """A GPU's published figures and the energies derived from them.

    Attributes:
        name: the card, as its datasheet names it.
        matmul_flops: dense matmul FLOP/s (no sparsity) per dtype name of :data:`phantom_plugin.dtypes.DTYPES`.
        memory_bytes_per_s: memory bandwidth, bytes/s.
        nvlink_bytes_per_s: NVLink bandwidth per GPU per direction, bytes/s.
        board_watts: the datasheet's maximum board power (TDP), W.
        source: where ``matmul_flops``, the bandwidths and ``board_watts`` come from.
        energy_dtype: the dtype whose peak rate prices a FLOP in the modeled energy
            (:attr:`pj_per_flop`): the rate a tuned run on the card would use.
        pj_per_byte: energy per byte a rank sends, pJ (an assumption, see ``byte_source``).
        byte_source: where ``pj_per_byte`` comes from.
    """
    name: str
    matmul_flops: dict
    memory_bytes_per_s: float
    nvlink_bytes_per_s: float
    board_watts: float
    source: str
    energy_dtype: str = "bf16"
    pj_per_byte: float = 80.0
    byte_source: str = _LINK

    @property
    def pj_per_flop(self) -> float:
        """pJ per FLOP: full board power at the peak rate of :attr:`energy_dtype` (a lower bound
        on the power drawn per FLOP at that rate, an upper bound on the rate)."""
        return self.board_watts / self.matmul_flops[self.energy_dtype] * 1e12

    @property
    def flop_source(self) -> str:
        """Where :attr:`pj_per_flop` comes from, with the arithmetic."""
        rate = self.matmul_flops[self.energy_dtype] / 1e12
        return (f"derived: {self.name} datasheet max TDP {self.board_watts:g} W / dense "
                f"{self.energy_dtype.upper()} peak {rate:g} TFLOP/s = {self.pj_per_flop:.2f} pJ/FLOP "
                "(full board power at the peak rate)")


_HOPPER = ({"bf16": 989.4e12, "fp16": 989.4e12, "fp32": 67e12, "fp64": 67e12},
           "BF16/FP16 tensor core 989.4 TFLOP/s dense, FP32 67, FP64 tensor core 67")
DEVICES = {
    "h100-sxm": Device(
        name="NVIDIA H100 SXM5 80GB", matmul_flops=_HOPPER[0], memory_bytes_per_s=3.35e12,
        nvlink_bytes_per_s=450e9, board_watts=700,
        source=f"NVIDIA H100 datasheet: {_HOPPER[1]}; HBM3 3.35 TB/s; NVLink 900 GB/s (450 per direction); "
               f"max TDP 700 W; {_FP32}"),
    "h200-sxm": Device(
        name="NVIDIA H200 SXM 141GB", matmul_flops=_HOPPER[0], memory_bytes_per_s=4.8e12,
        nvlink_bytes_per_s=450e9, board_watts=700,
        source=f"NVIDIA H200 datasheet: {_HOPPER[1]}; HBM3e 4.8 TB/s; NVLink 900 GB/s (450 per direction); "
               f"max TDP up to 700 W (configurable); {_FP32}"),
    "a100-sxm": Device(
        name="NVIDIA A100 SXM4 80GB",
        matmul_flops={"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12, "fp64": 19.5e12},
        memory_bytes_per_s=2.039e12, nvlink_bytes_per_s=300e9, board_watts=400,
        source="NVIDIA A100 datasheet: BF16/FP16 tensor core 312 TFLOP/s dense, FP32 19.5, FP64 tensor "
               f"core 19.5; HBM2e 2,039 GB/s; NVLink 600 GB/s (300 per direction); max TDP 400 W; {_FP32}"),
}
"""Device key -> :class:`Device`. The keys are what ``phantom-plan --datasheet``,
``phantom-bench --energy-preset`` and ``benchmarks/gpu_layer_check.py --preset`` take."""


def device(key: Union[str, Device], who: str = "device") -> Device:
    """The :class:`Device` of ``key`` (a :class:`Device` is returned as is).

    Raises ``ValueError`` naming ``who`` (the flag or field that took ``key``) and the valid keys.
    """
    if isinstance(key, Device):
        return key
    if key not in DEVICES:
        raise ValueError(f"{who}: unknown device {key!r}; choose one of {', '.join(sorted(DEVICES))}")
    return DEVICES[key]
