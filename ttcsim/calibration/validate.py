"""Compare predictions with measured run records.

Absolute percentage error: ``APE = |pred - meas| / meas * 100`` [%].  The
summary gives median, p90 and max over runs, for energy and latency.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ttcsim.calibration.records import RunRecord
from ttcsim.errors import TtcsimError
from ttcsim.hardware import HardwareProfile
from ttcsim.predict import Prediction, predict

#: The <= 6 runs of the project's held-out protocol (docs/VALIDATION.md): fitted
#: with ``calibrate fit --runs``, every other run of the campaign is reported.
#: Chosen to span the regimes (small/large model, long prompt, batch, parallel
#: samples, scoring) before any run was measured.
REFERENCE_FIT_IDS = (
    "1b-single-p512",
    "3b-single-p8192",
    "3b-bon4",
    "8b-vote16",
    "8b-single-q64",
    "14b-single",
)


def predict_record(run: RunRecord, profile: HardwareProfile) -> Prediction:
    """Predict the workload a run record describes with ttcsim."""
    reward = run.reward_model if run.reward_model and run.reward_model != run.model else None
    try:
        return predict(
            hw=profile,
            model=run.model,
            strategy=run.strategy,
            prompt_tokens=run.prompt_tokens,
            output_tokens=list(run.output_tokens),
            concurrency=run.concurrent_queries,
            weight_dtype=run.dtype,
            prefix_cache=run.prefix_sharing,
            reward_model=reward,
            percentiles=False,
        )
    except TtcsimError as exc:
        raise TtcsimError(f"run {run.label}: {exc}") from None


@dataclass(frozen=True)
class RunComparison:
    """Measured and predicted totals of one run."""

    id: str
    energy_j: float
    energy_j_pred: float
    latency_s: float
    latency_s_pred: float

    @property
    def energy_ape(self) -> float:
        """Absolute percentage error of energy [%]."""
        return abs(self.energy_j_pred - self.energy_j) / self.energy_j * 100.0

    @property
    def latency_ape(self) -> float:
        """Absolute percentage error of latency [%]."""
        return abs(self.latency_s_pred - self.latency_s) / self.latency_s * 100.0


def compare_run(run: RunRecord, profile: HardwareProfile) -> RunComparison:
    """Predict one run; totals are for the whole run (all concurrent queries)."""
    p = predict_record(run, profile)
    return RunComparison(
        id=run.label,
        energy_j=run.energy_j,
        energy_j_pred=p.energy_j * run.concurrent_queries,
        latency_s=run.latency_s,
        latency_s_pred=p.batch_latency_s,
    )


def summarize(errors_pct: list[float]) -> dict[str, float]:
    """Median, p90 and max of absolute percentage errors."""
    a = np.asarray(errors_pct, dtype=float)
    if a.size == 0:
        return {"median": float("nan"), "p90": float("nan"), "max": float("nan"), "n": 0}
    return {
        "median": float(np.median(a)),
        "p90": float(np.percentile(a, 90)),
        "max": float(a.max()),
        "n": int(a.size),
    }


def validate_runs(runs: list[RunRecord], profile: HardwareProfile) -> dict:
    """Per-run comparison and a summary, as a JSON-ready dict.

    Each run also has the profile's band (:mod:`ttcsim.uncertainty`) around its
    prediction (``energy_j_pred_low/high``, ``latency_s_pred_low/high``) and whether
    the measured value is inside it; the summary gives the coverage.
    """
    from ttcsim.uncertainty import interval, profile_band

    band = profile_band(profile)
    rows = [compare_run(r, profile) for r in runs]
    out = []
    for r in rows:
        e_lo, e_hi = interval(r.energy_j_pred, band.energy_ape)
        t_lo, t_hi = interval(r.latency_s_pred, band.latency_ape)
        out.append({
            "id": r.id,
            "energy_j": r.energy_j,
            "energy_j_pred": r.energy_j_pred,
            "energy_j_pred_low": e_lo,
            "energy_j_pred_high": e_hi,
            "energy_in_band": bool(e_lo <= r.energy_j <= e_hi),
            "energy_ape_pct": r.energy_ape,
            "latency_s": r.latency_s,
            "latency_s_pred": r.latency_s_pred,
            "latency_s_pred_low": t_lo,
            "latency_s_pred_high": t_hi,
            "latency_in_band": bool(t_lo <= r.latency_s <= t_hi),
            "latency_ape_pct": r.latency_ape,
        })
    n = max(len(out), 1)
    return {
        "hw": profile.name,
        "calibrated_profile": profile.calibrated,
        "profile_status": profile.provenance.parameters.status,
        "band": band.model_dump(),
        "runs": out,
        "summary": {
            "energy_ape_pct": summarize([r.energy_ape for r in rows]),
            "latency_ape_pct": summarize([r.latency_ape for r in rows]),
            "energy_band_coverage": sum(r["energy_in_band"] for r in out) / n,
            "latency_band_coverage": sum(r["latency_in_band"] for r in out) / n,
        },
    }
