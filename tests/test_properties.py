"""Tier 2: properties of predict() over random valid scenarios (hypothesis, derandomized).

Every test draws scenarios from a fixed, derandomized stream (``derandomize=True``,
no example database), so a run is reproducible and its cost is bounded by
``max_examples``.  Generated cases: see ``EXAMPLES``; the suite's total is
printed by ``test_generated_case_budget``.

Properties (issue 8):

* energy and latency are finite and positive, and so is every float field;
* per GPU, ``idle <= average power <= peak power <= limit``;
* ``energy x concurrency >= idle power x GPUs x batch latency``;
* energy and latency never fall when output tokens, prompt tokens or samples grow;
* per-query energy never rises with concurrency while decode is memory-bound;
* the same inputs give the same numbers: repeated calls, ``ttcsim predict --json``,
  ``ttcsim.sweep`` and the Python API, and a fresh interpreter with another hash seed;
* the same holds for random *profiles* drawn inside the schema's bounds.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from click.testing import CliRunner
from conftest import bounded_settings, make_profile
from hypothesis import assume, given
from hypothesis import strategies as st

import ttcsim
from ttcsim.cli import main
from ttcsim.errors import DoesNotFitError, TtcsimError
from ttcsim.hardware import HardwareProfile, get_profile, list_profiles
from ttcsim.models import get_model
from ttcsim.simulator.coefficients import pass_coefficients

#: max_examples per test; their sum counts towards the suite's >= 1,000 generated cases.
EXAMPLES = {
    "finite": 120,
    "output": 60,
    "prompt": 60,
    "samples": 60,
    "concurrency": 60,
    "repeat": 40,
    "cli": 15,
    "sweep": 15,
    "profiles": 100,
}


def fast(name: str):
    """Fixed, derandomized, bounded hypothesis settings for test ``name``."""
    return bounded_settings(EXAMPLES[name])


# Small dense and MoE models that fit one GPU of every shipped profile at small batches.
MODELS = ["llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "qwen2.5-0.5b", "qwen3-4b",
          "qwen3-30b-a3b"]  # fmt: skip
HW = list_profiles()

strategies_ = st.one_of(
    st.just("single"),
    st.builds("vote{}".format, st.integers(1, 16)),
    st.builds("bon{}".format, st.integers(1, 8)),
)
fixed_lengths = st.integers(1, 4096)
random_lengths = st.builds(
    "lognormal:median={},sigma={},max={}".format,
    st.integers(16, 2000),
    st.sampled_from([0.3, 0.7, 1.0]),
    st.integers(2048, 8192),
)


def _affordable(sc: dict) -> dict:
    """Random lengths cost an exact expectation over the whole batch: keep that batch small."""
    if not isinstance(sc["output_tokens"], int):
        sc = {**sc, "concurrency": min(sc["concurrency"], 2)}
    return sc


scenarios = st.fixed_dictionaries(
    {
        "hw": st.sampled_from(HW),
        "model": st.sampled_from(MODELS),
        "strategy": strategies_,
        "prompt_tokens": st.integers(1, 8192),
        "output_tokens": st.one_of(fixed_lengths, random_lengths),
        "concurrency": st.integers(1, 32),
        "tp": st.sampled_from([1, 1, 2]),
    }
).map(_affordable)


def run(**kw):
    """predict(), or ``assume(False)`` when the workload does not fit the GPU."""
    kw.setdefault("percentiles", False)
    kw.setdefault("marginal", False)
    try:
        return ttcsim.predict(**kw)
    except DoesNotFitError:
        assume(False)


def check_physical(r, profile: HardwareProfile) -> None:
    """The per-prediction properties (module docstring)."""
    for key, value in r.as_dict().items():
        if isinstance(value, float):
            assert math.isfinite(value), (key, value)
    assert r.energy_j > 0 and r.latency_s > 0 and r.batch_latency_s > 0
    idle = profile.parameters.idle_power_w
    limit = profile.datasheet.power_limit_w
    tol = 1e-9
    assert idle * (1 - tol) <= r.avg_power_w / r.gpus <= limit * (1 + tol)
    assert idle * (1 - tol) <= r.peak_power_w / r.gpus <= limit * (1 + tol)
    assert r.energy_j * r.concurrency >= idle * r.gpus * r.batch_latency_s * (1 - tol)
    assert 0 <= r.energy_dynamic_j <= r.energy_j * (1 + tol)
    # a query's latency within its batch's (to 1e-3)
    assert r.latency_s <= r.batch_latency_s * (1 + 1e-3)


@fast("finite")
@given(scenarios)
def test_random_scenarios_are_finite_positive_and_within_power_bounds(sc):
    r = run(**sc)
    check_physical(r, get_profile(sc["hw"]))


def _non_decreasing(a, b, rel=1e-12):
    return b >= a * (1 - rel)


@fast("output")
@given(scenarios, st.integers(1, 4096), st.integers(1, 4096))
def test_energy_and_latency_never_fall_with_more_output_tokens(sc, n1, n2):
    lo, hi = sorted((n1, n2))
    a = run(**{**sc, "output_tokens": lo})
    b = run(**{**sc, "output_tokens": hi})
    assert _non_decreasing(a.energy_j, b.energy_j), (a.energy_j, b.energy_j)
    assert _non_decreasing(a.latency_s, b.latency_s)


@fast("prompt")
@given(scenarios, st.integers(1, 16384), st.integers(1, 16384))
def test_energy_and_latency_never_fall_with_more_prompt_tokens(sc, p1, p2):
    lo, hi = sorted((p1, p2))
    a = run(**{**sc, "prompt_tokens": lo})
    b = run(**{**sc, "prompt_tokens": hi})
    assert _non_decreasing(a.energy_j, b.energy_j), (a.energy_j, b.energy_j)
    assert _non_decreasing(a.latency_s, b.latency_s)


@fast("samples")
@given(scenarios, st.sampled_from(["vote", "bon"]), st.integers(1, 32), st.integers(1, 32))
def test_energy_and_latency_never_fall_with_more_samples(sc, family, n1, n2):
    lo, hi = sorted((n1, n2))
    if not isinstance(sc["output_tokens"], int):  # 32 random-length samples: exact but slow
        sc = {**sc, "concurrency": 1}
    a = run(**{**sc, "strategy": f"{family}{lo}"})
    b = run(**{**sc, "strategy": f"{family}{hi}"})
    assert _non_decreasing(a.energy_j, b.energy_j), (a.energy_j, b.energy_j)
    assert _non_decreasing(a.latency_s, b.latency_s)


def memory_bound_batch(hw: str, model: str, tp: int) -> float:
    """Decode batch at the ridge point: weight-streaming time = GEMM time of the batch."""
    c = pass_coefficients(get_profile(hw), get_model(model), tp=tp)
    t_weights = c.shared_weight_bytes / c.weight_bandwidth_bytes_per_s
    t_gemm_per_sequence = c.linear_flops_per_token / c.gemm_flops_per_s
    return t_weights / t_gemm_per_sequence


@fast("concurrency")
@given(
    st.sampled_from(HW),
    st.sampled_from([m for m in MODELS if not get_model(m).is_moe]),
    st.integers(1, 2048),
    st.integers(1, 2048),
    st.integers(1, 64),
    st.integers(1, 64),
)
def test_per_query_energy_never_rises_with_concurrency_while_memory_bound(
    hw, model, prompt, output, q1, q2
):
    lo, hi = sorted((q1, q2))
    # a quarter of the ridge batch: decode passes stream weights, the GEMMs hide under them
    assume(hi <= memory_bound_batch(hw, model, 1) / 4)
    a = run(hw=hw, model=model, prompt_tokens=prompt, output_tokens=output, concurrency=lo)
    b = run(hw=hw, model=model, prompt_tokens=prompt, output_tokens=output, concurrency=hi)
    assert b.energy_j <= a.energy_j * (1 + 1e-12), (a.energy_j, b.energy_j)


@fast("repeat")
@given(scenarios, st.integers(0, 2**32))
def test_repeated_calls_are_identical(sc, seed):
    kw = {**sc, "seed": seed, "percentiles": True, "marginal": True}
    a, b = run(**kw), run(**kw)
    assert a == b
    assert a.as_dict() == b.as_dict()


CLI_OPTIONS = {
    "hw": "--hw",
    "model": "--model",
    "strategy": "--strategy",
    "prompt_tokens": "--prompt-tokens",
    "output_tokens": "--output-tokens",
    "concurrency": "--concurrency",
    "tp": "--tp",
}


@fast("cli")
@given(scenarios)
def test_cli_json_equals_python_api(sc):
    try:
        api = ttcsim.predict(**sc)
    except DoesNotFitError:
        assume(False)
    args = ["predict", "--json"]
    for key, opt in CLI_OPTIONS.items():
        args += [opt, str(sc[key])]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert json.loads(r.output) == json.loads(json.dumps(api.as_dict()))


SWEEP_COLUMNS = ["energy_j", "energy_prefill_j", "energy_decode_j", "energy_score_j",
                 "energy_dynamic_j", "latency_s", "batch_latency_s", "ttft_s", "avg_power_w",
                 "peak_power_w"]  # fmt: skip


@fast("sweep")
@given(scenarios.filter(lambda s: isinstance(s["output_tokens"], int)))
def test_sweep_rows_equal_predict(sc):
    sweep = pytest.importorskip("ttcsim.sweep")
    grid = {k: [v] for k, v in sc.items()}
    frame = sweep.sweep(grid)
    assert len(frame) == 1
    row = frame.iloc[0]
    try:
        api = ttcsim.predict(**sc, percentiles=False)
    except DoesNotFitError:
        assert not bool(row["fits"])
        return
    assert bool(row["fits"])
    for col in SWEEP_COLUMNS:
        assert row[col] == getattr(api, col), col


def test_results_identical_in_a_fresh_interpreter_with_another_hash_seed():
    kw = dict(hw="h100", model="8b", strategy="vote8", prompt_tokens=700, concurrency=4, seed=3,
              output_tokens="lognormal:median=500,sigma=0.8,max=6000")  # fmt: skip
    code = f"import json, ttcsim; print(json.dumps(ttcsim.predict(**{kw!r}).as_dict()))"
    out = {}
    for hash_seed in ("1", "12345"):
        proc = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**__import__("os").environ, "PYTHONHASHSEED": hash_seed},
        )
        out[hash_seed] = json.loads(proc.stdout)
    assert out["1"] == out["12345"] == json.loads(json.dumps(ttcsim.predict(**kw).as_dict()))


# ------------------------------------------------------------------ random valid profiles


def _log_uniform(lo: float, hi: float):
    return st.floats(math.log(lo), math.log(hi)).map(math.exp)


# Energies up to 10 pJ/FLOP (GEMM) and 100 pJ/FLOP (attention): 4x and 9x the calibrated H100.
# Extreme values inside the schema bounds: test_power_stays_under_the_limit_for_any_valid_profile.
random_parameters = st.fixed_dictionaries(
    {
        "idle_power_w": st.floats(5.0, 200.0),
        "active_power_w": st.floats(0.0, 150.0),
        "hbm_energy_j_per_byte": _log_uniform(1e-12, 1e-9),
        "compute_energy_j_per_flop": _log_uniform(1e-14, 1e-11),
        "attention_energy_j_per_flop": _log_uniform(1e-14, 1e-10),
        "gemm_efficiency": st.floats(0.05, 1.0),
        "weight_stream_efficiency": st.floats(0.05, 1.0),
        "attention_decode_efficiency": st.floats(0.05, 1.0),
        "attention_prefill_efficiency": st.floats(0.05, 1.0),
        "layer_overhead_s": st.floats(0.0, 1e-4),
        "step_overhead_s": st.floats(0.0, 1e-3),
        "roofline_exponent": st.floats(1.0, 64.0),
        "dvfs_energy_exponent": st.floats(0.0, 4.0),
        "interconnect_efficiency": st.floats(0.05, 1.0),
    }
)


@fast("profiles")
@given(random_parameters, scenarios.filter(lambda s: s["model"] in MODELS[:3]))
def test_random_valid_profiles_give_physical_results(params, sc):
    try:
        profile = HardwareProfile.model_validate(make_profile(**params).model_dump())
    except Exception:  # noqa: BLE001 - outside the schema's cross-checks: not a valid profile
        assume(False)
    r = run(**{**sc, "hw": profile})
    check_physical(r, profile)


def test_peak_power_is_at_least_average_power():
    r = ttcsim.predict(hw="a100-pcie-80gb", model="1b", prompt_tokens=1, output_tokens=32000)
    assert r.avg_power_w <= r.peak_power_w * (1 + 1e-9)


def test_power_stays_under_the_limit_for_any_valid_profile():
    params = dict(idle_power_w=5.0, active_power_w=0.0, hbm_energy_j_per_byte=math.exp(-23),
                  compute_energy_j_per_flop=math.exp(-24),
                  attention_energy_j_per_flop=math.exp(-21),
                  gemm_efficiency=1.0, weight_stream_efficiency=1.0, roofline_exponent=1.0,
                  dvfs_energy_exponent=0.0, layer_overhead_s=0.0, step_overhead_s=0.0)  # fmt: skip
    profile = HardwareProfile.model_validate(make_profile(**params).model_dump())
    r = ttcsim.predict(hw=profile, model="1b", prompt_tokens=1, output_tokens=1, concurrency=5)
    assert r.peak_power_w <= profile.datasheet.power_limit_w * (1 + 1e-9)  # 735 W > 700 W


def test_generated_case_budget():
    """The property and fuzz suites together generate at least 1,000 cases (issue 8)."""
    import test_fuzz_cli

    total = sum(EXAMPLES.values()) + sum(test_fuzz_cli.EXAMPLES.values())
    assert total >= 1000, total


def test_invalid_python_api_inputs_are_ttcsim_errors():
    for kw in (dict(seed=-1), dict(seed=1.5), dict(pue="1"), dict(weight_dtype=None),
               dict(output_tokens="mix:1e308*5|1e308*6", percentiles=True)):  # fmt: skip
        try:
            r = ttcsim.predict(**kw)
        except TtcsimError:
            continue
        assert all(math.isfinite(v) for v in r.as_dict().values() if isinstance(v, float))
