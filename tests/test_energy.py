"""EnergyMeter: NVML arithmetic against a fake pynvml module, RAPL against a temporary powercap
tree, the None path, the explicit group sum (real gloo ranks) and the modeled energy."""
import os
import types

import pytest
import torch

from dist_utils import run_ranks
from phantom_plugin import energy
from phantom_plugin.modeling import devices, energy_model


class _NVMLError(Exception):
    pass


def fake_nvml(readings_mj, calls, supported=True):
    """A module object with the few pynvml functions the meter uses; records call order."""
    it = iter(readings_mj)

    def total_energy(handle):
        calls.append("read")
        if not supported:
            raise _NVMLError("Not Supported")
        assert handle == ("handle", 3)
        return next(it)
    return types.SimpleNamespace(
        NVMLError=_NVMLError, nvmlInit=lambda: calls.append("init"),
        nvmlDeviceGetHandleByIndex=lambda i: ("handle", i),
        nvmlDeviceGetTotalEnergyConsumption=total_energy)


class FakeClock:
    """Stands in for the ``time`` module inside :mod:`phantom_plugin.energy`: its clocks move
    only when the test says (no sleeping, no dependence on the machine's load)."""

    def __init__(self):
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now

    def process_time(self) -> float:
        return 0.0


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    c = FakeClock()
    monkeypatch.setattr(energy, "time", c)
    return c


@pytest.mark.fast
def test_nvml_window_is_difference_of_millijoule_reads():
    nvml = fake_nvml([1_000_000, 1_000_000, 1_250_500], [])
    meter = energy.EnergyMeter(None, index=3, nvml=nvml)
    assert meter.source == "nvml" and meter.reason is None
    meter.begin_window("a")
    m = meter.end_window("a")
    assert m.energy_j == pytest.approx(250.5)              # (1_250_500 - 1_000_000) mJ
    assert m.source == "nvml" and "GPU" in m.scope and m.reason is None


@pytest.mark.fast
def test_nvml_syncs_before_every_window_read():
    calls = []
    meter = energy.EnergyMeter(None, index=3, nvml=fake_nvml([0, 0, 5_000], calls), sync=lambda: calls.append("sync"))
    meter.begin_window("a")
    meter.end_window("a")
    assert calls == ["init", "read", "sync", "read", "sync", "read"]      # the first read: the probe


@pytest.mark.fast
def test_nvml_reads_once_per_window_end():
    meter = energy.EnergyMeter(None, index=3, nvml=fake_nvml([0, 0, 5_000, 5_000], []))   # probe, a, a, b
    meter.begin_window("a")
    meter.end_window("a")
    meter.begin_window("b")
    with pytest.raises(StopIteration):
        meter.end_window("b")                              # fake counter exhausted: proves one read per end


@pytest.mark.fast
def test_nvml_window_shorter_than_the_update_period_is_flagged(clock):
    meter = energy.EnergyMeter(None, index=3, nvml=fake_nvml([0, 10_000, 30_000], []))
    meter.begin_window("w")
    clock.now += energy.UPDATE_PERIOD_S["nvml"] / 2
    m = meter.end_window("w")
    assert m.time_s == pytest.approx(energy.UPDATE_PERIOD_S["nvml"] / 2) and m.short_window


@pytest.mark.fast
def test_nvml_window_longer_than_the_update_period_is_not_flagged(clock):
    meter = energy.EnergyMeter(None, index=3, nvml=fake_nvml([0, 10_000, 30_000], []))
    meter.begin_window("w")
    clock.now += energy.UPDATE_PERIOD_S["nvml"] + 0.02
    m = meter.end_window("w")
    assert m.energy_j == pytest.approx(20.0)
    assert m.time_s == pytest.approx(energy.UPDATE_PERIOD_S["nvml"] + 0.02) and not m.short_window


@pytest.mark.fast
def test_nvml_not_supported_gives_none_with_reason():
    meter = energy.EnergyMeter(None, index=3, nvml=fake_nvml([], [], supported=False), sources=("nvml",))
    meter.begin_window("w")
    m = meter.end_window("w")
    assert m.energy_j is None and m.source == "none" and "Not Supported" in m.reason


@pytest.mark.fast
def test_nvml_device_found_by_pci_bus_id_and_labelled_by_it():
    calls = []
    nvml = fake_nvml([0, 5_000, 9_000], calls)
    boards = {"00000000:3b:00.0": ("handle", 3)}
    nvml.nvmlDeviceGetHandleByPciBusId = lambda bus: boards[bus]             # KeyError: wrong GPU
    nvml.nvmlDeviceGetHandleByIndex = lambda i: pytest.fail("looked up by index")
    nvml.nvmlDeviceGetPciInfo = lambda h: types.SimpleNamespace(busId=b"00000000:3B:00.0")
    meter = energy.EnergyMeter(None, pci_bus_id="0000:3B:00.0", nvml=nvml)
    m = _one_window(meter)
    assert m.energy_j == pytest.approx(4.0) and list(m.per_device_j) == ["gpu:00000000:3b:00.0"]
    assert "PCI bus id" in m.scope


@pytest.mark.fast
def test_cuda_device_that_cannot_be_identified_is_not_read_by_index():
    """torch's cuda:1 is not NVML's GPU 1 under per-rank CUDA_VISIBLE_DEVICES: no guess."""
    if torch.cuda.is_available():
        pytest.skip("a real CUDA device identifies itself by PCI bus id")
    m = _one_window(energy.EnergyMeter(torch.device("cuda", 1), nvml=fake_nvml([0, 1], []), sources=("nvml",),
                                      sync=lambda: None))
    assert m.energy_j is None and "cannot identify this rank's GPU" in m.reason


def _powercap(root, uj, max_uj=2 ** 32):
    for zone, name in (("intel-rapl:0", "package-0"), ("intel-rapl:0:0", "core")):
        d = root / zone
        d.mkdir(parents=True, exist_ok=True)
        (d / "name").write_text(name + "\n")
        (d / "energy_uj").write_text(f"{uj}\n")
        (d / "max_energy_range_uj").write_text(f"{max_uj}\n")


@pytest.mark.fast
def test_rapl_reads_package_zones_and_handles_wraparound(tmp_path):
    _powercap(tmp_path, 5_000_000)
    meter = energy.EnergyMeter(torch.device("cpu"), rapl_root=str(tmp_path))
    assert meter.source == "rapl"
    meter.begin_window("w")
    _powercap(tmp_path, 7_500_000)
    m = meter.end_window("w")
    assert m.energy_j == pytest.approx(2.5) and list(m.per_device_j) == ["package-0(intel-rapl:0)"]
    assert "shared" in m.scope
    _powercap(tmp_path, 2 ** 32 - 1_000_000)
    meter.begin_window("wrap")
    _powercap(tmp_path, 500_000)                           # counter wrapped past max_energy_range_uj
    assert meter.end_window("wrap").energy_j == pytest.approx(1.5)


@pytest.mark.fast
def test_unreadable_rapl_gives_none(tmp_path):
    _powercap(tmp_path, 1)
    os.chmod(tmp_path / "intel-rapl:0" / "energy_uj", 0)
    if os.access(tmp_path / "intel-rapl:0" / "energy_uj", os.R_OK):
        pytest.skip("running as root: permissions do not apply")
    m = _one_window(energy.EnergyMeter(torch.device("cpu"), rapl_root=str(tmp_path)))
    assert m.energy_j is None and "PermissionError" in m.reason


def _one_window(meter):
    meter.begin_window("w")
    return meter.end_window("w")


@pytest.mark.fast
def test_none_path_without_counters(tmp_path):
    m = _one_window(energy.EnergyMeter(torch.device("cpu"), rapl_root=str(tmp_path / "absent")))
    assert m.energy_j is None and m.source == "none" and "rapl" in m.reason and m.per_device_j == {}
    assert m.time_s >= 0 and m.cpu_time_s >= 0
    if not os.access("/sys/class/powercap", os.R_OK):     # this machine: no counter at all
        m = _one_window(energy.EnergyMeter(torch.device("cpu")))
        assert m.energy_j is None and m.reason


@pytest.mark.fast
def test_window_misuse_raises():
    meter = energy.EnergyMeter(torch.device("cpu"), sources=())
    with pytest.raises(ValueError):
        meter.end_window("never")
    meter.begin_window("x")
    with pytest.raises(ValueError):
        meter.begin_window("x")


@pytest.mark.fast
def test_modeled_energy_is_flops_and_bytes_times_stated_constants():
    p = devices.DEVICES["h100-sxm"]
    assert p.pj_per_flop == pytest.approx(700 / 989.4)
    assert energy_model.modeled_energy_j(1e12, 1e9, p) == pytest.approx(p.pj_per_flop + 1e9 * p.pj_per_byte * 1e-12)
    assert all(q.flop_source and q.byte_source for q in devices.DEVICES.values())


def _sum_rank(rank, world_size):
    return [_sum_one(rank, s, label) for s, label in (("nvml", f"gpu:0000000{rank}:3b:00.0"),
                                                       ("nvml", "gpu:00000000:3b:00.0"),
                                                       ("rapl", "package-0"), ("none", None))]


def _sum_one(rank, source, label):
    m = energy.Measurement("w", 1.0 + rank, None if source == "none" else 10.0 * (rank + 1),
                           {} if source == "none" else {label: 10.0 * (rank + 1)}, source, "s",
                           "no counter" if source == "none" else None, False, 0.5)
    import torch.distributed as dist
    return energy.sum_over_group(m, dist.group.WORLD)


def test_sum_over_group_explicit_and_rapl_counted_once_per_host():
    nv, shared, rapl, none = run_ranks(_sum_rank, 2)[0]
    assert nv.energy_j == pytest.approx(30.0) and nv.time_s == 2.0 and nv.cpu_time_s == 1.0
    assert shared.energy_j == pytest.approx(10.0)          # one GPU read by both ranks: counted once
    assert rapl.energy_j == pytest.approx(10.0)            # both ranks on one host share the package
    assert none.energy_j is None and "no counter" in none.reason
