"""Faults: NVML errors, a busy GPU, interrupted calibrations, atomic writes and --force.

Nothing here needs a GPU: pynvml is replaced by :func:`ttcsim.gpu.fakes.make_fake_pynvml`
(as in ``test_gpu_nvml.py``) and the real recorded calibration folders
``validation/h100-a`` and ``validation/h100-b`` (H100 SXM 80GB, 2026-11-26) stand in
for a calibration run.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ttcsim.calibration.checks import (
    IDLE_MAX_VARIATION,
    busy_gpu_warnings,
    check_window,
    idle_power_variation,
    idle_threshold_w,
    read_trace_columns,
    with_notes,
)
from ttcsim.calibration.session import read_windows, refit_from_trace_dir
from ttcsim.cli import main
from ttcsim.errors import GpuUnavailableError, TtcsimError
from ttcsim.gpu.fakes import NVML_CODES, make_fake_pynvml
from ttcsim.gpu.nvml import (
    NvmlDevice,
    NvmlError,
    NvmlGpuLostError,
    NvmlNoPermissionError,
    NvmlNotSupportedError,
    TraceSampler,
    nvml_status,
)
from ttcsim.hardware import get_profile, load_profile_file
from ttcsim.io import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
H100_A = ROOT / "validation" / "h100-a"
H100_B = ROOT / "validation" / "h100-b"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(r, *needles: str) -> str:
    """Exit code 2, one ``error:`` line containing every needle, no traceback."""
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert r.exit_code == 2, r.output
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture
def fake(monkeypatch):
    m = make_fake_pynvml(power_w=250.0)
    monkeypatch.setitem(sys.modules, "pynvml", m)
    return m


@pytest.fixture
def gpu_ok(monkeypatch, fake):
    """A machine that passes the availability check (torch + CUDA + NVML) with a fake NVML."""
    import ttcsim.gpu

    monkeypatch.setattr(ttcsim.gpu, "gpu_status", lambda: (True, "fake GPU"))
    return fake


# ------------------------------------------------------------------ NVML errors

FAULTS = [
    ("NVML_ERROR_NOT_SUPPORTED", NvmlNotSupportedError, "not supported on this GPU/driver"),
    ("NVML_ERROR_GPU_IS_LOST", NvmlGpuLostError, "GPU is lost"),
    ("NVML_ERROR_NO_PERMISSION", NvmlNoPermissionError, "no permission"),
]
CALLS = ["nvmlDeviceGetHandleByIndex", "nvmlDeviceGetName", "nvmlDeviceGetEnforcedPowerLimit"]


@pytest.mark.parametrize(("code", "exc", "text"), FAULTS)
@pytest.mark.parametrize("call", CALLS)
def test_nvml_faults_opening_a_device_are_clear_and_release_nvml(fake, code, exc, text, call):
    fake.fail[call] = NVML_CODES[code]
    with pytest.raises(exc) as info:
        NvmlDevice(0)
    assert isinstance(info.value, TtcsimError) and text in str(info.value)
    assert "\n" not in str(info.value)
    assert fake.init_count == 0  # nvmlShutdown after the failed open


@pytest.mark.parametrize(("code", "exc", "text"), FAULTS)
def test_nvml_faults_in_calibrate_run_are_one_line_and_write_nothing(gpu_ok, tmp_path, code,
                                                                      exc, text):  # fmt: skip
    gpu_ok.fail["nvmlDeviceGetName"] = NVML_CODES[code]
    out = tmp_path / "p.yaml"
    r = invoke("calibrate", "run", "--out", out)
    one_line_error(r, "NVML device name failed", text)
    assert not out.exists() and not (tmp_path / "p-trace").exists()


def test_gpu_lost_while_sampling_keeps_the_trace_so_far(fake, tmp_path):
    import time

    path = tmp_path / "trace.csv"
    with NvmlDevice(0) as dev:
        sampler = TraceSampler(dev, period_s=0.01, csv_path=path).start()
        time.sleep(0.4)
        fake.fail["nvmlDeviceGetTotalEnergyConsumption"] = NVML_CODES["NVML_ERROR_GPU_IS_LOST"]
        time.sleep(0.1)
        with pytest.raises(NvmlGpuLostError, match="GPU is lost"):
            sampler.stop()
    cols = read_trace_columns(tmp_path)
    assert cols is not None and cols["t_s"].size > 10  # what was recorded is on disk
    assert np.all(np.diff(cols["energy_j"]) >= 0)


def test_missing_library_or_driver_is_a_clear_message(monkeypatch, fake):
    fake.fail["nvmlInit"] = NVML_CODES["NVML_ERROR_DRIVER_NOT_LOADED"]
    ok, why = nvml_status()
    assert not ok and "init" in why
    monkeypatch.setitem(sys.modules, "pynvml", None)
    with pytest.raises(GpuUnavailableError, match=r"missing: nvidia-ml-py.*ttcsim\[gpu\]"):
        NvmlDevice(0)


def test_unknown_nvml_error_is_still_a_ttcsim_error(fake):
    fake.fail["nvmlDeviceGetPowerUsage"] = NVML_CODES["NVML_ERROR_UNKNOWN"]
    with NvmlDevice(0) as dev, pytest.raises(NvmlError, match="power usage"):
        dev.power_w()


def test_no_gpu_commands_fail_in_one_line(tmp_path):
    with mock.patch("ttcsim.gpu.gpu_status", lambda: (False, "torch sees no CUDA device")):
        one_line_error(invoke("calibrate", "run", "--out", tmp_path / "p.yaml"), "no NVIDIA GPU")
        one_line_error(invoke("measure", "--model", "1b", "--out", tmp_path / "m.jsonl"),
                       "no NVIDIA GPU")  # fmt: skip
    assert not (tmp_path / "m.jsonl").exists()


# ------------------------------------------------------------------ busy GPU


@pytest.mark.parametrize("folder", [H100_A, H100_B])
def test_quiet_recorded_calibrations_raise_no_busy_warning(folder):
    windows = read_windows(folder)
    trace = read_trace_columns(folder)
    assert trace is not None
    assert busy_gpu_warnings(windows, get_profile("h100"), trace) == []
    for w in windows:
        if w["kind"] == "idle":
            cv = idle_power_variation(trace["t_s"], trace["energy_j"], w["t_start_s"], w["t_end_s"])
            assert cv is not None and cv < 0.03  # measured: 0.04 % and 1.0-1.4 %


def test_idle_far_above_the_profile_is_a_warning():
    windows = read_windows(H100_A)
    busy = [dict(w, energy_j=w["energy_j"] * 3.0) if w["phase"] == "idle_after" else w
            for w in windows]  # fmt: skip
    base = get_profile("h100")
    warnings = busy_gpu_warnings(busy, base)
    assert len(warnings) == 1
    assert "idle_after" in warnings[0] and "busy GPU?" in warnings[0]
    assert f"{idle_threshold_w(base):.0f} W" in warnings[0]
    assert idle_threshold_w(base) == pytest.approx(base.parameters.idle_power_w * 1.5)


def _trace_with_bursts(windows, burst_w: float, period_s: float = 0.6, duty: float = 0.5):
    """The real H100 trace, plus another process's bursts inside every idle window."""
    trace = read_trace_columns(H100_A)
    t, e = trace["t_s"].copy(), trace["energy_j"].copy()
    extra = np.zeros_like(t)
    for w in windows:
        if w["kind"] != "idle":
            continue
        inside = np.clip(t - w["t_start_s"], 0.0, w["t_end_s"] - w["t_start_s"])
        cycles, into = np.floor(inside / period_s), inside % period_s
        extra += burst_w * (cycles * period_s * duty + np.minimum(into, period_s * duty))
    return {"t_s": t, "energy_j": e + np.maximum.accumulate(extra)}


def test_unsteady_idle_power_is_a_warning():
    windows = read_windows(H100_A)
    trace = _trace_with_bursts(windows, burst_w=60.0, period_s=2.0)  # mean stays under the limit
    warnings = busy_gpu_warnings(windows, get_profile("h100"), trace)
    assert warnings and all("varied by" in w for w in warnings)
    assert {"'idle'", "'idle_after'"} <= {w.split("window ")[1].split(" ")[0] for w in warnings}


@settings(max_examples=40, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
@given(
    st.floats(20.0, 170.0),  # a steady idle draw [W]
    st.floats(0.0, 0.004),  # sampler jitter [s] (as in test_gpu_nvml._synthetic)
    st.floats(0.0, 0.1),  # phase of the 100 ms counter ticks [s]
    st.one_of(st.just(0.0), st.floats(80.0, 600.0)),  # bursts of another process [W]
)
def test_variation_check_separates_steady_from_bursty_idle(idle_w, jitter_s, phase_s, burst_w):
    rng = np.random.default_rng(int(idle_w * 1000))
    t = np.arange(0.0, 6.0, 0.02) + rng.uniform(-jitter_s, jitter_s, 300)
    t.sort()
    on = (np.floor(t / 0.5) % 2 == 1) & (t > 1.0) & (t < 4.0)  # 0.5 s on / 0.5 s off
    power = idle_w + burst_w * on
    cum = np.concatenate([[0.0], np.cumsum(power[1:] * np.diff(t))])
    ticks = np.floor((t - phase_s) / 0.1) * 0.1 + phase_s  # the counter updates every 100 ms
    counter = np.interp(ticks, t, cum)
    cv = idle_power_variation(t, counter, 1.0, 4.0)
    assert cv is not None
    if burst_w == 0:
        assert cv < IDLE_MAX_VARIATION / 2
    else:
        assert cv > IDLE_MAX_VARIATION


def test_busy_warnings_go_into_the_profile_provenance_and_survive_yaml(tmp_path):
    """The hook the calibration uses: ``with_notes(profile, busy_gpu_warnings(...))``."""
    folder = tmp_path / "busy-trace"
    shutil.copytree(H100_A, folder)
    lines = (folder / "phases.jsonl").read_text().splitlines()
    rows = [json.loads(x) for x in lines]
    for row in rows:
        if row["kind"] == "idle":
            row["energy_j"] *= 4.0  # another job kept the GPU at ~300-500 W
    (folder / "phases.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (folder / "calibration_runs.jsonl").unlink()
    warnings = busy_gpu_warnings(read_windows(folder), get_profile("h100"),
                                 read_trace_columns(folder))  # fmt: skip
    assert len(warnings) == 2
    profile, _ = refit_from_trace_dir(folder, "h100")  # adds the warnings itself
    out = tmp_path / "p.yaml"
    atomic_write_text(out, profile.to_yaml())
    notes = load_profile_file(out).provenance.parameters.notes
    assert notes.count("busy GPU?") == 2
    assert with_notes(profile, []) is profile
    quiet, _ = refit_from_trace_dir(H100_A, "h100")
    assert "busy GPU?" not in (quiet.provenance.parameters.notes or "")


# ------------------------------------------------------------------ window validation


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda w: [1, 2], "a window must be a JSON object"),
        (lambda w: {**w, "kind": "warmup"}, "unknown window kind 'warmup'"),
        (lambda w: {**w, "energy_j": float("nan")}, "energy_j must be a finite number"),
        (lambda w: {**w, "time_s": "1"}, "time_s must be a number"),
        (lambda w: {k: v for k, v in w.items() if k != "hbm_bytes"}, "window lacks hbm_bytes"),
        (lambda w: {**w, "flops": None}, "window lacks flops"),
        (lambda w: {**w, "flops": -1.0}, "flops must be a finite number >= 0"),
        (lambda w: {**w, "mean_sm_clock_mhz": True}, "mean_sm_clock_mhz must be a number"),
    ],
)
def test_bad_windows_name_file_and_line(tmp_path, edit, message):
    lines = (H100_A / "phases.jsonl").read_text().splitlines()
    lines[3] = json.dumps(edit(json.loads(lines[3])))
    (tmp_path / "phases.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(TtcsimError, match=message) as info:
        read_windows(tmp_path)
    assert f"{tmp_path / 'phases.jsonl'}:4" in str(info.value)


def test_window_checks_accept_the_recorded_windows():
    for i, line in enumerate((H100_A / "phases.jsonl").read_text().splitlines(), 1):
        check_window(json.loads(line), f"phases.jsonl:{i}")
    decoder = json.loads((H100_A / "phases.jsonl").read_text().splitlines()[14])
    with pytest.raises(TtcsimError, match="batch must be a finite number > 0"):
        check_window({**decoder, "batch": 0}, "x")
    with pytest.raises(TtcsimError, match="needs a model"):
        check_window({**decoder, "phase": None, "model": None}, "x")


def test_windows_in_another_encoding_are_a_clear_error(tmp_path):
    (tmp_path / "phases.jsonl").write_bytes((H100_A / "phases.jsonl").read_text().encode("utf-16"))
    with pytest.raises(TtcsimError, match="cannot read windows"):
        read_windows(tmp_path)


# ------------------------------------------------------------------ interrupted calibration


@pytest.fixture(scope="module")
def full_refit():
    return refit_from_trace_dir(H100_A, "h100")


def test_refit_from_the_committed_real_calibration(full_refit, tmp_path):
    profile, report = full_refit
    info = profile.provenance.parameters
    assert profile.calibrated and info.gpu_name == "NVIDIA H100 80GB HBM3"
    assert info.trace == "h100-a"
    # idle power: the median idle reading of the five decoder runs (122.7 W on this H100)
    assert profile.parameters.idle_power_w == pytest.approx(122.7, abs=0.1)
    assert report.residuals_pct["window_energy_median_pct"] < 5.0
    out = tmp_path / "p.yaml"
    atomic_write_text(out, profile.to_yaml())
    assert load_profile_file(out) == profile.checked()


def _truncated_copy(tmp_path: Path, windows_kept: int, runs_kept: int | None,
                    trace_fraction: float) -> Path:  # fmt: skip
    """A calibration folder as an interrupted run leaves it: everything cut mid-line."""
    folder = tmp_path / "cut-trace"
    folder.mkdir()
    phases = (H100_A / "phases.jsonl").read_text().splitlines(keepends=True)
    half_line = phases[windows_kept][: len(phases[windows_kept]) // 2]
    (folder / "phases.jsonl").write_text("".join(phases[:windows_kept]) + half_line)
    trace = (H100_A / "trace.csv").read_text()
    (folder / "trace.csv").write_text(trace[: int(len(trace) * trace_fraction)])
    if runs_kept is not None:
        runs = (H100_A / "calibration_runs.jsonl").read_text().splitlines(keepends=True)
        partial = runs[runs_kept][:100] if runs_kept < len(runs) else ""
        (folder / "calibration_runs.jsonl").write_text("".join(runs[:runs_kept]) + partial)
    return folder


@pytest.mark.parametrize(
    ("windows_kept", "runs_kept", "trace_fraction"),
    [(6, None, 0.3), (10, None, 0.55), (16, None, 0.99), (16, 0, 1.0), (16, 3, 1.0)],
)
def test_an_interrupted_calibration_can_be_fitted_from_what_it_left(
    tmp_path, full_refit, windows_kept, runs_kept, trace_fraction
):
    folder = _truncated_copy(tmp_path, windows_kept, runs_kept, trace_fraction)
    assert len(read_windows(folder)) == windows_kept  # the half-written window is dropped
    assert read_trace_columns(folder)["t_s"].size > 100  # the truncated trace still reads
    profile, report = refit_from_trace_dir(folder, "h100")
    assert profile.calibrated and report.n_items == windows_kept - 1  # all but the idle one
    assert profile.checked() == profile
    full = full_refit[0].parameters
    if windows_kept == 16:  # every window but idle_after: idle is the cold (70 W) reading
        assert profile.parameters.weight_stream_efficiency == full.weight_stream_efficiency
        assert profile.parameters.gemm_efficiency == full.gemm_efficiency


def test_a_calibration_interrupted_before_any_busy_window_is_a_clear_error(tmp_path):
    folder = _truncated_copy(tmp_path, 1, None, 0.1)
    with pytest.raises(TtcsimError, match="no busy window"):
        refit_from_trace_dir(folder, "h100")
    r = invoke("calibrate", "refit", folder, "--base", "h100", "--out", tmp_path / "p.yaml")
    one_line_error(r, "no busy window")
    assert not (tmp_path / "p.yaml").exists()


def test_ctrl_c_during_calibrate_run_keeps_the_trace_and_refit_finishes_it(gpu_ok, tmp_path):
    """KeyboardInterrupt in the microbenchmarks: no profile, the trace stays, refit works."""
    out = tmp_path / "cal.yaml"

    def interrupted_microbenchmarks(trace_dir, **kwargs):
        trace_dir = Path(trace_dir)
        trace_dir.mkdir(parents=True, exist_ok=True)
        phases = (H100_A / "phases.jsonl").read_text().splitlines(keepends=True)
        (trace_dir / "phases.jsonl").write_text("".join(phases[:9]) + phases[9][:40])
        trace = (H100_A / "trace.csv").read_text()
        (trace_dir / "trace.csv").write_text(trace[: len(trace) // 2])
        raise KeyboardInterrupt

    with mock.patch("ttcsim.gpu.microbench.run_microbenchmarks", interrupted_microbenchmarks):
        r = invoke("calibrate", "run", "--out", out)
    assert r.exit_code != 0 and "Traceback" not in r.output  # click: "Aborted!"
    trace_dir = tmp_path / "cal-trace"
    assert not out.exists()
    assert (trace_dir / "phases.jsonl").exists() and (trace_dir / "trace.csv").exists()
    r = invoke("calibrate", "refit", trace_dir, "--base", "h100", "--out", out)
    assert r.exit_code == 0, r.output
    assert load_profile_file(out).calibrated
    r = invoke("calibrate", "refit", trace_dir, "--base", "h100", "--out", out)
    one_line_error(r, "--force")


# ------------------------------------------------------------------ atomic writes and --force


def test_atomic_write_failure_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "p.yaml"
    target.write_text("old\n")
    with mock.patch("os.replace", side_effect=OSError(28, "No space left on device")):
        with pytest.raises(TtcsimError, match="cannot write: No space left on device") as info:
            atomic_write_text(target, "new\n")
    assert str(target) in str(info.value)
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["p.yaml"]


def test_interrupt_during_an_atomic_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "p.yaml"
    target.write_text("old\n")
    with mock.patch("os.fsync", side_effect=KeyboardInterrupt):
        with pytest.raises(KeyboardInterrupt):
            atomic_write_text(target, "new " * 10_000)
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["p.yaml"]


def test_atomic_write_modes(tmp_path):
    umask = os.umask(0o022)
    try:
        new = atomic_write_text(tmp_path / "new.csv", "x\n")
        assert new.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
        kept = tmp_path / "kept.csv"
        kept.write_text("old")
        kept.chmod(0o600)
        atomic_write_text(kept, "new")
        assert kept.stat().st_mode & 0o777 == 0o600 and kept.read_text() == "new"
    finally:
        os.umask(umask)
    with pytest.raises(TtcsimError, match="exists; pass --force"):
        atomic_write_text(kept, "again", overwrite=False)
    with pytest.raises(TtcsimError, match="cannot write"):
        atomic_write_text(tmp_path / "new.csv" / "below-a-file.csv", "x")


def _runs_file(tmp_path: Path) -> Path:
    path = tmp_path / "runs.jsonl"
    rows = [
        {"id": f"r{i}", "hw": "h100", "model": "1b", "strategy": "single", "prompt_tokens": 256,
         "output_tokens": [n], "energy_j": 20.0 + n / 10, "latency_s": 0.3 + n / 2000}
        for i, n in enumerate((100, 200, 300))
    ]  # fmt: skip
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_calibrate_fit_never_overwrites_without_force(tmp_path):
    runs, out = _runs_file(tmp_path), tmp_path / "p.yaml"
    out.write_text("precious\n")
    r = invoke("calibrate", "fit", "--runs", runs, "--base", "h100", "--out", out)
    one_line_error(r, str(out), "--force")
    assert out.read_text() == "precious\n"
    # a failing fit with --force leaves the old file too
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"hw": "h100"}\n')
    r = invoke("calibrate", "fit", "--runs", bad, "--base", "h100", "--out", out, "--force")
    one_line_error(r, f"{bad}:1")
    assert out.read_text() == "precious\n"
    r = invoke("calibrate", "fit", "--runs", runs, "--base", "h100", "--out", out, "--force")
    assert r.exit_code == 0, r.output
    assert load_profile_file(out).calibrated


def test_calibrate_run_refuses_an_existing_profile_before_touching_the_gpu(gpu_ok, tmp_path):
    out = tmp_path / "p.yaml"
    out.write_text("precious\n")
    r = invoke("calibrate", "run", "--out", out)
    one_line_error(r, "--force")
    assert out.read_text() == "precious\n"
    assert gpu_ok.calls == {}  # no NVML call at all


def test_a_profile_that_would_not_load_is_never_written(tmp_path):
    from ttcsim.calibration.fit import _with

    h100 = get_profile("h100")
    broken = _with(h100, {"idle_power_w": 690.0, "active_power_w": 50.0})  # over the 700 W limit
    with pytest.raises(TtcsimError, match="invalid profile: .*power_limit_w"):
        broken.to_yaml()
    heavy = _with(h100, {"hbm_energy_j_per_byte": 5e-9})  # 17 kW streaming at 3.35 TB/s
    with pytest.raises(TtcsimError, match="exceeds power_limit_w"):
        heavy.checked()


def test_duplicate_keys_in_a_profile_are_an_error(tmp_path):
    text = (ROOT / "ttcsim/hardware_profiles/h100-sxm-80gb.yaml").read_text()
    lines = text.splitlines()
    i = next(k for k, line in enumerate(lines) if line.strip().startswith("idle_power_w:"))
    lines.insert(i + 1, lines[i].split(":")[0] + ": 90.0")
    path = tmp_path / "dup.yaml"
    path.write_text("\n".join(lines) + "\n")
    r = invoke("predict", "--hw", path)
    one_line_error(r, f"{path}:{i + 2}", "duplicate key 'idle_power_w'")


def test_outputs_of_curve_and_plots_are_atomic(tmp_path):
    out = tmp_path / "curve.csv"
    out.write_text("old\n")
    with mock.patch("os.replace", side_effect=OSError(5, "Input/output error")):
        r = invoke("curve", "--vary", "output-tokens=16,32", "--model", "1b", "--out", out)
    one_line_error(r, str(out), "Input/output error")
    assert out.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curve.csv"]
    r = invoke("curve", "--vary", "output-tokens=16,32", "--model", "1b", "--plot",
               tmp_path / "c.png")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
