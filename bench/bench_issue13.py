"""Issue 13's speed table: two source trees side by side, in one run.

    python bench/bench_issue13.py --tree before=/path/to/old/checkout --tree after=.
    python bench/bench_issue13.py --tree after=. --skip plan sweep     # quick look

Every measure runs in fresh subprocesses with ``PYTHONPATH`` set to a tree, the
trees alternating, and reports medians.  Per-call figures are **CPU time**
(``time.process_time`` inside the process), which a busy machine inflates less
than wall time; cold starts are wall time of a whole process; ``plan`` and
``sweep`` report the child's CPU time (``RUSAGE_CHILDREN``) and wall time.

Measures:

* ``predict``: ``predict(hw="h100", model="8b", strategy="vote5")`` per call
  (fixed lengths), the same with ``lognormal:median=800,sigma=0.7,max=8192``
  output lengths and ``percentiles=False``, and what the default percentiles add
  (``percentiles=True`` minus ``False``) at concurrency 1 and 64.
* ``cold``: ``python -m ttcsim.cli predict ...`` (fixed and lognormal lengths)
  and ``python -c pass``: wall time and the process's CPU time.
* ``plan``: ``ttcsim plan --hw H --model 8b --strategy vote5`` with lognormal
  lengths, for H in h100, h200, a100 (one process each: older trees crash on
  ``--hw h200,a100``, issue 16) at 3 loads (``--qps`` 5, 20, 80), and their sum.
* ``sweep``: ``bench/bench_sweep.py --case fixed-eval`` and ``dist-eval`` of the
  tree itself (1,048,576 scenarios each), scenarios per second.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

LOGNORMAL = "lognormal:median=800,sigma=0.7,max=8192"

PER_CALL = r"""
import json, statistics, sys, time
from ttcsim.predict import predict
kw = json.loads(sys.argv[1])
predict(**kw)
rounds = []
for _ in range(5):
    start, n = time.process_time(), 0
    while time.process_time() - start < 0.2 or n < 3:
        predict(**kw)
        n += 1
    rounds.append((time.process_time() - start) / n)
print(statistics.median(rounds))
"""

CALLS = {
    "vote5, fixed 1024": dict(hw="h100", model="8b", strategy="vote5"),
    "vote5, lognormal, percentiles off": dict(
        hw="h100", model="8b", strategy="vote5", output_tokens=LOGNORMAL, percentiles=False),
    "vote5, lognormal, percentiles on": dict(
        hw="h100", model="8b", strategy="vote5", output_tokens=LOGNORMAL),
    "vote5, lognormal, Q=64, percentiles off": dict(
        hw="h100", model="8b", strategy="vote5", output_tokens=LOGNORMAL, concurrency=64,
        percentiles=False),
    "vote5, lognormal, Q=64, percentiles on": dict(
        hw="h100", model="8b", strategy="vote5", output_tokens=LOGNORMAL, concurrency=64),
}


def _env(tree: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.abspath(tree)
    return env


def _child_run(argv: list[str], tree: str) -> tuple[float, float, str]:
    """(wall s, child CPU s, stdout) of one process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    out = subprocess.run(argv, env=_env(tree), capture_output=True, text=True, cwd=tree)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if out.returncode != 0:
        return wall, cpu, "FAILED: " + (out.stderr.strip().splitlines() or ["?"])[-1]
    return wall, cpu, out.stdout


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", required=True,
                        help="NAME=PATH of a source tree (repeat; the first is the baseline)")
    parser.add_argument("--repeat", type=int, default=3, help="processes per per-call figure")
    parser.add_argument("--cold-runs", type=int, default=7, help="processes per cold start")
    parser.add_argument("--skip", nargs="*", default=[], choices=["predict", "cold", "plan",
                                                                   "sweep"])
    parser.add_argument("--json", dest="json_path", help="also write the results here")
    args = parser.parse_args()
    trees = dict(t.split("=", 1) for t in args.tree)
    py = sys.executable
    rows: list[tuple[str, str, dict]] = []  # (measure, unit, {tree: value})

    if "predict" not in args.skip:
        for label, kw in CALLS.items():
            got: dict[str, list[float]] = {name: [] for name in trees}
            for _ in range(args.repeat):
                for name, path in trees.items():
                    _, _, out = _child_run([py, "-c", PER_CALL, json.dumps(kw)], path)
                    if not out.startswith("FAILED"):
                        got[name].append(float(out) * 1e3)
            rows.append((f"predict {label}", "ms CPU/call",
                         {n: _median(v) for n, v in got.items()}))

    if "cold" not in args.skip:
        commands = {
            "cold start `ttcsim predict --hw h100 --model 8b --strategy vote5`":
                ["-m", "ttcsim.cli", "predict", "--hw", "h100", "--model", "8b",
                 "--strategy", "vote5"],
            "cold start, the same with --output-tokens lognormal":
                ["-m", "ttcsim.cli", "predict", "--hw", "h100", "--model", "8b",
                 "--strategy", "vote5", "--output-tokens", LOGNORMAL],
            "cold start `python -c pass`": ["-c", "pass"],
        }
        for label, argv in commands.items():
            walls = {name: [] for name in trees}
            cpus = {name: [] for name in trees}
            for _ in range(args.cold_runs):
                for name, path in trees.items():
                    wall, cpu, out = _child_run([py, *argv], path)
                    if not out.startswith("FAILED"):
                        walls[name].append(wall * 1e3)
                        cpus[name].append(cpu * 1e3)
            rows.append((label, "ms wall", {n: _median(v) for n, v in walls.items()}))
            rows.append((label, "ms CPU", {n: _median(v) for n, v in cpus.items()}))

    if "plan" not in args.skip:
        cpu_all = {name: 0.0 for name in trees}
        wall_all = {name: 0.0 for name in trees}
        for qps in ("5", "20", "80"):
            for hw in ("h100", "h200", "a100"):
                for name, path in trees.items():
                    argv = [py, "-m", "ttcsim.cli", "plan", "--hw", hw, "--model", "8b",
                            "--strategy", "vote5", "--qps", qps, "--output-tokens", LOGNORMAL,
                            "--slo-ttft-p90-ms", "2000", "--slo-tpot-p90-ms", "50",
                            "--slo-e2e-p90-s", "60"]
                    wall, cpu, out = _child_run(argv, path)
                    bad = out.startswith("FAILED")
                    cpu_all[name] += float("nan") if bad else cpu
                    wall_all[name] += float("nan") if bad else wall
                    rows.append((f"plan --hw {hw} --qps {qps} (tp 1,2,4,8)", "s CPU",
                                 {name: float("nan") if bad else cpu}))
        rows.append(("plan, 3 GPUs x 3 loads together", "s CPU", cpu_all))
        rows.append(("plan, 3 GPUs x 3 loads together", "s wall", wall_all))

    if "sweep" not in args.skip:
        for case in ("fixed-eval", "dist-eval"):
            for name, path in trees.items():
                bench = os.path.join(os.path.abspath(path), "bench", "bench_sweep.py")
                _, _, out = _child_run([py, bench, "--case", case], path)
                rate = float("nan")
                if not out.startswith("FAILED"):
                    rate = float(json.loads(out.strip().splitlines()[-1])["rate_per_s"])
                rows.append((f"sweep {case}", "scenarios/s", {name: rate}))

    merged: dict[tuple[str, str], dict] = {}
    for label, unit, values in rows:
        merged.setdefault((label, unit), {}).update(values)
    names = list(trees)
    print("| measure | unit | " + " | ".join(names) + " |")
    print("| --- | --- | " + " | ".join("---:" for _ in names) + " |")
    for (label, unit), values in merged.items():
        cells = [f"{values.get(n, float('nan')):,.3g}" for n in names]
        print(f"| {label} | {unit} | " + " | ".join(cells) + " |")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump([{"measure": k[0], "unit": k[1], **v} for k, v in merged.items()], f,
                      indent=1)


if __name__ == "__main__":
    main()
