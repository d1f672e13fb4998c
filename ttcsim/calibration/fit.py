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
    "attention_prefill_efficiency": (0.05, 1.0),
    "layer_overhead_s": (1e-8, 2e-4),
    "step_overhead_s": (1e-7, 2e-2),
    "prefill_overhead_s": (1e-6, 0.5),
    # fittable on request (--params), not by default: the microbenchmarks measure
    # them directly, and a handful of runs cannot separate them from the above
    "gemm_efficiency": (0.1, 1.0),
    "attention_energy_j_per_flop": (1e-14, 1e-9),
    "attention_half_parallelism": (1e-3, 1e4),
    "roofline_exponent": (1.0, 64.0),
}
#: Starting values for parameters a base profile leaves at 0 (datasheet defaults).
UNSET_START = {"prefill_overhead_s": 2e-3, "attention_half_parallelism": 10.0}

#: What fit_runs adjusts unless told otherwise: static and memory power, the
#: per-layer decode overhead and the per-prefill overhead.  Efficiencies and
#: energy per FLOP come from the microbenchmarks; a handful of whole runs
#: cannot separate them from these four (fitting them too made held-out errors
#: worse on our H100 data: docs/VALIDATION.md).
DEFAULT_RUN_FIT = (
    "active_power_w",
    "hbm_energy_j_per_byte",
    "layer_overhead_s",
    "prefill_overhead_s",
)

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
    names = list(parameters or DEFAULT_RUN_FIT)
    unknown = [n for n in names if n not in RUN_FIT_BOUNDS]
    if unknown:
        raise TtcsimError(f"cannot fit {unknown}; fittable: {list(RUN_FIT_BOUNDS)}", "--params")
    idle = [r.idle_power_w for r in runs if r.idle_power_w]
    start = base
    if idle:
        if np.median(idle) >= base.datasheet.power_limit_w - 2.0:  # P_active >= 1 W must fit
            raise TtcsimError(f"median idle_power_w of the records, {np.median(idle):g} W, is "
                              f"not below the power limit {base.datasheet.power_limit_w:g} W")
        start = _with(base, {"idle_power_w": float(np.median(idle))})
    before = start.parameters.model_dump()
    # a parameter the base leaves unset (0) starts from a typical value, with no prior
    unset = np.array([before[n] <= RUN_FIT_BOUNDS[n][0] for n in names])
    x0 = np.log([UNSET_START.get(n, 1.0) if u else _bounded(n, before[n])
                 for n, u in zip(names, unset, strict=True)])  # fmt: skip
    prior = np.where(unset, 0.0, prior_weight)
    lo = np.log([RUN_FIT_BOUNDS[n][0] for n in names])
    hi = np.log([RUN_FIT_BOUNDS[n][1] for n in names])
    limit = start.datasheet.power_limit_w

    def residuals(x: np.ndarray) -> np.ndarray:
        values = dict(zip(names, np.exp(x), strict=True))
        if values.get("active_power_w", 0) + start.parameters.idle_power_w >= limit:
            values["active_power_w"] = limit - start.parameters.idle_power_w - 1.0
        r, _ = _run_residuals(_with(start, values), runs)
        return np.concatenate([r, prior * (x - x0)])

    try:
        sol = optimize.least_squares(residuals, x0, bounds=(lo, hi), x_scale=1.0, diff_step=1e-3)
    except ValueError as exc:  # residuals not finite: a prediction of 0 J or 0 s
        raise TtcsimError(f"the fit failed: {exc}") from None
    values = dict(zip(names, (float(v) for v in np.exp(sol.x)), strict=True))
    if values.get("active_power_w", 0) + start.parameters.idle_power_w >= limit:  # as residuals()
        values["active_power_w"] = limit - start.parameters.idle_power_w - 1.0
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


def _clock_scale(w: dict, f_max: float) -> float:
    clk = w.get("mean_sm_clock_mhz") or f_max
    return float(min(max(clk / f_max, 0.05), 1.0))


def _attention_calls(w: dict, spec_kv_elements_per_token: float, dtype_bytes: float) -> float:
    """Number of attention kernel calls (layers) in an attention window."""
    per_call = spec_kv_elements_per_token * w["batch"] * w["context_tokens"] * dtype_bytes
    return max(1.0, round(w["hbm_bytes"] / per_call))


def _fit_roofline_exponent(rows: list[tuple[float, float, float]], default: float) -> float:
    """``p`` minimising ``sum log((t_m^p + t_c^p)^(1/p) / t)^2`` over (t_m, t_c, t) rows."""
    if not rows:
        return default
    grid = np.concatenate([np.linspace(1.0, 4.0, 61), [5, 6, 8, 12, 16, 32, 64]])
    t_m, t_c, t = (np.array(v) for v in zip(*rows, strict=True))
    err = [
        np.sum(np.log(np.power(t_m**p + t_c**p, 1.0 / p) / t) ** 2) if p < 64 else
        np.sum(np.log(np.maximum(t_m, t_c) / t) ** 2)
        for p in grid
    ]  # fmt: skip
    return float(grid[int(np.argmin(err))])


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

    Each window has ``kind`` (idle, weight_stream, gemm, attention_decode,
    decoder), per-iteration ``time_s``, ``energy_j``, ``hbm_bytes``, ``flops``,
    ``avg_power_w``, ``mean_sm_clock_mhz`` and shape fields.  A window is
    *power-limited* when its power is within 5 % of the limit or its clock is
    more than 3 % under the highest clock seen.  Steps, each the inverse of one
    term of the forward model:

    1. ``idle_power_w``: the last idle window (context held, after work).
    2. ``weight_stream_efficiency``: median ``bytes / (B_hbm t)`` of unthrottled
       memory-bound weight-streaming windows.
    3. ``gemm_efficiency``: median ``FLOP / (R_peak s t)`` of GEMM windows, with
       ``s`` the measured clock scale (so it is the rate at full clock).
    4. ``roofline_exponent``: the ``p`` that best fits the weight-streaming
       windows near the ridge point.
    5. ``attention_decode_efficiency`` and ``attention_half_parallelism``: per-call
       time ``t0 + bytes / (B_hbm eta u / (u + u_half))`` fitted over the
       attention windows, ``u`` = batch x KV heads (``t0`` is per-layer
       overhead, measured again by the decoder windows).
    6. power: NNLS over the unthrottled windows,
       ``E - P_idle t = P_active t + e_B bytes + e_F FLOP_gemm + e_A FLOP_attn``.
    7. ``dvfs_energy_exponent``: from power-limited GEMMs,
       ``s^gamma = (E - P_static t - e_B bytes) / (e_F FLOP)``.
    8. ``layer_overhead_s``: decoder windows' measured step time minus the
       model's step time without overheads, per layer.
    """
    from ttcsim.simulator import architecture as arch

    ds = base.datasheet
    p0 = base.parameters
    bw, peak, limit = ds.hbm_bandwidth_bytes_per_s, ds.peak_flops_per_s["bf16"], ds.power_limit_w
    good = [w for w in windows if w.get("time_s", 0) > 0 and w.get("energy_j", 0) > 0]
    idle = [w for w in good if w["kind"] == "idle"]
    if not idle:
        raise TtcsimError("calibration windows lack an idle window")
    busy = [w for w in good if w["kind"] != "idle"]
    if not busy:
        raise TtcsimError("calibration windows hold no busy window")
    idle_w = idle[-1]["energy_j"] / idle[-1]["time_s"]
    f_max = max((w.get("mean_sm_clock_mhz") or 0.0) for w in busy) or 1.0

    def power(w):
        return w["energy_j"] / w["time_s"]

    def limited(w):
        return power(w) > 0.95 * limit or _clock_scale(w, f_max) < 0.97

    kinds = ("weight_stream", "gemm", "attention_decode", "decoder")
    ws, gemms, att, dec = ([w for w in busy if w["kind"] == k] for k in kinds)

    mem_bound = [w for w in ws if not limited(w) and w["flops"] / peak < 0.2 * w["hbm_bytes"] / bw]
    eta_w = _median([w["hbm_bytes"] / (bw * w["time_s"]) for w in mem_bound],
                    p0.weight_stream_efficiency)  # fmt: skip
    compute_bound = [w for w in gemms if w["flops"] / peak > 2.0 * w["hbm_bytes"] / bw]
    eta_g = _median(
        [w["flops"] / (peak * _clock_scale(w, f_max) * w["time_s"]) for w in compute_bound],
        p0.gemm_efficiency,
    )
    eta_g = min(eta_g, 1.0)
    near_ridge = [
        (w["hbm_bytes"] / (bw * eta_w), w["flops"] / (peak * eta_g * _clock_scale(w, f_max)),
         w["time_s"])
        for w in ws if w not in mem_bound
    ]  # fmt: skip
    p_roof = _fit_roofline_exponent(near_ridge, p0.roofline_exponent)

    llama = get_model("llama-3.1-8b")
    kv_el = 2.0 * llama.n_kv_heads * llama.head_dim  # per token per layer
    eta_a, half = p0.attention_decode_efficiency, p0.attention_half_parallelism
    if len(att) >= 3:
        # per call: t = t0 + bytes / (B * eta * u / (u + u_half)), u = batch * n_kv
        calls = np.array([_attention_calls(w, kv_el, 2.0) for w in att])
        x = np.array([w["hbm_bytes"] for w in att]) / calls
        y = np.array([w["time_s"] for w in att]) / calls
        u = np.array([w["batch"] * llama.n_kv_heads for w in att], dtype=float)

        def resid(theta):
            t0, eta, uh = np.exp(theta)
            return np.log((t0 + x * (u + uh) / (bw * eta * u)) / y)

        sol = optimize.least_squares(
            resid, np.log([5e-6, 0.7, 10.0]), bounds=(np.log([1e-8, 0.05, 1e-3]),
                                                      np.log([1e-3, 1.0, 1e4])),
        )  # fmt: skip
        _, eta_a, half = (float(v) for v in np.exp(sol.x))

    def split_flops(w):
        """(GEMM FLOP, attention FLOP) of a window."""
        if w["kind"] == "attention_decode":
            return 0.0, w["flops"]
        if w["kind"] == "decoder":
            spec = get_model(w.get("model") or _model_from_phase(w.get("phase", "")))
            f_att = w["batch"] * w["context_tokens"] * arch.attention_flops_per_token_pair(spec)
            return max(w["flops"] - f_att, 0.0), f_att
        return w["flops"], 0.0

    values: dict[str, float] = {
        "idle_power_w": idle_w,
        "weight_stream_efficiency": min(eta_w, 1.0),
        "gemm_efficiency": eta_g,
        "roofline_exponent": p_roof,
        "attention_decode_efficiency": eta_a,
        "attention_half_parallelism": half,
    }
    per_item = []
    free = [w for w in busy if not limited(w)]
    if len(free) >= 4:
        a = np.array([[w["time_s"], w["hbm_bytes"], *split_flops(w)] for w in free], dtype=float)
        y = np.array([w["energy_j"] - idle_w * w["time_s"] for w in free], dtype=float)
        scale = 1.0 / np.array([w["energy_j"] for w in free])
        col = np.maximum(a.max(axis=0), 1e-300)
        coef, _ = optimize.nnls(a * scale[:, None] / col, y * scale)
        coef = coef / col
        values["active_power_w"] = float(min(coef[0], limit - idle_w - 1.0))
        values["hbm_energy_j_per_byte"] = float(coef[1])
        if coef[2] > 0:
            values["compute_energy_j_per_flop"] = float(coef[2])
        if coef[3] > 0:
            values["attention_energy_j_per_flop"] = float(coef[3])
        pred = idle_w * a[:, 0] + a @ coef
        for w, e_pred in zip(free, pred, strict=True):
            per_item.append({"phase": w.get("phase", w["kind"]), "energy_j": w["energy_j"],
                             "energy_j_pred": float(e_pred)})  # fmt: skip
        static = idle_w + values["active_power_w"]
        e_flop = values.get("compute_energy_j_per_flop", p0.compute_energy_j_per_flop)
        gammas = []
        for w in gemms:
            s_clk = _clock_scale(w, f_max)
            ratio = (w["energy_j"] - static * w["time_s"] - coef[1] * w["hbm_bytes"]) / (
                e_flop * w["flops"]
            )
            if limited(w) and s_clk < 0.97 and 0 < ratio < 1:
                gammas.append(np.log(ratio) / np.log(s_clk))
        if gammas:
            values["dvfs_energy_exponent"] = float(min(max(np.median(gammas), 0.0), 4.0))
    fitted = _with(base, values)

    # fixed per-layer overhead from decoder windows: measured step time minus the
    # model's step time with the per-layer overhead set to zero
    if dec:
        no_overhead = _with(fitted, {"layer_overhead_s": 1e-8})
        over = []
        for w in dec:
            spec = get_model(w.get("model") or _model_from_phase(w.get("phase", "")))
            c = pass_coefficients(no_overhead, spec)
            x = w["batch"] * w["context_tokens"]
            t_model = float(forward_pass(c, w["batch"], x, x).time_s)
            over.append((w["time_s"] - t_model) / spec.n_layers)
        layer = float(np.median(over))
        fitted = _with(fitted, {"layer_overhead_s": min(max(layer, 1e-8), 2e-4)})

    errs = [abs(i["energy_j_pred"] / i["energy_j"] - 1) * 100 for i in per_item]
    resid = {f"window_energy_{k}_pct": v for k, v in summarize(errs).items() if k != "n"}
    info = CalibrationInfo(
        status="calibrated",
        method=(
            "ttcsim calibrate run: microbenchmark windows (idle, weight streaming, GEMMs, "
            "decode attention, reference decoder) fitted by ttcsim.calibration.fit.fit_windows"
        ),
        date=date or dt.date.today().isoformat(),
        gpu_name=gpu_name or base.display_name,
        driver_version=driver_version,
        trace=trace,
        residuals={k: round(v, 3) for k, v in resid.items() if math.isfinite(v)},
    )
    out = fitted.with_parameters(fitted.parameters, info)
    return out, FitReport(p0.model_dump(), out.parameters.model_dump(), resid, per_item, len(busy))
