"""NVML layer with a fake pynvml; energy_between on synthetic ticked counters."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest

from ttcsim.errors import GpuUnavailableError, TtcsimError
from ttcsim.gpu import nvml
from ttcsim.gpu.fakes import NVML_CODES, make_fake_pynvml
from ttcsim.gpu.nvml import (
    NvmlDevice,
    NvmlError,
    NvmlGpuLostError,
    NvmlNoPermissionError,
    NvmlNotSupportedError,
    NvmlUninitializedError,
    TraceSampler,
    counter_ticks,
    energy_between,
    read_trace_csv,
)


@pytest.fixture
def fake(monkeypatch):
    m = make_fake_pynvml(power_w=250.0)
    monkeypatch.setitem(sys.modules, "pynvml", m)
    return m


# ---------------------------------------------------------------- device


def test_device_reads_and_units(fake):
    with NvmlDevice(0) as d:
        assert d.name == "NVIDIA H100 80GB HBM3"  # bytes decoded
        assert d.driver_version == "550.54.15"
        assert d.power_limit_w == 700.0  # mW -> W
        assert d.power_w() == 250.0
        assert d.sm_clock_mhz() == 1980.0
        assert d.temperature_c() == 45.0
        e0 = d.energy_j()
        time.sleep(0.25)
        e1 = d.energy_j()
        assert 250 * 0.1 <= e1 - e0 <= 250 * 0.35  # J, ticked at 100 ms
        assert fake.init_count == 1
    assert fake.init_count == 0  # shutdown on close


@pytest.mark.parametrize(
    ("code", "exc"),
    [
        ("NVML_ERROR_NOT_SUPPORTED", NvmlNotSupportedError),
        ("NVML_ERROR_GPU_IS_LOST", NvmlGpuLostError),
        ("NVML_ERROR_NO_PERMISSION", NvmlNoPermissionError),
        ("NVML_ERROR_UNINITIALIZED", NvmlUninitializedError),
        ("NVML_ERROR_UNKNOWN", NvmlError),
    ],
)
def test_errors_are_translated(fake, code, exc):
    d = NvmlDevice(0)
    fake.fail["nvmlDeviceGetTotalEnergyConsumption"] = NVML_CODES[code]
    with pytest.raises(exc) as info:
        d.energy_j()
    assert isinstance(info.value, TtcsimError)
    assert "energy counter" in str(info.value)
    d.close()


def test_missing_driver_is_gpu_unavailable(fake):
    fake.fail["nvmlInit"] = NVML_CODES["NVML_ERROR_DRIVER_NOT_LOADED"]
    with pytest.raises(GpuUnavailableError, match="^no NVIDIA GPU"):
        NvmlDevice(0)
    ok, why = nvml.nvml_status()
    assert not ok and "init" in why


def test_missing_pynvml_is_gpu_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    with pytest.raises(GpuUnavailableError, match="nvidia-ml-py"):
        NvmlDevice(0)


def test_bad_index_closes_nvml(fake):
    with pytest.raises(NvmlError, match="open device 3"):
        NvmlDevice(3)
    assert fake.init_count == 0


def test_nvml_status_ok(fake):
    ok, why = nvml.nvml_status()
    assert ok and "550.54.15" in why
    assert fake.init_count == 0


def test_gpu_status_and_require_gpu(fake):
    torch = pytest.importorskip("torch")
    from ttcsim.gpu import gpu_status, require_gpu

    ok, why = gpu_status()
    if torch.cuda.is_available():  # pragma: no cover - GPU machines
        assert ok
    else:
        assert not ok and "CUDA" in why
        with pytest.raises(GpuUnavailableError, match="^no NVIDIA GPU: "):
            require_gpu()


def test_no_torch_or_pynvml_at_import():
    code = (
        "import sys, ttcsim.gpu, ttcsim.gpu.nvml, ttcsim.gpu.decoder, ttcsim.gpu.measure, "
        "ttcsim.gpu.microbench, ttcsim.gpu.fakes\n"
        "bad = [m for m in ('torch', 'pynvml', 'triton') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- sampler


def test_sampler_streams_csv_and_measures(fake, tmp_path):
    path = tmp_path / "trace.csv"
    with NvmlDevice(0) as d:
        s = TraceSampler(d, period_s=0.01, csv_path=path).start()
        time.sleep(0.15)
        t0 = time.monotonic()
        time.sleep(0.6)
        t1 = time.monotonic()
        on_disk = path.read_text().splitlines()  # flushed while running
        time.sleep(0.2)
        rows = s.stop()
    assert on_disk[0] == "t_s,energy_j,power_w,sm_clock_mhz,temperature_c"
    assert len(on_disk) > 10
    assert len(rows) > 50
    cols = read_trace_csv(path)
    assert len(cols["t_s"]) == len(rows)
    assert np.all(np.diff(cols["t_s"]) > 0)
    e = energy_between(cols["t_s"], cols["energy_j"], t0, t1)
    assert e == pytest.approx(250 * (t1 - t0), rel=0.06)
    out = s.to_csv(tmp_path / "copy.csv")
    assert out.read_text() == path.read_text()


def test_sampler_error_reraised_on_stop(fake):
    d = NvmlDevice(0)
    s = TraceSampler(d, period_s=0.01).start()
    fake.fail["nvmlDeviceGetTotalEnergyConsumption"] = NVML_CODES["NVML_ERROR_GPU_IS_LOST"]
    time.sleep(0.1)
    with pytest.raises(NvmlGpuLostError):
        s.stop()
    d.close()


def test_sampler_optional_columns_nan(fake):
    fake.fail["nvmlDeviceGetTemperature"] = NVML_CODES["NVML_ERROR_NOT_SUPPORTED"]
    with NvmlDevice(0) as d:
        row = TraceSampler(d).sample()
    assert np.isnan(row[4]) and row[3] == 1980.0


# ---------------------------------------------------------------- energy_between


def _synthetic(power, t_end=6.0, tick_s=0.1, period_s=0.02, jitter_s=0.004, seed=0, reset_at=None):
    """Sampled, ticked, mJ-rounded counter of a power function; return (t, e, exact_cum)."""
    rng = np.random.default_rng(seed)
    fine = np.linspace(0, t_end, 600_001)
    cum = np.concatenate([[0], np.cumsum((power(fine[1:]) + power(fine[:-1])) / 2 * np.diff(fine))])

    def exact(t):
        return np.interp(t, fine, cum)

    phase = rng.uniform(0, tick_s)
    t = np.arange(0.01, t_end - 0.01, period_s)
    t = t + rng.uniform(-jitter_s, jitter_s, t.size)
    last_tick = np.floor((t - phase) / tick_s) * tick_s + phase
    e = np.floor(exact(last_tick) * 1000) / 1000 + 5000.0  # counter since driver load, in mJ steps
    if reset_at is not None:
        after = last_tick >= reset_at
        e[after] = np.floor((exact(last_tick[after]) - exact(reset_at)) * 1000) / 1000
    return t, e, exact


def _power_smooth(t):
    return 300 + 120 * np.sin(2 * np.pi * t / 1.3) + 40 * np.sin(2 * np.pi * t / 0.37)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize(("t0", "t1"), [(1.03, 3.51), (0.5, 5.5), (2.0, 3.6)])
def test_energy_between_matches_integral(seed, t0, t1):
    t, e, exact = _synthetic(_power_smooth, seed=seed)
    want = exact(t1) - exact(t0)
    got = energy_between(t, e, t0, t1)
    # edge error <= one sampling period of power at each end (<= 2 x 460 W x 20 ms)
    assert abs(got - want) <= 2 * 460 * 0.02
    assert got == pytest.approx(want, rel=0.02)


def test_energy_between_step_load():
    def step(t):
        return np.where((t > 1.5) & (t < 4.0), 650.0, 80.0)

    t, e, exact = _synthetic(step, seed=3)
    want = exact(4.2) - exact(1.3)
    assert energy_between(t, e, 1.3, 4.2) == pytest.approx(want, rel=0.02)


def test_energy_between_shuffled_and_duplicated_rows():
    t, e, exact = _synthetic(_power_smooth, seed=7)
    rng = np.random.default_rng(1)
    dup = rng.choice(len(t), 100)
    t2 = np.concatenate([t, t[dup], [np.nan]])
    e2 = np.concatenate([e, e[dup], [1.0]])
    order = rng.permutation(len(t2))
    base = energy_between(t, e, 1.0, 4.0)
    assert energy_between(t2[order], e2[order], 1.0, 4.0) == pytest.approx(base, abs=1e-9)


def test_energy_between_counter_reset():
    def const(t):
        return np.full_like(t, 400.0)

    t, e, exact = _synthetic(const, seed=2, reset_at=2.5)
    assert np.any(np.diff(e) < 0)
    want = exact(4.0) - exact(1.0)
    assert energy_between(t, e, 1.0, 4.0) == pytest.approx(want, rel=0.01)
    t, e, exact = _synthetic(_power_smooth, seed=4, reset_at=2.5)
    assert energy_between(t, e, 1.0, 4.0) == pytest.approx(exact(4.0) - exact(1.0), rel=0.03)


def test_counter_ticks_first_sample_is_not_a_tick():
    t = [0.0, 0.02, 0.04, 0.06, 0.08, 0.10, 0.12]
    e = [10.0, 10.0, 11.0, 11.0, 11.0, 12.0, 12.0]
    tick_t, tick_e = counter_ticks(t, e)
    assert tick_t.tolist() == [0.04, 0.10]
    assert tick_e.tolist() == [11.0, 12.0]
    assert energy_between(t, e, 0.05, 0.08) == pytest.approx(0.5)


def test_energy_between_needs_bracketing_ticks():
    t, e, _ = _synthetic(_power_smooth, t_end=2.0)
    with pytest.raises(TtcsimError, match="do not bracket"):
        energy_between(t, e, 0.0, 1.0)
    with pytest.raises(TtcsimError, match="do not bracket"):
        energy_between(t, e, 1.0, 2.5)
    with pytest.raises(TtcsimError, match="before its start"):
        energy_between(t, e, 1.5, 1.0)
    with pytest.raises(TtcsimError):
        energy_between([], [], 0.0, 1.0)


# ---------------------------------------------------------------- a real H100 trace
# tests/data/gpu/h100_microbench_*: run_microbenchmarks() on one H100 SXM 80GB
# (driver 580.159.04, torch 2.11.0+cu130), 2026-11-26, sampler period 20 ms.


def _real():
    import json
    from pathlib import Path

    base = Path(__file__).parent / "data" / "gpu"
    trace = read_trace_csv(base / "h100_microbench_trace.csv")
    phases = [
        json.loads(x) for x in (base / "h100_microbench_phases.jsonl").read_text().splitlines()
    ]
    return trace, {p["phase"]: p for p in phases}


def test_real_trace_replays_recorded_energies():
    trace, phases = _real()
    tick_t, _ = counter_ticks(trace["t_s"], trace["energy_j"])
    assert np.median(np.diff(tick_t)) == pytest.approx(0.1, abs=0.01)  # H100 counter: ~100 ms
    for p in phases.values():
        e = energy_between(trace["t_s"], trace["energy_j"], p["t_start_s"], p["t_end_s"])
        assert e / p["iterations"] == pytest.approx(p["energy_j"], rel=1e-9)


def test_real_trace_is_physically_sensible():
    _, ph = _real()
    assert 50 < ph["idle"]["avg_power_w"] < 150
    for m in (2048, 8192, 16384):  # large GEMMs run at the 700 W limit
        assert ph[f"gemm_m{m}"]["avg_power_w"] == pytest.approx(700, rel=0.06)
    ws = ph["weight_stream_m1"]
    assert 2.2e12 < ws["hbm_bytes"] / ws["time_s"] < 3.35e12  # below the 3.35 TB/s datasheet peak
    gemm = ph["gemm_m16384"]
    assert 5e14 < gemm["flops"] / gemm["time_s"] < 9.9e14  # below the 989 TFLOP/s bf16 peak
