"""Decode phases: a batch of sequences that shrinks as sequences finish.

Convention: a sequence with ``L`` output tokens gets its first token from the
prefill pass and ``L - 1`` decode steps.  At decode step ``s`` (1-based) every
active sequence attends over ``P + s`` tokens (its prompt ``P`` and ``s``
generated tokens), so a step with batch ``b`` has::

    tokens = b,   kv_read_tokens = attention_pairs = x = b * (P + s)

and, from :mod:`ttcsim.simulator.roofline`, an unthrottled time and a dynamic
energy that are affine in ``x`` for fixed ``b``::

    t(x) = t0(b) + a * x,      E_dyn(x) = e0(b) + e1 * x

Over a run of steps with a fixed batch, ``x`` is an arithmetic progression, so
each segment's totals are summed in closed form (:func:`segment_cost`): the
cost of a decode phase is O(#distinct lengths), never O(tokens).  Segments
that reach the power limit (large batches of small models) are summed step by
step, vectorised.

Random lengths: with ``n`` i.i.d. lengths of survival function
``S(s) = P(L > s)``, the batch at step ``s`` is ``B(s) ~ Binomial(n, S(s))``, so
the exact expected cost is ``sum_s sum_b P(B(s) = b) * cost(b, s)``
(:mod:`ttcsim.simulator.expectation`, which sums it in O(batch sizes) per
scenario).  This is the order-statistics expectation: the longest sample sets
the duration and energy is never evaluated at the mean length.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ttcsim.simulator.coefficients import PassCoefficients, context_read_tokens
from ttcsim.simulator.roofline import (
    activation_hbm_bytes,
    attention_time_per_pair_s,
    exposed_host_time_s,
    fixed_time_s,
    forward_pass,
    linear_time_s,
    padded_batch,
    weight_bytes_read,
)


@dataclass(frozen=True)
class DecodeCost:
    """Totals of a decode phase (per phase, all GPUs)."""

    time_s: float
    dynamic_energy_j: float
    energy_j: float
    decode_steps: float
    generated_tokens: float  #: tokens produced by decode steps (excludes prefill's first)


def step_coefficients(c: PassCoefficients, batch, l2_hit_tokens=0.0):
    """``(t0, a, e0, e1)`` of a decode step with batch ``b`` at full clock, per GPU.

    With ``x = b * (P + s)`` cached tokens read (one query token per sequence)::

        t(x) = t0 + a * x                     t0 = rl(weights, GEMM) + fixed + X(b)/B_w [s]
        E_dyn(x) = e0 + e1 * x                e0 = e_B (W(b) + (b - h) b_kv + X(b)) + e_F b F_lin,
                                              e1 = e_B b_kv + e_A f_attn          [J]

    ``a`` is :func:`~ttcsim.simulator.roofline.attention_time_per_pair_s` at ``b``
    sequences; ``h = l2_hit_tokens`` are cached tokens read from L2 instead of
    HBM (prefix sharing: energy only).  Arrays broadcast.
    """
    b = np.asarray(batch, dtype=float)
    if c.has_engine_terms:
        return _engine_step_coefficients(c, b, l2_hit_tokens)
    a = attention_time_per_pair_s(c, b)
    x_act = activation_hbm_bytes(c, b)  # 0 for batches whose activations fit the L2
    t0 = linear_time_s(c, b) + fixed_time_s(c, b) + x_act / c.weight_bandwidth_bytes_per_s
    e0 = (
        c.energy_per_byte_j
        * (weight_bytes_read(c, b) + (b - l2_hit_tokens) * c.kv_bytes_per_token + x_act)
        + c.energy_per_linear_flop_j * b * c.linear_flops_per_token
    )
    e1 = c.energy_per_byte_j * c.kv_bytes_per_token + (
        c.energy_per_attention_flop_j * c.attention_flops_per_pair
    )
    return t0, a, e0, e1


def _engine_step_coefficients(c: PassCoefficients, b: np.ndarray, l2_hit_tokens):
    """:func:`step_coefficients` with engine terms (the same model as ``forward_pass``).

    GEMMs at the graph bucket ``bp = pad(b)``; exposed host time
    ``h(b) = h_pass + h_seq b`` adds to ``t0`` and takes ``(P_static - P_gap) h``
    off ``e0``; a per-step cache copy of ``k`` bytes per KV token adds
    ``k / B_w`` to ``a`` and ``e_B k`` to ``e1``.
    """
    bp = padded_batch(c.decode_batch_buckets, b) if c.decode_batch_buckets else b
    host = exposed_host_time_s(c, b, b)
    a = attention_time_per_pair_s(c, b) + c.kv_copy_bytes_per_token / c.weight_bandwidth_bytes_per_s
    x_act = activation_hbm_bytes(c, bp)
    t0 = linear_time_s(c, bp) + fixed_time_s(c, bp) + host + x_act / c.weight_bandwidth_bytes_per_s
    e0 = (
        c.energy_per_byte_j
        * (weight_bytes_read(c, bp) + (b - l2_hit_tokens) * c.kv_bytes_per_token + x_act)
        + c.energy_per_linear_flop_j * bp * c.linear_flops_per_token
        - c.host_gap_saving_w * host
    )
    e1 = c.energy_per_byte_j * (c.kv_bytes_per_token + c.kv_copy_bytes_per_token) + (
        c.energy_per_attention_flop_j * c.attention_flops_per_pair
    )
    return t0, a, e0, e1


def _affine_sum(f0, df, k_lo, k_hi):
    """``sum_{k=k_lo}^{k_hi-1} (f0 + df * k)`` (0 where ``k_hi <= k_lo``)."""
    m = np.maximum(k_hi - k_lo, 0.0)
    return m * f0 + df * m * (k_lo + k_hi - 1.0) / 2.0


def segment_cost(
    c: PassCoefficients,
    batch,
    first_context_tokens,
    n_steps,
    shared_prefix_tokens=0.0,
    groups=None,
):
    """Totals of ``n_steps`` decode steps at fixed ``batch`` (closed form, broadcasting).

    ``first_context_tokens`` is ``P + s`` at the segment's first step; context
    grows by one per sequence per step, so ``x_k = b * (P + s + k)`` and, at
    full clock, ``t_k = t0(b) + a * x_k`` and ``E_k = e0(b) + e1 * x_k``::

        sum_k t_k = n * (t0 + a * x0) + a * dx * n * (n - 1) / 2

    Power ``P_static + E_k / t_k`` is monotone in ``x``, so a segment whose first
    and last steps stay under the limit never throttles.  In a segment that
    does, the step cost (:func:`~ttcsim.simulator.roofline.forward_pass` with
    the clock solved for the limit) is smooth but not affine in ``x``: its sum
    is Simpson's rule over the first, middle and last step, ``n * (f_0 + 4
    f_mid + f_last) / 6`` (exact for affine costs; error well under 0.1 % in
    our tests against the step-by-step sum).

    Prefix sharing: when the ``b`` sequences belong to ``groups`` queries whose
    samples share ``shared_prefix_tokens`` of prompt KV, that prefix comes from
    HBM once per group per step (the other samples hit L2), so each step's HBM
    KV traffic is ``x_k - (b - groups) * P_shared`` tokens; the attention time
    still covers every read.  ``groups=None`` means no sharing.

    Sliding-window layers (share ``phi``, window ``W``): a step reads
    ``x_k = b * (C_k - phi * max(C_k - W, 0))``, ``C_k = P + s + k``, which is
    affine in ``k`` on each side of the step where the window fills, so each
    segment is split there and both parts summed in closed form
    (:func:`_windowed_totals`).

    Returns ``(time_s, dynamic_energy_j, energy_j)`` arrays; energies summed over GPUs.
    """
    g_in = batch if groups is None else groups
    b, ctx0, n, p_sh, g = np.broadcast_arrays(
        *(
            np.asarray(v, dtype=float)
            for v in (batch, first_context_tokens, n_steps, shared_prefix_tokens, g_in)
        )
    )
    shape = b.shape
    b, ctx0, n, p_sh, g = (v.reshape(-1) for v in (b, ctx0, n, p_sh, g))
    # shared-prefix reads served by L2 (sliding layers: the prefix as the window keeps it)
    l2_hits = np.maximum(b - g, 0.0) * context_read_tokens(c, p_sh)
    if np.any(c.windowed_fraction):
        time, e_dyn = _windowed_totals(c, b, ctx0, n, l2_hits)
    else:
        time, e_dyn = _segment_totals(c, b, b * ctx0, b, n, l2_hits)
    active = (b > 0) & (n > 0)
    time = np.where(active, time, 0.0).reshape(shape)
    e_dyn = np.where(active, e_dyn, 0.0).reshape(shape)
    return time, c.n_gpus * e_dyn, c.n_gpus * (c.static_power_w * time + e_dyn)


def _windowed_totals(c: PassCoefficients, b, ctx0, n, l2_hits):
    """:func:`_segment_totals` of segments whose reads saturate in sliding layers.

    Steps ``k < n_1 = clip(floor(W - C_0) + 1, 0, n)`` read the whole context
    (``x = b C_k``); the rest read ``x = b ((1 - phi) C_k + phi W)``, slope
    ``b (1 - phi)``.  Shared-prefix L2 hits count the prefix as the window keeps
    it, ``attended(P_shared)`` per sample (an upper bound late in long decodes).
    """
    w, phi = c.attention_window_tokens, c.windowed_fraction
    n1 = np.clip(np.floor(w - ctx0) + 1.0, 0.0, n)
    ctx1 = ctx0 + n1
    both = (
        np.concatenate(v)
        for v in (
            (b, b),
            (b * ctx0, b * ((1.0 - phi) * ctx1 + phi * w)),
            (b, b * (1.0 - phi)),
            (n1, n - n1),
            (l2_hits, l2_hits),
        )
    )
    time, e_dyn = _segment_totals(c, *both)
    m = b.size
    return time[:m] + time[m:], e_dyn[:m] + e_dyn[m:]


def _segment_totals(c: PassCoefficients, b, x0, dx, n, l2_hits):
    """Per-GPU ``(time_s, dynamic_energy_j)`` of ``n`` steps reading ``x0 + k * dx`` tokens.

    The closed form and power-limit split of :func:`segment_cost`; flat arrays.
    """
    t0, a, e0, e1 = step_coefficients(c, b, l2_hits)
    sum_k = n * (n - 1.0) / 2.0
    time = n * (t0 + a * x0) + a * dx * sum_k
    e_dyn = n * (e0 + e1 * x0) + e1 * dx * sum_k
    active = (b > 0) & (n > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        x1 = x0 + (n - 1.0) * dx
        p_first = c.static_power_w + (e0 + e1 * x0) / (t0 + a * x0)
        p_last = c.static_power_w + (e0 + e1 * x1) / (t0 + a * x1)
    hot = active & ((p_first > c.power_limit_w) | (p_last > c.power_limit_w))
    if hot.any():
        # Power-limited steps: P(x) is monotone, so the throttled steps are one run at
        # the start or the end of the segment.  Split at the crossing x*; the free part
        # is summed in closed form, the throttled part (smooth, not affine in x) by
        # Simpson's rule over its first, middle and last step.
        seg = np.nonzero(hot)[0]
        nn, xx0, bb, dxx = n[seg], x0[seg], b[seg], dx[seg]
        head = c.power_limit_w - c.static_power_w
        with np.errstate(divide="ignore", invalid="ignore"):
            x_star = (head * t0[seg] - e0[seg]) / (e1 - head * a[seg])
            k_star = np.clip(np.ceil((x_star - xx0) / dxx), 0.0, nn)
        rising = p_first[seg] <= c.power_limit_w
        falling = ~rising & (p_last[seg] <= c.power_limit_w)
        # throttled steps [k_lo, k_hi); free steps are the rest of [0, n)
        k_lo = np.where(rising, k_star, 0.0)
        k_hi = np.where(falling, k_star, nn)
        k_lo = np.where(~rising & ~falling, 0.0, k_lo)
        m = np.maximum(k_hi - k_lo, 0.0)
        free_t = time[seg] - _affine_sum(t0[seg] + a[seg] * xx0, a[seg] * dxx, k_lo, k_hi)
        free_e = e_dyn[seg] - _affine_sum(e0[seg] + e1 * xx0, e1 * dxx, k_lo, k_hi)
        k = np.stack([k_lo, k_lo + (m - 1.0) / 2.0, k_lo + m - 1.0])
        b3 = np.broadcast_to(bb, k.shape)
        x = xx0 + k * dxx
        cost = forward_pass(c, b3, x, x, kv_hbm_tokens=x - l2_hits[seg])
        weights = np.array([1.0, 4.0, 1.0])[:, None] / 6.0
        time[seg] = free_t + m * (weights * cost.time_s).sum(axis=0)
        e_dyn[seg] = free_e + m * (weights * cost.dynamic_energy_j).sum(axis=0) / c.n_gpus
    return time, e_dyn


def _segments(prompt_tokens: float, output_tokens, samples: int, shared: bool):
    """Segments of a deterministic decode: batch, first context, steps, groups, order.

    Sequences are ordered query by query (``samples`` each).  Segment ``j`` runs
    the steps between the ``j``-th and ``j+1``-th shortest sequence's last step;
    its active groups are the queries with a sequence still running.
    """
    lengths = np.asarray(output_tokens, dtype=float)
    steps = np.sort(np.maximum(lengths - 1.0, 0.0))
    n = steps.size
    bounds = np.concatenate([[0.0], steps])
    batch = n - np.arange(n, dtype=float)
    first_ctx = prompt_tokens + bounds[:-1] + 1.0
    groups = None
    if shared and samples > 1:
        last = np.sort(np.maximum(lengths.reshape(-1, samples) - 1.0, 0.0).max(axis=1))
        groups = last.size - np.searchsorted(last, bounds[:-1], side="right")
    return batch, first_ctx, np.diff(bounds), groups, steps


def deterministic_decode(
    c: PassCoefficients,
    prompt_tokens: float,
    output_tokens,
    samples_per_query: int = 1,
    shared_prefix: bool = False,
) -> DecodeCost:
    """Decode of sequences with known lengths ``output_tokens`` (one per sequence).

    With ``shared_prefix`` each query's ``samples_per_query`` samples share the
    prompt's KV (see :func:`segment_cost`).
    """
    batch, first_ctx, seg_steps, groups, steps = _segments(
        prompt_tokens, output_tokens, samples_per_query, shared_prefix
    )
    t, e_dyn, e = segment_cost(
        c, batch, first_ctx, seg_steps, prompt_tokens if groups is not None else 0.0, groups
    )
    return DecodeCost(
        time_s=float(t.sum()),
        dynamic_energy_j=float(e_dyn.sum()),
        energy_j=float(e.sum()),
        decode_steps=float(steps[-1]) if steps.size else 0.0,
        generated_tokens=float(steps.sum()),
    )


def decode_time_per_query_s(
    c: PassCoefficients,
    prompt_tokens: float,
    output_tokens,
    samples_per_query: int,
    shared_prefix: bool = False,
) -> np.ndarray:
    """Decode time until each query's last sample finishes [s], for known lengths.

    ``output_tokens`` is ordered query by query (``samples_per_query`` each).
    Unthrottled time does not depend on prefix sharing (every read takes
    bandwidth), but a power-limited step does (shared reads cost less energy), so
    the segments are priced as :func:`deterministic_decode` prices them: the last
    query's finish is then exactly the batch's decode time.
    """
    lengths = np.asarray(output_tokens, dtype=float)
    batch, first_ctx, seg_steps, groups, steps = _segments(
        prompt_tokens, lengths, samples_per_query, shared_prefix
    )
    n = steps.size
    t, _, _ = segment_cost(
        c, batch, first_ctx, seg_steps, prompt_tokens if groups is not None else 0.0, groups
    )
    cumulative = np.cumsum(t)
    last = np.maximum(lengths.reshape(-1, samples_per_query) - 1.0, 0.0).max(axis=1)
    idx = np.searchsorted(steps, last, side="right") - 1
    return np.where(last > 0, cumulative[np.clip(idx, 0, n - 1)], 0.0)


def decode_draws(
    c: PassCoefficients,
    prompt_tokens: float,
    lengths: np.ndarray,
    samples: int,
    shared_prefix: bool = False,
):
    """Decode cost for each row of a ``(draws, n)`` matrix of known lengths (vectorised).

    Rows are ordered query by query (``samples`` each); see
    :func:`deterministic_decode` for ``shared_prefix``.  Returns ``(time_s,
    dynamic_energy_j, energy_j, query_time_s)``; the first three have shape
    ``(draws,)``, ``query_time_s`` has ``(draws, n / samples)``.
    """
    lengths = np.atleast_2d(np.asarray(lengths, dtype=float))
    draws, n = lengths.shape
    steps = np.sort(np.maximum(lengths - 1.0, 0.0), axis=1)
    bounds = np.concatenate([np.zeros((draws, 1)), steps], axis=1)
    batch = (n - np.arange(n))[None, :]
    last = np.maximum(lengths.reshape(draws, -1, samples) - 1.0, 0.0).max(axis=2)
    groups, shared = None, 0.0
    if shared_prefix and samples > 1:
        last_sorted = np.sort(last, axis=1)
        # queries still running at each segment start: count of query ends > bound
        below = (last_sorted[:, None, :] <= bounds[:, :-1, None]).sum(axis=2)
        groups, shared = last.shape[1] - below, prompt_tokens
    t, e_dyn, e = segment_cost(
        c, batch, prompt_tokens + bounds[:, :-1] + 1.0, np.diff(bounds, axis=1), shared, groups
    )
    cumulative = np.cumsum(t, axis=1)
    idx = np.clip(
        np.array([np.searchsorted(steps[i], last[i], side="right") - 1 for i in range(draws)]),
        0,
        n - 1,
    )
    q_time = np.where(last > 0, np.take_along_axis(cumulative, idx, axis=1), 0.0)
    return t.sum(axis=1), e_dyn.sum(axis=1), e.sum(axis=1), q_time
