"""Benchmark of ``ttcsim predict`` (issue 2): cold start of the CLI and time per predict() call.

    python bench/bench_predict.py              # 7 cold starts, 5 timing rounds, medians
    python bench/bench_predict.py --runs 11

Cold start: wall time of a fresh ``ttcsim predict --hw h100 --model 8b --strategy vote5``
process (console script, so interpreter start-up and every import are included), and of
``python -c "import ttcsim.cli"`` for the import part alone.  Per call: median over
timing rounds of the mean time of repeated ``predict()`` calls in one process (first
call excluded: it loads the profile and model catalog).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

CALLS = {
    "single, fixed 1024 tokens": dict(strategy="single", output_tokens="1024"),
    "vote5, fixed 1024 tokens": dict(strategy="vote5", output_tokens="1024"),
    "bon8, fixed 1024 tokens, Q=16": dict(strategy="bon8", output_tokens="1024", concurrency=16),
    "single, lognormal, no percentiles": dict(
        strategy="single", output_tokens="lognormal:median=800,sigma=0.7,max=8192",
        percentiles=False),
    "vote5, lognormal, no percentiles": dict(
        strategy="vote5", output_tokens="lognormal:median=800,sigma=0.7,max=8192",
        percentiles=False),
    "vote5, lognormal, with p50/p90/p99": dict(
        strategy="vote5", output_tokens="lognormal:median=800,sigma=0.7,max=8192"),
}


def cold_start(argv: list[str], runs: int) -> float:
    """Median wall time of ``runs`` fresh processes [s]."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def per_call(kwargs: dict, rounds: int, budget_s: float = 1.0) -> float:
    """Median over rounds of the mean time per predict() call [s]."""
    from ttcsim.predict import predict

    predict(**kwargs)
    means = []
    for _ in range(rounds):
        n, start = 0, time.perf_counter()
        while True:
            predict(**kwargs)
            n += 1
            elapsed = time.perf_counter() - start
            if elapsed > budget_s / rounds and n >= 3:
                break
        means.append(elapsed / n)
    return statistics.median(means)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="cold starts per command")
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds per call")
    args = parser.parse_args()
    exe = shutil.which("ttcsim")
    cli = [exe] if exe else [sys.executable, "-m", "ttcsim.cli"]
    predict_cmd = cli + ["predict", "--hw", "h100", "--model", "8b", "--strategy", "vote5"]
    print(f"cold start `{' '.join(['ttcsim'] + predict_cmd[len(cli):])}`: "
          f"{cold_start(predict_cmd, args.runs) * 1e3:7.0f} ms (median of {args.runs})")
    imp = [sys.executable, "-c", "import ttcsim.cli"]
    print(f"cold start `python -c 'import ttcsim.cli'`:            "
          f"{cold_start(imp, args.runs) * 1e3:7.0f} ms (median of {args.runs})")
    base = [sys.executable, "-c", "pass"]
    print(f"cold start `python -c pass` (interpreter alone):       "
          f"{cold_start(base, args.runs) * 1e3:7.0f} ms (median of {args.runs})")
    for label, kwargs in CALLS.items():
        t = per_call(kwargs, args.rounds)
        print(f"predict() {label:<36} {t * 1e3:9.3f} ms/call  ({1 / t:9,.0f} calls/s)")
    print(f"load average: {os.getloadavg()}  cores: {os.cpu_count()}")


if __name__ == "__main__":
    main()
