"""Sanity checks on calibration data: well-formed windows, and a GPU busy with other work.

Pure functions (no GPU, no file writes) used by the calibration orchestration
(:mod:`ttcsim.calibration.session`):

* :func:`check_window` -- one ``phases.jsonl`` window has the keys and finite,
  non-negative numbers that :func:`~ttcsim.calibration.fit.fit_windows` reads;
  a :class:`~ttcsim.errors.TtcsimError` names the key and the line otherwise.
* :func:`busy_gpu_warnings` -- signs that another process used the GPU while
  it was being calibrated.  A quiet GPU's idle windows draw about the
  profile's idle power, and steadily: on an H100 SXM the two idle windows of
  ``validation/h100-a`` draw 70 W (before the benchmark allocates anything)
  and 125 W (context held, clocks up), and their power over 0.5 s steps
  varies by under 1.5 % (coefficient of variation).  Two checks:

  1. *idle power too high*: an idle window draws more than
     ``P_idle + max(0.5 P_idle, 0.05 P_limit)`` [W] (180 W for the H100's
     120 W idle and 700 W limit);
  2. *idle power unsteady* (needs the raw trace): the coefficient of
     variation of the power over :data:`IDLE_STEP_S` steps inside an idle
     window exceeds :data:`IDLE_MAX_VARIATION`.  Power per step comes from the
     cumulative energy counter interpolated between its tick instants
     (:func:`ttcsim.gpu.nvml.counter_ticks`), not from ``power_w``: that is a
     1-s moving average on H100/H200 that lags the load.

  Either gives a warning for the profile's ``provenance.parameters.notes``
  (:func:`with_notes`); the fit still runs.
* :func:`read_trace_columns` -- ``trace.csv`` of an interrupted calibration,
  tolerating a truncated last line.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ttcsim.errors import TtcsimError
from ttcsim.hardware import HardwareProfile

#: Window kinds that :func:`~ttcsim.calibration.fit.fit_windows` knows.
WINDOW_KINDS = ("idle", "weight_stream", "gemm", "attention_decode", "decoder")
#: Idle power above ``P_idle`` more than this fraction of ``P_idle`` is suspicious ...
IDLE_EXCESS_OF_IDLE = 0.5
#: ... and more than this fraction of the power limit (the larger margin applies).
IDLE_EXCESS_OF_LIMIT = 0.05
#: Step [s] over which idle power is averaged for the variation check (5 counter ticks:
#: a tick instant is known to one 20 ms sampling period, 4 % of a step at each end).
IDLE_STEP_S = 0.5
#: Largest coefficient of variation of a quiet idle window's power (measured: < 0.015).
IDLE_MAX_VARIATION = 0.10


def _finite_number(row: dict, key: str, where: str, *, required: bool, positive: bool = False):
    value = row.get(key)
    if value is None:
        if required:
            raise TtcsimError(f"window lacks {key}", where)
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TtcsimError(f"{key} must be a number, got {value!r}", where)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise TtcsimError(f"{key} must be a finite number {bound}, got {value!r}", where)
    return value


def check_window(row: object, where: str) -> dict:
    """Return ``row`` if it is a usable calibration window, else raise naming ``where``.

    Required: ``kind`` (one of :data:`WINDOW_KINDS`), ``time_s`` and ``energy_j``
    (per iteration [s], [J]); for busy kinds ``hbm_bytes`` and ``flops``; for
    ``attention_decode`` and ``decoder`` also ``batch`` and ``context_tokens``
    (> 0); for ``decoder`` a ``model`` or a ``phase`` naming one.  Optional
    numbers (``avg_power_w``, ``mean_sm_clock_mhz``, ``t_start_s``,
    ``t_end_s``, ``iterations``) must be finite and >= 0 when present.  Other
    keys are ignored.
    """
    if not isinstance(row, dict):
        raise TtcsimError("a window must be a JSON object", where)
    kind = row.get("kind")
    if kind not in WINDOW_KINDS:
        raise TtcsimError(f"unknown window kind {kind!r}; valid: {', '.join(WINDOW_KINDS)}", where)
    for key in ("time_s", "energy_j"):
        _finite_number(row, key, where, required=True)
    for key in ("hbm_bytes", "flops"):
        _finite_number(row, key, where, required=kind != "idle")
    for key in ("batch", "context_tokens"):
        _finite_number(row, key, where, required=kind in ("attention_decode", "decoder"),
                       positive=True)  # fmt: skip
    for key in ("avg_power_w", "mean_sm_clock_mhz", "t_start_s", "t_end_s", "iterations"):
        _finite_number(row, key, where, required=False)
    if kind == "decoder":
        names = [row.get("model"), row.get("phase")]
        if not any(isinstance(n, str) and n for n in names):
            raise TtcsimError("a decoder window needs a model (or a phase naming one)", where)
    return row


def idle_threshold_w(base: HardwareProfile) -> float:
    """Idle power above which a GPU looks busy [W]: ``P_idle + max(0.5 P_idle, 0.05 P_limit)``."""
    idle = base.parameters.idle_power_w
    limit = base.datasheet.power_limit_w
    return idle + max(IDLE_EXCESS_OF_IDLE * idle, IDLE_EXCESS_OF_LIMIT * limit)


def idle_power_variation(
    t_s: np.ndarray, energy_j: np.ndarray, t0_s: float, t1_s: float, step_s: float = IDLE_STEP_S
) -> float | None:
    """Coefficient of variation of power over ``step_s`` steps in ``[t0_s, t1_s]``.

    Power per step is the cumulative counter energy (interpolated between tick
    instants) over the step, divided by ``step_s``.  None when the counter
    ticks do not bracket the window or it holds fewer than 3 steps.
    """
    from ttcsim.gpu.nvml import counter_ticks  # pure numpy; pynvml is not imported

    tick_t, tick_e = counter_ticks(t_s, energy_j)
    n = int((t1_s - t0_s) / step_s)
    if n < 3 or tick_t.size < 2 or t0_s < tick_t[0] or t1_s > tick_t[-1]:
        return None
    grid = t0_s + step_s * np.arange(n + 1)
    power = np.diff(np.interp(grid, tick_t, tick_e)) / step_s
    mean = float(power.mean())
    return float(power.std() / mean) if mean > 0 else None


def busy_gpu_warnings(
    windows: list[dict], base: HardwareProfile, trace: dict | None = None
) -> list[str]:
    """Warnings that the GPU was busy with other work during calibration (module docstring).

    Parameters
    ----------
    windows : list of dict
        ``phases.jsonl`` windows (only ``kind == "idle"`` ones are looked at).
    base : HardwareProfile
        The profile the calibration starts from; its ``idle_power_w`` [W] and
        ``power_limit_w`` [W] set the threshold (:func:`idle_threshold_w`).
    trace : dict, optional
        Raw trace columns ``t_s`` [s] and ``energy_j`` [J] (same clock as the
        windows' ``t_start_s``/``t_end_s``) for the variation check.

    Returns a list of one-line warnings, empty for a quiet GPU.
    """
    out = []
    limit_w = idle_threshold_w(base)
    for w in windows:
        if not isinstance(w, dict) or w.get("kind") != "idle":
            continue
        name = w.get("phase", "idle")
        time_s, energy_j = w.get("time_s"), w.get("energy_j")
        if isinstance(time_s, (int, float)) and isinstance(energy_j, (int, float)) and time_s > 0:
            power_w = energy_j / time_s
            if power_w > limit_w:
                out.append(
                    f"busy GPU? idle window {name!r} drew {power_w:.0f} W, above {limit_w:.0f} W "
                    f"({base.name} idles at {base.parameters.idle_power_w:.0f} W): another "
                    "process may have used the GPU; recalibrate on an idle GPU"
                )
        t0, t1 = w.get("t_start_s"), w.get("t_end_s")
        if trace is None or not isinstance(t0, (int, float)) or not isinstance(t1, (int, float)):
            continue
        cv = idle_power_variation(trace["t_s"], trace["energy_j"], float(t0), float(t1))
        if cv is not None and cv > IDLE_MAX_VARIATION:
            out.append(
                f"busy GPU? power in idle window {name!r} varied by {cv:.0%} over "
                f"{IDLE_STEP_S} s steps (a quiet GPU: under {IDLE_MAX_VARIATION:.0%}): another "
                "process may have used the GPU; recalibrate on an idle GPU"
            )
    return out


def with_notes(profile: HardwareProfile, notes: list[str]) -> HardwareProfile:
    """``profile`` with ``notes`` appended to ``provenance.parameters.notes`` (``; ``-joined)."""
    if not notes:
        return profile
    info = profile.provenance.parameters
    text = "; ".join([info.notes, *notes] if info.notes else notes)
    return profile.with_parameters(profile.parameters, info.model_copy(update={"notes": text}))


def read_trace_columns(trace_dir: str | Path) -> dict[str, np.ndarray] | None:
    """``t_s`` and ``energy_j`` of ``trace_dir/trace.csv``; None when missing or unreadable.

    Rows that do not parse (the truncated last line of an interrupted run) are skipped.
    """
    path = Path(trace_dir) / "trace.csv"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    if not lines:
        return None
    header = [h.strip() for h in lines[0].split(",")]
    if "t_s" not in header or "energy_j" not in header:
        return None
    i_t, i_e = header.index("t_s"), header.index("energy_j")
    rows = []
    for line in lines[1:]:
        parts = line.split(",")
        if len(parts) != len(header):
            continue
        try:
            rows.append((float(parts[i_t]), float(parts[i_e])))
        except ValueError:
            continue
    if len(rows) < 2:
        return None
    arr = np.array(rows, dtype=float)
    return {"t_s": arr[:, 0], "energy_j": arr[:, 1]}
