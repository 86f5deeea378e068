"""The *modeled* energy of a run: FLOPs and bytes sent (from :mod:`.counts`) times the energies per
FLOP and per byte of a :class:`~.devices.Device` (:data:`.devices.DEVICES`). A model, never a
measurement: results go in fields named ``*_modeled`` and carry :func:`describe`'s words, next to
what :class:`phantom_plugin.energy.EnergyMeter` measured (or why it could not). Leaf module:
torch-free.
"""
from __future__ import annotations

from typing import Union

from .devices import Device, device

__all__ = ["modeled_energy_j", "describe"]


def modeled_energy_j(flops: float, bytes_sent: float, dev: Union[str, Device] = "h100-sxm") -> float:
    """``flops * pJ/FLOP + bytes_sent * pJ/byte`` of ``dev`` (a key of :data:`.devices.DEVICES` or a
    :class:`~.devices.Device`), in joules. Always a *modeled* figure."""
    d = device(dev, "modeled_energy_j: dev")
    return (flops * d.pj_per_flop + bytes_sent * d.pj_per_byte) * 1e-12


def describe(dev: Union[str, Device]) -> str:
    """What the modeled energy of ``dev`` assumes, with sources: ``"preset h100-sxm: 0.707 pJ/FLOP
    (derived: ...); 80 pJ/byte (assumption, ...)"``."""
    d = device(dev, "describe: dev")
    label = dev if isinstance(dev, str) else d.name
    return (f"preset {label}: {d.pj_per_flop:.3g} pJ/FLOP ({d.flop_source}); "
            f"{d.pj_per_byte:.3g} pJ/byte ({d.byte_source})")
