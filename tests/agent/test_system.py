"""The system sampler against the real psutil and, where there is one, the real NVML.

Host readings are real calls. The NVML paths that a CPU machine cannot reach
(devices refusing queries, Xid events) run once against :class:`FakeNvml`, a
small stand-in for the pynvml module installed in ``sys.modules``.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest

from runwatch.agent.buffer import SYSTEM, PointBuffer, Record
from runwatch.agent.safety import Faults
from runwatch.agent.system import PART, SystemSampler

HOST_KEYS = {"sys/mem_used_percent", "sys/mem_available_gb", "sys/proc_rss_gb"}
RATE_KEYS = {
    "sys/cpu_percent",
    "sys/proc_cpu_percent",
    "sys/disk_read_mb_s",
    "sys/disk_write_mb_s",
    "sys/net_sent_mb_s",
    "sys/net_recv_mb_s",
}


def _nvml_works() -> bool:
    """Whether this machine has a GPU that NVML can talk to."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return False
    pynvml.nvmlShutdown()
    return True


def _sampler(sink: Any = None, **kw: Any) -> SystemSampler:
    return SystemSampler(PointBuffer() if sink is None else sink, step=lambda: 7, **kw)


def test_sample_reads_the_host() -> None:
    sampler = _sampler()
    try:
        first = sampler.sample()
        time.sleep(0.02)
        second = sampler.sample()
    finally:
        sampler.stop()
    assert first.keys() >= HOST_KEYS
    assert not {"sys/cpu_percent", "sys/proc_cpu_percent"} & first.keys()  # only primed
    assert HOST_KEYS | {"sys/cpu_percent", "sys/proc_cpu_percent"} <= second.keys()
    assert all(isinstance(v, float) for v in second.values())
    ncpu = os.cpu_count() or 1
    assert 0 <= second["sys/cpu_percent"] <= 100
    assert 0 <= second["sys/proc_cpu_percent"] <= 100 * ncpu
    assert 0 < second["sys/mem_used_percent"] <= 100
    assert second["sys/mem_available_gb"] > 0
    assert second["sys/proc_rss_gb"] > 0
    # Disk counters are missing in some containers; whatever rates there are are rates.
    for key in RATE_KEYS & second.keys():
        assert second[key] >= 0, key


def test_gpu_metrics_where_nvml_works_and_quiet_where_not(
    caplog: pytest.LogCaptureFixture,
) -> None:
    has_gpu = _nvml_works()
    caplog.set_level(logging.DEBUG, logger="runwatch.agent")
    sampler = _sampler(gpu_indices=[0] if has_gpu else None)
    try:
        values = sampler.sample()
    finally:
        sampler.stop()
    gpu_keys = {k for k in values if k.startswith("sys/gpu")}
    if has_gpu:
        assert {
            "sys/gpu0/util_percent",
            "sys/gpu0/mem_used_gb",
            "sys/gpu0/mem_total_gb",
            "sys/gpu0/temp_c",
        } <= gpu_keys
        assert values["sys/gpu0/mem_total_gb"] > 0
        assert 0 <= values["sys/gpu0/util_percent"] <= 100
    else:
        assert gpu_keys == set()
        assert any("NVML" in r.getMessage() for r in caplog.records)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_running_sampler_puts_samples_at_the_trainers_step() -> None:
    buffer = PointBuffer()
    asked: list[int] = []

    def step() -> int:
        asked.append(100 + len(asked))
        return asked[-1]

    sampler = SystemSampler(buffer, step=step, interval=0.05, faults=Faults())
    sampler.start()
    deadline = time.monotonic() + 2.0
    while len(asked) < 4 and time.monotonic() < deadline:  # the 4th ask follows the 3rd put
        time.sleep(0.01)
    sampler.stop()
    thread = sampler._thread
    assert thread is not None and thread.name == "runwatch-system" and thread.daemon
    assert not thread.is_alive()

    assert sum(r.size for r in buffer._queues[SYSTEM]) == len(buffer)  # all at SYSTEM priority
    records: list[Record] = buffer.drain()
    assert len(records) >= 3
    assert [r.step for r in records] == list(range(100, 100 + len(records)))
    assert all(r.values.keys() >= HOST_KEYS for r in records)
    assert RATE_KEYS & records[1].values.keys()  # rates from the second sample on


def test_a_fault_switches_the_sampler_off_without_raising(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    faults = Faults()
    buffer = PointBuffer()
    sampler = SystemSampler(buffer, step=lambda: 1, interval=0.01, faults=faults)
    calls = 0

    def broken() -> dict[str, float]:
        nonlocal calls
        calls += 1
        raise RuntimeError("psutil is broken")

    monkeypatch.setattr(sampler, "_read_host", broken)
    with caplog.at_level(logging.WARNING, logger="runwatch.agent"):
        sampler.start()
        assert sampler._thread is not None
        sampler._thread.join(1.0)
        assert not sampler._thread.is_alive()  # ended by itself, not by stop()
        sampler.stop()
    assert faults.failed(PART)
    assert faults.counts() == {PART: 1}
    assert calls == 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and PART in warnings[0].getMessage()
    assert len(buffer) == 0
    sampler.start()  # a failed part stays off
    assert not sampler._thread.is_alive()


def test_start_is_idempotent_and_stop_before_start_is_harmless() -> None:
    idle = _sampler(interval=60.0, faults=Faults())
    idle.stop()
    idle.stop()
    idle.start()  # a stopped sampler stays stopped
    assert idle._thread is None

    sampler = _sampler(interval=60.0, faults=Faults())
    before = threading.active_count()
    sampler.start()
    first = sampler._thread
    sampler.start()
    assert sampler._thread is first
    assert threading.active_count() == before + 1
    assert [t.name for t in threading.enumerate()].count("runwatch-system") == 1
    sampler.stop()
    sampler.stop()
    assert first is not None and not first.is_alive()


class FakeNvml:
    """The part of the pynvml module the sampler uses, with two GPUs.

    GPU 1 refuses ECC and power (``NotSupported``, as consumer boards do);
    GPU 0 has Xid events queued in :attr:`events`.
    """

    class NVMLError(Exception):
        pass

    class NVMLError_NotSupported(NVMLError):  # pynvml's spelling
        pass

    class NVMLError_Timeout(NVMLError):
        pass

    NVML_TEMPERATURE_GPU = 0
    NVML_MEMORY_ERROR_TYPE_CORRECTED = 0
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
    NVML_VOLATILE_ECC = 0
    nvmlEventTypeXidCriticalError = 8

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.events: list[SimpleNamespace] = []
        self.initialised = False

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    def nvmlInit(self) -> None:
        self.initialised = True

    def nvmlShutdown(self) -> None:
        self.initialised = False

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
        return f"gpu{index}"

    def nvmlDeviceGetIndex(self, handle: str) -> int:
        return int(handle[3:])

    def nvmlDeviceGetUtilizationRates(self, handle: str) -> SimpleNamespace:
        return SimpleNamespace(gpu=42, memory=10)

    def nvmlDeviceGetMemoryInfo(self, handle: str) -> SimpleNamespace:
        return SimpleNamespace(used=2_000_000_000, total=80_000_000_000)

    def nvmlDeviceGetTemperature(self, handle: str, sensor: int) -> int:
        return 61

    def nvmlDeviceGetPowerUsage(self, handle: str) -> int:
        self._count(f"power:{handle}")
        if handle == "gpu1":
            raise self.NVMLError_NotSupported()
        return 350_500

    def nvmlDeviceGetTotalEccErrors(self, handle: str, error_type: int, counter: int) -> int:
        self._count(f"ecc:{handle}")
        if handle == "gpu1":
            raise self.NVMLError_NotSupported()
        return 3 if error_type == self.NVML_MEMORY_ERROR_TYPE_CORRECTED else 0

    def nvmlEventSetCreate(self) -> str:
        return "set"

    def nvmlDeviceRegisterEvents(self, handle: str, types: int, event_set: str) -> None:
        pass

    def nvmlEventSetWait_v2(self, event_set: str, timeout_ms: int) -> SimpleNamespace:
        assert timeout_ms == 0  # never blocks the sampler
        if not self.events:
            raise self.NVMLError_Timeout()
        return self.events.pop(0)

    def nvmlEventSetFree(self, event_set: str) -> None:
        self._count("free")


def test_nvml_refusals_are_not_retried_and_xid_events_are_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    nvml = FakeNvml()
    xid = SimpleNamespace(device="gpu0", eventType=nvml.nvmlEventTypeXidCriticalError)
    nvml.events = [xid, xid]
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    sampler = _sampler(faults=Faults())

    first = sampler.sample()
    nvml.events = [xid]
    second = sampler.sample()
    sampler.stop()

    assert first["sys/gpu0/util_percent"] == 42.0
    assert first["sys/gpu0/mem_used_gb"] == 2.0
    assert first["sys/gpu0/mem_total_gb"] == 80.0
    assert first["sys/gpu0/temp_c"] == 61.0
    assert first["sys/gpu0/power_w"] == 350.5
    assert first["sys/gpu0/ecc_corrected"] == 3.0
    assert first["sys/gpu0/ecc_uncorrected"] == 0.0
    assert (first["sys/gpu0/xid_errors"], second["sys/gpu0/xid_errors"]) == (2.0, 3.0)
    assert second["sys/gpu1/xid_errors"] == 0.0
    gpu1 = {k.split("/")[2] for k in second if k.startswith("sys/gpu1/")}
    assert gpu1 == {"util_percent", "mem_used_gb", "mem_total_gb", "temp_c", "xid_errors"}
    # Each refused query was asked once, not once per sample.
    assert nvml.calls["power:gpu1"] == 1
    assert nvml.calls["ecc:gpu1"] == 2  # corrected and uncorrected, each once
    assert nvml.calls["ecc:gpu0"] == 4
    # stop() freed the event set and shut NVML down, and the sampler does not reopen it.
    assert nvml.calls["free"] == 1 and not nvml.initialised
    assert not {k for k in sampler.sample() if k.startswith("sys/gpu")}
