"""NVML access: the only module of ttcsim that imports ``pynvml``.

Read-only: nothing here sets clocks, power limits or persistence mode.

Measurement physics (see ANCHORS.md, "Measuring GPU energy correctly"):

* ``nvmlDeviceGetTotalEnergyConsumption`` is a cumulative counter in mJ since
  the driver loaded.  On H100/H200 it is updated only about every 100 ms, so
  the energy of a window is read from *tick instants* (the first sample that
  shows a new counter value) and interpolated between them
  (:func:`energy_between`), and a window should last >= 1 s.  The sampler
  polls at 20 ms, five times per counter update, so a tick instant is known to
  within one sampling period.
* ``nvmlDeviceGetPowerUsage`` is, on Ampere and newer (except A100), a
  1-second moving average, not an instantaneous reading: it lags every change
  of load and is recorded only as a diagnostic, never integrated for energy.

pynvml errors become :class:`NvmlError` subclasses of
:class:`~ttcsim.errors.TtcsimError`; a missing library or driver becomes
:class:`~ttcsim.errors.GpuUnavailableError`.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from ttcsim.errors import GpuUnavailableError, TtcsimError

MJ_PER_J = 1e3  # NVML energy counter unit: millijoule
MW_PER_W = 1e3  # NVML power unit: milliwatt
TRACE_COLUMNS = ("t_s", "energy_j", "power_w", "sm_clock_mhz", "temperature_c")

T = TypeVar("T")


class NvmlError(TtcsimError):
    """An NVML call failed."""


class NvmlNotSupportedError(NvmlError):
    """The GPU or driver does not support this NVML query."""


class NvmlGpuLostError(NvmlError):
    """The GPU fell off the bus or stopped responding."""


class NvmlNoPermissionError(NvmlError):
    """The current user may not make this NVML query."""


class NvmlUninitializedError(NvmlError):
    """NVML was used before ``nvmlInit`` (or after ``nvmlShutdown``)."""


def _pynvml() -> Any:
    try:
        import pynvml
    except ModuleNotFoundError as exc:
        if exc.name not in (None, "pynvml"):
            raise
        raise GpuUnavailableError(
            "the [gpu] extra is not installed (missing: nvidia-ml-py, which provides pynvml); "
            "pip install 'ttcsim[gpu]'"
        ) from None
    except Exception as exc:  # noqa: BLE001
        raise GpuUnavailableError(
            f"no NVIDIA GPU: pynvml does not import ({exc}); pip install 'ttcsim[gpu]'"
        ) from None
    return pynvml


def _translate(exc: Exception, what: str) -> TtcsimError:
    """Map a ``pynvml.NVMLError`` to the matching ttcsim exception."""
    nv = _pynvml()
    code = getattr(exc, "value", None)

    def c(name: str, default: int) -> int:
        return int(getattr(nv, name, default))

    text = f"NVML {what} failed: {exc}"
    if code == c("NVML_ERROR_NOT_SUPPORTED", 3):
        return NvmlNotSupportedError(f"{text} (not supported on this GPU/driver)")
    if code == c("NVML_ERROR_GPU_IS_LOST", 15):
        return NvmlGpuLostError(f"{text} (GPU is lost: check dmesg / nvidia-smi)")
    if code == c("NVML_ERROR_NO_PERMISSION", 4):
        return NvmlNoPermissionError(f"{text} (no permission)")
    if code == c("NVML_ERROR_UNINITIALIZED", 1):
        return NvmlUninitializedError(f"{text} (NVML not initialised)")
    if code in (
        c("NVML_ERROR_LIBRARY_NOT_FOUND", 12),
        c("NVML_ERROR_DRIVER_NOT_LOADED", 9),
        c("NVML_ERROR_FUNCTION_NOT_FOUND", 13),
    ):
        return GpuUnavailableError(f"no NVIDIA GPU: {text}")
    return NvmlError(text)


def _call(what: str, fn: Callable[..., T], *args: Any) -> T:
    """Call a pynvml function, translating ``NVMLError`` into ttcsim errors."""
    nv = _pynvml()
    try:
        return fn(*args)
    except nv.NVMLError as exc:
        raise _translate(exc, what) from None


def nvml_status() -> tuple[bool, str]:
    """Whether pynvml imports and ``nvmlInit`` works; ``(ok, description or reason)``."""
    try:
        nv = _pynvml()
        _call("init", nv.nvmlInit)
        try:
            driver = _str(_call("driver version", nv.nvmlSystemGetDriverVersion))
            count = int(_call("device count", nv.nvmlDeviceGetCount))
        finally:
            with contextlib.suppress(Exception):
                nv.nvmlShutdown()
    except TtcsimError as exc:
        return False, str(exc).removeprefix("no NVIDIA GPU: ")
    if count < 1:
        return False, "NVML sees no device"
    return True, f"driver {driver}, {count} device(s)"


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class NvmlDevice:
    """Read-only view of one GPU through NVML.

    Parameters
    ----------
    index : int
        NVML device index (the ``nvidia-smi`` order; with ``CUDA_VISIBLE_DEVICES``
        unset this is also the CUDA index).

    ``nvmlInit`` is reference counted by NVML, so each device calls it once and
    :meth:`close` calls ``nvmlShutdown``.  Use as a context manager.
    """

    def __init__(self, index: int = 0) -> None:
        nv = _pynvml()
        self._nv = nv
        _call("init", nv.nvmlInit)
        self._open = True
        self.index = index
        try:
            self._handle = _call(f"open device {index}", nv.nvmlDeviceGetHandleByIndex, index)
            self.name: str = _str(_call("device name", nv.nvmlDeviceGetName, self._handle))
            self.driver_version: str = _str(_call("driver version", nv.nvmlSystemGetDriverVersion))
            limit_mw = _call("power limit", nv.nvmlDeviceGetEnforcedPowerLimit, self._handle)
            self.power_limit_w: float = float(limit_mw) / MW_PER_W
        except BaseException:
            self.close()
            raise

    def energy_j(self) -> float:
        """Cumulative energy since driver load [J] (NVML counter in mJ; ticks every ~100 ms)."""
        mj = _call("energy counter", self._nv.nvmlDeviceGetTotalEnergyConsumption, self._handle)
        return float(mj) / MJ_PER_J

    def power_w(self) -> float:
        """Board power [W]; on H100/H200 a ~1 s moving average (NVML reports mW)."""
        mw = _call("power usage", self._nv.nvmlDeviceGetPowerUsage, self._handle)
        return float(mw) / MW_PER_W

    def sm_clock_mhz(self) -> float:
        """Current SM clock [MHz]."""
        nv = self._nv
        return float(_call("SM clock", nv.nvmlDeviceGetClockInfo, self._handle, nv.NVML_CLOCK_SM))

    def temperature_c(self) -> float:
        """GPU die temperature [degC]."""
        nv = self._nv
        return float(
            _call("temperature", nv.nvmlDeviceGetTemperature, self._handle, nv.NVML_TEMPERATURE_GPU)
        )

    def close(self) -> None:
        """Release this device's ``nvmlInit`` reference (idempotent)."""
        if getattr(self, "_open", False):
            self._open = False
            with contextlib.suppress(Exception):
                self._nv.nvmlShutdown()

    def __enter__(self) -> NvmlDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"NvmlDevice({self.index}, {self.name!r}, limit {self.power_limit_w:.0f} W)"


def _optional(read: Callable[[], float]) -> float:
    """A diagnostic reading, NaN where the GPU does not support it."""
    try:
        return read()
    except NvmlNotSupportedError:
        return math.nan


class TraceSampler:
    """Background thread that polls one device every ``period_s`` seconds.

    Each row is ``(t_s, energy_j, power_w, sm_clock_mhz, temperature_c)`` with
    ``t_s`` from :func:`time.monotonic` [s] taken right after the energy read.
    With ``csv_path`` set, the header is written at :meth:`start` and rows are
    appended and flushed about every 0.25 s, so an interrupted run still
    leaves its trace on disk.  An NVML error in the thread stops sampling and is
    re-raised by :meth:`stop`.

    Parameters
    ----------
    device : NvmlDevice
        The device to poll (anything with the same five read methods works).
    period_s : float
        Polling period [s]; 0.02 s samples the ~100 ms energy counter 5x per tick.
    csv_path : str or Path, optional
        Where to stream the trace as it is recorded.
    """

    def __init__(
        self, device: Any, period_s: float = 0.02, csv_path: str | Path | None = None
    ) -> None:
        if not period_s > 0:
            raise TtcsimError(f"period_s must be > 0, got {period_s}")
        self.device = device
        self.period_s = float(period_s)
        self.csv_path = Path(csv_path) if csv_path is not None else None
        self.rows: list[tuple[float, float, float, float, float]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._flushed = 0

    def sample(self) -> tuple[float, float, float, float, float]:
        """Read one row now, append it and return it."""
        d = self.device
        e = d.energy_j()
        t = time.monotonic()
        row = (t, e, _optional(d.power_w), _optional(d.sm_clock_mhz), _optional(d.temperature_c))
        with self._lock:
            self.rows.append(row)
        return row

    def start(self) -> TraceSampler:
        """Take a first sample (errors surface here, in the caller) and start the thread."""
        if self._thread is not None:
            raise TtcsimError("TraceSampler already started")
        if self.csv_path is not None:
            self.csv_path.parent.mkdir(parents=True, exist_ok=True)
            self.csv_path.write_text(",".join(TRACE_COLUMNS) + "\n", encoding="utf-8")
        self.sample()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="ttcsim-trace", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        next_t = time.monotonic() + self.period_s
        last_flush = time.monotonic()
        try:
            while not self._stop.wait(max(0.0, next_t - time.monotonic())):
                self.sample()
                next_t += self.period_s
                now = time.monotonic()
                if next_t < now:  # fell behind (GIL, slow NVML): skip, do not burst
                    next_t = now + self.period_s
                if now - last_flush >= 0.25:
                    self._flush()
                    last_flush = now
        except BaseException as exc:  # noqa: BLE001 - re-raised by stop()
            self._error = exc
        finally:
            self._flush()

    def _flush(self) -> None:
        if self.csv_path is None:
            return
        with self._lock:
            new = self.rows[self._flushed :]
            self._flushed = len(self.rows)
        if new:
            with self.csv_path.open("a", encoding="utf-8") as f:
                f.writelines(_csv_line(r) for r in new)
                f.flush()

    def stop(self) -> list[tuple[float, float, float, float, float]]:
        """Stop the thread, take a last sample, flush, and return all rows."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5.0)
            self._thread = None
            if self._error is None:
                self.sample()
            self._flush()
        if self._error is not None:
            err, self._error = self._error, None
            raise err
        return list(self.rows)

    def __enter__(self) -> TraceSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def columns(self) -> dict[str, np.ndarray]:
        """The rows so far as one float array per column of :data:`TRACE_COLUMNS`."""
        with self._lock:
            arr = np.array(self.rows, dtype=float).reshape(-1, len(TRACE_COLUMNS))
        return {name: arr[:, i] for i, name in enumerate(TRACE_COLUMNS)}

    def energy_between(self, t0_s: float, t1_s: float) -> float:
        """Energy [J] over ``[t0_s, t1_s]`` (monotonic clock) from the rows so far."""
        cols = self.columns()
        return energy_between(cols["t_s"], cols["energy_j"], t0_s, t1_s)

    def to_csv(self, path: str | Path) -> Path:
        """Write all rows so far to ``path`` with header ``t_s,energy_j,...``; return the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            rows = list(self.rows)
        with path.open("w", encoding="utf-8") as f:
            f.write(",".join(TRACE_COLUMNS) + "\n")
            f.writelines(_csv_line(r) for r in rows)
        return path


def _csv_line(row: Sequence[float]) -> str:
    return ",".join(repr(float(v)) for v in row) + "\n"


def read_trace_csv(path: str | Path) -> dict[str, np.ndarray]:
    """Read a trace written by :class:`TraceSampler` into one array per column."""
    arr = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)
    return {name: arr[:, i] for i, name in enumerate(TRACE_COLUMNS)}


def counter_ticks(t_s: Sequence[float], energy_j: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Tick instants and a continuous cumulative energy from raw counter samples.

    Steps:

    1. drop non-finite rows, sort by time, keep the first row of each
       duplicated time stamp;
    2. a *tick* is a sample whose value differs from the previous sample's
       (the counter changed since then); its time is the tick instant [s], known
       to within one sampling period.  The first sample is never a tick (when
       its value was set is unknown);
    3. a decrease of the counter is a reset (driver reload): later values are
       shifted up so the series stays continuous, and the gap between the last
       tick before and the first tick after the reset is bridged at the mean
       power of the tick interval on either side.

    Returns ``(tick_t_s, cumulative_energy_j)``, both increasing.
    """
    t = np.asarray(t_s, dtype=float)
    e = np.asarray(energy_j, dtype=float)
    if t.shape != e.shape or t.ndim != 1:
        raise TtcsimError(f"t_s and energy_j must be 1-D of one length, got {t.shape}, {e.shape}")
    ok = np.isfinite(t) & np.isfinite(e)
    t, e = t[ok], e[ok]
    order = np.lexsort((e, t))
    t, e = t[order], e[order]
    if t.size:
        keep = np.r_[True, np.diff(t) > 0]
        t, e = t[keep], e[keep]
    if t.size < 2:
        return np.empty(0), np.empty(0)
    change = np.r_[False, e[1:] != e[:-1]]
    tick_t, tick_e = t[change], e[change].copy()
    resets = np.flatnonzero(np.diff(tick_e) < 0) + 1
    for k in resets:  # bridge each reset at the neighbouring mean power
        powers = []
        if k >= 2:
            powers.append((tick_e[k - 1] - tick_e[k - 2]) / (tick_t[k - 1] - tick_t[k - 2]))
        if k + 1 < tick_e.size and tick_e[k + 1] >= tick_e[k]:
            powers.append((tick_e[k + 1] - tick_e[k]) / (tick_t[k + 1] - tick_t[k]))
        p_w = float(np.mean(powers)) if powers else 0.0
        target = tick_e[k - 1] + p_w * (tick_t[k] - tick_t[k - 1])
        tick_e[k:] += target - tick_e[k]
    return tick_t, tick_e


def energy_between(
    t_s: Sequence[float], energy_j: Sequence[float], t0_s: float, t1_s: float
) -> float:
    """Energy [J] spent over ``[t0_s, t1_s]`` from cumulative-counter samples.

    ``E = C(t1) - C(t0)`` where ``C`` is the cumulative energy [J] linearly
    interpolated between tick instants (:func:`counter_ticks`), i.e. power is
    taken as constant within each ~100 ms counter interval.

    Assumptions: the samples bracket the window with a tick at or before
    ``t0_s`` and one at or after ``t1_s`` (poll from >= 0.2 s before to >= 0.2 s
    after); the error is at most the energy of one tick interval at each edge
    when power changes inside it, and the tick-instant lag (<= one sampling
    period) cancels between the two edges at equal edge power.

    Parameters
    ----------
    t_s : sequence of float
        Sample times [s] (any order; duplicates allowed).
    energy_j : sequence of float
        Counter values [J] at those times.
    t0_s, t1_s : float
        Window [s], same clock as ``t_s``.
    """
    if not t1_s >= t0_s:
        raise TtcsimError(f"window end {t1_s} is before its start {t0_s}")
    tick_t, tick_e = counter_ticks(t_s, energy_j)
    if tick_t.size < 2 or t0_s < tick_t[0] or t1_s > tick_t[-1]:
        span = f"[{tick_t[0]:.3f}, {tick_t[-1]:.3f}] s" if tick_t.size else "none"
        raise TtcsimError(
            f"energy counter ticks ({tick_t.size}, span {span}) do not bracket the window "
            f"[{t0_s:.3f}, {t1_s:.3f}] s: sample longer before and after it"
        )
    c0, c1 = np.interp([t0_s, t1_s], tick_t, tick_e)
    return float(c1 - c0)
