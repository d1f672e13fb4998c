"""Sweeps: bit-for-bit equality with predict(), grid format, chunking, writers, CLI."""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from ttcsim.cli import main
from ttcsim.errors import DoesNotFitError, TtcsimError
from ttcsim.predict import predict
from ttcsim.sweep import (
    RESULT_COLUMNS,
    Grid,
    ProgressBar,
    SlowPathWarning,
    Sweeper,
    as_grid,
    iter_sweep,
    load_grid,
    sweep,
    write_sweep,
)
from ttcsim.tablewriter import format_floats, parquet_available

ROOT = Path(__file__).resolve().parents[1]


def _predict_row(row: pd.Series, grid: Grid):
    """predict() for one result row; None where predict refuses the scenario."""
    try:
        return predict(
            hw=row.hw,
            model=row.model,
            strategy=row.strategy,
            prompt_tokens=int(row.prompt_tokens),
            output_tokens=row.output_tokens_spec,
            concurrency=int(row.concurrency),
            tp=int(row.tp),
            weight_dtype=row.weight_dtype,
            kv_dtype=row.kv_dtype,
            prefix_cache=bool(row.prefix_cache),
            reward_model=row.reward_model or None,
            pue=grid.pue,
            carbon_g_per_kwh=grid.carbon_g_per_kwh,
            usd_per_kwh=grid.usd_per_kwh,
            percentiles=False,
        )
    except (DoesNotFitError, TtcsimError):
        return None


def _assert_rows_equal_predict(df: pd.DataFrame, grid: Grid, rows) -> int:
    """Every result column of ``rows`` == predict() (exact); returns rows that fit."""
    fitted = 0
    for i in rows:
        row = df.iloc[int(i)]
        p = _predict_row(row, grid)
        assert (p is not None) == bool(row.fits), (i, row.to_dict())
        if p is None:
            assert math.isnan(row.energy_j)
            continue
        fitted += 1
        for col in RESULT_COLUMNS:
            if col in df.columns:
                assert row[col] == getattr(p, col), (col, row[col], getattr(p, col), i)
    return fitted


FIXED_GRID = {
    "hw": ["h100", "a100", "l40s", "mi300x"],
    "model": ["8b", "70b", "qwen3-30b-a3b"],
    "weight_dtype": ["bf16", "fp8"],
    "tp": [1, 2, 8],
    "strategy": ["single", "cot", "vote1", "vote5", "vote16", "bon3"],
    "output_tokens": [1, 2, 100, 1024, 5000],
    "prefix_cache": [True, False],
    "concurrency": [1, 3, 8, 9, 100, 129, 1000],
    "prompt_tokens": [1, 128, 999, 30000],
    "pue": 1.3,
    "carbon_g_per_kwh": 400,
    "usd_per_kwh": 0.12,
}


def test_fixed_lengths_equal_predict_bit_for_bit():
    grid = as_grid(FIXED_GRID)
    df = sweep(grid)
    assert len(df) == grid.n_scenarios == 4 * 3 * 2 * 3 * 5 * 5 * 2 * 7 * 4  # cot == single
    assert 0.2 < df.fits.mean() < 0.95  # both kinds of rows are present
    rows = np.random.default_rng(7).choice(len(df), 250, replace=False)
    assert _assert_rows_equal_predict(df, grid, rows) > 50


def test_hot_decode_segments_equal_predict():
    """Small models in large batches reach the power limit step by step."""
    grid = as_grid({
        "hw": ["h100", "b200"],
        "model": ["qwen2.5-0.5b", "1b"],
        "strategy": ["single", "vote64", "bon16"],
        "output_tokens": [64, 3000],
        "concurrency": [1, 64],
        "prompt_tokens": [32, 1000],
    })
    df = sweep(grid)
    assert _assert_rows_equal_predict(df, grid, range(len(df))) > 20


def test_random_lengths_equal_predict_bit_for_bit():
    grid = as_grid({
        "hw": ["h100"],
        "model": ["8b", "qwen3-30b-a3b"],
        "reward_model": [None, "1b"],
        "strategy": ["single", "vote4", "bon3"],
        "output_tokens": [
            "lognormal:median=300,sigma=0.7,max=2048",
            "mix:0.6*lognormal:median=100,sigma=0.5,max=600|0.4*gamma:mean=400,shape=2,max=1500",
        ],
        "prefix_cache": [True, False],
        "concurrency": [1, 40],  # 40 x 4 sequences: windowed binomial grid
        "prompt_tokens": [16, 700, 701],
    })
    df = sweep(grid)
    rows = np.random.default_rng(3).choice(len(df), 40, replace=False)
    assert _assert_rows_equal_predict(df, grid, rows) > 20


def test_long_random_lengths_use_blocked_steps_and_still_match():
    grid = as_grid({
        "hw": ["h200"],
        "model": ["qwen2.5-0.5b"],
        "strategy": ["single", "vote8"],
        "output_tokens": ["lognormal:median=3000,sigma=0.5,max=20000"],
        "concurrency": [1, 20],
        "prompt_tokens": [100, 2000],
    })
    df = sweep(grid)
    assert _assert_rows_equal_predict(df, grid, range(len(df))) == len(df)


def test_models_that_do_not_fit_get_nan_rows_not_exceptions():
    df = sweep({"hw": "l4", "model": ["405b", "8b"], "output_tokens": [1024, 200000],
                "prompt_tokens": 512})
    assert list(df.fits) == [False, False, True, False]
    assert list(df.status) == ["out-of-memory", "context-exceeded", "ok", "context-exceeded"]
    assert df.energy_j.isna().tolist() == [True, True, False, True]
    assert df.memory_per_gpu_bytes.notna().all()
    with pytest.raises(DoesNotFitError):
        predict(hw="l4", model="405b")


def test_explicit_length_lists_take_the_slow_path_with_a_warning():
    grid = as_grid({"model": "1b", "strategy": ["vote3", "vote2"],
                    "output_tokens": ["100,200,300", 50], "concurrency": [1, 2]})
    with pytest.warns(SlowPathWarning):
        df = sweep(grid)
    listed = df[df.output_tokens_spec == "100,200,300"]
    assert set(listed.status) == {"ok", "invalid"}  # vote2 with 3 lengths is refused
    assert (listed.status == "invalid").sum() == 2
    assert _assert_rows_equal_predict(df, grid, range(len(df))) == 6


def test_phase_totals_add_left_to_right_on_every_python():
    # Python >= 3.12's sum() of floats is compensated; predict adds its phases
    # one rounding at a time, as the sweep does, so their bits cannot drift apart.
    from ttcsim.predict import running_sum

    values = [1e16, 1.0, -1e16]
    assert running_sum(values) == (1e16 + 1.0) + -1e16 == 0.0
    assert running_sum(np.array(v) for v in values) == 0.0


def test_grid_ranges_families_and_row_order():
    grid = as_grid({
        "strategy": ["single", {"name": "vote", "n": {"start": 2, "stop": 16, "factor": 2}}],
        "prompt_tokens": {"start": 100, "stop": 400, "step": 100},
        "concurrency": {"start": 1, "stop": 1000, "num": 4, "log": True},
        "output_tokens": [{"start": 256, "stop": 512, "step": 256}, "gamma:mean=100,shape=2"],
        "dtype": "fp8",
    })
    assert grid.labels["strategy"] == ("single", "vote2", "vote4", "vote8", "vote16")
    assert grid.labels["prompt_tokens"] == (100, 200, 300, 400)
    assert grid.labels["concurrency"] == (1, 10, 100, 1000)
    assert grid.labels["weight_dtype"] == ("fp8",)
    assert grid.n_scenarios == 5 * 4 * 4 * 3
    df = sweep({"prompt_tokens": [1, 2, 3], "concurrency": [1, 2], "strategy": ["single", "vote2"]})
    assert df.prompt_tokens.tolist()[:4] == [1, 2, 3, 1]  # last axis fastest
    assert df.concurrency.tolist()[:6] == [1, 1, 1, 2, 2, 2]
    assert df.kv_dtype.tolist()[0] == "bf16"


@pytest.mark.parametrize(
    "bad, where",
    [
        ({"hardware": "h100"}, "unknown key"),
        ({"hw": "h999"}, "unknown hardware"),
        ({"strategy": "vote"}, "needs a sample count"),
        ({"prompt_tokens": 0}, "between 1"),
        ({"prompt_tokens": 1.5}, "whole number"),
        ({"concurrency": {"start": 4, "stop": 2, "step": 1}}, "below start"),
        ({"concurrency": {"start": 1, "stop": 2}}, "exactly one of"),
        ({"output_tokens": "lognormal:median=5"}, "missing sigma"),
        ({"weight_dtype": "fp32"}, "fp32"),
        ({"prefix_cache": "yes"}, "true or false"),
        ({"pue": 9}, "[1, 5]"),
        ({"tp": []}, "empty list"),
        ({"prompt_tokens": {"start": 1, "stop": 10**30, "step": 1}}, "at most"),
        ({"prompt_tokens": {"start": 0, "stop": 100, "factor": 2}}, "start >= 1"),
        ({"prompt_tokens": {"start": 1, "stop": 10**9, "factor": 1.0000001}}, "at most"),
        ({"prompt_tokens": {"start": 1, "stop": 10, "factor": "x"}}, "factor must be"),
    ],
)
def test_bad_grids_are_one_line_errors(bad, where):
    with pytest.raises(TtcsimError, match=where.replace("[", r"\[").replace("]", r"\]")):
        as_grid(bad)


def test_chunking_does_not_change_results():
    grid = {"hw": ["h100", "l40s"], "model": ["8b", "qwen3-30b-a3b"],
            "strategy": ["single", "vote4", "bon2"],
            "output_tokens": [128, "lognormal:median=200,sigma=0.5,max=1000"],
            "concurrency": [1, 4], "prompt_tokens": [64, 512, 4096]}
    whole = sweep(grid)
    parts = list(iter_sweep(grid, chunk_rows=7))
    assert max(len(p) for p in parts) == 7
    pd.testing.assert_frame_equal(pd.concat(parts, ignore_index=True), whole, check_exact=True)


def test_csv_is_pandas_to_csv_byte_for_byte_and_round_trips(tmp_path):
    grid = {"hw": ["h100", "a100"], "model": ["8b", "qwen3-30b-a3b"],
            "strategy": ["single", "bon2"], "output_tokens": [1, 256, 100_000],
            "concurrency": [1, 3], "prompt_tokens": [1, 5000],
            "usd_per_kwh": 0.1, "carbon_g_per_kwh": 300}
    df = sweep(grid)
    report = write_sweep(grid, tmp_path / "out.csv", chunk_rows=10)
    text = (tmp_path / "out.csv").read_text()
    assert text == df.to_csv(index=False, lineterminator="\n")
    assert report.rows == len(df) and report.format == "csv"
    # pandas 3 parses floats exactly by default; pandas 2 (Python 3.10) needs asking
    exact = {} if int(pd.__version__.split(".")[0]) >= 3 else {"float_precision": "round_trip"}
    back = pd.read_csv(tmp_path / "out.csv", **exact)
    for col in df.columns:
        if df[col].dtype == float:
            assert np.array_equal(back[col].to_numpy(), df[col].to_numpy(), equal_nan=True), col


def test_format_floats_matches_repr():
    rng = np.random.default_rng(1)
    x = np.concatenate([
        rng.random(20_000) * 10.0 ** rng.integers(-12, 24, 20_000),
        -rng.random(100) * 1e3,
        2.0 ** rng.integers(-60, 60, 500),
        rng.integers(0, 2**53, 500).astype(float),
        [0.0, -0.0, np.inf, -np.inf, 0.1, 0.3, 1e16, 1e15, 123.0, 1e-4, 1e-5, 5e-324, 1e300,
         2.0**-1022, 1 / 3, 1e22, 1e23, 9.999999999999999e22, 577687892517859.2],
    ])
    data, mask = format_floats(x)
    got = [bytes(data[i][mask[i]]).decode() for i in range(x.size)]
    assert got == [repr(float(v)) for v in x]
    data, mask = format_floats(np.array([np.nan]))
    assert not mask.any()


@pytest.mark.skipif(not parquet_available(), reason="pyarrow not installed")
def test_parquet_round_trip(tmp_path):
    grid = {"model": ["8b", "405b"], "strategy": ["single", "vote4"], "prompt_tokens": [10, 20]}
    df = sweep(grid)
    write_sweep(grid, tmp_path / "out.parquet", chunk_rows=3)
    back = pd.read_parquet(tmp_path / "out.parquet")
    pd.testing.assert_frame_equal(back, df, check_exact=True, check_categorical=False)


def test_writer_refuses_to_overwrite_without_force_and_leaves_no_partial_file(tmp_path):
    out = tmp_path / "r.csv"
    out.write_text("keep")
    with pytest.raises(TtcsimError, match="exists"):
        write_sweep({"model": "1b"}, out, overwrite=False)
    assert out.read_text() == "keep"
    with pytest.raises(TtcsimError):
        write_sweep({"model": "1b"}, tmp_path / "r.parquet" if not parquet_available()
                    else tmp_path / "r.bin", fmt="xml")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.csv"]


def test_progress_bar_draws_on_its_stream():
    stream = io.StringIO()
    bar = ProgressBar(10, stream=stream)
    bar.update(10)
    bar.close()
    assert "100.0%" in stream.getvalue() and "10/10" in stream.getvalue()


def test_example_grid_loads():
    grid = load_grid(ROOT / "examples" / "sweep_grid.yaml")
    text = (ROOT / "examples" / "sweep_grid.yaml").read_text()
    assert f"{grid.n_scenarios:,}" in text
    sweeper = Sweeper(grid)
    cols = sweeper.columns(0, 100)
    assert len(cols["energy_j"]) == 100


def test_cli_sweep_writes_a_table(tmp_path):
    grid = tmp_path / "g.yaml"
    grid.write_text("model: [1b, 8b]\nstrategy: [single, vote3]\nprompt_tokens: [100, 200]\n")
    out = tmp_path / "r.csv"
    runner = CliRunner()
    result = runner.invoke(main, ["sweep", str(grid), "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "wrote 8 rows" in result.output
    assert len(pd.read_csv(out)) == 8
    again = runner.invoke(main, ["sweep", str(grid), "--out", str(out)])
    assert again.exit_code == 2 and "exists" in again.output
    dry = runner.invoke(main, ["sweep", str(grid), "--out", str(out), "--dry-run"])
    assert dry.exit_code == 0 and "8 scenarios" in dry.output


def test_cli_sweep_bad_grid_is_exit_2(tmp_path):
    grid = tmp_path / "g.yaml"
    grid.write_text("model: [nosuchmodel]\n")
    result = CliRunner().invoke(main, ["sweep", str(grid), "--out", str(tmp_path / "r.csv")])
    assert result.exit_code == 2
    assert "unknown model" in result.output
    broken = tmp_path / "b.yaml"
    broken.write_text("model: [1b\n")
    result = CliRunner().invoke(main, ["sweep", str(broken), "--out", str(tmp_path / "r.csv")])
    assert result.exit_code == 2 and "invalid YAML" in result.output


def test_cli_sweep_reports_the_slow_path(tmp_path):
    grid = tmp_path / "g.yaml"
    grid.write_text("model: 1b\noutput_tokens: ['10,20']\nstrategy: vote2\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = CliRunner().invoke(
            main, ["sweep", str(grid), "--out", str(tmp_path / "r.csv"), "--no-progress"]
        )
    assert result.exit_code == 0, result.output
    assert "slow path" in result.output


def test_sweep_cli_plot_draws_the_table(tmp_path):
    from click.testing import CliRunner

    from ttcsim.cli import main

    grid = tmp_path / "g.yaml"
    grid.write_text(
        "hw: h100\nmodel: 1b\nstrategy: [single, vote4]\n"
        "output_tokens: [128, 512, 2048]\nconcurrency: [1, 4]\n"
    )
    out, png = tmp_path / "r.csv", tmp_path / "r.png"
    r = CliRunner().invoke(main, ["sweep", str(grid), "--out", str(out), "--plot", str(png)])
    assert r.exit_code == 0, r.output
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = CliRunner().invoke(main, ["sweep", str(grid), "--out", str(out), "--force",
                                  "--plot", str(png), "--y", "no_such_column"])
    assert r.exit_code == 2 and "cannot plot" in r.output
    r = CliRunner().invoke(main, ["sweep", str(grid), "--out", str(out), "--force",
                                  "--plot", str(png), "--y", "hw"])
    assert r.exit_code == 2 and "not numeric" in r.output


def test_sweep_plot_places_length_labels_that_are_not_numbers(tmp_path):
    """The default x axis (output_tokens_spec) mixing fixed lengths and distributions."""
    from click.testing import CliRunner

    from ttcsim.cli import main

    grid = tmp_path / "g.yaml"
    grid.write_text("hw: h100\nmodel: 1b\nstrategy: [single, vote4]\n"
                    "output_tokens: [512, 'lognormal:median=200,sigma=0.5,max=1024', 128]\n")
    out, png = tmp_path / "r.csv", tmp_path / "r.png"
    r = CliRunner().invoke(main, ["sweep", str(grid), "--out", str(out), "--plot", str(png)])
    assert r.exit_code == 0, r.output
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"



def test_grid_file_with_a_key_twice_is_refused_at_its_line(tmp_path):
    """As for profiles: plain YAML would keep the last ``hw:`` and drop an axis silently."""
    from ttcsim.sweep import load_grid

    grid = tmp_path / "g.yaml"
    grid.write_text("hw: [h100]\nmodel: 8b\nhw: [a100]\n")
    with pytest.raises(TtcsimError, match=r"g\.yaml:3: invalid YAML .*duplicate key 'hw'"):
        load_grid(grid)
