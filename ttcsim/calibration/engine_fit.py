"""Fit an engine profile, a hardware profile, or both, to run records.

The inverse of the forward model with the engine layer: minimise over the
chosen parameters ``theta`` (log space, within bounds that are part of the
problem -- :func:`scipy.optimize.least_squares` with ``bounds``)::

    sum_runs [log(E_pred / E_meas)]^2 + [log(t_pred / t_meas)]^2 + [log(TPOT_pred / TPOT_meas)]^2
      + 0.25 [log(phase time ratios)]^2
      + w_prior^2 sum_k [log(theta_k / theta_base_k)]^2

(the time terms where the record has them; steady-state records give energy
per request and TPOT).  The prior is a ridge toward the base profiles' values
in log space; a parameter the base leaves at 0 starts from a typical value
with no prior.

**Never a validation error.**  Every bound lies inside the schema's, and the
hardware cross-checks are enforced by construction
(:func:`feasible_hardware_values`: active power and memory power are clipped
so that ``P_idle + P_active + e_B B_hbm < P_limit``); a run whose prediction
fails (it does not fit in memory, say) is left out and reported; if nothing
can be predicted the base profiles come back unchanged with that said in the
report.  What is returned always loads.

**Identifiability.**  At the solution the Jacobian ``J`` of the data residuals
in log parameters gives the condition number of ``J^T J`` and the correlation
matrix ``C_ij / sqrt(C_ii C_jj)`` of ``C = (J^T J)^+``.  A parameter whose
column is below :data:`MIN_SENSITIVITY` of the largest, or the less sensitive
of a pair with ``|corr| >`` :data:`MAX_CORRELATION`, is held at its prior
and the rest refitted; both lists go into the report and the profile's
provenance.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field

import numpy as np
from scipy import optimize

from ttcsim.calibration.fit import DEFAULT_RUN_FIT, RUN_FIT_BOUNDS, UNSET_START
from ttcsim.calibration.records import RunRecord
from ttcsim.calibration.validate import compare_run, record_engine, summarize
from ttcsim.engines.schema import EngineCalibration, EngineProfile
from ttcsim.errors import TtcsimError
from ttcsim.hardware import CalibrationInfo, HardwareProfile, ModelParameters

#: Engine parameters the fit may adjust (dotted names) and their bounds.
ENGINE_FIT_BOUNDS: dict[str, tuple[float, float]] = {
    "host.step_s": (1e-6, 0.5),
    "host.per_layer_s": (1e-8, 5e-3),
    "host.per_tp_rank_s": (1e-7, 0.05),
    "host.per_sequence_s": (1e-8, 5e-3),
    "host.prefill_s": (1e-6, 0.5),
    "host.per_prefill_token_s": (1e-10, 5e-4),
    "host.gap_power_fraction": (1e-3, 1.0),
    "host.overlap": (1e-3, 0.999),
    "kernels.weight_stream_efficiency_scale": (0.1, 2.0),
    "kernels.gemm_efficiency_scale": (0.1, 2.0),
    "kernels.attention_decode_efficiency_scale": (0.06, 2.0),
    "kernels.attention_prefill_efficiency_scale": (0.06, 2.0),
    "kv_cache.append_copy_factor": (1e-3, 8.0),
}
#: Starting values for engine parameters a base profile leaves at 0.
ENGINE_UNSET_START = {
    "host.step_s": 1e-3, "host.per_layer_s": 1e-5, "host.per_tp_rank_s": 1e-3,
    "host.per_sequence_s": 1e-5,
    "host.prefill_s": 1e-3, "host.per_prefill_token_s": 1e-7, "host.gap_power_fraction": 0.5,
    "host.overlap": 0.5, "kv_cache.append_copy_factor": 1.0,
}
#: What ``--fit engine`` adjusts unless told otherwise.
DEFAULT_ENGINE_FIT = (
    "host.step_s",
    "host.per_layer_s",
    "host.per_sequence_s",
    "host.prefill_s",
    "host.gap_power_fraction",
    "kernels.attention_decode_efficiency_scale",
)
DEFAULT_PRIOR_WEIGHT = 0.02
#: Columns of the Jacobian below this fraction of the largest: not identified.
MIN_SENSITIVITY = 1e-3
#: Pairs correlated beyond this cannot be told apart: one is held at its prior.
MAX_CORRELATION = 0.98
#: Residual given to a run whose prediction fails during the search.
FAILED_RESIDUAL = 5.0


@dataclass
class ProfileFitReport:
    """What :func:`fit_profiles` did."""

    fitted: list[str]
    held_at_prior: list[str]
    parameters_before: dict[str, float]
    parameters_after: dict[str, float]
    residuals_pct: dict[str, float] = field(default_factory=dict)
    condition_number: float = float("nan")
    correlated_pairs: list[tuple[str, str, float]] = field(default_factory=list)
    excluded_runs: list[str] = field(default_factory=list)
    per_run: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def feasible_hardware_values(profile: HardwareProfile, values: dict[str, float]) -> dict:
    """Hardware values clipped so that the profile's power cross-checks hold.

    ``P_idle + P_active + e_B B_hbm <= P_limit - 1 W`` with ``P_active >= 1 W``:
    memory power is cut first to leave 1 W of active power, then active power
    to what is left.
    """
    out = dict(values)
    p, ds = profile.parameters, profile.datasheet
    idle = out.get("idle_power_w", p.idle_power_w)
    head = ds.power_limit_w - idle - 1.0
    e_b = out.get("hbm_energy_j_per_byte", p.hbm_energy_j_per_byte)
    if e_b * ds.hbm_bandwidth_bytes_per_s > head - 1.0:
        out["hbm_energy_j_per_byte"] = e_b = max(head - 1.0, 0.0) / ds.hbm_bandwidth_bytes_per_s
    active = out.get("active_power_w", p.active_power_w)
    cap = head - e_b * ds.hbm_bandwidth_bytes_per_s
    if active > cap:
        out["active_power_w"] = max(cap, 0.0)
    return out


def _hardware(profile: HardwareProfile, values: dict[str, float]) -> HardwareProfile:
    values = feasible_hardware_values(profile, values)
    params = profile.parameters.model_copy(update=values)
    return profile.model_copy(update={"parameters": params})


def _engine(engine: EngineProfile, values: dict[str, float]) -> EngineProfile:
    blocks: dict[str, dict] = {}
    for name, v in values.items():
        block, key = name.split(".", 1)
        blocks.setdefault(block, {})[key] = float(v)
    return engine.with_settings(blocks) if blocks else engine


def _run_residuals(runs, hw, eng, failed: float = FAILED_RESIDUAL):
    """Log-ratio residuals of every run (a failed prediction gives ``failed`` per term)."""
    res, rows, bad = [], [], []
    for run in runs:
        try:
            r = compare_run(run, hw, eng)
            terms = [math.log(r.energy_j_pred / r.energy_j)]
            if r.latency_s is not None:
                terms.append(math.log(r.latency_s_pred / r.latency_s))
            if r.tpot_s is not None:
                terms.append(math.log(r.tpot_s_pred / r.tpot_s))
            if not all(math.isfinite(t) for t in terms):
                raise ValueError("not finite")
            rows.append(r)
        except (TtcsimError, ValueError, ZeroDivisionError, OverflowError):
            terms = [failed] * (1 + (run.latency_s is not None) + (run.tpot_s is not None))
            bad.append(run.label)
        res += terms
    return np.asarray(res), rows, bad


def _values(hw: HardwareProfile, eng: EngineProfile, names: list[str]) -> dict[str, float]:
    out = {}
    for n in names:
        if "." in n:
            block, key = n.split(".", 1)
            out[n] = float(getattr(getattr(eng, block), key))
        else:
            out[n] = float(getattr(hw.parameters, n))
    return out


def _bounds(name: str) -> tuple[float, float]:
    return ENGINE_FIT_BOUNDS[name] if "." in name else RUN_FIT_BOUNDS[name]


def _identifiability(jac: np.ndarray, names: list[str]):
    """Condition number, unidentified parameters and highly correlated pairs."""
    if jac.size == 0:
        return float("nan"), [], []
    norms = np.linalg.norm(jac, axis=0)
    weak = [n for n, s in zip(names, norms, strict=True)
            if not s > MIN_SENSITIVITY * max(norms.max(), 1e-300)]
    jtj = jac.T @ jac
    sv = np.linalg.svd(jtj, compute_uv=False)
    cond = float(sv[0] / sv[-1]) if sv[-1] > 0 else float("inf")
    cov = np.linalg.pinv(jtj)
    d = np.sqrt(np.maximum(np.diag(cov), 1e-300))
    corr = cov / np.outer(d, d)
    pairs = []
    for i, j in zip(*np.triu_indices(len(names), 1), strict=True):
        if abs(corr[i, j]) > MAX_CORRELATION and names[i] not in weak and names[j] not in weak:
            pairs.append((names[i], names[j], float(corr[i, j])))
    return cond, weak, pairs


def fit_profiles(
    runs: list[RunRecord],
    base_hw: HardwareProfile,
    base_engine: EngineProfile,
    fit: str = "engine",
    parameters: list[str] | None = None,
    prior_weight: float = DEFAULT_PRIOR_WEIGHT,
    method_note: str = "calibrate fit --runs",
    runs_label: str | None = None,
) -> tuple[HardwareProfile, EngineProfile, ProfileFitReport]:
    """Fit ``fit`` (``engine`` | ``hardware`` | ``both``) to ``runs`` (module docstring).

    Each record is predicted with ``base_engine`` plus the record's own engine
    settings (:func:`~ttcsim.calibration.validate.record_engine`).  Returns
    the hardware profile, the engine profile (each the base when not fitted)
    and the report.
    """
    if fit not in ("engine", "hardware", "both"):
        raise TtcsimError(f"must be engine, hardware or both, got {fit!r}", "--fit")
    if parameters:
        names = list(dict.fromkeys(parameters))
    else:
        names = ([] if fit == "engine" else list(DEFAULT_RUN_FIT)) + (
            [] if fit == "hardware" else list(DEFAULT_ENGINE_FIT))
    known = set(RUN_FIT_BOUNDS) | set(ENGINE_FIT_BOUNDS)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise TtcsimError(f"cannot fit {unknown}; fittable: {sorted(known)}", "--params")
    if fit == "engine" and any("." not in n for n in names) or fit == "hardware" and any(
            "." in n for n in names):
        raise TtcsimError(f"--fit {fit} cannot fit {names}", "--params")
    if not runs:
        raise TtcsimError("no runs to fit", "--runs")
    idle = [r.idle_power_w for r in runs if r.idle_power_w]
    hw0 = base_hw
    if idle and fit != "engine" and np.median(idle) < base_hw.datasheet.power_limit_w - 3.0:
        hw0 = _hardware(base_hw, {"idle_power_w": float(np.median(idle))})
    # runs the base cannot predict at all are left out
    _, _, excluded = _run_residuals(runs, hw0, base_engine)
    usable = [r for r in runs if r.label not in excluded]
    before = _values(hw0, base_engine, names)
    report = ProfileFitReport(names, [], before, dict(before), excluded_runs=excluded)
    if not usable:
        report.notes.append("no run could be predicted with the base profiles: nothing fitted")
        return base_hw, base_engine, report

    def clip(n, v):
        lo, hi = _bounds(n)
        return min(max(v, lo), hi)

    unset = {n: before[n] <= _bounds(n)[0] for n in names}
    start = {n: (ENGINE_UNSET_START.get(n, UNSET_START.get(n, 1.0)) if unset[n]
                 else clip(n, before[n])) for n in names}

    def solve(free: list[str], held: dict[str, float]):
        x0 = np.log([start[n] for n in free])
        prior = np.array([0.0 if unset[n] else prior_weight for n in free])
        lo = np.log([_bounds(n)[0] for n in free])
        hi = np.log([_bounds(n)[1] for n in free])
        x0 = np.clip(x0, lo, hi)

        def split(x):
            values = {**held, **dict(zip(free, np.exp(x), strict=True))}
            hv = {k: v for k, v in values.items() if "." not in k}
            ev = {k: v for k, v in values.items() if "." in k}
            return _hardware(hw0, hv), _engine(base_engine, ev)

        def residuals(x):
            r, _, _ = _run_residuals(usable, *split(x))
            return np.concatenate([r, prior * (x - x0)])

        sol = optimize.least_squares(residuals, x0, bounds=(lo, hi), diff_step=1e-3,
                                     x_scale=1.0, max_nfev=60 * (len(free) + 1))
        n_data = sol.fun.size - len(free)
        return sol, split(sol.x), sol.jac[:n_data]

    free, held = list(names), {}
    sol, (hw, eng), jac = solve(free, held) if free else (None, (hw0, base_engine), np.zeros(0))
    if free:
        cond, weak, pairs = _identifiability(jac, free)
        report.condition_number, report.correlated_pairs = cond, pairs
        hold = set(weak)
        norms = dict(zip(free, np.linalg.norm(jac, axis=0), strict=True))
        for a, b, _ in pairs:
            if a not in hold and b not in hold:
                hold.add(a if norms[a] < norms[b] else b)
        if hold:
            # held at the base value itself (a base 0 stays 0: nothing is invented)
            held = {n: (before[n] if unset[n] else start[n]) for n in hold}
            free = [n for n in names if n not in hold]
            report.held_at_prior = sorted(hold)
            if free:
                sol, (hw, eng), jac = solve(free, held)
                report.condition_number = _identifiability(jac, free)[0]
            else:
                hw, eng = _hardware(hw0, {k: v for k, v in held.items() if "." not in k}), \
                    _engine(base_engine, {k: v for k, v in held.items() if "." in k})
    report.fitted = free
    report.parameters_after = _values(hw, eng, names)
    _, rows, failed = _run_residuals(usable, hw, eng)
    report.excluded_runs += failed
    e_err = [r.energy_ape for r in rows]
    t_err = [r.latency_ape for r in rows if r.latency_ape is not None]
    p_err = [r.tpot_ape for r in rows if r.tpot_ape is not None]
    resid = {}
    for label, errs in (("energy", e_err), ("latency", t_err), ("tpot", p_err)):
        if errs:
            resid |= {f"{label}_{k}_pct": round(v, 3) for k, v in summarize(errs).items()
                      if k != "n"}
    report.residuals_pct = resid
    report.per_run = [{"id": r.id, "energy_j": r.energy_j, "energy_j_pred": r.energy_j_pred,
                       "latency_s": r.latency_s, "latency_s_pred": r.latency_s_pred,
                       "tpot_s": r.tpot_s, "tpot_s_pred": r.tpot_s_pred} for r in rows]
    return _finish(runs, hw0, base_hw, base_engine, hw, eng, fit, report, prior_weight,
                   method_note, runs_label)


def _finish(runs, hw0, base_hw, base_engine, hw, eng, fit, report, prior_weight, method_note,
            runs_label):
    """Stamp provenance on the fitted profiles and re-validate them (falling back to the base)."""
    today = dt.date.today().isoformat()
    method = (f"{method_note}: least squares on {len(runs)} run records (log energy, latency "
              f"and TPOT; prior weight {prior_weight})")
    gpu = base_hw.provenance.parameters.gpu_name or base_hw.display_name
    out_hw, out_eng = base_hw, base_engine
    fitted_hw = [n for n in report.fitted if "." not in n]
    fitted_eng = [n for n in report.fitted if "." in n]
    if fit in ("hardware", "both"):
        info = CalibrationInfo(
            status="calibrated", method=f"{method} from {base_hw.name} with engine {eng.name}",
            date=today, gpu_name=gpu, driver_version=base_hw.provenance.parameters.driver_version,
            residuals={k: v for k, v in report.residuals_pct.items() if math.isfinite(v)},
            notes=f"fitted: {', '.join(fitted_hw) or 'none'}; held at prior: "
            f"{', '.join(n for n in report.held_at_prior if '.' not in n) or 'none'}",
        )
        try:
            params = ModelParameters.model_validate(hw.parameters.model_dump())
            out_hw = hw0.with_parameters(params, info).checked()
        except (TtcsimError, ValueError) as exc:
            report.notes.append(f"fitted hardware profile invalid ({exc}); base kept")
    if fit in ("engine", "both"):
        cal = EngineCalibration(
            method=f"{method} from engine {base_engine.name}", date=today, hardware=hw.name,
            runs=runs_label, residuals={k: v for k, v in report.residuals_pct.items()
                                        if math.isfinite(v)},
            identifiability={"condition_number": report.condition_number}
            if math.isfinite(report.condition_number) else {},
            held_at_prior=[n for n in report.held_at_prior if "." in n],
            notes=f"fitted: {', '.join(fitted_eng) or 'none'}",
        )
        sources = dict(base_engine.provenance.sources)
        for n in fitted_eng:
            sources[n] = f"fitted ({today}, {len(runs)} runs on {hw.name}; see calibration)"
        prov = base_engine.provenance.model_copy(update={"status": "calibrated",
                                                         "sources": sources,
                                                         "calibration": cal})
        try:
            out_eng = EngineProfile.model_validate({**eng.model_dump(),
                                                    "provenance": prov.model_dump()})
        except ValueError as exc:
            report.notes.append(f"fitted engine profile invalid ({exc}); base kept")
    return out_hw, out_eng, report


def runs_engine(runs: list[RunRecord], engine=None) -> EngineProfile:
    """The base engine of a fit: ``engine``, else the single engine the records name."""
    if engine is not None:
        from ttcsim.engines import get_engine

        return get_engine(engine)
    names = {record_engine(r).name for r in runs}
    if len(names) > 1:
        raise TtcsimError(f"the records name several engines {sorted(names)}; pass --engine",
                          "--engine")
    from ttcsim.engines import get_engine

    return get_engine(names.pop())
