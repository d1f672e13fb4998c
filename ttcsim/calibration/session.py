"""GPU-side orchestration of ``calibrate run`` and ``measure`` (I/O at the edge).

Everything that touches the GPU is in :mod:`ttcsim.gpu`; this module checks
availability once, runs it, fits, and writes files atomically.
"""

from __future__ import annotations

from pathlib import Path

from ttcsim.calibration.fit import FitReport, fit_windows
from ttcsim.errors import TtcsimError
from ttcsim.hardware import HardwareProfile, get_profile, profile_name_for_gpu
from ttcsim.io import atomic_write_text


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
    windows = run_microbenchmarks(trace_dir, device_index=gpu_index, budget_s=budget_s)
    profile, report = fit_windows(
        windows,
        base_profile,
        gpu_name=gpu_name,
        driver_version=driver,
        trace=str(trace_dir.name),
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


def read_windows(trace_dir: str | Path) -> list[dict]:
    """Windows from a calibration's ``phases.jsonl`` (tolerates a truncated last line)."""
    import json

    path = Path(trace_dir) / "phases.jsonl"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise TtcsimError(f"cannot read windows: {exc}", str(path)) from None
    windows = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            windows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines):  # interrupted while writing the last window
                break
            raise TtcsimError("invalid JSON", f"{path}:{i}") from None
    return windows


def refit_from_trace_dir(
    trace_dir: str | Path, base: str, gpu_name: str | None = None, date: str | None = None
) -> tuple[HardwareProfile, FitReport]:
    """Fit a profile from a recorded calibration folder (no GPU needed)."""
    windows = read_windows(trace_dir)
    return fit_windows(
        windows, get_profile(base), gpu_name=gpu_name, trace=Path(trace_dir).name, date=date
    )


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
    n = concurrency * strat.samples_per_query
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
