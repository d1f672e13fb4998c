"""Compare predictions with measured run records.

Absolute percentage error: ``APE = |pred - meas| / meas * 100`` [%].  The
summary gives median, p90 and max over runs, for energy and latency.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ttcsim.calibration.records import RunRecord
from ttcsim.engines import EngineProfile, engine_from_record, get_engine
from ttcsim.engines.steady import SteadyState, steady_state
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


def record_engine(run: RunRecord, engine=None) -> EngineProfile:
    """The engine to predict a record with: the record's, or ``engine`` with its settings.

    ``engine`` (a name, path or profile; e.g. ``validate --engine``) replaces the
    profile the record names; the record's own settings (``max_num_seqs``,
    ``gpu_memory_utilization``...) still apply on top.
    """
    value = run.engine_spec
    if engine is not None:
        if isinstance(value, dict):
            value = {**value, "name": get_engine(engine)}
        else:
            value = get_engine(engine)
    try:
        return engine_from_record(value)
    except TtcsimError as exc:
        raise TtcsimError(f"run {run.label}: {exc}") from None


def predict_record(run: RunRecord, profile: HardwareProfile, engine=None) -> Prediction:
    """Predict the workload a run record describes with ttcsim (``measure: run``)."""
    reward = run.reward_model if run.reward_model and run.reward_model != run.model else None
    eng = record_engine(run, engine)
    try:
        return predict(
            hw=profile,
            model=run.model,
            strategy=run.strategy,
            prompt_tokens=run.prompt_tokens,
            output_tokens=list(run.output_tokens),
            concurrency=run.concurrent_queries,
            tp=run.tp,
            weight_dtype=run.dtype,
            prefix_cache=run.prefix_sharing,
            reward_model=reward,
            percentiles=False,
            marginal=False,
            engine=eng,
        )
    except TtcsimError as exc:
        raise TtcsimError(f"run {run.label}: {exc}") from None


def predict_steady_record(run: RunRecord, profile: HardwareProfile, engine=None) -> SteadyState:
    """Predict a ``measure: steady-state`` record (:func:`ttcsim.engines.steady.steady_state`)."""
    eng = record_engine(run, engine)
    batch = run.running_batch or run.max_num_seqs
    output = run.output_tokens
    if isinstance(output, list):
        output = ",".join(str(v) for v in output)
    try:
        return steady_state(
            hw=profile, model=run.model, engine=eng, prompt_tokens=run.prompt_tokens,
            output_tokens=output, running_batch=batch, tp=run.tp, weight_dtype=run.dtype,
        )
    except TtcsimError as exc:
        raise TtcsimError(f"run {run.label}: {exc}") from None


@dataclass(frozen=True)
class RunComparison:
    """Measured and predicted values of one run: of what the record measured.

    ``energy_j`` is the whole run's energy (``measure: run``) or the energy per
    request (``measure: steady-state``); ``latency_s`` the batch's wall time
    (None for a steady state); ``tpot_s`` the time per output token where
    measured.
    """

    id: str
    energy_j: float
    energy_j_pred: float
    latency_s: float | None
    latency_s_pred: float | None
    tpot_s: float | None = None
    tpot_s_pred: float | None = None
    measure: str = "run"

    @property
    def energy_ape(self) -> float:
        """Absolute percentage error of energy [%]."""
        return abs(self.energy_j_pred - self.energy_j) / self.energy_j * 100.0

    @property
    def latency_ape(self) -> float | None:
        """Absolute percentage error of latency [%] (None when not measured)."""
        if self.latency_s is None or self.latency_s_pred is None:
            return None
        return abs(self.latency_s_pred - self.latency_s) / self.latency_s * 100.0

    @property
    def tpot_ape(self) -> float | None:
        """Absolute percentage error of the time per output token [%] (None: not measured)."""
        if self.tpot_s is None or self.tpot_s_pred is None:
            return None
        return abs(self.tpot_s_pred - self.tpot_s) / self.tpot_s * 100.0


def predicted_tpot_s(p: Prediction, run: RunRecord, engine=None) -> float:
    """Time per output token of a run's query: ``(latency - TTFT) / (mean length - 1)``.

    With a static padded batch (HF ``generate``) every row runs until the
    longest ends, and the measured TPOT is the time per decode step:
    ``(batch latency - TTFT) / (max length - 1)``.
    """
    if record_engine(run, engine).batching.policy == "static-padded":
        max_len = float(np.max(run.output_tokens))
        return (p.batch_latency_s - p.ttft_s) / max(max_len - 1.0, 1.0)
    mean_len = float(np.mean(run.output_tokens))
    return (p.latency_s - p.ttft_s) / max(mean_len - 1.0, 1.0)


def compare_run(run: RunRecord, profile: HardwareProfile, engine=None) -> RunComparison:
    """Predict one run; totals are for the whole run (all concurrent queries)."""
    if run.measure == "steady-state":
        s = predict_steady_record(run, profile, engine)
        return RunComparison(
            id=run.label, energy_j=run.energy_j, energy_j_pred=s.energy_per_request_j,
            latency_s=None, latency_s_pred=None, tpot_s=run.tpot_s,
            tpot_s_pred=s.tpot_s if run.tpot_s is not None else None, measure=run.measure,
        )
    p = predict_record(run, profile, engine)
    return RunComparison(
        id=run.label,
        energy_j=run.energy_j,
        energy_j_pred=p.energy_j * run.concurrent_queries,
        latency_s=run.latency_s,
        latency_s_pred=p.batch_latency_s,
        tpot_s=run.tpot_s,
        tpot_s_pred=predicted_tpot_s(p, run, engine) if run.tpot_s is not None else None,
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


def _row(r: RunComparison, band) -> dict:
    """One run's JSON row, with the profile's band around its predictions."""
    from ttcsim.uncertainty import interval

    e_lo, e_hi = interval(r.energy_j_pred, band.energy_ape)
    row = {
        "id": r.id,
        "measure": r.measure,
        "energy_j": r.energy_j,
        "energy_j_pred": r.energy_j_pred,
        "energy_j_pred_low": e_lo,
        "energy_j_pred_high": e_hi,
        "energy_in_band": bool(e_lo <= r.energy_j <= e_hi),
        "energy_ape_pct": r.energy_ape,
        "latency_s": r.latency_s,
        "latency_s_pred": r.latency_s_pred,
        "latency_ape_pct": r.latency_ape,
    }
    if r.latency_s is not None and r.latency_s_pred is not None:
        t_lo, t_hi = interval(r.latency_s_pred, band.latency_ape)
        row |= {"latency_s_pred_low": t_lo, "latency_s_pred_high": t_hi,
                "latency_in_band": bool(t_lo <= r.latency_s <= t_hi)}
    if r.tpot_s is not None:
        row |= {"tpot_s": r.tpot_s, "tpot_s_pred": r.tpot_s_pred, "tpot_ape_pct": r.tpot_ape}
    return row


def validate_runs(runs: list[RunRecord], profile: HardwareProfile, engine=None) -> dict:
    """Per-run comparison and a summary, as a JSON-ready dict.

    ``engine`` replaces the engine every record names (see :func:`record_engine`).
    Each run also has the profile's band (:mod:`ttcsim.uncertainty`) around its
    prediction (``energy_j_pred_low/high``, ``latency_s_pred_low/high``) and whether
    the measured value is inside it; the summary gives the coverage.
    """
    from ttcsim.uncertainty import profile_band

    band = profile_band(profile)
    rows = [compare_run(r, profile, engine) for r in runs]
    engines = sorted({record_engine(r, engine).name for r in runs})
    out = [_row(r, band) for r in rows]
    timed = [r for r in out if "latency_in_band" in r]
    return {
        "hw": profile.name,
        "calibrated_profile": profile.calibrated,
        "profile_status": profile.provenance.parameters.status,
        "band": band.model_dump(),
        "engine": engines[0] if len(engines) == 1 else engines,
        "runs": out,
        "summary": {
            "energy_band_coverage": sum(r["energy_in_band"] for r in out) / max(len(out), 1),
            "latency_band_coverage": (
                sum(r["latency_in_band"] for r in timed) / len(timed) if timed else None),
            "energy_ape_pct": summarize([r.energy_ape for r in rows]),
            "latency_ape_pct": summarize(
                [r.latency_ape for r in rows if r.latency_ape is not None]
            ),
            "tpot_ape_pct": summarize([r.tpot_ape for r in rows if r.tpot_ape is not None]),
        },
    }
