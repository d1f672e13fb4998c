"""A fake ``pynvml`` module for tests and dry runs without a GPU.

:func:`make_fake_pynvml` returns a module object with the pynvml names that
:mod:`ttcsim.gpu.nvml` uses.  Its energy counter follows a power function of
``time.monotonic()`` and, like an H100's, is updated only every
``tick_s`` (100 ms)::

    counter_mj(t) = 1000 * integral_0^{tick(t)} P(u) du,   tick(t) = floor(t / tick_s) * tick_s

(a constant ``power_w`` makes the integral ``power_w * tick(t)``).  Any
function can be told to raise ``NVMLError(code)`` through ``fail``.
Install it with ``monkeypatch.setitem(sys.modules, "pynvml", fake)``.
"""

from __future__ import annotations

import math
import time
import types
from collections.abc import Callable

NVML_CODES = {
    "NVML_ERROR_UNINITIALIZED": 1,
    "NVML_ERROR_INVALID_ARGUMENT": 2,
    "NVML_ERROR_NOT_SUPPORTED": 3,
    "NVML_ERROR_NO_PERMISSION": 4,
    "NVML_ERROR_NOT_FOUND": 6,
    "NVML_ERROR_DRIVER_NOT_LOADED": 9,
    "NVML_ERROR_LIBRARY_NOT_FOUND": 12,
    "NVML_ERROR_FUNCTION_NOT_FOUND": 13,
    "NVML_ERROR_GPU_IS_LOST": 15,
    "NVML_ERROR_UNKNOWN": 999,
}


def make_fake_pynvml(
    power_w: float | Callable[[float], float] = 100.0,
    *,
    tick_s: float = 0.1,
    name: str = "NVIDIA H100 80GB HBM3",
    driver_version: str = "550.54.15",
    power_limit_w: float = 700.0,
    n_devices: int = 1,
) -> types.ModuleType:
    """Build a fake pynvml module (see the module docstring).

    ``power_w`` [W]: a constant or a function of monotonic time [s] (then
    integrated numerically at 1 ms).  ``fake.fail[name] = code`` makes the
    function ``name`` raise ``NVMLError(code)``; ``fake.calls`` counts calls.
    """
    m = types.ModuleType("pynvml")
    for k, v in NVML_CODES.items():
        setattr(m, k, v)
    m.NVML_CLOCK_SM = 1
    m.NVML_TEMPERATURE_GPU = 0
    m.fail = {}
    m.calls = {}
    m.init_count = 0
    origin = time.monotonic()

    class NVMLError(Exception):
        def __init__(self, value: int) -> None:
            self.value = value
            super().__init__(f"fake NVML error {value}")

    m.NVMLError = NVMLError

    def energy_at(t: float) -> float:
        """Exact energy [J] since ``origin`` up to monotonic time ``t``."""
        if not callable(power_w):
            return power_w * (t - origin)
        n = max(1, int((t - origin) / 1e-3))
        h = (t - origin) / n
        return sum(power_w(origin + (i + 0.5) * h) for i in range(n)) * h

    m.energy_at = energy_at

    def api(fn: Callable) -> Callable:
        def wrapped(*args: object) -> object:
            m.calls[fn.__name__] = m.calls.get(fn.__name__, 0) + 1
            if fn.__name__ in m.fail:
                raise NVMLError(m.fail[fn.__name__])
            return fn(*args)

        wrapped.__name__ = fn.__name__
        setattr(m, fn.__name__, wrapped)
        return wrapped

    @api
    def nvmlInit() -> None:  # noqa: N802 - pynvml's names
        m.init_count += 1

    @api
    def nvmlShutdown() -> None:  # noqa: N802
        m.init_count -= 1

    @api
    def nvmlSystemGetDriverVersion() -> str:  # noqa: N802
        return driver_version

    @api
    def nvmlDeviceGetCount() -> int:  # noqa: N802
        return n_devices

    @api
    def nvmlDeviceGetHandleByIndex(index: int) -> int:  # noqa: N802
        if not 0 <= index < n_devices:
            raise NVMLError(NVML_CODES["NVML_ERROR_INVALID_ARGUMENT"])
        return index

    @api
    def nvmlDeviceGetName(handle: int) -> bytes:  # noqa: N802 - old pynvml returns bytes
        return name.encode()

    @api
    def nvmlDeviceGetEnforcedPowerLimit(handle: int) -> int:  # noqa: N802
        return int(power_limit_w * 1000)

    @api
    def nvmlDeviceGetTotalEnergyConsumption(handle: int) -> int:  # noqa: N802
        now = time.monotonic()
        tick = origin + math.floor((now - origin) / tick_s) * tick_s
        return int(energy_at(tick) * 1000)

    @api
    def nvmlDeviceGetPowerUsage(handle: int) -> int:  # noqa: N802
        p = power_w(time.monotonic()) if callable(power_w) else power_w
        return int(p * 1000)

    @api
    def nvmlDeviceGetClockInfo(handle: int, clock: int) -> int:  # noqa: N802
        return 1980

    @api
    def nvmlDeviceGetTemperature(handle: int, sensor: int) -> int:  # noqa: N802
        return 45

    return m
