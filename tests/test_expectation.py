"""The O(batch) expectation over random lengths against the full (steps x batch) sum.

Tier 1 (hand-computed and brute force): the reference below is the definition,
``sum_s w_s sum_b P(B(s) = b) * cost(b, s)`` with every cell priced by
``forward_pass``; ``ttcsim.simulator.expectation`` must reproduce it.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import LLAMA_8B, bounded_settings, make_profile
from hypothesis import example, given
from hypothesis import strategies as st
from scipy import stats

from ttcsim.distributions import parse_lengths
from ttcsim.simulator.coefficients import pass_coefficients
from ttcsim.simulator.expectation import (
    BAND_EXACT,
    PANELS,
    batch_measure,
    decode_expectation,
    expected_decode,
    expected_decode_totals,
    query_running_share,
    reference_decode_totals,
    step_grid,
)
from ttcsim.simulator.roofline import forward_pass

COOL = pass_coefficients(make_profile(), LLAMA_8B)
#: static power near the limit and costly FLOPs: batches >= 32 reach the limit at
#: short contexts and leave it at long ones (the hardest case: a kink inside a column)
HOT = pass_coefficients(
    make_profile(active_power_w=300.0, compute_energy_j_per_flop=2e-12), LLAMA_8B
)


def test_one_sequence_by_hand():
    """n = 1, lengths 2 or 3 tokens with equal odds: steps 1 (always) and 2 (half the time)."""
    survival = np.array([1.0, 0.5])  # P(L > 1) = 1, P(L > 2) = 0.5
    cost, q_time = expected_decode(COOL, 100.0, survival, 1, 1)
    one = forward_pass(COOL, 1.0, 101.0, 101.0)
    two = forward_pass(COOL, 1.0, 102.0, 102.0)
    assert cost.time_s == pytest.approx(float(one.time_s + 0.5 * two.time_s), rel=1e-12)
    assert cost.energy_j == pytest.approx(float(one.energy_j + 0.5 * two.energy_j), rel=1e-12)
    assert q_time == pytest.approx(cost.time_s, rel=1e-15)
    assert cost.generated_tokens == pytest.approx(1.5, rel=1e-12)
    assert cost.decode_steps == pytest.approx(1.5, rel=1e-12)


CASES = [
    ("lognormal:median=200,sigma=0.8,max=2000", 4, 4, False),
    ("lognormal:median=200,sigma=0.8,max=2000", 12, 3, True),
    ("gamma:mean=150,shape=1.5", 48, 4, True),
    ("gamma:mean=150,shape=1.5", 200, 8, False),  # windowed binomial (n > 128)
    ("lognormal:median=60,sigma=0.5,max=20000", 6, 2, True),  # blocked step grid
]


@pytest.mark.parametrize("spec,n,samples,shared", CASES)
@pytest.mark.parametrize("prompt", [16.0, 3000.0])
def test_matches_full_grid_sum_at_full_clock(spec, n, samples, shared, prompt):
    survival = parse_lengths(spec).survival_steps()
    t, e, q, tokens, throttled = reference_decode_totals(COOL, prompt, survival, n, samples,
                                                         shared)
    assert not throttled
    cost, q_time = expected_decode(COOL, prompt, survival, n, samples, shared)
    assert cost.time_s == pytest.approx(t, rel=1e-10)
    assert cost.energy_j == pytest.approx(e, rel=1e-10)
    assert q_time == pytest.approx(q, rel=1e-10)
    assert cost.generated_tokens == pytest.approx(tokens, rel=1e-10)


@pytest.mark.parametrize("spec,n,samples,shared", CASES[2:4])
@pytest.mark.parametrize("prompt", [16.0, 300.0])
def test_matches_full_grid_sum_at_the_power_limit(spec, n, samples, shared, prompt):
    survival = parse_lengths(spec).survival_steps()
    t, e, q, _, throttled = reference_decode_totals(HOT, prompt, survival, n, samples, shared)
    assert throttled  # the case must exercise the Gauss nodes
    cost, q_time = expected_decode(HOT, prompt, survival, n, samples, shared)
    assert cost.time_s == pytest.approx(t, rel=1e-4)
    assert cost.energy_j == pytest.approx(e, rel=1e-4)
    assert q_time == pytest.approx(q, rel=1e-4)


def test_the_limit_makes_a_difference_the_nodes_capture():
    """Pricing hot columns at full clock instead would be visibly wrong (test can fail)."""
    survival = parse_lengths("gamma:mean=150,shape=1.5").survival_steps()
    exp = decode_expectation(survival, 200, 4)
    t_hot = expected_decode_totals(HOT, exp, [16.0])[0][0]
    m = exp.measure
    from ttcsim.simulator.expectation import _step_coefficients

    t0, a_b, _, _ = _step_coefficients(HOT, m.batch)
    t_free = float((t0 * m.mass + a_b * (16.0 * m.mass + m.first_moment)).sum())
    assert t_hot > 1.03 * t_free


def test_one_prompt_alone_gives_the_same_bits_as_in_an_array():
    survival = parse_lengths("gamma:mean=150,shape=1.5").survival_steps()
    exp = decode_expectation(survival, 48, 4)
    prompts = np.array([16.0, 100.0, 300.0, 3000.0, 7.0, 16.0])
    shared = np.array([True, False, True, False, True, False])
    for c in (COOL, HOT):
        together = expected_decode_totals(c, exp, prompts, shared)
        for i, p in enumerate(prompts):
            alone = expected_decode_totals(c, exp, [p], bool(shared[i]))
            for a, b in zip(alone, together, strict=True):
                assert a[0] == b[i]
        # sharing the prompt's KV saves HBM energy; time only where the limit binds
        assert together[2][0] < together[2][5]
        assert (together[0][0] == together[0][5]) == (c is COOL)


def test_query_running_share_is_hypergeometric():
    # n = 6 sequences, a query of N = 2: with b = 3 running, P(query done) = C(4,3)/C(6,3)
    share = query_running_share(6, 2, np.array([0.0, 1.0, 3.0, 4.0, 5.0, 6.0]))
    np.testing.assert_allclose(share, [0.0, 1 / 3, 1 - 4 / 20, 1 - 1 / 15, 1.0, 1.0],
                               atol=1e-12)
    # by exchangeability: P(done) * P_n(b) = F^N * P_{n-N}(b)
    n, N, S, b = 40, 5, 0.3, np.arange(0, 36)
    lhs = (1 - query_running_share(n, N, b)) * stats.binom.pmf(b, n, S)
    np.testing.assert_allclose(lhs, (1 - S) ** N * stats.binom.pmf(b, n - N, S), rtol=1e-10,
                               atol=1e-300)


def test_measure_moments_and_gauss_nodes():
    survival = parse_lengths("lognormal:median=200,sigma=0.8,max=2000").survival_steps()
    g = step_grid(survival)
    n = 20
    m = batch_measure(g, n)
    # total mass: expected steps with a non-empty batch; first moment in b: E[sum B(s)]
    assert m.mass.sum() == pytest.approx((1.0 - (1.0 - g.survival) ** n).sum(), rel=1e-10)
    assert (m.batch * m.mass).sum() == pytest.approx(n * g.survival.sum(), rel=1e-10)
    # each column's nodes carry its mass and integrate cubics in s exactly
    assert m.batch.size == n <= BAND_EXACT  # every band is one batch size here
    assert m.node_weights.shape == (m.batch.size, 2 * PANELS)
    np.testing.assert_allclose(m.node_batch[:, 0], m.batch)
    np.testing.assert_allclose(m.node_weights.sum(axis=1), m.mass, rtol=1e-12)
    np.testing.assert_allclose((m.node_weights * m.node_steps).sum(axis=1), m.first_moment,
                               rtol=1e-10)
    pmf = stats.binom.pmf(m.batch[None, :], n, g.survival[:, None])
    for k in (2, 3):
        exact = (pmf * g.steps[:, None] ** k).sum(axis=0)
        quad = (m.node_weights * m.node_steps**k).sum(axis=1)
        np.testing.assert_allclose(quad, exact, rtol=1e-8)
    assert np.all(m.first_step <= m.last_step)


@pytest.mark.parametrize("survival", [np.zeros(5), np.array([1.0, 1.0, 0.0]), np.ones(3),
                                      np.array([1e-300, 0.0])])
@pytest.mark.parametrize("n,samples", [(1, 1), (4, 4), (8, 2), (300, 3)])
def test_degenerate_lengths_match_the_definition_without_warnings(survival, n, samples):
    """Every length 1 (no decode step), every length fixed, vanishing survival."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cost, q_time = expected_decode(COOL, 100.0, survival, n, samples, True)
    t, e, q, tokens, _ = reference_decode_totals(COOL, 100.0, survival, n, samples, True)
    assert cost.time_s == pytest.approx(t, rel=1e-9, abs=1e-300)
    assert cost.energy_j == pytest.approx(e, rel=1e-9, abs=1e-300)
    assert q_time == pytest.approx(q, rel=1e-9, abs=1e-300)
    assert cost.generated_tokens == pytest.approx(tokens, rel=1e-9, abs=1e-300)


@bounded_settings(200)
@example(hazards=[0.0, 0.0, 0.125], n=27, samples=1, prompt=1.0, shared=False, hot=True)
@given(
    hazards=st.lists(st.floats(0.0, 0.2), min_size=1, max_size=300),
    n=st.integers(1, 160),
    samples=st.sampled_from([1, 2, 4, 8]),
    prompt=st.sampled_from([1.0, 37.0, 2048.0]),
    shared=st.booleans(),
    hot=st.booleans(),
)
def test_any_survival_function_matches_the_definition(hazards, n, samples, prompt, shared, hot):
    """Random non-increasing survival functions (per-step hazards), any n and N."""
    survival = np.cumprod(1.0 - np.asarray(hazards))
    n = max(samples, n - n % samples)  # whole queries
    c = HOT if hot else COOL
    cost, q_time = expected_decode(c, prompt, survival, n, samples, shared)
    t, e, q, tokens, _ = reference_decode_totals(c, prompt, survival, n, samples, shared)
    # at the limit: quadrature of the kink where it starts inside a band of batch
    # sizes; up to ~1e-4 on this deliberately hot profile (2e-5 on shipped ones)
    rel = 3e-4 if hot else 1e-9
    assert cost.time_s == pytest.approx(t, rel=rel, abs=1e-300)
    assert cost.energy_j == pytest.approx(e, rel=rel, abs=1e-300)
    assert q_time == pytest.approx(q, rel=rel, abs=1e-300)
    assert cost.generated_tokens == pytest.approx(tokens, rel=1e-9, abs=1e-300)
