"""Phantom time, throughput, traffic and energy as DeepSpeed monitor events.

:class:`StepLogger` wraps the engine's optimizer step (``DeepSpeedEngine._take_model_step``,
which both the plain and the pipeline engine call once per optimizer step) and, every
``interval`` steps, writes through ``engine.monitor.write_events`` (tensorboard / csv / wandb /
comet, whichever the config enables; DeepSpeed writes on global rank 0 only):

* ``Phantom/seconds_per_step``   wall seconds per optimizer step over the window;
* ``Phantom/samples_per_second`` ``train_batch_size`` samples (global) per wall second;
* ``Phantom/comm_bytes_per_step`` bytes this rank sent in phantom collectives per step
  (``phantom_plugin.comm.COUNTER``, ring algorithms);
* ``Phantom/energy_joules_per_step`` when ``phantom_plugin.energy.EnergyMeter`` finds an
  energy counter for this rank's device (NVML, amdsmi or RAPL; a CPU package's RAPL counter is
  shared by every process on it).

Event steps are ``engine.global_samples``, DeepSpeed's own convention. The logger runs no
collective; it synchronizes the accelerator before reading the clock. While it is attached it
drops :data:`COUNTER`'s records at each window end, so they do not grow without bound.
"""
from __future__ import annotations

import time
import warnings

from .. import comm

__all__ = ["StepLogger"]


def _energy_meter(device):
    """``EnergyMeter`` for this rank's device, or ``None`` (time and bytes are logged regardless)."""
    try:
        from ..energy import EnergyMeter
    except ImportError:
        return None
    meter = EnergyMeter(device)
    if meter.reason:
        warnings.warn(f"phantom_parallel: {meter.reason}; logging time and bytes only", stacklevel=2)
    return meter


class StepLogger:
    """Writes the events above every ``interval`` optimizer steps of ``engine``."""

    WINDOW = "phantom_parallel"

    def __init__(self, engine, interval: int):
        from deepspeed.accelerator import get_accelerator
        self.engine, self.interval, self.steps = engine, interval, 0
        self._sync = get_accelerator().synchronize
        self.meter = _energy_meter(getattr(engine, "device", None))
        self.events: list[tuple[str, float, int]] = []      # everything written, for tests and users
        self._inner = engine._take_model_step
        engine._take_model_step = self._step
        self._begin()

    def _begin(self) -> None:
        self._sync()
        comm.COUNTER.reset()
        if self.meter is not None:
            self.meter.begin_window(self.WINDOW)
        self._t0 = time.perf_counter()

    def _step(self, *args, **kwargs):
        out = self._inner(*args, **kwargs)
        self.steps += 1
        if self.steps % self.interval == 0:
            self._flush()
        return out

    def _flush(self) -> None:
        self._sync()
        seconds = time.perf_counter() - self._t0
        n = self.interval
        sent = comm.COUNTER.sent_bytes
        joules = None
        if self.meter is not None:
            m = self.meter.end_window(self.WINDOW)
            seconds, joules = m.time_s, m.energy_j
        at = int(getattr(self.engine, "global_samples", self.steps))
        events = [("Phantom/seconds_per_step", seconds / n, at),
                  ("Phantom/samples_per_second", self.engine.train_batch_size() * n / seconds, at),
                  ("Phantom/comm_bytes_per_step", sent / n, at)]
        if joules is not None:
            events.append(("Phantom/energy_joules_per_step", joules / n, at))
        self.events += events
        monitor = getattr(self.engine, "monitor", None)
        if monitor is not None:
            monitor.write_events(events)
        self._begin()
