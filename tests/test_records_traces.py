"""Run records and raw traces: parsing, error messages, energy from counters and power."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ttcsim.calibration.records import read_runs
from ttcsim.calibration.traces import (
    cumulative_energy,
    energy_between,
    power_energy_between,
    read_power_csv,
    runs_from_trace,
)
from ttcsim.errors import TtcsimError

GOOD = {
    "id": "a", "hw": "h100", "model": "llama-3.2-1b", "prompt_tokens": 128,
    "concurrent_queries": 1, "strategy": "vote2", "output_tokens": [10, 20],
    "energy_j": 100.0, "latency_s": 1.0, "extra_key": "ignored",
}  # fmt: skip


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_read_runs_ignores_unknown_keys(tmp_path):
    runs = read_runs(write_jsonl(tmp_path / "r.jsonl", [GOOD, GOOD | {"id": "b"}]))
    assert [r.id for r in runs] == ["a", "b"]
    assert runs[0].prefix_sharing is True


@pytest.mark.parametrize(
    "bad,match",
    [
        ({k: v for k, v in GOOD.items() if k != "energy_j"}, r"r.jsonl:2: energy_j: missing"),
        (GOOD | {"energy_j": -1}, r"r.jsonl:2: energy_j"),
        (GOOD | {"output_tokens": [0]}, r"r.jsonl:2: output_tokens"),
        ("{not json", r"r.jsonl:2: invalid JSON"),
        ("[1, 2]", r"r.jsonl:2: a run record must be a JSON object"),
    ],
)
def test_read_runs_errors_name_the_line(tmp_path, bad, match):
    with pytest.raises(TtcsimError, match=match):
        read_runs(write_jsonl(tmp_path / "r.jsonl", [GOOD, bad]))


def ticked_counter(t, power_w, tick_s=0.1):
    """Cumulative energy as NVML reports it: updated only at tick instants."""
    exact = np.concatenate([[0.0], np.cumsum(power_w[:-1] * np.diff(t))])
    ticks = np.floor(t / tick_s) * tick_s
    return np.interp(ticks, t, exact)


def test_energy_between_recovers_integral_from_ticked_counter():
    t = np.arange(0, 20, 0.02)
    power = 300 + 200 * (t > 5) * (t < 12)
    counter = ticked_counter(t, power)
    exact = 300 * (10.0 - 2.0) + 200 * (10.0 - 5.0)
    got = energy_between(t, counter, 2.0, 10.0)
    assert got == pytest.approx(exact, rel=0.01)


def test_cumulative_energy_handles_disorder_duplicates_and_reset():
    t = np.array([3.0, 1.0, 2.0, 2.0, 4.0, 5.0])
    e = np.array([30.0, 10.0, 20.0, 20.0, 5.0, 15.0])  # reset between t=3 and t=4
    out = cumulative_energy(t, e)
    assert out["t_s"].tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert out["energy_j"].tolist() == [0.0, 10.0, 20.0, 20.0, 30.0]


def test_power_csv_nvidia_smi_format_and_trapezoid(tmp_path):
    rows = ["timestamp, power.draw.instant [W], clocks.sm [MHz]"]
    for i in range(50):
        rows.append(f"2026/11/26 10:00:{i * 0.1:06.3f}, {100 + 10 * (i >= 25):.2f} W, 1980 MHz")
    rows.insert(10, "2026/11/26 10:00:00.900, [N/A], [N/A]")  # unreadable
    rows.append("2026/11/26 10:00")  # truncated line
    path = tmp_path / "p.csv"
    path.write_text("\n".join(rows))
    tr = read_power_csv(path)
    assert not tr["averaged"]
    t0 = tr["t_s"][0]
    e = power_energy_between(tr["t_s"], tr["power_w"], t0 + 1.0, t0 + 4.0)
    assert e == pytest.approx(100 * 1.5 + 110 * 1.5, rel=0.01)


def test_runs_from_trace_with_counter_and_log(tmp_path):
    t = np.arange(1000.0, 1010.0, 0.05)
    power = np.where((t > 1002) & (t < 1005), 500.0, 80.0)
    counter_mj = ticked_counter(t - 1000.0, power) * 1e3 + 5e6
    write_jsonl(
        tmp_path / "e.jsonl",
        [{"t": float(a), "energy_mj": float(b)} for a, b in zip(t, counter_mj, strict=True)],
    )
    req = {k: v for k, v in GOOD.items() if k not in ("energy_j", "latency_s")}
    write_jsonl(tmp_path / "log.jsonl", [req | {"start": 1002.0, "end": 1005.0}])
    (run,) = runs_from_trace(tmp_path / "log.jsonl", energy_jsonl=tmp_path / "e.jsonl")
    assert run.latency_s == pytest.approx(3.0)
    assert run.energy_j == pytest.approx(1500.0, rel=0.03)


def test_runs_from_trace_rejects_requests_outside_or_with_gaps(tmp_path):
    t = np.concatenate([np.arange(0, 2, 0.1), np.arange(6, 8, 0.1)])
    write_jsonl(tmp_path / "e.jsonl", [{"t": float(a), "energy_j": float(a) * 100} for a in t])
    req = {k: v for k, v in GOOD.items() if k not in ("energy_j", "latency_s")}
    write_jsonl(tmp_path / "log.jsonl", [req | {"start": 1.0, "end": 7.0}])
    with pytest.raises(TtcsimError, match=r"log.jsonl:1: trace has a gap"):
        runs_from_trace(tmp_path / "log.jsonl", energy_jsonl=tmp_path / "e.jsonl")
    write_jsonl(tmp_path / "log.jsonl", [req | {"start": 1.0, "end": 9.0}])
    with pytest.raises(TtcsimError, match="outside the trace"):
        runs_from_trace(tmp_path / "log.jsonl", energy_jsonl=tmp_path / "e.jsonl")
