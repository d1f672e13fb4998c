"""GPU-side orchestration of ``calibrate run`` and ``measure`` (I/O at the edge).

Everything that touches the GPU is in :mod:`ttcsim.gpu`; this module checks
availability once, runs it, fits, and writes files atomically.
"""

from __future__ import annotations

from pathlib import Path

from ttcsim.calibration.checks import (
    busy_gpu_warnings,
    check_window,
    read_trace_columns,
    with_notes,
)
from ttcsim.calibration.fit import FitReport, fit_windows
from ttcsim.errors import TtcsimError
from ttcsim.hardware import HardwareProfile, get_profile, profile_name_for_gpu
from ttcsim.io import atomic_write_text

#: Reference-decoder runs that ``calibrate run`` measures after the microbenchmarks
#: (about 30 s).  Shapes differ from every run in the validation campaign.
CALIBRATION_RUNS = (
    dict(id="cal-1b-b1", model="llama-3.2-1b", strategy="single", prompt_tokens=1024,
         output_tokens=256, concurrent_queries=1),
    dict(id="cal-8b-b1", model="llama-3.1-8b", strategy="single", prompt_tokens=256,
         output_tokens=192, concurrent_queries=1),
    dict(id="cal-8b-vote32", model="llama-3.1-8b", strategy="vote32", prompt_tokens=512,
         output_tokens=128, concurrent_queries=1),
    dict(id="cal-8b-p4096-q2", model="llama-3.1-8b", strategy="single", prompt_tokens=4096,
         output_tokens=64, concurrent_queries=2),
    dict(id="cal-3b-q128", model="llama-3.2-3b", strategy="single", prompt_tokens=256,
         output_tokens=128, concurrent_queries=128),
)  # fmt: skip


#: What the calibration runs adjust after the window fit: only the fixed prefill
#: overhead, which no microbenchmark window measures.
CALIBRATION_RUN_FIT = ("prefill_overhead_s",)


def calibrate_on_gpu(
    out_path: str | Path,
    gpu_index: int = 0,
    base: str | None = None,
    budget_s: float = 150.0,
    force: bool = False,
) -> tuple[HardwareProfile, FitReport, Path]:
    """Run the microbenchmarks on GPU ``gpu_index``, fit, write the profile.

    The raw trace (``trace.csv``) and window log (``phases.jsonl``) go to
    ``<out stem>-trace/`` beside the profile; they are written while the
    benchmarks run, so an interrupted calibration leaves them on disk and
    :func:`refit_from_trace_dir` can finish the fit later.
    """
    from ttcsim.gpu import require_gpu

    out_path = Path(out_path)
    if out_path.exists() and not force:
        raise TtcsimError("exists; pass --force to overwrite", str(out_path))
    require_gpu()
    from ttcsim.gpu.microbench import run_microbenchmarks
    from ttcsim.gpu.nvml import NvmlDevice

    with NvmlDevice(gpu_index) as dev:
        gpu_name, driver = dev.name, dev.driver_version
    base_profile = _base_for(base, gpu_name)
    trace_dir = out_path.with_name(out_path.stem + "-trace")
    run_microbenchmarks(trace_dir, device_index=gpu_index, budget_s=budget_s)
    from ttcsim.gpu.measure import measure_many

    measure_many(
        [dict(r) for r in CALIBRATION_RUNS],
        trace_dir / "calibration_runs.jsonl",
        device_index=gpu_index,
    )
    profile, report = refit_from_trace_dir(
        trace_dir, base_profile, gpu_name=gpu_name, driver_version=driver
    )
    atomic_write_text(out_path, profile.to_yaml())
    return profile, report, trace_dir


def _base_for(base: str | None, gpu_name: str) -> HardwareProfile:
    if base:
        return get_profile(base)
    guess = profile_name_for_gpu(gpu_name)
    if guess is None:
        raise TtcsimError(f"no shipped profile matches {gpu_name!r}; pass --base", "--base")
    return get_profile(guess)


def datasheet_base(profile: HardwareProfile) -> HardwareProfile:
    """``profile`` with datasheet-default parameters.

    A refit then never depends on an earlier calibration.  Idle power for the
    default rule is 17 % of the power limit (the windows measure the real one).
    """
    from ttcsim.hardware import CalibrationInfo
    from ttcsim.simulator.defaults import default_parameters

    params = default_parameters(profile.datasheet, 0.17 * profile.datasheet.power_limit_w)
    info = CalibrationInfo(status="datasheet-default", method="ttcsim.simulator.defaults rule")
    return profile.with_parameters(params, info)


def read_windows(trace_dir: str | Path) -> list[dict]:
    """Windows from a calibration's ``phases.jsonl`` (tolerates a truncated last line)."""
    import json

    path = Path(trace_dir) / "phases.jsonl"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise TtcsimError(f"cannot read windows: {exc}", str(path)) from None
    windows = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):  # JSONDecodeError, 5000-digit ints, deep nesting
            if i == len(lines):  # interrupted while writing the last window
                break
            raise TtcsimError("invalid JSON", f"{path}:{i}") from None
        windows.append(check_window(row, f"{path}:{i}"))
    return windows


def refit_from_trace_dir(
    trace_dir: str | Path,
    base: str | HardwareProfile,
    gpu_name: str | None = None,
    driver_version: str | None = None,
    date: str | None = None,
) -> tuple[HardwareProfile, FitReport]:
    """Fit a profile from a recorded calibration folder (no GPU needed).

    Two steps: :func:`~ttcsim.calibration.fit.fit_windows` on ``phases.jsonl``,
    then, when ``calibration_runs.jsonl`` exists, :func:`~ttcsim.calibration.fit.fit_runs`
    of :data:`CALIBRATION_RUN_FIT` on those reference-decoder runs, with the window
    fit as the base (and prior).
    """
    from ttcsim.calibration.fit import fit_runs
    from ttcsim.calibration.records import read_runs

    trace_dir = Path(trace_dir)
    windows = read_windows(trace_dir)
    runs_path = trace_dir / "calibration_runs.jsonl"
    runs = read_runs(runs_path, recording=True) if runs_path.exists() else []
    if runs and runs[0].model_extra:
        extra = runs[0].model_extra
        gpu_name = gpu_name or extra.get("gpu_name")
        driver_version = driver_version or extra.get("driver_version")
        date = date or str(extra.get("measured_at", ""))[:10] or None
    profile, report = fit_windows(
        windows,
        datasheet_base(get_profile(base)),
        gpu_name=gpu_name,
        driver_version=driver_version,
        trace=trace_dir.name,
        date=date,
    )
    if runs:
        refined, run_report = fit_runs(
            runs, profile, CALIBRATION_RUN_FIT, method_note="calibrate run (decoder runs)"
        )
        info = refined.provenance.parameters.model_copy(
            update={
                "method": profile.provenance.parameters.method
                + f"; then prefill_overhead_s by least squares on {len(runs)} "
                "reference-decoder runs (calibration_runs.jsonl)",
                "date": profile.provenance.parameters.date,
                "gpu_name": profile.provenance.parameters.gpu_name,
                "driver_version": driver_version,
                "trace": trace_dir.name,
                "residuals": {**profile.provenance.parameters.residuals,
                              **refined.provenance.parameters.residuals},
            }
        )  # fmt: skip
        profile = refined.with_parameters(refined.parameters, info)
        report.residuals_pct.update(run_report.residuals_pct)
    # a GPU busy with other work shows as high or unsteady idle power: say so
    warnings = busy_gpu_warnings(windows, get_profile(base), read_trace_columns(trace_dir))
    profile = with_notes(profile, warnings)
    return profile, report


def measure_one(
    model: str,
    strategy: str,
    prompt_tokens: int,
    output_tokens: str,
    concurrency: int,
    reward_model: str | None,
    no_prefix_cache: bool,
    seed: int,
    gpu_index: int,
    out_path: str,
) -> dict:
    """Measure one run with the reference decoder and append its record to ``out_path``."""
    import json

    import numpy as np

    from ttcsim.distributions import LengthList, parse_lengths
    from ttcsim.gpu import require_gpu
    from ttcsim.strategies import parse_strategy

    strat = parse_strategy(strategy, reward_model)
    n = concurrency * strat.draws_per_query
    lengths = parse_lengths(output_tokens)
    if isinstance(lengths, LengthList):
        values = [int(v) for v in lengths.values]
    else:
        values = [int(v) for v in lengths.sample(np.random.default_rng(seed), n)]
    require_gpu()
    from ttcsim.gpu.measure import measure_run

    record = measure_run(
        model,
        strat.spec,
        prompt_tokens,
        values,
        concurrency,
        reward_model=reward_model,
        prefix_sharing=not no_prefix_cache,
        device_index=gpu_index,
    )
    with open(out_path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
    return record
