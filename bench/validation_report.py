"""Held-out validation of a calibrated profile against measured run records.

Usage::

    python bench/validation_report.py \
        --runs validation/h100-a/runs.jsonl validation/h100-c/runs.jsonl \
        --profile ttcsim/hardware_profiles/h100-sxm-80gb.yaml

Protocol (fixed before any run was measured):

* zero-shot: the profile as shipped (``calibrate run`` microbenchmarks only),
  no fitting to the runs, error over every run;
* fitted: ``calibrate fit --runs`` on the :data:`FIT_IDS` runs only (<= 6),
  error reported on all other runs (held out), repeats included;
* noise floor: the relative difference between each run and its ``-rep`` twin.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ttcsim.calibration.fit import fit_runs  # noqa: E402
from ttcsim.calibration.records import read_runs  # noqa: E402
from ttcsim.calibration.validate import REFERENCE_FIT_IDS, compare_run, summarize  # noqa: E402
from ttcsim.hardware import load_profile_file  # noqa: E402

FIT_IDS = REFERENCE_FIT_IDS


def table(rows, title):
    out = [
        f"#### {title}",
        "",
        "| run | E meas [J] | E pred [J] | err | t meas [s] | t pred [s] | err |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r.id} | {r.energy_j:.1f} | {r.energy_j_pred:.1f} | {r.energy_ape:.1f} % | "
            f"{r.latency_s:.3f} | {r.latency_s_pred:.3f} | {r.latency_ape:.1f} % |"
        )
    return "\n".join(out)


def summary_line(rows, label):
    e = summarize([r.energy_ape for r in rows])
    t = summarize([r.latency_ape for r in rows])
    return (
        f"| {label} | {e['n']} | {e['median']:.1f} % | {e['p90']:.1f} % | {e['max']:.1f} % | "
        f"{t['median']:.1f} % | {t['p90']:.1f} % | {t['max']:.1f} % |"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", required=True, nargs="+", help="one or more run-record files")
    ap.add_argument("--profile", required=True)
    ap.add_argument("--fitted-out", default=None, help="write the run-fitted profile here")
    args = ap.parse_args()
    runs = [r for path in args.runs for r in read_runs(path)]
    profile = load_profile_file(args.profile)
    zero = [compare_run(r, profile) for r in runs]
    fit_set = [r for r in runs if r.id in FIT_IDS]
    held = [r for r in runs if r.id not in FIT_IDS]
    fitted, report = fit_runs(fit_set, profile, method_note="bench/validation_report.py")
    if args.fitted_out:
        Path(args.fitted_out).write_text(fitted.to_yaml())
    held_rows = [compare_run(r, fitted) for r in held]
    by_id = {r.id: r for r in runs}
    spread = []
    for r in runs:
        if r.id and r.id.endswith("-rep") and r.id[:-4] in by_id:
            a, b = by_id[r.id[:-4]], r
            spread.append(
                (r.id[:-4], abs(a.energy_j - b.energy_j) / ((a.energy_j + b.energy_j) / 2) * 100,
                 abs(a.latency_s - b.latency_s) / ((a.latency_s + b.latency_s) / 2) * 100)
            )  # fmt: skip
    print(f"profile {profile.name} ({profile.provenance.parameters.gpu_name}), {len(runs)} runs")
    print("| protocol | runs | E median | E p90 | E max | t median | t p90 | t max |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    print(summary_line(zero, "zero-shot (shipped profile)"))
    print(summary_line(held_rows, f"fitted on {len(fit_set)} runs, held-out"))
    if spread:
        se, st = np.median([s[1] for s in spread]), np.median([s[2] for s in spread])
        emax = max(s[1] for s in spread)
        tmax = max(s[2] for s in spread)
        print(
            f"| repeat spread (noise floor) | {len(spread)} pairs | {se:.1f} % | | "
            f"{emax:.1f} % | {st:.1f} % | | {tmax:.1f} % |"
        )
    print()
    print(table(zero, "zero-shot, every run"))
    print()
    print(table(held_rows, f"fitted on {', '.join(FIT_IDS)}; held-out runs"))
    print()
    print("fitted parameters:", json.dumps({k: float(f"{v:.4g}") for k, v in
                                             fitted.parameters.model_dump().items()}))  # fmt: skip


if __name__ == "__main__":
    main()
