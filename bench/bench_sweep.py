"""Benchmark of ``ttcsim sweep`` (issue 7): scenarios per second, peak memory, predict() ratio.

    python bench/bench_sweep.py                  # every case, 3 runs each, medians
    python bench/bench_sweep.py --repeat 5 --skip-10m
    python bench/bench_sweep.py --case fixed-csv # one run of one case, JSON on stdout

Each run of a case is a fresh subprocess, so its peak RSS (``resource.getrusage``,
``ru_maxrss``) is that case's alone and imports are excluded from the timed part.
Cases:

* ``fixed-eval``     1,048,576 fixed-length scenarios evaluated (no output)
* ``fixed-parquet``  the same written to Parquet (skipped without pyarrow)
* ``fixed-parquet-warm``  the same, timed after two untimed runs in the same process
* ``fixed-csv``      the same written to CSV
* ``dist-eval``      1,048,576 scenarios with random output lengths (exact expectations)
* ``dist-small-eval`` the 9,216-scenario random-length grid of earlier measurements
* ``dist-csv``       the 1,048,576 random-length scenarios written to CSV
* ``stream-10m``     10,485,760 fixed-length scenarios streamed to disk (Parquet if
  pyarrow is importable, else CSV): the memory bound
* ``dist-stream-10m`` 10,485,760 random-length scenarios streamed to disk (as above)
* ``predict-fixed`` / ``predict-dist``  a scalar loop of ``predict()`` over random rows
  of the same grids: the per-call rate the sweep is compared with
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

FIXED_GRID = {  # 4*4*2*2*4*4*2*8*64 = 1,048,576 scenarios
    "hw": ["h100", "a100", "l40s", "h200"],
    "model": ["8b", "70b", "qwen3-30b-a3b", "qwen2.5-7b"],
    "weight_dtype": ["bf16", "fp8"],
    "tp": [1, 4],
    "strategy": ["single", "vote4", "vote16", "bon8"],
    "output_tokens": [256, 1024, 4096, 16384],
    "prefix_cache": [True, False],
    "concurrency": [1, 2, 4, 8, 16, 32, 64, 128],
    "prompt_tokens": {"start": 128, "stop": 32768, "num": 64, "log": True},
}
BIG_GRID = {  # 8*10*2*2*4*4*2*8*128 = 10,485,760 scenarios
    **FIXED_GRID,
    "hw": FIXED_GRID["hw"] + ["b200", "mi300x", "h100-pcie-80gb", "a100-sxm-40gb"],
    "model": FIXED_GRID["model"]
    + ["1b", "3b", "qwen3-8b", "qwen3-14b", "qwen2.5-14b", "qwen2.5-32b"],
    "prompt_tokens": {"start": 128, "stop": 32768, "num": 128, "log": True},
}
DIST_GRID = {  # 4*4*2*2*4*4*2*8*64 = 1,048,576 scenarios, every one with random lengths
    **FIXED_GRID,
    "output_tokens": [
        "lognormal:median=300,sigma=0.7,max=2048",
        "lognormal:median=800,sigma=0.6,max=4096",
        "gamma:mean=500,shape=2,max=4096",
        "lognormal:median=2000,sigma=0.8,max=16384",
    ],
}
BIG_DIST_GRID = {**BIG_GRID, "output_tokens": DIST_GRID["output_tokens"]}  # 10,485,760
SMALL_DIST_GRID = {  # 4*2*3*3*4*32 = 9,216 scenarios (the grid of earlier measurements)
    "hw": ["h100", "a100", "l40s", "h200"],
    "model": ["8b", "qwen3-30b-a3b"],
    "strategy": ["single", "vote4", "bon4"],
    "output_tokens": DIST_GRID["output_tokens"][:3],
    "concurrency": [1, 2, 4, 8],
    "prompt_tokens": {"start": 128, "stop": 8192, "num": 32, "log": True},
}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _evaluate(grid: dict) -> dict:
    from ttcsim.sweep import DEFAULT_CHUNK_ROWS, Sweeper, as_grid, chunk_bounds

    g = as_grid(grid)
    sweeper = Sweeper(g)
    start = time.perf_counter()
    for lo, hi in chunk_bounds(g.n_scenarios, DEFAULT_CHUNK_ROWS):
        sweeper.columns(lo, hi)
    seconds = time.perf_counter() - start
    return {"rows": g.n_scenarios, "seconds": seconds}


def _write(grid: dict, fmt: str, warm_runs: int = 0) -> dict:
    from ttcsim.sweep import as_grid, write_sweep
    from ttcsim.tablewriter import parquet_available

    if fmt == "parquet" and not parquet_available():
        return {"skipped": "pyarrow not installed"}
    if fmt == "auto":
        fmt = "parquet" if parquet_available() else "csv"
    g = as_grid(grid)
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        path = os.path.join(tmp, f"sweep.{fmt}")
        for _ in range(warm_runs):  # same process, untimed: allocator and pyarrow warmed up
            write_sweep(g, path, fmt)
        start = time.perf_counter()
        report = write_sweep(g, path, fmt)
        seconds = time.perf_counter() - start
        size = os.path.getsize(path)
    return {"rows": report.rows, "seconds": seconds, "format": fmt, "file_mb": size / 2**20}


def _predict_loop(grid: dict, calls: int, budget_s: float) -> dict:
    import numpy as np

    from ttcsim.errors import TtcsimError
    from ttcsim.predict import predict
    from ttcsim.sweep import GROUP_AXES, INNER_AXES, as_grid

    g = as_grid(grid)
    axes = GROUP_AXES + INNER_AXES
    rng = np.random.default_rng(0)
    rows = [np.unravel_index(int(i), g.shape) for i in rng.integers(0, g.n_scenarios, calls)]
    kwargs = []
    for digits in rows:
        v = {a: g.axes[a][int(d)] for a, d in zip(axes, digits, strict=True)}
        kwargs.append(dict(v, percentiles=False))
    done, start = 0, time.perf_counter()
    for kw in kwargs:
        try:
            predict(**kw)
        except TtcsimError:  # does not fit: predict refuses it (the sweep writes a NaN row)
            pass
        done += 1
        if time.perf_counter() - start > budget_s:
            break
    seconds = time.perf_counter() - start
    return {"rows": done, "seconds": seconds}


CASES = {
    "fixed-eval": lambda: _evaluate(FIXED_GRID),
    "fixed-parquet": lambda: _write(FIXED_GRID, "parquet"),
    "fixed-parquet-warm": lambda: _write(FIXED_GRID, "parquet", warm_runs=2),
    "fixed-csv": lambda: _write(FIXED_GRID, "csv"),
    "dist-eval": lambda: _evaluate(DIST_GRID),
    "dist-small-eval": lambda: _evaluate(SMALL_DIST_GRID),
    "dist-csv": lambda: _write(DIST_GRID, "csv"),
    "stream-10m": lambda: _write(BIG_GRID, "auto"),
    "dist-stream-10m": lambda: _write(BIG_DIST_GRID, "auto"),
    "predict-fixed": lambda: _predict_loop(FIXED_GRID, 3000, 20.0),
    "predict-dist": lambda: _predict_loop(DIST_GRID, 200, 30.0),
}


def run_case(name: str) -> dict:
    """One run of one case in this process (imports done before the clock starts)."""
    import ttcsim.predict  # noqa: F401
    import ttcsim.sweep  # noqa: F401
    import ttcsim.tablewriter

    ttcsim.tablewriter.parquet_available()  # imports pyarrow when installed

    out = CASES[name]()
    if "rows" in out:
        out["rate_per_s"] = out["rows"] / out["seconds"]
    out["peak_rss_mb"] = _peak_rss_mb()
    out["case"] = name
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=sorted(CASES), help="run one case once (JSON out)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per case (median kept)")
    parser.add_argument("--skip-10m", action="store_true", help="skip the 10M-row streams")
    parser.add_argument("--only", nargs="*", choices=sorted(CASES), help="run only these cases")
    parser.add_argument("--json", dest="json_path", help="also write the results here")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case)))
        return
    results = {}
    for name in CASES:
        big = name.endswith("stream-10m")
        if (big and args.skip_10m) or (args.only and name not in args.only):
            continue
        repeat = 1 if big else args.repeat
        runs = []
        for _ in range(repeat):
            proc = subprocess.run(
                [sys.executable, __file__, "--case", name],
                capture_output=True, text=True, check=True,
            )
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        if "skipped" in runs[0]:
            results[name] = runs[0]
            print(f"{name:<14} skipped: {runs[0]['skipped']}")
            continue
        med = {
            "rows": runs[0]["rows"],
            "runs": len(runs),
            "seconds": statistics.median(r["seconds"] for r in runs),
            "rate_per_s": statistics.median(r["rate_per_s"] for r in runs),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
            "all_rates": [round(r["rate_per_s"]) for r in runs],
        }
        for k in ("format", "file_mb"):
            if k in runs[0]:
                med[k] = runs[0][k]
        results[name] = med
        extra = f" [{med['format']}, {med['file_mb']:.0f} MiB]" if "format" in med else ""
        print(
            f"{name:<14} {med['rows']:>10,} rows  {med['seconds']:8.2f} s  "
            f"{med['rate_per_s']:>12,.0f} /s  peak RSS {med['peak_rss_mb']:7.0f} MB  "
            f"(runs: {med['all_rates']}){extra}",
            flush=True,
        )
    for sweep_case, loop_case in (("fixed-eval", "predict-fixed"), ("dist-eval", "predict-dist")):
        if sweep_case in results and loop_case in results:
            ratio = results[sweep_case]["rate_per_s"] / results[loop_case]["rate_per_s"]
            results[f"ratio {sweep_case} / {loop_case}"] = ratio
            print(f"speed-up {sweep_case} over a predict() loop: {ratio:,.0f}x")
    print(f"load average: {os.getloadavg()}  cores: {os.cpu_count()}")
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
