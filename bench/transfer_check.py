"""Check the transfer rules: move a calibrated profile onto another GPU, compare with its runs.

Usage::

    python bench/transfer_check.py --source ttcsim/hardware_profiles/h100-sxm-80gb.yaml \
        --target h200-sxm-141gb --runs validation/h200-a/runs.jsonl
    python bench/transfer_check.py --source validation/h200-a/profile.yaml \
        --target h100-sxm-80gb --runs validation/h100-*/runs.jsonl

The target contributes only its datasheet and its :data:`ttcsim.transfer.FAMILIES`
entry (memory technology, process node, clock); its idle power is TDP-scaled from
the source (a published idle figure of the target is not used here), so no
measurement of the target GPU enters the prediction.  Every run of the target is
reported (none was used).  ``--band-out`` writes the energy and latency APE at
the p85 (the band quantile) as JSON, for the profiles' transferred bands.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ttcsim.calibration.records import read_runs  # noqa: E402
from ttcsim.calibration.validate import compare_run, summarize  # noqa: E402
from ttcsim.hardware import CalibrationInfo, get_profile, load_profile_file  # noqa: E402
from ttcsim.transfer import FAMILIES, transfer_parameters  # noqa: E402
from ttcsim.uncertainty import BAND_QUANTILE  # noqa: E402


def transferred(source_path: str, source_name: str | None, target: str):
    """The target profile with parameters transferred from the profile at ``source_path``."""
    src = load_profile_file(source_path)
    fam_name = source_name or src.name
    tgt = get_profile(target)
    params, info = transfer_parameters(src, FAMILIES[fam_name], tgt.datasheet, FAMILIES[target])
    record = CalibrationInfo(
        status="transferred",
        method=f"bench/transfer_check.py from {source_path}",
        transfer=info.model_copy(update={"source_profile": fam_name}),
    )
    return tgt.with_parameters(params, record).checked()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", required=True, help="calibrated profile YAML to transfer from")
    ap.add_argument("--source-family", default=None, help="FAMILIES key of the source "
                    "(default: its profile name)")
    ap.add_argument("--target", required=True, help="shipped profile whose datasheet receives it")
    ap.add_argument("--runs", required=True, nargs="+")
    ap.add_argument("--band-out", default=None)
    ap.add_argument("--rows", action="store_true", help="print every run")
    args = ap.parse_args()
    profile = transferred(args.source, args.source_family, args.target)
    runs = [r for p in args.runs for r in read_runs(p)]
    rows = [compare_run(r, profile) for r in runs]
    e = summarize([r.energy_ape for r in rows])
    t = summarize([r.latency_ape for r in rows])
    signed = np.median([(r.energy_j_pred - r.energy_j) / r.energy_j * 100 for r in rows])
    print(f"transfer {args.source} -> {args.target}: {len(rows)} runs of the target")
    print("| runs | E median | E p90 | E max | E signed median | t median | t p90 | t max |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {e['n']} | {e['median']:.1f} % | {e['p90']:.1f} % | {e['max']:.1f} % | "
          f"{signed:+.1f} % | {t['median']:.1f} % | {t['p90']:.1f} % | {t['max']:.1f} % |")
    if args.rows:
        for r in rows:
            print(f"  {r.id:<28} E {r.energy_ape:5.1f} %  t {r.latency_ape:5.1f} %  "
                  f"(pred/meas E {r.energy_j_pred / r.energy_j:.3f}, "
                  f"t {r.latency_s_pred / r.latency_s:.3f})")
    src_name = args.source_family or profile.provenance.parameters.transfer.source_profile
    band = {
        "name": f"{src_name} -> {args.target}",
        "command": "python bench/transfer_check.py " + " ".join(sys.argv[1:]),
        "n_runs": len(rows),
        "energy_ape": round(float(np.percentile([r.energy_ape for r in rows], BAND_QUANTILE))
                            / 100, 4),
        "latency_ape": round(float(np.percentile([r.latency_ape for r in rows], BAND_QUANTILE))
                             / 100, 4),
        "energy_median_pct": round(e["median"], 2),
        "energy_max_pct": round(e["max"], 2),
        "energy_signed_median_pct": round(float(signed), 2),
        "latency_median_pct": round(t["median"], 2),
        "latency_max_pct": round(t["max"], 2),
    }
    print(f"p{BAND_QUANTILE:g} APE: energy {band['energy_ape']:.3f}, "
          f"latency {band['latency_ape']:.3f}")
    if args.band_out:  # one entry per direction, replaced when rerun
        path = Path(args.band_out)
        data = json.loads(path.read_text()) if path.exists() else {
            "quantile": BAND_QUANTILE, "directions": []}
        data["directions"] = [d for d in data["directions"] if d["name"] != band["name"]]
        data["directions"].append(band)
        data["directions"].sort(key=lambda d: d["name"])
        path.write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    main()
