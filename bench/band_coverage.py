"""Size a profile's error band on some runs and measure its coverage on others.

Usage::

    python bench/band_coverage.py --profile ttcsim/hardware_profiles/h100-sxm-80gb.yaml \
        --size-runs validation/h100-a/runs.jsonl \
        --check-runs validation/h100-b/runs.jsonl validation/h100-c/runs.jsonl \
                     validation/h100-d/runs.jsonl

Protocol (held out): the band is the p85 APE (``ttcsim.uncertainty.BAND_QUANTILE``)
of the profile's zero-shot predictions on ``--size-runs``; coverage is the share
of ``--check-runs`` whose measured energy (latency) lies inside
``[pred / (1 + w), pred / (1 - w)]``, and the width is the median of
``(high - low) / pred`` on them.  ``--band E,T`` skips the sizing and checks a
given band (e.g. the datasheet-default 0.5,0.5 or a transfer check's spread);
``--transfer-from`` prices the check runs with the profile transferred from that
calibrated YAML (``bench/transfer_check.py``'s rule).  ``--split a|b`` (one machine,
e.g. the H200): the runs of ``--check-runs`` are grouped by id (a ``-rep`` with its
original), the groups sorted by id and dealt alternately into halves a and b; the
band is sized on the named half and checked on the other.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ttcsim.calibration.records import read_runs  # noqa: E402
from ttcsim.calibration.validate import compare_run  # noqa: E402
from ttcsim.hardware import load_profile_file  # noqa: E402
from ttcsim.uncertainty import BAND_QUANTILE, band_ape_from_errors, interval  # noqa: E402


def coverage(rows, e_ape: float, t_ape: float) -> dict:
    """Share of runs inside the band and the band's median relative width."""
    inside_e = [interval(r.energy_j_pred, e_ape)[0] <= r.energy_j <= interval(
        r.energy_j_pred, e_ape)[1] for r in rows]
    inside_t = [interval(r.latency_s_pred, t_ape)[0] <= r.latency_s <= interval(
        r.latency_s_pred, t_ape)[1] for r in rows]
    width = lambda w: 1 / (1 - w) - 1 / (1 + w)  # noqa: E731  (high - low) / pred
    return {
        "n": len(rows),
        "energy_coverage": float(np.mean(inside_e)),
        "latency_coverage": float(np.mean(inside_t)),
        "energy_width": width(e_ape),
        "latency_width": width(t_ape),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", required=True)
    ap.add_argument("--size-runs", nargs="*", default=[])
    ap.add_argument("--check-runs", nargs="+", required=True)
    ap.add_argument("--band", default=None, help="energy,latency APE to check instead of sizing")
    ap.add_argument("--transfer-from", default=None, help="calibrated YAML to transfer from")
    ap.add_argument("--transfer-family", default=None)
    ap.add_argument("--split", choices=("a", "b"), default=None)
    args = ap.parse_args()
    if args.transfer_from:
        from transfer_check import transferred

        target = load_profile_file(args.profile).name
        profile = transferred(args.transfer_from, args.transfer_family, target)
    else:
        profile = load_profile_file(args.profile)
    if args.band:
        e_ape, t_ape = (float(x) for x in args.band.split(","))
        how = f"given band {e_ape:g}, {t_ape:g}"
    elif args.split:
        runs = [r for p in args.check_runs for r in read_runs(p)]
        groups = sorted({r.label.removesuffix("-rep") for r in runs})
        half = {g: "ab"[i % 2] for i, g in enumerate(groups)}
        size = [compare_run(r, profile) for r in runs
                if half[r.label.removesuffix("-rep")] == args.split]
        e_ape = band_ape_from_errors([r.energy_ape / 100 for r in size])
        t_ape = band_ape_from_errors([r.latency_ape / 100 for r in size])
        how = f"p{BAND_QUANTILE:g} APE of the {len(size)} runs of half {args.split}"
    else:
        size = [compare_run(r, profile) for p in args.size_runs for r in read_runs(p)]
        e_ape = band_ape_from_errors([r.energy_ape / 100 for r in size])
        t_ape = band_ape_from_errors([r.latency_ape / 100 for r in size])
        how = f"p{BAND_QUANTILE:g} APE of {len(size)} sizing runs"
    check = [compare_run(r, profile) for p in args.check_runs for r in read_runs(p)]
    if args.split:
        check = [c for c in check if half[c.id.removesuffix("-rep")] != args.split]
    c = coverage(check, e_ape, t_ape)
    print(f"profile {profile.name}: band energy {e_ape:.4f}, latency {t_ape:.4f} ({how})")
    print("| check runs | energy coverage | energy width | latency coverage | latency width |")
    print("|---:|---:|---:|---:|---:|")
    print(f"| {c['n']} | {c['energy_coverage'] * 100:.0f} % | {c['energy_width'] * 100:.0f} % | "
          f"{c['latency_coverage'] * 100:.0f} % | {c['latency_width'] * 100:.0f} % |")


if __name__ == "__main__":
    main()
