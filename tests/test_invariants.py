"""Tier 2: invariants of predict() and the expectation over random lengths."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import LLAMA_8B, MOE, make_profile

from ttcsim.distributions import parse_lengths
from ttcsim.errors import DoesNotFitError, TtcsimError
from ttcsim.predict import predict
from ttcsim.simulator.coefficients import pass_coefficients
from ttcsim.simulator.decode import decode_draws
from ttcsim.simulator.expectation import expected_decode

H100 = make_profile()


def run(**kw):
    base = dict(hw=H100, model=LLAMA_8B, prompt_tokens=512, output_tokens=1024)
    base.update(kw)
    return predict(**base)


@pytest.mark.parametrize(
    "spec", ["lognormal:median=200,sigma=0.8,max=2000", "gamma:mean=150,shape=1.5"]
)
@pytest.mark.parametrize("n,samples", [(4, 4), (12, 3), (300, 5)])
def test_expected_decode_equals_brute_force_monte_carlo(spec, n, samples):
    dist = parse_lengths(spec)
    c = pass_coefficients(H100, LLAMA_8B)
    cost, q_time = expected_decode(c, 256, dist.survival_steps(), n, samples)
    rng = np.random.default_rng(7)
    mat = dist.sample(rng, (4000, n))
    t, _, e, qt = decode_draws(c, 256, mat, samples)
    se = e.std() / np.sqrt(e.size)
    assert abs(cost.energy_j - e.mean()) < 4 * se + 1e-6 * e.mean()
    assert abs(cost.time_s - t.mean()) < 4 * t.std() / np.sqrt(t.size) + 1e-9
    qt = qt.ravel()
    assert abs(q_time - qt.mean()) < 4 * qt.std() / np.sqrt(4000) + 1e-9


def test_fixed_length_distribution_is_deterministic():
    a = run(output_tokens=777, strategy="vote3")
    b = run(output_tokens="777,777,777", strategy="vote3")
    assert a.energy_j == pytest.approx(b.energy_j, rel=1e-12)
    assert a.energy_j_p50 is None


def test_energy_grows_with_output_and_prompt_tokens():
    e = [run(output_tokens=n).energy_j for n in (16, 128, 1024, 4096)]
    assert all(x < y for x, y in zip(e, e[1:], strict=False))
    p = [run(prompt_tokens=n).energy_j for n in (16, 512, 4096, 16384)]
    assert all(x < y for x, y in zip(p, p[1:], strict=False))


def test_vote1_equals_single_and_cot_alias():
    assert run(strategy="vote1").energy_j == pytest.approx(run(strategy="single").energy_j)
    assert run(strategy="cot").energy_j == run(strategy="single").energy_j


def test_vote_far_cheaper_than_n_singles_when_memory_bound():
    single = run(strategy="single").energy_j
    for n in (4, 8, 32):
        vote = run(strategy=f"vote{n}").energy_j
        assert single < vote < 0.5 * n * single


def test_more_samples_never_cost_less():
    e = [run(strategy=f"vote{n}").energy_j for n in (1, 2, 4, 8, 16, 64)]
    assert all(x <= y for x, y in zip(e, e[1:], strict=False))


def test_energy_at_least_idle_power_times_latency_and_power_under_limit():
    for kw in (
        dict(strategy="single"),
        dict(strategy="vote16", output_tokens="lognormal:median=400,sigma=0.9,max=4096"),
        dict(strategy="bon8", prompt_tokens=8000),
        dict(strategy="vote8", concurrency=16),
    ):
        r = run(**kw)
        q = r.concurrency
        assert r.energy_j >= H100.parameters.idle_power_w * r.latency_s / q * 0.999
        assert r.peak_power_w <= 700.0 * r.gpus + 1e-6
        assert r.avg_power_w <= r.peak_power_w + 1e-6
        assert r.energy_dynamic_j <= r.energy_j


def test_per_query_energy_falls_with_concurrency_while_memory_bound():
    e = [run(concurrency=q, output_tokens=256).energy_j for q in (1, 2, 8, 32)]
    assert all(x > y for x, y in zip(e, e[1:], strict=False))


def test_prefix_cache_off_costs_more_prefill():
    on = run(strategy="vote8", prompt_tokens=4000)
    off = run(strategy="vote8", prompt_tokens=4000, prefix_cache=False)
    assert off.energy_prefill_j > 6 * on.energy_prefill_j
    # same decode time; a shared prompt's KV comes from HBM once per step, not 8 times
    assert off.decode_latency_s == pytest.approx(on.decode_latency_s)
    assert on.energy_decode_j < off.energy_decode_j


def test_bon_adds_scoring_energy_to_vote():
    vote, bon = run(strategy="vote4"), run(strategy="bon4")
    assert bon.energy_score_j > 0
    assert bon.energy_j == pytest.approx(vote.energy_j + bon.energy_score_j, rel=1e-9)


def test_random_lengths_use_expectation_not_mean_length():
    dist = "lognormal:median=600,sigma=1.0,max=16000"
    r = run(strategy="vote8", output_tokens=dist)
    at_mean = run(strategy="vote8", output_tokens=round(parse_lengths(dist).mean()))
    # the longest of 8 heavy-tailed samples sets the duration: far above the mean-length cost
    assert r.latency_s > 1.5 * at_mean.latency_s
    assert r.energy_j_p50 < r.energy_j_p90 < r.energy_j_p99


def test_tensor_parallel_splits_work_and_sums_energy():
    one = run(strategy="single", output_tokens=256)
    two = run(strategy="single", output_tokens=256, tp=2)
    assert two.gpus == 2
    assert two.latency_s < one.latency_s
    assert two.energy_j > 0.8 * one.energy_j  # two GPUs' static power


def test_model_that_does_not_fit_is_refused_with_tp_hint():
    big = LLAMA_8B.model_copy(update={"name": "big", "n_layers": 320})
    with pytest.raises(DoesNotFitError, match=r"try --tp \d+"):
        run(model=big)


def test_moe_decode_reads_more_experts_at_larger_batch():
    r1 = run(model=MOE, concurrency=1, output_tokens=64)
    r64 = run(model=MOE, concurrency=64, output_tokens=64)
    assert r64.energy_j < r1.energy_j


@pytest.mark.parametrize(
    "kw",
    [
        dict(prompt_tokens=0),
        dict(prompt_tokens=-5),
        dict(output_tokens="0"),
        dict(output_tokens="lognormal:median=-1,sigma=1"),
        dict(output_tokens="banana"),
        dict(strategy="vote0"),
        dict(strategy="vote"),
        dict(concurrency=0),
        dict(weight_dtype="fp64"),
        dict(pue=0.5),
    ],
)
def test_bad_inputs_raise_clear_errors(kw):
    with pytest.raises(TtcsimError):
        run(**kw)


def test_results_are_deterministic():
    kw = dict(strategy="vote8", output_tokens="lognormal:median=400,sigma=0.9,max=4096")
    assert run(**kw) == run(**kw)
