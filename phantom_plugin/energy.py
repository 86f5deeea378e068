"""Energy measured in windows, beside time: ``EnergyMeter.begin_window`` / ``end_window``.

Each rank reads the counter of **its own device** and nothing else; no collective runs unless
the caller asks for one with :func:`sum_over_group` and an explicit group. A CUDA/ROCm device is
found in NVML / amdsmi by its **PCI bus id** (from ``torch.cuda.get_device_properties``), never
by torch's index alone: torch's index differs from the management library's under per-rank
``CUDA_VISIBLE_DEVICES``, and a MIG instance has no energy counter of its own (its board is
read, and the scope says so). Readings are labelled by bus id, so :func:`sum_over_group` counts
a device that several ranks share once. Sources, tried in order (``docs/benchmarking.md``, "Energy"):

* ``nvml``: NVML's total-energy counter (``nvidia-ml-py``, module ``pynvml``;
  ``nvmlDeviceGetTotalEnergyConsumption``, millijoules since driver load; Volta and newer).
  Updated every ~10-100 ms, so windows shorter than :data:`UPDATE_PERIOD_S` ``["nvml"]`` are flagged.
* ``amdsmi``: ``amdsmi_get_energy_count`` (ticks x microjoules per tick), when importable. On
  MI250X one die of each pair reports for both: the figure covers the pair.
* ``rapl``: CPU package counters under ``/sys/class/powercap/*/energy_uj`` when readable. A
  package is shared by every process on it: the scope says so, and :func:`sum_over_group`
  counts each host once.
* otherwise ``energy_j = None`` with the ``reason``. Never an estimate in that field.

This module only measures. The *modeled* energy (FLOPs and bytes from
:mod:`phantom_plugin.modeling.counts` times a device's stated per-FLOP and per-byte energies) is
:func:`phantom_plugin.modeling.energy_model.modeled_energy_j`, whose results go in fields named
``*_modeled``.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import socket
import time
from typing import Callable, Optional

__all__ = ["Measurement", "EnergyMeter", "sum_over_group", "UPDATE_PERIOD_S"]

UPDATE_PERIOD_S = {"nvml": 0.1, "amdsmi": 0.001, "rapl": 0.001}
"""Counter update period per source, seconds (NVML: the slow end of its 10-100 ms; RAPL ~1 ms)."""


@dataclasses.dataclass(frozen=True)
class Measurement:
    """One window on one rank (or summed over a group by :func:`sum_over_group`).

    Attributes:
        name: the window's name.
        time_s: wall-clock seconds between the two (synchronized) reads.
        energy_j: joules over the window, summed over ``per_device_j``; ``None`` when not measured.
        per_device_j: joules per device read (label -> J).
        source: ``"nvml"``, ``"amdsmi"``, ``"rapl"`` or ``"none"``.
        scope: what the joules cover (which device; whether shared with other processes).
        reason: why ``energy_j`` is ``None`` (``None`` when measured).
        short_window: the window was shorter than the counter's update period (treat with care).
        cpu_time_s: CPU seconds this process used in the window (all its threads), always measured.
    """
    name: str
    time_s: float
    energy_j: Optional[float]
    per_device_j: dict
    source: str
    scope: str
    reason: Optional[str]
    short_window: bool
    cpu_time_s: float

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# --- sources: each has read() -> {label: joules} and attributes name, scope, shared ----------

def _norm_bus_id(bus) -> str:
    """``"0000:3B:00.0"`` / ``b"00000000:3b:00.0"`` -> ``"00000000:3b:00.0"`` (NVML's long form)."""
    bus = (bus.decode() if isinstance(bus, bytes) else str(bus)).strip().strip("\x00").lower()
    parts = bus.split(":")
    domain = parts[0] if len(parts) == 3 else "0"
    return f"{int(domain, 16):08x}:{':'.join(parts[-2:])}"


class _Nvml:
    name, shared = "nvml", False

    def __init__(self, nvml, index: Optional[int], uuid: Optional[str] = None,
                 pci_bus_id: Optional[str] = None):
        nvml.nvmlInit()
        self._nvml = nvml
        handle, how = None, None
        if pci_bus_id is not None and hasattr(nvml, "nvmlDeviceGetHandleByPciBusId"):
            handle, how = nvml.nvmlDeviceGetHandleByPciBusId(_norm_bus_id(pci_bus_id)), "PCI bus id"
        elif uuid is not None and uuid.startswith("GPU-") and hasattr(nvml, "nvmlDeviceGetHandleByUUID"):
            handle, how = nvml.nvmlDeviceGetHandleByUUID(uuid), "UUID"
        elif index is not None:
            handle, how = nvml.nvmlDeviceGetHandleByIndex(index), f"NVML index {index}"
        else:
            raise RuntimeError("cannot identify this rank's GPU in NVML (no PCI bus id or GPU UUID "
                               "from torch); pass EnergyMeter(pci_bus_id=...) or index=")
        self._handle = handle
        bus = None
        if hasattr(nvml, "nvmlDeviceGetPciInfo"):
            bus = _norm_bus_id(nvml.nvmlDeviceGetPciInfo(handle).busId)
        self.label = f"gpu:{bus}" if bus else f"gpu:nvml{index}"
        mig = " shared by its MIG instances" if _mig_enabled(nvml, handle, uuid) else ""
        self.scope = f"this rank's GPU ({self.label}, found by {how}; whole board{mig})"
        self.read()  # raises NVMLError (NotSupported before Volta) here, not mid-window

    def read(self) -> dict:
        mj = self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)   # millijoules
        return {self.label: mj / 1000.0}


def _mig_enabled(nvml, handle, uuid: Optional[str]) -> bool:
    """MIG mode of the board (NVML), else whether this process was given a MIG instance."""
    if hasattr(nvml, "nvmlDeviceGetMigMode"):
        try:
            return nvml.nvmlDeviceGetMigMode(handle)[0] == 1
        except getattr(nvml, "NVMLError", RuntimeError):   # NotSupported on boards without MIG
            pass
    return (uuid or "").startswith("MIG-") or "MIG-" in os.environ.get("CUDA_VISIBLE_DEVICES", "")


class _Amdsmi:
    name, shared = "amdsmi", False

    def __init__(self, amdsmi, index: Optional[int], pci_bus_id: Optional[str] = None):
        amdsmi.amdsmi_init()
        self._amdsmi = amdsmi
        if pci_bus_id is not None and hasattr(amdsmi, "amdsmi_get_processor_handle_from_bdf"):
            bdf = _norm_bus_id(pci_bus_id)[4:]                                 # "0000:3b:00.0"
            self._handle, how, label = amdsmi.amdsmi_get_processor_handle_from_bdf(bdf), "PCI bus id", bdf
        elif index is not None:
            self._handle, how, label = amdsmi.amdsmi_get_processor_handles()[index], f"amdsmi index {index}", f"amdsmi{index}"
        else:
            raise RuntimeError("cannot identify this rank's GPU in amdsmi (no PCI bus id from torch); "
                               "pass EnergyMeter(pci_bus_id=...) or index=")
        self.label = f"gpu:{label}"
        self.scope = f"this rank's GPU ({self.label}, found by {how}; on MI250X one die reports for its pair)"
        self.read()

    def read(self) -> dict:
        info = self._amdsmi.amdsmi_get_energy_count(self._handle)
        ticks = info.get("energy_accumulator", info.get("power"))
        return {self.label: float(ticks) * float(info["counter_resolution"]) / 1e6}   # uJ -> J


class _Rapl:
    name, shared = "rapl", True

    def __init__(self, root: str):
        zones = sorted(z for z in glob.glob(os.path.join(root, "*")) if _is_package(z))
        if not zones:
            raise OSError(f"no RAPL package zones under {root}")
        self._zones = []
        for z in zones:
            with open(os.path.join(z, "name")) as f:
                label = f.read().strip()
            wrap = _read_int(os.path.join(z, "max_energy_range_uj"), default=None)
            self._zones.append((f"{label}({os.path.basename(z)})", os.path.join(z, "energy_uj"), wrap))
        self._last: dict[str, float] = {}
        self._offset: dict[str, float] = {}
        self.scope = ("CPU packages of this host (" + ", ".join(l for l, _, _ in self._zones)
                      + "), shared with every process on them")
        self.read()

    def read(self) -> dict:
        out = {}
        for label, path, wrap in self._zones:
            uj = float(_read_int(path))            # PermissionError when root-only
            if label in self._last and uj < self._last[label] and wrap:
                self._offset[label] = self._offset.get(label, 0.0) + wrap   # counter wrapped
            self._last[label] = uj
            out[label] = (uj + self._offset.get(label, 0.0)) / 1e6
        return out


def _is_package(path: str) -> bool:
    """Top-level zones (``intel-rapl:0``), not sub-zones (``intel-rapl:0:1``) nor ``*-mmio``."""
    base = os.path.basename(path)
    return base.count(":") == 1 and "mmio" not in base and os.path.exists(os.path.join(path, "energy_uj"))


def _read_int(path: str, default=0):
    try:
        with open(path) as f:
            return int(f.read().strip())
    except FileNotFoundError:
        if default is None:
            return None
        raise


def _default_sync(device) -> Callable[[], None]:
    def sync() -> None:
        if device is not None and getattr(device, "type", None) == "cuda":
            import torch
            torch.cuda.synchronize(device)
    return sync


class EnergyMeter:
    """Energy and time of named windows on this rank's device.

    Args:
        device: this rank's ``torch.device`` (a CUDA/ROCm device is matched by PCI bus id; CPU
            devices use RAPL).
        index: the management library's own GPU number, used only when neither ``device`` nor
            ``pci_bus_id`` identifies the GPU (default 0 then).
        pci_bus_id: the GPU's PCI bus id (``"0000:3b:00.0"``) when ``device`` does not say.
        sources: source names to try, in order.
        nvml, amdsmi: module objects to use instead of importing ``pynvml`` / ``amdsmi`` (tests).
        rapl_root: where the powercap tree lives.
        sync: called before every read (default: ``torch.cuda.synchronize`` on CUDA devices).
    """

    def __init__(self, device=None, *, index: Optional[int] = None, sources=("nvml", "amdsmi", "rapl"),
                 nvml=None, amdsmi=None, pci_bus_id: Optional[str] = None,
                 rapl_root: str = "/sys/class/powercap", sync: Optional[Callable[[], None]] = None):
        self.device = device
        self._sync = sync or _default_sync(device)
        self._windows: dict[str, tuple[float, float, Optional[dict]]] = {}
        self._source = None
        reasons = []
        gpu = ((device is not None and getattr(device, "type", "cpu") in ("cuda", "hip"))
               or nvml is not None or amdsmi is not None)
        bus = pci_bus_id if pci_bus_id is not None else _pci_bus_id(device)
        uuid = _cuda_uuid(device)
        if index is None and bus is None and uuid is None and not _is_accelerator(device):
            index = 0                                     # no torch device to go by (tests, tools)
        for name in sources:
            try:
                if name == "nvml" and gpu:
                    self._source = _Nvml(nvml or _import("pynvml"), index, uuid, bus)
                elif name == "amdsmi" and gpu:
                    self._source = _Amdsmi(amdsmi or _import("amdsmi"), index, bus)
                elif name == "rapl" and not gpu:
                    self._source = _Rapl(rapl_root)
                else:
                    reasons.append(f"{name}: not for a {'GPU' if gpu else 'CPU'} device")
                    continue
                break
            except ImportError as e:
                reasons.append(f"{name}: not importable ({e.name})")
            except (OSError, PermissionError) as e:
                reasons.append(f"{name}: {e.__class__.__name__}: {e}")
            except Exception as e:  # NVMLError / AmdSmiException (NotSupported, no driver)
                reasons.append(f"{name}: {e.__class__.__name__}: {e}")
        self.reason = None if self._source else "no energy counter: " + "; ".join(reasons)

    @property
    def source(self) -> str:
        return self._source.name if self._source else "none"

    def begin_window(self, name: str) -> None:
        """Synchronize the device and read the counters; the window ``name`` starts now."""
        if name in self._windows:
            raise ValueError(f"EnergyMeter: window {name!r} is already open")
        self._sync()
        reading = self._source.read() if self._source else None
        self._windows[name] = (time.perf_counter(), time.process_time(), reading)

    def end_window(self, name: str) -> Measurement:
        """Synchronize, read again and return the window's :class:`Measurement` (J, s)."""
        if name not in self._windows:
            raise ValueError(f"EnergyMeter: window {name!r} was not begun")
        self._sync()
        t1, c1 = time.perf_counter(), time.process_time()
        end = self._source.read() if self._source else None
        t0, c0, start = self._windows.pop(name)
        dt = t1 - t0
        if self._source is None:
            return Measurement(name, dt, None, {}, "none", "none", self.reason, False, c1 - c0)
        per = {k: end[k] - start[k] for k in end}
        return Measurement(name, dt, sum(per.values()), per, self._source.name, self._source.scope,
                           None, dt < UPDATE_PERIOD_S[self._source.name], c1 - c0)


def _import(name: str):
    import importlib
    return importlib.import_module(name)


def _is_accelerator(device) -> bool:
    return getattr(device, "type", None) in ("cuda", "hip")


def _cuda_props(device):
    if not _is_accelerator(device):
        return None
    import torch
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(device)


def _pci_bus_id(device) -> Optional[str]:
    """``"0000:3b:00.0"`` of a CUDA/ROCm device (torch's own properties), or None."""
    props = _cuda_props(device)
    if props is None or getattr(props, "pci_bus_id", None) is None:
        return None
    return f"{getattr(props, 'pci_domain_id', 0):04x}:{props.pci_bus_id:02x}:{getattr(props, 'pci_device_id', 0):02x}.0"


def _cuda_uuid(device) -> Optional[str]:
    """``GPU-...`` (a whole GPU) or ``MIG-...`` (a MIG instance), or None."""
    props = _cuda_props(device)
    uuid = None if props is None else getattr(props, "uuid", None)
    if uuid is None:
        return None
    text = str(uuid)
    return text if text.startswith(("GPU-", "MIG-")) else f"GPU-{text}"


def sum_over_group(m: Measurement, group) -> Measurement:
    """Sum ``m`` over the ranks of ``group`` (a collective: call it on every rank of ``group``).

    Each device is counted once: readings with the same label on the same host (one GPU by PCI
    bus id, or a RAPL package) shared by several ranks contribute once (the reading of the
    first such rank). ``time_s`` is the longest window, ``cpu_time_s`` the sum. ``energy_j`` is ``None``
    if any rank's is.
    """
    import torch.distributed as dist
    mine = {"m": m.as_dict(), "host": socket.gethostname()}
    every = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, mine, group=group)
    per, missing = {}, {}
    for r, e in enumerate(every):
        d = e["m"]
        if d["energy_j"] is None:
            missing.setdefault(d["reason"], []).append(r)
            continue
        for label, joules in d["per_device_j"].items():
            key = f"{e['host']}:{label}"
            per.setdefault(key, joules)
    ms = [e["m"] for e in every]
    energy = None if missing else sum(per.values())
    return Measurement(m.name, max(x["time_s"] for x in ms), energy, {} if missing else per,
                       ms[0]["source"], f"sum over {len(ms)} ranks of: {ms[0]['scope']}",
                       "; ".join(f"ranks {rs}: {why}" for why, rs in missing.items()) or None, any(x["short_window"] for x in ms),
                       sum(x["cpu_time_s"] for x in ms))

