"""The system sampler: host and GPU metrics from a daemon thread, one sample per interval.

A :class:`SystemSampler` wakes every ``interval`` seconds (5 s by default), reads
psutil and NVML, and puts the values at the trainer's current step with the
``SYSTEM`` priority, so that under pressure they are dropped after per-layer
detail and before the loss. Why it is built the way it is:

* **Cheap enough to ignore.** One :meth:`SystemSampler.sample` without a GPU
  takes about 0.2 ms (median 0.21 ms, p99 0.43 ms, 0.22 ms CPU time over 1,000
  calls on a 2-core AMD EPYC container, psutil 7.2.2, Python 3.11); the first
  call takes ~23 ms, mostly importing psutil and looking for NVML. NVML adds a
  handful of driver queries per GPU (not measured here: that machine had no
  GPU). At one sample per 5 s that is under 0.01 % of one core. It runs on its
  own thread and never touches the training step or the trainer's tensors, and
  it creates no CUDA context (NVML talks to the driver, not the CUDA runtime).
* **Never hurts training.** Each tick runs inside ``swallow_internal("system
  sampler")``: a bug is logged once, counted, and the thread ends (the part is
  switched off) instead of logging a traceback every interval. ``start()``
  handles the ``RuntimeError`` that ``Thread.start`` raises at interpreter
  shutdown; the thread is a daemon, so it never holds the interpreter open.
* **Absent hardware is normal, not an error.** No pynvml, no driver, or
  ``nvmlInit`` failing (CPU machines, most CI) turns GPU sampling off with one
  DEBUG line. A query a device answers with ``NVMLError_NotSupported`` (ECC on
  consumer cards, power on some boards, Xid events without privileges) is
  dropped for that device at the first refusal rather than asked again every
  interval. Any other ``NVMLError`` (a GPU falling off the bus answers
  ``GpuIsLost``) skips that value in that sample only: the trainer is about to
  find out anyway, and the host metrics keep flowing.
* **Rates from counters.** Disk and network throughput and CPU percentages are
  deltas since the previous sample over the monotonic clock, so the first
  sample only primes them and carries no rate keys. Counters psutil cannot
  read (``disk_io_counters()`` is ``None`` in many containers) are skipped.
* **Xid errors are counted, not waited for.** An NVML event set registered for
  critical Xid events is drained without blocking (``nvmlEventSetWait_v2(set,
  0)`` until ``NVMLError_Timeout``) at each sample, at most
  :data:`MAX_EVENTS_PER_SAMPLE` events, and ``sys/gpu{i}/xid_errors`` is the
  count since the sampler started: a rising count is the earliest sign of a
  failing GPU.
* **pynvml is imported lazily**, on the sampler's thread at the first sample,
  so that importing the agent stays cheap and ``nvmlInit`` (which enumerates
  every device) is not paid in ``runwatch.init()``.
* **Not restarted after fork.** A forked child (a DataLoader worker) would
  report the same host a second time, and NVML state inherited from the parent
  is not the child's to shut down; the child's copy of the sampler stays idle.

Units are decimal: GB is 1e9 bytes and MB/s is 1e6 bytes per second.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from runwatch.agent.buffer import SYSTEM
from runwatch.agent.safety import FAULTS, Faults, swallow_internal

if TYPE_CHECKING:
    import psutil

    from runwatch.agent.buffer import Sink

log = logging.getLogger("runwatch.agent")

PART = "system sampler"
"""The name the sampler's faults are recorded under."""
DEFAULT_INTERVAL = 5.0
"""Seconds between samples."""
MAX_EVENTS_PER_SAMPLE = 1024
"""Bound on NVML events drained per sample, so that an event storm cannot stall the thread."""

GB = 1e9
MB = 1e6


class SystemSampler:
    """Samples host and GPU metrics every ``interval`` seconds and puts them into ``sink``.

    Example::

        sampler = SystemSampler(buffer, step=lambda: trainer_step)
        sampler.start()
        ...
        sampler.stop()

    ``step()`` returns the trainer's current step; each sample is put at that step.
    ``gpu_indices`` names the NVML devices to sample (``None``: every device NVML reports).
    """

    def __init__(
        self,
        sink: Sink,
        *,
        step: Callable[[], int],
        interval: float = DEFAULT_INTERVAL,
        gpu_indices: Sequence[int] | None = None,
        faults: Faults = FAULTS,
    ) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be > 0 seconds, not {interval}")
        self.sink = sink
        self.step = step
        self.interval = interval
        self.gpu_indices = gpu_indices
        self.faults = faults
        self._pid = os.getpid()
        self._stop_event = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        # Held for a whole sample and for closing NVML, so that stop() never shuts
        # NVML down under a sample that is still running.
        self._sample_lock = threading.Lock()
        self._host = _Host()
        self._gpus = _Gpus(gpu_indices)

    def start(self) -> None:
        """Start the daemon thread ``runwatch-system``; a no-op if started, stopped or failed."""
        with self._start_lock:
            if self._thread is not None or self._stop_event.is_set() or self.faults.failed(PART):
                return
            thread = threading.Thread(target=self._run, name="runwatch-system", daemon=True)
            try:
                thread.start()
            except RuntimeError:
                # "can't create new thread at interpreter shutdown", or no threads left:
                # the run goes on without system metrics.
                log.debug("runwatch agent: system sampler thread could not start", exc_info=True)
                return
            self._thread = thread

    def stop(self, timeout: float = 1.0) -> None:
        """Ask the thread to end, wait up to ``timeout`` seconds, and shut NVML down; idempotent."""
        self._stop_event.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        if thread is None or not thread.is_alive():
            self._close()
        # Otherwise the thread is inside a slow sample: it closes NVML itself on its way out.

    def sample(self) -> dict[str, float]:
        """Take one sample; rate keys appear from the second call on."""
        with self._sample_lock:
            values = self._read_host()
            values.update(self._gpus.read())
            return values

    def _read_host(self) -> dict[str, float]:
        """Read psutil (a separate method so that a test can make it fail)."""
        return self._host.read()

    def _run(self) -> None:
        try:
            # The first sample at start, so that even a short run gets one.
            if not self._tick():
                return
            while not self._stop_event.wait(self.interval):
                if not self._tick():
                    return
        finally:
            self._close()

    def _tick(self) -> bool:
        """Sample and put; False once the sampler has failed and must stop."""
        with swallow_internal(PART, self.faults):
            self.sink.put_scalars(self.step(), self.sample(), SYSTEM)
        return not self.faults.failed(PART)

    def _close(self) -> None:
        if os.getpid() != self._pid:
            return  # NVML state inherited over fork belongs to the parent.
        with self._sample_lock:
            self._gpus.close()


class _Host:
    """psutil readings, with the previous counters kept for rates."""

    def __init__(self) -> None:
        self._process: psutil.Process | None = None
        self._primed = False
        self._last_time = 0.0
        self._last_disk: tuple[int, int] | None = None
        self._last_net: tuple[int, int] | None = None

    def read(self) -> dict[str, float]:
        import psutil

        if self._process is None:
            self._process = psutil.Process()
        proc = self._process
        now = time.monotonic()
        values: dict[str, float] = {}

        # Both percentages are since the previous call (psutil keeps the system-wide
        # state per calling thread, the process one on the Process object); the
        # first call has nothing to compare with and returns a meaningless 0.0.
        cpu = float(psutil.cpu_percent(interval=None))
        proc_cpu = float(proc.cpu_percent(None))
        if self._primed:
            values["sys/cpu_percent"] = cpu
            values["sys/proc_cpu_percent"] = proc_cpu

        mem = psutil.virtual_memory()
        values["sys/mem_used_percent"] = float(mem.percent)
        values["sys/mem_available_gb"] = mem.available / GB
        values["sys/proc_rss_gb"] = proc.memory_info().rss / GB

        disk = _disk_bytes()
        net = _net_bytes()
        elapsed = now - self._last_time
        if self._primed and elapsed > 0:
            _put_rates(
                values, "sys/disk_read_mb_s", "sys/disk_write_mb_s", self._last_disk, disk, elapsed
            )
            _put_rates(
                values, "sys/net_sent_mb_s", "sys/net_recv_mb_s", self._last_net, net, elapsed
            )
        self._last_disk, self._last_net, self._last_time = disk, net, now
        self._primed = True
        return values


def _disk_bytes() -> tuple[int, int] | None:
    """(read, written) bytes since boot, or None where psutil sees no disks."""
    import psutil

    try:
        counters = psutil.disk_io_counters()
    except (OSError, RuntimeError):  # older psutil raise where newer ones return None
        return None
    return None if counters is None else (counters.read_bytes, counters.write_bytes)


def _net_bytes() -> tuple[int, int] | None:
    """(sent, received) bytes since boot, or None where psutil sees no interfaces."""
    import psutil

    try:
        counters = psutil.net_io_counters()
    except (OSError, RuntimeError):
        return None
    return None if counters is None else (counters.bytes_sent, counters.bytes_recv)


def _put_rates(
    values: dict[str, float],
    key_a: str,
    key_b: str,
    before: tuple[int, int] | None,
    after: tuple[int, int] | None,
    elapsed: float,
) -> None:
    if before is None or after is None:
        return
    for key, b, a in ((key_a, before[0], after[0]), (key_b, before[1], after[1])):
        if a >= b:  # a counter that went back (a device removed) gives no rate this time
            values[key] = (a - b) / MB / elapsed


# One NVML query: (name, function of (pynvml, handle) -> {key suffix: value}).
_Query = tuple[str, Callable[[Any, Any], dict[str, float]]]


def _utilization(nvml: Any, handle: Any) -> dict[str, float]:
    return {"util_percent": float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)}


def _memory(nvml: Any, handle: Any) -> dict[str, float]:
    info = nvml.nvmlDeviceGetMemoryInfo(handle)
    return {"mem_used_gb": info.used / GB, "mem_total_gb": info.total / GB}


def _temperature(nvml: Any, handle: Any) -> dict[str, float]:
    return {"temp_c": float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))}


def _power(nvml: Any, handle: Any) -> dict[str, float]:
    return {"power_w": nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0}  # NVML reports milliwatts


def _ecc_corrected(nvml: Any, handle: Any) -> dict[str, float]:
    count = nvml.nvmlDeviceGetTotalEccErrors(
        handle, nvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, nvml.NVML_VOLATILE_ECC
    )
    return {"ecc_corrected": float(count)}


def _ecc_uncorrected(nvml: Any, handle: Any) -> dict[str, float]:
    count = nvml.nvmlDeviceGetTotalEccErrors(
        handle, nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nvml.NVML_VOLATILE_ECC
    )
    return {"ecc_uncorrected": float(count)}


_QUERIES: tuple[_Query, ...] = (
    ("utilization", _utilization),
    ("memory", _memory),
    ("temperature", _temperature),
    ("power", _power),
    ("ecc_corrected", _ecc_corrected),
    ("ecc_uncorrected", _ecc_uncorrected),
)


class _Gpus:
    """NVML readings for the sampled devices; everything NVML refuses is switched off quietly."""

    def __init__(self, indices: Sequence[int] | None) -> None:
        self._indices = None if indices is None else tuple(indices)
        self._opened = False  # nvmlInit tried (once: a failure is not retried)
        self._nvml: Any = None  # the pynvml module while NVML is initialised
        self._handles: dict[int, Any] = {}
        self._unsupported: set[tuple[int, str]] = set()
        self._reported: set[tuple[int, str]] = set()
        self._event_set: Any = None
        self._xid: dict[int, int] = {}

    def read(self) -> dict[str, float]:
        if not self._opened:
            self._open()
        nvml = self._nvml
        if nvml is None:
            return {}
        values: dict[str, float] = {}
        for index, handle in self._handles.items():
            for name, query in _QUERIES:
                if (index, name) in self._unsupported:
                    continue
                try:
                    got = query(nvml, handle)
                except nvml.NVMLError as exc:
                    self._refused(index, name, exc)
                    continue
                for suffix, value in got.items():
                    values[f"sys/gpu{index}/{suffix}"] = value
        if self._event_set is not None:
            self._drain_events()
            for index, count in self._xid.items():
                values[f"sys/gpu{index}/xid_errors"] = float(count)
        return values

    def _open(self) -> None:
        self._opened = True
        try:
            import pynvml as nvml

            nvml.nvmlInit()
        except (
            Exception
        ) as exc:  # ImportError, NVMLError_LibraryNotFound, NVMLError_DriverNotLoaded
            log.debug("runwatch agent: no NVML (%s), GPU metrics are off", exc)
            return
        self._nvml = nvml
        try:
            indices = self._indices
            if indices is None:
                indices = tuple(range(nvml.nvmlDeviceGetCount()))
        except nvml.NVMLError as exc:
            log.debug("runwatch agent: NVML lists no devices (%s), GPU metrics are off", exc)
            self.close()
            return
        for index in indices:
            try:
                self._handles[index] = nvml.nvmlDeviceGetHandleByIndex(index)
            except nvml.NVMLError as exc:
                log.debug("runwatch agent: no NVML device %d (%s), not sampled", index, exc)
        self._register_xid_events()

    def _register_xid_events(self) -> None:
        nvml = self._nvml
        try:
            event_set = nvml.nvmlEventSetCreate()
        except nvml.NVMLError as exc:
            log.debug("runwatch agent: no NVML event set (%s), Xid errors are not counted", exc)
            return
        for index, handle in self._handles.items():
            try:
                nvml.nvmlDeviceRegisterEvents(handle, nvml.nvmlEventTypeXidCriticalError, event_set)
            except nvml.NVMLError as exc:
                log.debug("runwatch agent: GPU %d gives no Xid events (%s)", index, exc)
            else:
                self._xid[index] = 0
        if self._xid:
            self._event_set = event_set
        else:
            _quietly(nvml.nvmlEventSetFree, event_set)

    def _drain_events(self) -> None:
        nvml = self._nvml
        for _ in range(MAX_EVENTS_PER_SAMPLE):
            try:
                event = nvml.nvmlEventSetWait_v2(self._event_set, 0)
            except nvml.NVMLError_Timeout:
                return  # no event pending: the normal way out
            except nvml.NVMLError as exc:
                log.debug("runwatch agent: NVML event wait failed (%s)", exc)
                return  # try again at the next sample
            if not event.eventType & nvml.nvmlEventTypeXidCriticalError:
                continue
            try:
                index = nvml.nvmlDeviceGetIndex(event.device)
            except nvml.NVMLError:
                continue
            if index in self._xid:
                self._xid[index] += 1

    def _refused(self, index: int, name: str, exc: Exception) -> None:
        if isinstance(exc, self._nvml.NVMLError_NotSupported):
            self._unsupported.add((index, name))
            log.debug("runwatch agent: GPU %d does not support %s, not sampled", index, name)
        elif (index, name) not in self._reported:
            self._reported.add((index, name))
            log.debug(
                "runwatch agent: GPU %d %s failed (%s), skipped this sample", index, name, exc
            )

    def close(self) -> None:
        """Free the event set and shut NVML down; idempotent, never raises."""
        self._opened = True  # a closed sampler does not open NVML again
        nvml, self._nvml = self._nvml, None
        if nvml is None:
            return
        if self._event_set is not None:
            _quietly(nvml.nvmlEventSetFree, self._event_set)
            self._event_set = None
        self._handles.clear()
        _quietly(nvml.nvmlShutdown)


def _quietly(fn: Callable[..., object], *args: object) -> None:
    """Call an NVML clean-up function; a failure there is not worth anyone's attention."""
    try:
        fn(*args)
    except Exception as exc:
        log.debug("runwatch agent: NVML %s failed (%s)", getattr(fn, "__name__", fn), exc)
