"""HF transformers ``generate`` on the H200 (validation/h200-hf) predicted by ttcsim.

Usage::

    python bench/hf_validation.py            # the tables of docs/VALIDATION.md
    python bench/hf_validation.py --runs     # and every run's errors

Protocol (``docs/VALIDATION.md``, "HF transformers on H200"): the shipped
``hf-transformers`` engine profile was fitted (``calibrate fit --fit engine``,
hardware fixed) on the 6 runs of ``validation/h200-hf/fit_runs.txt`` only,
chosen by the rule written in that file before any held-out comparison.
Errors of the fitted profile are reported on the 22 other runs, split into the
main held-out set, the repeats (``-rep4``, ``-rep``) and the second
configurations (``-eager``, ``-static``).  Zero-shot predictors on all 28 runs:
the datasheet-default profile this fit started from
(``validation/h200-hf/hf-transformers-prior.yaml``) and the ``reference``
engine (ttcsim's lean decoder, no host time).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ttcsim.calibration.records import read_runs  # noqa: E402
from ttcsim.calibration.validate import compare_run, summarize  # noqa: E402
from ttcsim.hardware import get_profile  # noqa: E402

DATA = ROOT / "validation" / "h200-hf"
FIT_RUNS = DATA / "fit_runs.txt"
PRIOR = DATA / "hf-transformers-prior.yaml"
VARIANTS = ("-eager", "-static")
REPEATS = ("-rep4", "-rep")


def fit_ids(path: Path = FIT_RUNS) -> list[str]:
    """The frozen fit split: one run id a line, ``#`` comments."""
    return [s.strip() for s in path.read_text().splitlines() if s.strip() and not s.startswith("#")]


def group(run_id: str) -> str:
    """``variant``, ``repeat`` or ``main`` (by the id's suffix)."""
    if run_id.endswith(VARIANTS):
        return "variant"
    if run_id.endswith(REPEATS):
        return "repeat"
    return "main"


def evaluate(runs, hw, engine) -> list[dict]:
    """Per run: id, group, energy / latency / TPOT absolute percentage errors [%]."""
    out = []
    for r in runs:
        c = compare_run(r, hw, engine)
        out.append({"id": r.label, "group": group(r.label), "e": c.energy_ape,
                    "t": c.latency_ape, "tpot": c.tpot_ape,
                    "e_meas": c.energy_j, "e_pred": c.energy_j_pred})
    return out


def _row(name: str, rows: list[dict]) -> str:
    e, t, p = (summarize([r[k] for r in rows if r[k] is not None]) for k in ("e", "t", "tpot"))
    return (f"| {name} | {len(rows)} | {e['median']:.1f} / {e['p90']:.1f} / {e['max']:.1f} | "
            f"{t['median']:.1f} | {p['median']:.1f} |")


def repeat_spread(runs) -> list[str]:
    """Within-run spread of the repeated windows and, for 8B p512, across runs."""
    lines = ["| run | energy per window J | spread (max-min)/mean | CV |", "|---|---|---|---|"]
    for r in runs:
        if len(r.energy_j_repeats or []) > 1:
            v = np.asarray(r.energy_j_repeats)
            lines.append(f"| {r.label} | {', '.join(f'{x:.1f}' for x in v)} | "
                         f"{(v.max() - v.min()) / v.mean() * 100:.1f} % | "
                         f"{v.std(ddof=1) / v.mean() * 100:.1f} % |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", action="store_true", help="print every run's errors")
    args = ap.parse_args(argv)
    runs = read_runs(DATA / "runs.jsonl")
    hw = get_profile("h200")
    fit = set(fit_ids())
    held = [r for r in runs if r.label not in fit]
    shipped = evaluate(held, hw, "hf-transformers")
    print("Fitted (shipped hf-transformers), held out; energy median / p90 / max, latency and "
          "TPOT median [%]")
    print("| runs | n | energy | latency | TPOT |\n|---|---|---|---|---|")
    for name, sel in (("held out, main", "main"), ("repeats", "repeat"),
                      ("variants (-eager, -static)", "variant")):
        print(_row(name, [r for r in shipped if r["group"] == sel]))
    print(_row("all held out", shipped))
    print("\nZero-shot on all 28 runs (no fit)")
    print("| predictor | n | energy | latency | TPOT |\n|---|---|---|---|---|")
    prior = evaluate(runs, hw, str(PRIOR))
    ref = evaluate(runs, hw, "reference")
    print(_row("hf-transformers datasheet default", prior))
    print(_row("reference engine", ref))
    print("\nRepeat spread (repeated windows of one run)")
    print("\n".join(repeat_spread(runs)))
    if args.runs:
        print("\n| run | group | E meas J | E pred J | energy % | latency % | TPOT % |")
        print("|---|---|---|---|---|---|---|")
        for r in shipped:
            print(f"| {r['id']} | {r['group']} | {r['e_meas']:.0f} | {r['e_pred']:.0f} | "
                  f"{r['e']:.1f} | {r['t']:.1f} | {r['tpot']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
