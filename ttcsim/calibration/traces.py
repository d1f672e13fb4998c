"""Raw power/energy traces plus a request log -> run records.

Formats (documented with examples in ``docs/CALIBRATION.md``):

* **power CSV** as written by
  ``nvidia-smi --query-gpu=timestamp,power.draw,clocks.sm --format=csv -lms 100``
  (header ``timestamp, power.draw [W], clocks.sm [MHz]``; values may carry
  units, ``[N/A]`` is skipped).  A ``power.draw.instant`` column is preferred
  when present.  ``power.draw`` on Ampere-and-newer (except A100) is a 1-s
  average that lags the load: it is shifted back by half its window
  (:data:`AVERAGED_POWER_LAG_S`) before integration.
* **energy JSONL**: one sample per line, ``{"t": <unix s or ISO time>,
  "energy_mj": <counter>}`` (or ``"energy_j"``), from
  ``nvmlDeviceGetTotalEnergyConsumption``.
* **request log JSONL**: one run per line, a run record without
  ``energy_j``/``latency_s`` but with ``"start"`` and ``"end"`` times.

Energy per request comes from the counter when given (tick-aware, see
:func:`energy_between`), else from trapezoidal integration of power.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import math
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from ttcsim.calibration.records import RunRecord
from ttcsim.errors import TtcsimError

#: ``power.draw`` is averaged over 1 s on H100/H200: centre it by shifting 0.5 s back.
AVERAGED_POWER_LAG_S = 0.5


def parse_time(value, where: str) -> float:
    """Unix seconds from a number, ISO-8601, or nvidia-smi's ``YYYY/MM/DD HH:MM:SS.fff``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise TtcsimError(f"time {value!r} is not finite", where)
        return float(value)
    text = str(value).strip()
    try:
        return float(text)
    except ValueError:
        pass
    for candidate in (text.replace("/", "-"), text):
        try:
            t = dt.datetime.fromisoformat(candidate)
        except ValueError:
            continue
        if t.tzinfo is None:
            t = t.replace(tzinfo=dt.timezone.utc)
        return t.timestamp()
    raise TtcsimError(f"unreadable time {text!r}", where)


def _number(text: str) -> float | None:
    text = text.strip()
    if not text or text.startswith("[") or text.upper() in ("N/A", "NAN"):
        return None
    try:
        value = float(text.split()[0])
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def read_power_csv(path: str | Path) -> dict[str, np.ndarray | bool]:
    """Read an nvidia-smi power CSV: sorted, de-duplicated ``t_s``, ``power_w``, ``sm_clock_mhz``.

    Returns also ``averaged`` (True when only the averaged ``power.draw`` was found).
    """
    path = Path(path)
    try:
        with path.open(encoding="utf-8", newline="") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError) as exc:
        raise TtcsimError(f"cannot read power trace: {exc}", str(path)) from None
    if not rows:
        raise TtcsimError("empty power trace", str(path))
    header = [h.strip().lower() for h in rows[0]]

    def find(*names: str) -> int | None:
        for n in names:
            for i, h in enumerate(header):
                if h.split(" [")[0] == n:
                    return i
        return None

    i_t = find("timestamp", "t_s", "time")
    i_inst = find("power.draw.instant")
    i_avg = find("power.draw", "power.draw.average", "power_w")
    i_clk = find("clocks.sm", "clocks.current.sm", "sm_clock_mhz")
    i_p = i_inst if i_inst is not None else i_avg
    if i_t is None or i_p is None:
        raise TtcsimError(
            "need a timestamp column and power.draw or power.draw.instant", f"{path}:1"
        )
    t, p, clk = [], [], []
    for line_no, row in enumerate(rows[1:], start=2):
        if len(row) <= max(i_t, i_p):
            continue  # truncated line
        power = _number(row[i_p])
        if power is None:
            continue
        if power < 0:
            raise TtcsimError(f"negative power {row[i_p].strip()!r}", f"{path}:{line_no}")
        try:
            t.append(parse_time(row[i_t], f"{path}:{line_no}"))
        except TtcsimError:
            continue
        p.append(power)
        clk.append(_number(row[i_clk]) if i_clk is not None and len(row) > i_clk else None)
    if len(t) < 2:
        raise TtcsimError("fewer than 2 readable power samples", str(path))
    t_arr, order = np.unique(np.asarray(t), return_index=True)  # sorts, drops duplicate times
    averaged = i_inst is None
    if averaged:
        t_arr = t_arr - AVERAGED_POWER_LAG_S
    clocks = np.array([np.nan if c is None else c for c in clk], dtype=float)[order]
    return {
        "t_s": t_arr,
        "power_w": np.asarray(p)[order],
        "sm_clock_mhz": clocks,
        "averaged": averaged,
    }


def read_energy_jsonl(path: str | Path) -> dict[str, np.ndarray]:
    """Read counter samples: sorted ``t_s`` and a reset-free cumulative ``energy_j``."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise TtcsimError(f"cannot read energy samples: {exc}", str(path)) from None
    t, e = [], []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{i}"
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):  # JSONDecodeError, 5000-digit ints, deep nesting
            raise TtcsimError("invalid JSON", where) from None
        if not isinstance(row, dict) or "t" not in row:
            raise TtcsimError('each line needs {"t": ..., "energy_mj": ...}', where)
        key = "energy_mj" if "energy_mj" in row else "energy_j"
        if key not in row:
            raise TtcsimError("missing energy_mj (or energy_j)", where)
        value = row[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TtcsimError(f"{key} must be a number, got {value!r}", where)
        value = value / 1e3 if key == "energy_mj" else value
        if not math.isfinite(value):
            raise TtcsimError("energy must be a finite number", where)
        t.append(parse_time(row["t"], where))
        e.append(float(value))
    if len(t) < 2:
        raise TtcsimError("fewer than 2 energy samples", str(path))
    return cumulative_energy(np.asarray(t), np.asarray(e))


def cumulative_energy(t_s: np.ndarray, counter_j: np.ndarray) -> dict[str, np.ndarray]:
    """Sort by time, drop duplicates, and undo counter resets/wraps.

    A sample lower than its predecessor starts a new segment: its value is
    offset by the energy counted before the reset (the energy inside the reset
    interval is lost, and treated as zero).
    """
    order = np.argsort(t_s, kind="stable")
    t_s, counter_j = t_s[order], counter_j[order]
    keep = np.concatenate([[True], np.diff(t_s) > 0])
    t_s, counter_j = t_s[keep], counter_j[keep]
    steps = np.diff(counter_j)
    steps = np.where(steps < 0, 0.0, steps)
    return {"t_s": t_s, "energy_j": np.concatenate([[0.0], np.cumsum(steps)])}


def energy_between(t_s: np.ndarray, energy_j: np.ndarray, t0_s: float, t1_s: float) -> float:
    """Energy over ``[t0, t1]`` from cumulative counter samples [J].

    The counter only changes at ticks (~100 ms on H100/H200), so a sample
    repeating the previous value carries no information about *when* energy
    was spent.  Keep the tick instants (the first sample showing each new
    value) and interpolate linearly between them.
    """
    t_s, energy_j = np.asarray(t_s, float), np.asarray(energy_j, float)
    first = np.concatenate([[True], np.diff(energy_j) != 0])
    tt, ee = t_s[first], energy_j[first]
    if tt.size < 2:
        return 0.0
    lo, hi = np.interp([t0_s, t1_s], tt, ee)
    return float(hi - lo)


def power_energy_between(t_s: np.ndarray, power_w: np.ndarray, t0_s: float, t1_s: float) -> float:
    """Trapezoidal integral of power over ``[t0, t1]`` [J] (power interpolated at the ends)."""
    inside = (t_s > t0_s) & (t_s < t1_s)
    tt = np.concatenate([[t0_s], t_s[inside], [t1_s]])
    pp = np.interp(tt, t_s, power_w)
    return float(np.sum((pp[1:] + pp[:-1]) * np.diff(tt) / 2.0))


def _idle_power_w(power: dict, windows: list[tuple[float, float]], min_samples: int = 10):
    """Median power of samples outside every request (more than 1 s away); None if too few."""
    t = power["t_s"]
    quiet = np.ones(t.size, dtype=bool)
    for t0, t1 in windows:
        quiet &= (t < t0 - 1.0) | (t > t1 + 1.0)
    if quiet.sum() < min_samples:
        return None
    return float(np.median(power["power_w"][quiet]))


def runs_from_trace(
    log_path: str | Path,
    power_csv: str | Path | None = None,
    energy_jsonl: str | Path | None = None,
    max_gap_s: float = 2.0,
) -> list[RunRecord]:
    """Build run records from a request log and a power CSV and/or energy samples.

    A request whose window is not covered by the trace, or which has a gap
    larger than ``max_gap_s`` between samples, is an error naming its line.
    """
    if power_csv is None and energy_jsonl is None:
        raise TtcsimError("need --trace (power CSV) and/or --energy (counter JSONL)")
    power = read_power_csv(power_csv) if power_csv else None
    energy = read_energy_jsonl(energy_jsonl) if energy_jsonl else None
    ref = energy if energy is not None else power
    log_path = Path(log_path)
    try:
        lines = log_path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise TtcsimError(f"cannot read request log: {exc}", str(log_path)) from None
    windows, records = [], []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{log_path}:{i}"
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):  # JSONDecodeError, 5000-digit ints, deep nesting
            raise TtcsimError("invalid JSON", where) from None
        if not isinstance(row, dict) or "start" not in row or "end" not in row:
            raise TtcsimError("a request needs start and end times", where)
        t0, t1 = parse_time(row["start"], where), parse_time(row["end"], where)
        if not t1 > t0:
            raise TtcsimError("end must be after start", where)
        ts = ref["t_s"]
        if t0 < ts[0] or t1 > ts[-1]:
            raise TtcsimError("request lies outside the trace", where)
        # samples from the last one at or before t0 to the first at or after t1: a gap
        # just outside the window is interpolated across too
        edges = ts[np.searchsorted(ts, t0, "right") - 1 : np.searchsorted(ts, t1, "left") + 1]
        if edges.size > 1 and np.diff(edges).max() > max_gap_s:
            raise TtcsimError(f"trace has a gap over {max_gap_s} s during the request", where)
        if energy is not None:
            e = energy_between(energy["t_s"], energy["energy_j"], t0, t1)
        else:
            e = power_energy_between(power["t_s"], power["power_w"], t0, t1)
        record = {k: v for k, v in row.items() if k not in ("start", "end")}
        record.update(energy_j=e, latency_s=t1 - t0)
        windows.append((t0, t1))
        records.append((record, where))
    idle = _idle_power_w(power, windows) if power is not None else None
    runs = []
    for record, where in records:
        if idle is not None:
            record.setdefault("idle_power_w", idle)
        try:
            runs.append(RunRecord.model_validate(record))
        except ValidationError as exc:
            err = exc.errors()[0]
            key = ".".join(str(x) for x in err["loc"])
            raise TtcsimError(f"bad request record: {key}: {err['msg']}", where) from None
    if not runs:
        raise TtcsimError("no requests in the log", str(log_path))
    return runs
