"""Fit a profile's model parameters to measurements.

Two inverses of the forward model, each returning exactly the
:class:`~ttcsim.hardware.ModelParameters` that :mod:`ttcsim.simulator` takes:

* :func:`fit_windows` -- from microbenchmark windows of ``calibrate run``
  (idle, weight streaming, GEMMs, decode attention, reference decoder).
  Efficiencies come from the windows' times; the power coefficients from a
  non-negative least-squares fit of every window's energy::

      E_i - P_idle * t_i = P_active * t_i + e_B * bytes_i + e_F * flops_i

* :func:`fit_runs` -- from a handful of whole-run records.  Minimises, over
  the chosen parameters ``theta`` (in log space, within bounds)::

      sum_runs [log(E_pred / E_meas)]^2 + [log(t_pred / t_meas)]^2 (+ phase times)
        + w_prior^2 * sum_k [log(theta_k / theta_base_k)]^2

  The weak prior keeps parameters the runs do not determine at the base
  profile's values instead of letting them wander.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field

import numpy as np
from scipy import optimize

from ttcsim.calibration.records import RunRecord
from ttcsim.calibration.validate import predict_record, summarize
from ttcsim.errors import TtcsimError
from ttcsim.hardware import CalibrationInfo, HardwareProfile, ModelParameters
from ttcsim.models import get_model
from ttcsim.simulator.coefficients import pass_coefficients
from ttcsim.simulator.roofline import forward_pass

#: Parameters fit_runs adjusts by default, with their bounds.
RUN_FIT_BOUNDS: dict[str, tuple[float, float]] = {
    "active_power_w": (1.0, 900.0),
    "hbm_energy_j_per_byte": (1e-12, 2e-9),
    "compute_energy_j_per_flop": (1e-14, 1e-11),
    "weight_stream_efficiency": (0.2, 1.0),
    "attention_decode_efficiency": (0.05, 1.0),
    "gemm_efficiency": (0.1, 1.0),
    "attention_prefill_efficiency": (0.05, 1.0),
    "layer_overhead_s": (1e-8, 2e-4),
    "step_overhead_s": (1e-7, 2e-2),
}

DEFAULT_PRIOR_WEIGHT = 0.02


@dataclass
class FitReport:
    """What a fit did: parameters before/after and residuals [%]."""

    parameters_before: dict[str, float]
    parameters_after: dict[str, float]
    residuals_pct: dict[str, float] = field(default_factory=dict)
    per_item: list[dict] = field(default_factory=list)
    n_items: int = 0


def _bounded(name: str, value: float) -> float:
    lo, hi = RUN_FIT_BOUNDS.get(name, (-math.inf, math.inf))
    return float(min(max(value, lo), hi))


def _with(profile: HardwareProfile, values: dict[str, float]) -> HardwareProfile:
    params = profile.parameters.model_copy(update=values)
    # re-validate bounds and cross-checks
    params = ModelParameters.model_validate(params.model_dump())
    return profile.model_copy(update={"parameters": params})


def _run_residuals(profile: HardwareProfile, runs: list[RunRecord]) -> tuple[np.ndarray, list]:
    res, rows = [], []
    for run in runs:
        p = predict_record(run, profile)
        e_pred = p.energy_j * run.concurrent_queries
        t_pred = p.batch_latency_s
        res += [math.log(e_pred / run.energy_j), math.log(t_pred / run.latency_s)]
        for key, pred in (
            ("prefill_latency_s", p.prefill_latency_s),
            ("decode_latency_s", p.decode_latency_s),
            ("score_latency_s", p.score_latency_s),
        ):
            meas = getattr(run, key)
            if meas and pred > 0 and meas > 1e-3:
                res.append(0.5 * math.log(pred / meas))
        rows.append(
            {
                "id": run.label,
                "energy_j": run.energy_j,
                "energy_j_pred": e_pred,
                "latency_s": run.latency_s,
                "latency_s_pred": t_pred,
            }
        )
    return np.asarray(res), rows


def fit_runs(
    runs: list[RunRecord],
    base: HardwareProfile,
    parameters: list[str] | None = None,
    prior_weight: float = DEFAULT_PRIOR_WEIGHT,
    method_note: str = "calibrate fit --runs",
) -> tuple[HardwareProfile, FitReport]:
    """Fit ``parameters`` of ``base`` to run records (see module docstring).

    ``idle_power_w`` is not fitted: when the records carry a measured
    ``idle_power_w`` their median replaces the base value.
    """
    if not runs:
        raise TtcsimError("no runs to fit")
    names = list(parameters or RUN_FIT_BOUNDS)
    unknown = [n for n in names if n not in RUN_FIT_BOUNDS]
    if unknown:
        raise TtcsimError(f"cannot fit {unknown}; fittable: {list(RUN_FIT_BOUNDS)}", "--params")
    idle = [r.idle_power_w for r in runs if r.idle_power_w]
    start = base
    if idle:
        start = _with(base, {"idle_power_w": float(np.median(idle))})
    before = start.parameters.model_dump()
    x0 = np.log([_bounded(n, before[n]) for n in names])
    lo = np.log([RUN_FIT_BOUNDS[n][0] for n in names])
    hi = np.log([RUN_FIT_BOUNDS[n][1] for n in names])
    limit = start.datasheet.power_limit_w

    def residuals(x: np.ndarray) -> np.ndarray:
        values = dict(zip(names, np.exp(x), strict=True))
        if values.get("active_power_w", 0) + start.parameters.idle_power_w >= limit:
            values["active_power_w"] = limit - start.parameters.idle_power_w - 1.0
        r, _ = _run_residuals(_with(start, values), runs)
        return np.concatenate([r, prior_weight * (x - x0)])

    sol = optimize.least_squares(residuals, x0, bounds=(lo, hi), x_scale=1.0, diff_step=1e-3)
    values = dict(zip(names, (float(v) for v in np.exp(sol.x)), strict=True))
    fitted = _with(start, values)
    _, rows = _run_residuals(fitted, runs)
    e_err = [abs(r["energy_j_pred"] / r["energy_j"] - 1) * 100 for r in rows]
    t_err = [abs(r["latency_s_pred"] / r["latency_s"] - 1) * 100 for r in rows]
    resid = {f"energy_{k}_pct": v for k, v in summarize(e_err).items() if k != "n"}
    resid |= {f"latency_{k}_pct": v for k, v in summarize(t_err).items() if k != "n"}
    info = CalibrationInfo(
        status="calibrated",
        method=f"{method_note}: least squares on {len(runs)} run records "
        f"(log energy and latency, prior weight {prior_weight}) from {base.name}",
        date=dt.date.today().isoformat(),
        gpu_name=base.provenance.parameters.gpu_name or base.display_name,
        driver_version=base.provenance.parameters.driver_version,
        residuals={k: round(v, 3) for k, v in resid.items()},
        notes=f"fitted: {', '.join(names)}",
    )
    out = fitted.with_parameters(fitted.parameters, info)
    report = FitReport(before, out.parameters.model_dump(), resid, rows, len(runs))
    return out, report


# --------------------------------------------------------------------------- windows


def _median(values: list[float], default: float) -> float:
    return float(np.median(values)) if values else default


def _model_from_phase(phase: str) -> str:
    """``decoder_<model>_b<batch>`` -> ``<model>``."""
    parts = phase.split("_")
    if len(parts) < 3 or parts[0] != "decoder":
        raise TtcsimError(f"decoder window {phase!r} names no model")
    return "_".join(parts[1:-1])


def fit_windows(
    windows: list[dict],
    base: HardwareProfile,
    *,
    gpu_name: str | None = None,
    driver_version: str | None = None,
    trace: str | None = None,
    date: str | None = None,
) -> tuple[HardwareProfile, FitReport]:
    """Fit model parameters from microbenchmark windows (see module docstring).

    Each window dict has ``kind`` (idle, weight_stream, gemm, attention_decode,
    decoder), per-iteration ``time_s``, ``energy_j``, ``hbm_bytes``, ``flops``
    and shape fields.  Efficiencies: ``weight_stream_efficiency`` = median of
    ``bytes / (B_hbm * t)`` over memory-bound weight-streaming windows;
    ``gemm_efficiency`` = best ``flops / (R_peak * t)`` over GEMMs;
    ``attention_decode_efficiency`` = median ``bytes / (B_hbm * t)`` over
    attention windows.  Decoder windows (``model``, ``batch``,
    ``context_tokens``) give the fixed per-layer overhead: measured step time
    minus the model's roofline step time, divided by the layer count.
    """
    ds = base.datasheet
    p0 = base.parameters
    bw, peak = ds.hbm_bandwidth_bytes_per_s, ds.peak_flops_per_s["bf16"]
    by_kind: dict[str, list[dict]] = {}
    for w in windows:
        if w.get("time_s", 0) > 0 and w.get("energy_j", 0) > 0:
            by_kind.setdefault(w["kind"], []).append(w)
    if "idle" not in by_kind:
        raise TtcsimError("calibration windows lack an idle window")
    idle_w = _median([w["energy_j"] / w["time_s"] for w in by_kind["idle"]], p0.idle_power_w)

    ws = by_kind.get("weight_stream", [])
    mem_bound = [w for w in ws if w["flops"] / peak < 0.5 * w["hbm_bytes"] / bw]
    eta_w = _median(
        [w["hbm_bytes"] / (bw * w["time_s"]) for w in mem_bound], p0.weight_stream_efficiency
    )
    gemms = by_kind.get("gemm", [])
    eta_g = max([w["flops"] / (peak * w["time_s"]) for w in gemms], default=p0.gemm_efficiency)
    att = by_kind.get("attention_decode", [])
    eta_a = _median(
        [w["hbm_bytes"] / (bw * w["time_s"]) for w in att], p0.attention_decode_efficiency
    )

    # power: NNLS of E - P_idle t = P_act t + e_B bytes + e_F flops over busy windows
    busy = ws + gemms + att + by_kind.get("decoder", [])
    values: dict[str, float] = {
        "idle_power_w": idle_w,
        "weight_stream_efficiency": min(eta_w, 1.0),
        "gemm_efficiency": min(eta_g, 1.0),
        "attention_decode_efficiency": min(eta_a, 1.0),
    }
    per_item = []
    if len(busy) >= 3:
        a = np.array([[w["time_s"], w["hbm_bytes"], w["flops"]] for w in busy], dtype=float)
        y = np.array([w["energy_j"] - idle_w * w["time_s"] for w in busy], dtype=float)
        # relative errors: weight each window by 1 / its energy
        scale = 1.0 / np.array([w["energy_j"] for w in busy])
        col = a.max(axis=0)
        coef, _ = optimize.nnls(a * scale[:, None] / col, y * scale)
        coef = coef / col
        limit = ds.power_limit_w
        values["active_power_w"] = float(min(coef[0], limit - idle_w - 1.0))
        values["hbm_energy_j_per_byte"] = float(coef[1])
        values["compute_energy_j_per_flop"] = float(coef[2])
        pred = idle_w * a[:, 0] + a @ coef
        for w, e_pred in zip(busy, pred, strict=True):
            per_item.append(
                {
                    "phase": w.get("phase", w["kind"]),
                    "energy_j": w["energy_j"],
                    "energy_j_pred": float(e_pred),
                }
            )
    fitted = _with(base, values)

    # fixed per-layer overhead from decoder windows: measured step time minus the
    # roofline time of the same step with the overheads set to zero
    dec = by_kind.get("decoder", [])
    if dec:
        no_overhead = _with(fitted, {"layer_overhead_s": 1e-8})
        over = []
        for w in dec:
            spec = get_model(w.get("model") or _model_from_phase(w.get("phase", "")))
            c = pass_coefficients(no_overhead, spec)
            x = w["batch"] * w["context_tokens"]
            t_roof = float(forward_pass(c, w["batch"], x, x).time_s)
            over.append((w["time_s"] - t_roof) / spec.n_layers)
        layer = float(np.median(over))
        fitted = _with(fitted, {"layer_overhead_s": min(max(layer, 1e-8), 2e-4)})

    errs = [abs(i["energy_j_pred"] / i["energy_j"] - 1) * 100 for i in per_item]
    resid = {f"window_energy_{k}_pct": v for k, v in summarize(errs).items() if k != "n"}
    info = CalibrationInfo(
        status="calibrated",
        method=(
            "ttcsim calibrate run: idle window; efficiencies from weight-streaming, GEMM and "
            "decode-attention windows; NNLS power fit over all busy windows; layer overhead "
            "from reference-decoder windows"
        ),
        date=date or dt.date.today().isoformat(),
        gpu_name=gpu_name or base.display_name,
        driver_version=driver_version,
        trace=trace,
        residuals={k: round(v, 3) for k, v in resid.items() if math.isfinite(v)},
    )
    out = fitted.with_parameters(fitted.parameters, info)
    return out, FitReport(p0.model_dump(), out.parameters.model_dump(), resid, per_item, len(busy))
