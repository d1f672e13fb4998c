"""The ML.ENERGY Leaderboard v2 A100 results (vLLM 0.5.4) predicted four ways.

Usage::

    python bench/mlenergy_validation.py                      # tables, held-out protocol
    python bench/mlenergy_validation.py --tree ../shared/mlenergy-v2 --sensitivity

Protocol (``docs/VALIDATION.md``, "vLLM 0.5.4 on the A100"): the shipped ``vllm``
engine profile was fitted (``calibrate fit --fit engine``) on the <= 6 runs of
``validation/mlenergy-a100/fit_runs.txt`` only, chosen by a stated rule before
any held-out comparison; errors are reported on every other run (held out) and
on all runs.  Four predictors of the same records:

* ``vllm`` -- ttcsim with the shipped ``vllm`` engine profile (steady state of
  continuous batching at the record's running batch,
  :func:`ttcsim.engines.steady.steady_state`);
* ``reference`` -- ttcsim with the ``reference`` engine (the GPU physics of the
  hardware profile alone, no host time) on the same steady state;
* ``llm-flops style`` -- :func:`constant_power_estimate`: roofline time at the
  datasheet peaks, times one constant power, 0.85 x TDP per GPU;
* ``EcoLogits style`` -- :func:`per_token_estimate`: energy per output token from
  EcoLogits' regression on the active parameter count (its published constants,
  batch 64), times the GPU count.

TPOT is the steady-state time per output token (from the throughput, see
:func:`ttcsim.importers.mlenergy.steady_tpot_s`); the upstream ``Avg TPOT`` (a
mean over all iterations of the run, ramp-up and drain included) is compared
separately with :func:`run_mean_tpot_s`, which replays the run's schedule.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ttcsim.calibration.records import RunRecord, read_runs  # noqa: E402
from ttcsim.calibration.validate import compare_run, record_engine, summarize  # noqa: E402
from ttcsim.distributions import as_distribution, parse_lengths  # noqa: E402
from ttcsim.hardware import get_profile  # noqa: E402
from ttcsim.models import get_model  # noqa: E402
from ttcsim.simulator import architecture as arch  # noqa: E402
from ttcsim.simulator.coefficients import pass_coefficients  # noqa: E402
from ttcsim.simulator.roofline import forward_pass  # noqa: E402

RUNS = ROOT / "validation" / "mlenergy-a100" / "runs.jsonl"
FIT_RUNS = ROOT / "validation" / "mlenergy-a100" / "fit_runs.txt"
PRIOR = ROOT / "validation" / "mlenergy-a100" / "vllm-0.5-prior.yaml"
FITTED_HW = ROOT / "validation" / "mlenergy-a100" / "a100-sxm-40gb-fit.yaml"

#: llm-flops' constant power: 0.85 x TDP per GPU for every phase and batch
#: (``../shared/ANCHORS.md``, "Peer tools": "energy = 0.85 x TDP x time").
LLM_FLOPS_POWER_FRACTION = 0.85
#: EcoLogits' GPU-energy regression (``ecologits/impacts/llm.py``, genai-impact/ecologits):
#: Wh per output token per GPU = alpha * exp(beta * batch) * P_active[1e9] + gamma,
#: fitted by EcoLogits to ML.ENERGY A100 data; batch fixed at 64.
ECOLOGITS_ALPHA = 1.1665273170451914e-06
ECOLOGITS_BETA = -0.011205921025579175
ECOLOGITS_GAMMA = 4.052928146734005e-05
ECOLOGITS_BATCH = 64
JOULES_PER_WH = 3600.0


def fit_ids(path: Path = FIT_RUNS) -> list[str]:
    """The frozen fit runs (one id a line, ``#`` comments)."""
    return [ln.strip() for ln in path.read_text().splitlines()
            if ln.strip() and not ln.startswith("#")]


def _moments(spec) -> tuple[float, float]:
    d = as_distribution(parse_lengths(spec, "lengths"))
    return float(d.mean()), float(d.second_moment())


def constant_power_estimate(run: RunRecord, hw) -> tuple[float, float]:
    """llm-flops-style energy per request [J] and TPOT [s] of a steady-state record.

    Roofline at the datasheet peaks, per GPU of the ``tp`` group (no
    efficiencies, overheads or host time); a decode step at the running batch
    ``B`` over the mean context ``x`` and one prefill of the mean prompt ``P``::

        t_dec = max((W + B x b_kv) / BW_peak, B F / R_peak)
        t_pre = max(W / BW_peak, P F / R_peak)
        E_req = tp * 0.85 * TDP * ((L - 1) / B * t_dec + t_pre)

    ``W``, ``F``, ``b_kv``: weight bytes, linear FLOPs per token and KV bytes per
    token on one GPU; ``L``: mean output length.
    """
    spec = get_model(run.model)
    tp = run.tp
    ds = hw.datasheet
    p1, _ = _moments(run.prompt_tokens)
    m1, m2 = _moments(run.output_tokens)
    b = float(run.running_batch)
    w = arch.active_parameter_count(spec) * 2.0 / tp
    f = arch.linear_flops_per_token(spec) / tp
    kv = arch.kv_elements_per_token(spec) * 2.0 / tp
    x = p1 + m2 / (2.0 * m1)
    bw, peak = ds.hbm_bandwidth_bytes_per_s, ds.peak_flops_per_s["bf16"]
    t_dec = max((w + b * x * kv) / bw, b * f / peak)
    t_pre = max(w / bw, p1 * f / peak)
    power = tp * LLM_FLOPS_POWER_FRACTION * ds.power_limit_w
    return power * ((m1 - 1.0) / b * t_dec + t_pre), t_dec


def per_token_estimate(run: RunRecord) -> float:
    """EcoLogits-style GPU energy per request [J]: GPUs x L x e_token(P_active).

    ``e_token = alpha exp(beta * 64) P + gamma`` Wh per output token per GPU
    (EcoLogits' published constants; ``P`` the active parameters in billions),
    for the record's GPU count and mean output length; prompts are ignored.
    """
    spec = get_model(run.model)
    p = arch.active_parameter_count(spec) / 1e9
    wh = ECOLOGITS_ALPHA * math.exp(ECOLOGITS_BETA * ECOLOGITS_BATCH) * p + ECOLOGITS_GAMMA
    m1, _ = _moments(run.output_tokens)
    return run.tp * m1 * wh * JOULES_PER_WH


def run_schedule(steps: np.ndarray, slots: int) -> tuple[np.ndarray, np.ndarray]:
    """Decode iterations of a whole FCFS continuous-batching run, in iteration units.

    ``steps[i]`` decode steps of request ``i`` (output length - 1), at most
    ``slots`` running; a finished request's slot is refilled at once.  Returns
    per decode iteration the running batch and the requests admitted (prefilled)
    just before it.
    """
    n = steps.size
    start = np.zeros(n)
    free = list(steps[:slots].astype(float))
    import heapq

    heap = [(t, j) for j, t in enumerate(free)]
    heapq.heapify(heap)
    for i in range(min(slots, n), n):
        t, j = heapq.heappop(heap)
        start[i] = t
        heapq.heappush(heap, (t + steps[i], j))
    end = start + steps
    horizon = int(end.max()) if n else 0
    diff = np.zeros(horizon + 1)
    np.add.at(diff, start.astype(int), 1.0)
    np.add.at(diff, end.astype(int), -1.0)
    batch = np.cumsum(diff)[:horizon]
    admitted = np.bincount(start[slots:].astype(int), minlength=horizon + 1)[:horizon]
    return batch, admitted.astype(float)


def run_mean_tpot_s(run: RunRecord, hw, engine, seed: int = 0) -> float:
    """Predicted upstream ``Avg TPOT``: the mean over the run's decode iterations.

    Replays the whole run (``requests`` requests, ``max_num_seqs`` slots,
    lengths drawn from the record's output distribution with a fixed seed, FCFS)
    and averages, over decode iterations, the iteration's time plus the prefill
    pass that ran just before it (the running requests wait for it).  Iteration
    times come from the engine's forward pass at each batch size, with the
    steady state's mean context per sequence.  The ramp-up's own prefills are
    left out.
    """
    spec = get_model(run.model)
    eng = record_engine(run, engine)
    c = pass_coefficients(hw, spec, run.dtype, "bf16", run.tp, eng)
    p1, p2 = _moments(run.prompt_tokens)
    d = as_distribution(parse_lengths(run.output_tokens, "output_tokens"))
    m1, m2 = float(d.mean()), float(d.second_moment())
    rng = np.random.default_rng(seed)
    lengths = d.sample(rng, int(getattr(run, "requests", 2000) or 2000))
    steps = np.maximum(lengths - 1.0, 0.0)
    slots = int(run.max_num_seqs or run.running_batch)
    batch, admitted = run_schedule(steps, slots)
    x = p1 + m2 / (2.0 * m1)
    sizes = np.arange(1, int(batch.max()) + 1, dtype=float)
    step_t = forward_pass(c, sizes, sizes * x, sizes * x).time_s
    k = np.arange(1, int(admitted.max()) + 1 if admitted.size else 1, dtype=float)
    pre_t = np.concatenate([[0.0], forward_pass(c, k * p1, 0.0, k * (p2 + p1) / 2.0,
                                                 sequences=k, prefill=True).time_s])
    live = batch > 0
    t = step_t[batch[live].astype(int) - 1] + pre_t[admitted[live].astype(int)]
    return float(t.mean())


def evaluate(runs, hw, method: str, engine=None) -> list[dict]:
    """Per-run measured and predicted energy per request and steady TPOT."""
    rows = []
    for run in runs:
        if method == "llm-flops":
            e, t = constant_power_estimate(run, hw)
        elif method == "ecologits":
            e, t = per_token_estimate(run), float("nan")
        else:
            r = compare_run(run, hw, engine)
            e, t = r.energy_j_pred, r.tpot_s_pred
        rows.append({"id": run.id, "energy_j": run.energy_j, "energy_j_pred": e,
                     "tpot_s": run.tpot_s, "tpot_s_pred": t})
    return rows


def errors(rows, key: str) -> list[float]:
    """Absolute percentage errors of ``key`` [%] (rows with a prediction)."""
    return [abs(r[f"{key}_pred"] - r[key]) / r[key] * 100.0 for r in rows
            if r[f"{key}_pred"] is not None and math.isfinite(r[f"{key}_pred"])]


def _fmt(s: dict) -> str:
    if not s.get("n"):
        return "- | - | -"
    return f"{s['median']:.1f} % | {s['p90']:.1f} % | {s['max']:.1f} %"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", default=str(RUNS))
    ap.add_argument("--fit-runs", default=str(FIT_RUNS))
    ap.add_argument("--hw", default="a100-sxm-40gb", help="the shipped hardware profile")
    ap.add_argument("--fitted-hw", default=str(FITTED_HW),
                    help="hardware side of the 6-run --fit both (a YAML)")
    ap.add_argument("--engine", default=None, help="engine profile instead of the shipped vllm")
    ap.add_argument("--tree", default=None, help="ML.ENERGY tree, for --sensitivity")
    ap.add_argument("--sensitivity", action="store_true",
                    help="re-import with other chars/token ratios and output shapes")
    ap.add_argument("--reported-tpot", action="store_true",
                    help="also compare the upstream Avg TPOT (replays every run; slower)")
    ap.add_argument("--per-run", action="store_true", help="print every held-out run")
    ap.add_argument("--json", dest="json_out", default=None, help="write per-run rows here")
    args = ap.parse_args(argv)

    hw = get_profile(args.hw)
    runs = read_runs(args.runs)
    fit = set(fit_ids(Path(args.fit_runs)))
    held = [r for r in runs if r.id not in fit]
    print(f"hardware profile {hw.name} ({hw.provenance.parameters.status}); "
          f"{len(runs)} runs, {len(runs) - len(held)} fit, {len(held)} held out")
    fitted_hw = get_profile(args.fitted_hw) if Path(args.fitted_hw).exists() else None
    methods = []
    if fitted_hw is not None:
        methods.append(("ttcsim, vllm + A100 side of the same 6-run fit", "fitted", args.engine,
                        fitted_hw))
    methods += [("ttcsim, shipped vllm + shipped A100 profile", "vllm", args.engine, hw),
                ("ttcsim, reference engine", "reference", "reference", hw)]
    if PRIOR.exists() and args.engine is None:
        methods.append(("ttcsim, vllm datasheet default (before the fit)", "prior", str(PRIOR),
                        hw))
    methods += [("llm-flops style (roofline x 0.85 TDP)", "llm-flops", None, hw),
                ("EcoLogits style (per token, parameters)", "ecologits", None, hw)]
    print()
    print("| predictor | runs | energy median | p90 | max | TPOT median | p90 | max |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    dump = {}
    for label, key, eng, hw_m in methods:
        method = key if key in ("llm-flops", "ecologits") else "ttcsim"
        for subset, rs in (("held out", held), ("all", runs)):
            rows = evaluate(rs, hw_m, method, eng)
            e = summarize(errors(rows, "energy_j"))
            t = summarize(errors(rows, "tpot_s"))
            print(f"| {label} | {subset} ({e['n']}) | {_fmt(e)} | {_fmt(t)} |")
            dump[f"{key}/{subset}"] = rows
    if args.per_run:
        print()
        print("| held-out run | E meas [J] | vllm (fit hw) | reference | llm-flops | EcoLogits | "
              "TPOT meas [ms] | vllm (fit hw) |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        by = {k: {r["id"]: r for r in v} for k, v in dump.items()}
        main_key = "fitted" if "fitted/held out" in by else "vllm"
        for r in held:
            v, ref = by[f"{main_key}/held out"][r.id], by["reference/held out"][r.id]
            lf, eco = by["llm-flops/held out"][r.id], by["ecologits/held out"][r.id]
            print(f"| {r.id} | {r.energy_j:.1f} | {v['energy_j_pred']:.1f} | "
                  f"{ref['energy_j_pred']:.1f} | {lf['energy_j_pred']:.1f} | "
                  f"{eco['energy_j_pred']:.1f} | {r.tpot_s * 1e3:.1f} | "
                  f"{v['tpot_s_pred'] * 1e3:.1f} |")
    hw_main = fitted_hw or hw
    if args.reported_tpot:
        errs = {"held out": [], "all": []}
        for r in runs:
            pred = run_mean_tpot_s(r, hw_main, args.engine)
            err = abs(pred - r.tpot_reported_s) / r.tpot_reported_s * 100.0
            errs["all"].append(err)
            if r.id not in fit:
                errs["held out"].append(err)
        print()
        print("Upstream Avg TPOT (mean over all iterations of the run), replayed schedule:")
        for subset, e in errs.items():
            print(f"  {subset} ({len(e)}): {_fmt(summarize(e))}")
    if args.sensitivity:
        _sensitivity(args, hw_main, fit)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(dump, indent=1))
    return 0


def _sensitivity(args, hw, fit) -> None:
    """Held-out error of the shipped profile with other import assumptions."""
    from ttcsim.calibration.records import RunRecord
    from ttcsim.importers.mlenergy import import_tree

    if not args.tree:
        print("\n--sensitivity needs --tree (the ML.ENERGY result tree)")
        return
    cases = [("as shipped: chat 4.0, code 2.5 chars/token, gamma shape 2", {}, None),
             ("code 3.3 chars/token (the first assumption)", {"code": 3.3}, None),
             ("chat 3.0 chars/token", {"chat": 3.0}, None),
             ("chat 5.0 chars/token", {"chat": 5.0}, None),
             ("code 2.0 chars/token", {"code": 2.0}, None),
             ("code 4.0 chars/token", {"code": 4.0}, None),
             ("output lengths gamma shape 1 (exponential)", {}, 1.0),
             ("output lengths gamma shape 8 (narrow)", {}, 8.0)]
    print()
    print("| import assumption | held-out energy median | p90 | max | TPOT median | p90 | max |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, ratios, shape in cases:
        recs = import_tree(args.tree, ratios, None, shape).records
        runs = [RunRecord.model_validate(r) for r in recs if r["id"] not in fit]
        rows = evaluate(runs, hw, "ttcsim", args.engine)
        print(f"| {label} | {_fmt(summarize(errors(rows, 'energy_j')))} | "
              f"{_fmt(summarize(errors(rows, 'tpot_s')))} |")


if __name__ == "__main__":
    raise SystemExit(main())
