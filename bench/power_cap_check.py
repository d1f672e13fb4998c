"""Power-limit what-ifs against measured and published behaviour.

Usage::

    python bench/power_cap_check.py

(a) Natural cap: the campaign runs whose prefill ttcsim prices at the 700 W limit
    (validation/h100-*, validation/h200-a) against the other runs: the throttle's
    error is the error of the runs it prices.
(b) Published: Ma et al., "The Illusion of Power Capping in LLM Decode" (arXiv
    2605.11999, H200): decode draws 137-300 W on a 700 W H200 and no cap triggers
    in decode.  ttcsim: decode power of an 8B model on the H200 profile and the
    highest cap that slows decode by more than 1 %.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ttcsim.calibration.records import read_runs  # noqa: E402
from ttcsim.calibration.validate import compare_run, predict_record  # noqa: E402
from ttcsim.hardware import get_profile  # noqa: E402
from ttcsim.predict import predict  # noqa: E402

ROOT = Path(__file__).resolve().parents[1] / "validation"


def natural_cap() -> None:
    print("(a) runs priced at the 700 W limit vs the others (zero-shot, shipped profiles)")
    print("| GPU | limited runs | E median | E max | t median | other runs | E median | t median |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for hw, dirs in (("h100", ["h100-a", "h100-b", "h100-c", "h100-d"]), ("h200", ["h200-a"])):
        profile = get_profile(hw)
        lim, free = [], []
        for d in dirs:
            for r in read_runs(ROOT / d / "runs.jsonl"):
                c = compare_run(r, profile)
                (lim if predict_record(r, profile).power_limited else free).append(c)
        med = lambda rows, k: np.median([getattr(x, k) for x in rows])  # noqa: E731
        print(f"| {hw} | {len(lim)} | {med(lim, 'energy_ape'):.1f} % | "
              f"{max(x.energy_ape for x in lim):.1f} % | {med(lim, 'latency_ape'):.1f} % | "
              f"{len(free)} | {med(free, 'energy_ape'):.1f} % | {med(free, 'latency_ape'):.1f} % |")


def decode_on_h200() -> None:
    print()
    print("(b) 8B decode on the H200 (1,024-token prompt, 512 output tokens per sequence)")
    print("| batch | avg decode power W | highest cap slowing decode > 1 % |")
    print("|---:|---:|---:|")
    for batch in (1, 8, 32, 64):
        base = predict(hw="h200", prompt_tokens=1024, output_tokens=512, concurrency=batch,
                       percentiles=False, marginal=False)
        dec_w = base.energy_decode_j * batch / base.decode_latency_s
        hit = None
        for cap in range(700, 199, -10):
            r = predict(hw="h200", prompt_tokens=1024, output_tokens=512, concurrency=batch,
                        percentiles=False, marginal=False, power_limit_w=cap)
            if r.decode_latency_s > 1.01 * base.decode_latency_s:
                hit = cap
                break
        print(f"| {batch} | {dec_w:.0f} | {hit if hit else 'none >= 200'} W |")


if __name__ == "__main__":
    natural_cap()
    decode_on_h200()
