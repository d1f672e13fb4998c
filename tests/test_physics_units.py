"""Tier 1: hand-computed counts, times and energies of single passes and segments."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import LLAMA_8B, MOE, make_profile

from ttcsim.simulator import architecture as arch
from ttcsim.simulator.coefficients import pass_coefficients
from ttcsim.simulator.decode import (
    decode_draws,
    decode_time_per_query_s,
    deterministic_decode,
    segment_cost,
)
from ttcsim.simulator.roofline import forward_pass


def test_llama_8b_parameter_count():
    # Meta's model card: 8.03 B parameters.
    assert arch.parameter_count(LLAMA_8B) == pytest.approx(8.03e9, rel=2e-3)
    # by hand: embed+head 2*128256*4096; per layer attn 2*4096^2 + 2*4096*1024, mlp 3*4096*14336
    per_layer = 2 * 4096**2 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096
    assert arch.parameter_count(LLAMA_8B) == 32 * per_layer + 2 * 128256 * 4096 + 4096


def test_linear_flops_and_kv_bytes_by_hand():
    matmul = 32 * (2 * 4096**2 + 2 * 4096 * 1024 + 3 * 4096 * 14336) + 128256 * 4096
    assert arch.linear_flops_per_token(LLAMA_8B) == 2 * matmul
    assert arch.kv_elements_per_token(LLAMA_8B) == 2 * 32 * 8 * 128  # 128 KiB/token in bf16
    assert arch.attention_flops_per_token_pair(LLAMA_8B) == 4 * 32 * 32 * 128
    assert arch.causal_pairs(4, 10) == 4 * 10 + 10  # 11+12+13+14


def test_moe_experts_touched_and_active_params():
    assert arch.experts_touched(MOE, 1) == pytest.approx(2.0)
    assert arch.experts_touched(MOE, 10_000) == pytest.approx(8.0)
    expert = 3 * 1024 * 1024
    assert arch.parameter_count(MOE) - arch.active_parameter_count(MOE) == 4 * 6 * expert


def test_decode_step_by_hand():
    prof = make_profile()
    p = prof.parameters
    c = pass_coefficients(prof, LLAMA_8B)
    ctx = 1000
    w_bytes = arch.shared_weight_parameters(LLAMA_8B) * 2
    kv_b = 2 * 32 * 8 * 128 * 2
    f_lin = arch.linear_flops_per_token(LLAMA_8B)
    f_att = ctx * arch.attention_flops_per_token_pair(LLAMA_8B)
    q = p.roofline_exponent
    t_lin_m = w_bytes / (3.35e12 * p.weight_stream_efficiency)
    t_lin_c = f_lin / (989e12 * p.gemm_efficiency)
    t_att_m = ctx * kv_b / (3.35e12 * p.attention_decode_efficiency)
    t_att_c = f_att / (989e12 * p.attention_prefill_efficiency)
    t = (
        (t_lin_m**q + t_lin_c**q) ** (1 / q)
        + (t_att_m**q + t_att_c**q) ** (1 / q)
        + 32 * p.layer_overhead_s
        + p.step_overhead_s
    )
    e_dyn = (
        p.hbm_energy_j_per_byte * (w_bytes + (ctx + 1) * kv_b)
        + p.compute_energy_j_per_flop * f_lin
        + p.attention_energy_j_per_flop * f_att
    )
    cost = forward_pass(c, 1, ctx, ctx)
    assert not bool(cost.throttled)
    assert float(cost.time_s) == pytest.approx(t, rel=1e-12)
    assert float(cost.dynamic_energy_j) == pytest.approx(e_dyn, rel=1e-12)
    assert float(cost.energy_j) == pytest.approx(e_dyn + (p.idle_power_w + p.active_power_w) * t)


def test_prefill_power_limit_throttles_with_voltage_scaling():
    prof = make_profile(compute_energy_j_per_flop=1.2e-12, dvfs_energy_exponent=1.5)
    p = prof.parameters
    c = pass_coefficients(prof, LLAMA_8B)
    tokens = 8192
    pairs = arch.causal_pairs(tokens)
    cost = forward_pass(c, tokens, 0, pairs)
    assert bool(cost.throttled)
    assert float(cost.energy_j / cost.time_s) == pytest.approx(700.0, rel=1e-6)
    # by hand: a prefill's causal pairs read no cached key, so they cost the bf16
    # GEMM energy per FLOP; the activations (8192 tokens, a 940 MB gate/up output,
    # far over twice the 50 MB L2) all go through HBM
    f_lin = tokens * arch.linear_flops_per_token(LLAMA_8B)
    f_att = pairs * arch.attention_flops_per_token_pair(LLAMA_8B)
    e_comp = p.compute_energy_j_per_flop * (f_lin + f_att)
    w_bytes = arch.shared_weight_parameters(LLAMA_8B) * 2
    kv_b = 2 * 32 * 8 * 128 * 2
    per_layer = 14 * 4096 + 8 * 14336 + (11 * 32 + 8 * 8) * 128
    x_act = tokens * 32 * per_layer * 2
    e_mem = p.hbm_energy_j_per_byte * (w_bytes + tokens * kv_b + x_act)
    # the clock scale s from the energy identity E_dyn = E_mem + s^gamma E_comp ...
    s_clk = ((float(cost.dynamic_energy_j) - e_mem) / e_comp) ** (1 / 1.5)
    assert 0.3 < s_clk < 1.0
    # ... gives back the time: GEMMs and attention at 1/s, the rest at full speed
    q = p.roofline_exponent
    t = (
        ((w_bytes / (3.35e12 * p.weight_stream_efficiency)) ** q
         + (f_lin / (989e12 * p.gemm_efficiency * s_clk)) ** q) ** (1 / q)
        + f_att / (989e12 * p.attention_prefill_efficiency * s_clk)
        + 32 * p.layer_overhead_s + p.step_overhead_s
        + x_act / (3.35e12 * p.weight_stream_efficiency)
    )  # fmt: skip
    assert float(cost.time_s) == pytest.approx(t, rel=1e-6)


def test_smooth_roofline_limits():
    from ttcsim.simulator.roofline import smooth_roofline

    assert smooth_roofline(3.0, 4.0, 2.0) == pytest.approx(5.0)
    assert smooth_roofline(3.0, 4.0, 64.0) == 4.0
    assert smooth_roofline(0.0, 0.0, 2.0) == 0.0


@pytest.mark.parametrize("compute_j", [6e-13, 3e-12])  # unthrottled and throttled decode
def test_segment_closed_form_matches_step_sum(compute_j):
    prof = make_profile(compute_energy_j_per_flop=compute_j, hbm_energy_j_per_byte=1.2e-10)
    c = pass_coefficients(prof, LLAMA_8B)
    batch, ctx0, n = 48, 300, 257
    steps = np.arange(n)
    x = batch * (ctx0 + steps)
    brute = forward_pass(c, np.full(n, batch), x, x)
    t, e_dyn, e = segment_cost(c, batch, ctx0, n)
    # exact closed form when no step is power-limited; Simpson's rule when some are
    tol = 1e-4 if brute.throttled.any() else 1e-10
    assert float(t) == pytest.approx(brute.time_s.sum(), rel=tol)
    assert float(e_dyn) == pytest.approx(brute.dynamic_energy_j.sum(), rel=tol)
    assert float(e) == pytest.approx(brute.energy_j.sum(), rel=tol)


@pytest.mark.parametrize("ctx0,n", [(1000, 3000), (10, 20000)])
def test_segment_partly_power_limited_matches_step_sum(ctx0, n):
    prof = make_profile(compute_energy_j_per_flop=3e-12, hbm_energy_j_per_byte=1.2e-10)
    c = pass_coefficients(prof, LLAMA_8B)
    batch = 128
    x = batch * (ctx0 + np.arange(n))
    brute = forward_pass(c, np.full(n, batch), x, x)
    assert 0 < brute.throttled.sum() < n
    t, _, e = segment_cost(c, batch, ctx0, n)
    assert float(t) == pytest.approx(brute.time_s.sum(), rel=1e-4)
    assert float(e) == pytest.approx(brute.energy_j.sum(), rel=1e-4)


def test_deterministic_decode_matches_step_loop():
    prof = make_profile()
    c = pass_coefficients(prof, LLAMA_8B)
    lengths = np.array([5, 17, 17, 40, 3])
    prompt = 64
    total_t = total_e = 0.0
    for s in range(1, lengths.max()):
        b = int((lengths > s).sum())
        x = b * (prompt + s)
        cost = forward_pass(c, b, x, x)
        total_t += float(cost.time_s)
        total_e += float(cost.energy_j)
    d = deterministic_decode(c, prompt, lengths)
    assert d.time_s == pytest.approx(total_t, rel=1e-10)
    assert d.energy_j == pytest.approx(total_e, rel=1e-10)
    assert d.generated_tokens == (lengths - 1).sum()
    # per-query time: query (5,17) ends at step 16, query (17,40) at 39 = the whole phase
    q = decode_time_per_query_s(c, prompt, lengths[:4], 2)
    assert q[1] == pytest.approx(deterministic_decode(c, prompt, lengths[:4]).time_s)
    assert q[0] < q[1]


def test_decode_draws_matches_rows():
    c = pass_coefficients(make_profile(), LLAMA_8B)
    rng = np.random.default_rng(1)
    mat = rng.integers(1, 300, size=(6, 8)).astype(float)
    t, _, e, _ = decode_draws(c, 100, mat, 4)
    for i in range(6):
        d = deterministic_decode(c, 100, mat[i])
        assert t[i] == pytest.approx(d.time_s, rel=1e-12)
        assert e[i] == pytest.approx(d.energy_j, rel=1e-12)


def test_clock_scale_solves_the_power_limit_by_hand():
    """t(s) = 1 + 2/s, E_mem = 100, E_comp = 300 (J), static 50 W, limit 150 W, gamma 1.

    g(s) = 100 + 300 s - 100 (1 + 2/s) = 300 s - 200/s = 0  ->  s = sqrt(2/3).
    A pass whose memory energy alone exceeds the headroom gets the lowest clock.
    """
    from ttcsim.simulator.power import MIN_CLOCK_SCALE, solve_clock_scale

    def time_at(s, idx):
        return 1.0 + 2.0 / np.asarray(s)

    s = solve_clock_scale(time_at, np.array([100.0, 5000.0]), np.array([300.0, 300.0]),
                          50.0, 150.0, 1.0)
    assert s[0] == pytest.approx(np.sqrt(2.0 / 3.0), rel=1e-11)
    assert s[1] == MIN_CLOCK_SCALE
    # each pass converges on its own: alone it gives the same bits as in the array
    alone = solve_clock_scale(time_at, np.array([100.0]), np.array([300.0]), 50.0, 150.0, 1.0)
    assert alone[0] == s[0]


def test_per_query_decode_time_counts_prefix_sharing_at_the_power_limit():
    """Regression (issue 13): the per-query wait ignored prefix sharing when throttled.

    One query of 64 samples with equal lengths finishes with the batch, so its wait
    must equal the phase's time.  At the power limit the L2 hits of a shared prompt
    lower the step power and so the throttle; priced without them, the wait came
    out longer than the whole phase.
    """
    hot = pass_coefficients(
        make_profile(active_power_w=300.0, compute_energy_j_per_flop=2e-12), LLAMA_8B
    )
    lengths = np.full(64, 200.0)
    shared = deterministic_decode(hot, 300, lengths, 64, True)
    alone = deterministic_decode(hot, 300, lengths, 64, False)
    assert shared.time_s < alone.time_s * (1 - 1e-3)  # sharing matters here: throttled
    q = decode_time_per_query_s(hot, 300, lengths, 64, True)
    assert q[0] == shared.time_s
    assert decode_time_per_query_s(hot, 300, lengths, 64, False)[0] == alone.time_s
