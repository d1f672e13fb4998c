"""Accuracy and speed of the O(batch) random-length expectation against the full grid sum.

    python bench/bench_expectation.py            # table on stdout
    python bench/bench_expectation.py --json out.json

For every scenario (GPU x model x length distribution x (n, N, prefix sharing)
x prompt length) it evaluates ``ttcsim.simulator.expectation.expected_decode``
(what ``predict()`` and ``ttcsim sweep`` use) and ``reference_decode_totals``
(the definition, every ``(step, batch)`` cell priced by ``forward_pass``), and
reports the relative differences of batch time, energy and one query's wait,
separately for scenarios where some decode step reaches the power limit (their
bands are priced by Gauss nodes) and where none does (closed form only).
Timings: building the deployment-independent expectation, evaluating it for one
prompt, and the reference sum, medians over scenarios.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

DEPLOYMENTS = [("h100", "1b", 1), ("h100", "8b", 1), ("h100", "70b", 4), ("a100", "8b", 1),
               ("h200", "qwen3-30b-a3b", 1), ("l40s", "8b", 1)]
LENGTHS = [
    "lognormal:median=300,sigma=0.7,max=2048",
    "gamma:mean=500,shape=2,max=4096",
    "lognormal:median=2000,sigma=0.8,max=16384",
]
BATCHES = [(1, 1, False), (4, 4, True), (32, 4, False), (64, 16, True), (256, 4, True),
           (512, 8, False)]
PROMPTS = [128.0, 2048.0, 16384.0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", dest="json_path", help="also write the results here")
    args = parser.parse_args()

    from ttcsim.distributions import parse_lengths
    from ttcsim.hardware import get_profile
    from ttcsim.models import get_model
    from ttcsim.simulator.coefficients import pass_coefficients
    from ttcsim.simulator.expectation import (
        decode_expectation,
        expected_decode_totals,
        reference_decode_totals,
    )

    rows = []
    survivals = {spec: parse_lengths(spec).survival_steps() for spec in LENGTHS}
    builds = {}
    for spec, (n, per, _) in itertools.product(LENGTHS, BATCHES):
        start = time.perf_counter()
        builds[spec, n, per] = decode_expectation(survivals[spec], n, per)
        builds[spec, n, per, "s"] = time.perf_counter() - start
    for (hw, model, tp), spec, (n, per, shared), prompt in itertools.product(
        DEPLOYMENTS, LENGTHS, BATCHES, PROMPTS
    ):
        c = pass_coefficients(get_profile(hw), get_model(model), "bf16", "bf16", tp)
        exp = builds[spec, n, per]
        start = time.perf_counter()
        t, _, e, q = expected_decode_totals(c, exp, [prompt], shared)
        fast_s = time.perf_counter() - start
        start = time.perf_counter()
        rt, re_, rq, _, limited = reference_decode_totals(
            c, prompt, survivals[spec], n, per, shared)
        ref_s = time.perf_counter() - start
        rows.append({
            "hw": hw, "model": model, "lengths": spec, "n": n, "samples": per,
            "shared": shared, "prompt": prompt, "power_limited": limited,
            "time_err": abs(t[0] / rt - 1), "energy_err": abs(e[0] / re_ - 1),
            "query_err": abs(q[0] / rq - 1), "fast_s": fast_s, "reference_s": ref_s,
            "build_s": builds[spec, n, per, "s"],
        })

    print(f"{len(rows)} scenarios ({len(DEPLOYMENTS)} deployments x {len(LENGTHS)} length "
          f"distributions x {len(BATCHES)} (n, N, sharing) x {len(PROMPTS)} prompts)")
    print(f"{'scenarios':<28} {'count':>5} {'time max':>9} {'energy max':>11} "
          f"{'query max':>10} {'energy median':>14}")
    for label, sel in (("no step at the power limit", False), ("some steps at the limit", True)):
        part = [r for r in rows if r["power_limited"] == sel]
        if not part:
            continue
        print(f"{label:<28} {len(part):>5} {max(r['time_err'] for r in part):>9.1e} "
              f"{max(r['energy_err'] for r in part):>11.1e} "
              f"{max(r['query_err'] for r in part):>10.1e} "
              f"{statistics.median(r['energy_err'] for r in part):>14.1e}")
    med = {k: statistics.median(r[k] for r in rows) for k in ("fast_s", "reference_s")}
    build = statistics.median(builds[k] for k in builds if k[-1] == "s")
    print(f"median per scenario: expected_decode_totals {med['fast_s'] * 1e3:.2f} ms, "
          f"reference grid sum {med['reference_s'] * 1e3:.1f} ms; "
          f"median build (per distribution, n, N) {build * 1e3:.1f} ms")
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
