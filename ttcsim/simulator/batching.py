"""Decode under an engine's batching policy: static padded batches and continuous batching.

The reference engine's ``lockstep`` decode is :mod:`ttcsim.simulator.decode`
(one batch that shrinks as sequences finish).  This module holds the two
other policies of :mod:`ttcsim.engines.physics`:

* **static padded** (HF ``generate``): ``n`` sequences decode together until the
  longest is done, so the batch is ``n`` at every one of the ``max(L) - 1``
  steps.  Known lengths reuse the lock-step code with every length set to the
  longest; random lengths take the exact expectation over the maximum ``M`` of
  ``n`` i.i.d. lengths::

      E[cost] = sum_{s >= 1} P(M > s) cost(n, n (P + s)),
      P(M > s) = 1 - (1 - S(s))^n                     (S(s) = P(L > s))

  with every step priced by :func:`~ttcsim.simulator.roofline.forward_pass`
  (power limit included).
* **continuous** (vLLM): ``B`` slots, sequences admitted first come first
  served as slots free (:func:`ttcsim.engines.physics.continuous_schedule`).
  Until the last admission (step ``s_sat``) all ``B`` slots run; the work of
  those steps is ``X_sat = X_all - X_drain`` context tokens (the total context
  ``X_all = sum_i d_i P + d_i (d_i + 1) / 2`` of ``d_i = L_i - 1`` steps does not
  depend on the schedule), priced in closed form at batch ``B``
  (:func:`~ttcsim.simulator.decode.segment_cost`).  The sequences still
  running at ``s_sat`` then drain as a shrinking batch, each from its own
  context ``P + age`` (:func:`~ttcsim.simulator.phases.decode_matrix`).
  Random lengths use ``n`` quantile lengths in a fixed shuffled order (a
  deterministic approximation); Monte-Carlo draws are scheduled draw by draw,
  vectorised.  Prefix sharing's L2 hits are not credited here.
"""

from __future__ import annotations

import numpy as np

from ttcsim.simulator.coefficients import PassCoefficients, context_read_tokens
from ttcsim.simulator.decode import DecodeCost, segment_cost
from ttcsim.simulator.power import average_power_w
from ttcsim.simulator.roofline import forward_pass

#: Seed of the fixed order in which quantile lengths are queued (continuous batching).
QUEUE_ORDER_SEED = 0


def quantile_lengths(dist, n: int) -> np.ndarray:
    """``n`` lengths at the mid-quantiles ``(i + 1/2) / n`` of ``dist``, in a fixed random order."""
    s = np.arange(0, dist.upper_bound() + 1, dtype=float)
    cdf = 1.0 - dist.survival(s)
    q = (np.arange(n) + 0.5) / n
    values = s[np.minimum(np.searchsorted(cdf, q - 1e-12), s.size - 1)]
    values = np.maximum(values, 1.0)
    return np.random.default_rng(QUEUE_ORDER_SEED).permutation(values)


def static_padded_expected(
    c: PassCoefficients, prompt_tokens: float, survival: np.ndarray, n: int, queries: int,
    shared_prefix: bool = False,
):
    """Expected static-padded decode of ``n`` random lengths (module formula).

    ``survival[s-1] = P(L > s)``.  With ``shared_prefix`` the ``n / queries``
    samples of each query read its prompt from HBM once per step (the other
    reads hit L2).  Returns ``(DecodeCost, peak_power_w)``; every query waits
    for the longest sequence, so its wait is the phase time.
    """
    surv = np.asarray(survival, dtype=float)
    steps = np.arange(1, surv.size + 1, dtype=float)
    weight = 1.0 - np.power(1.0 - surv, n)
    x = n * context_read_tokens(c, prompt_tokens + steps)  # sliding layers: their window
    hits = (n - queries) * context_read_tokens(c, prompt_tokens) if shared_prefix else 0.0
    cost = forward_pass(c, np.full_like(x, float(n)), x, x, kv_hbm_tokens=x - hits)
    power = average_power_w(cost.energy_j, cost.time_s)
    decode = DecodeCost(
        time_s=float((weight * cost.time_s).sum()),
        dynamic_energy_j=float((weight * cost.dynamic_energy_j).sum()),
        energy_j=float((weight * cost.energy_j).sum()),
        decode_steps=float(weight.sum()),
        generated_tokens=float(n * surv.sum()),
    )
    return decode, float(power[weight > 0].max()) if np.any(weight > 0) else 0.0


def continuous_decode(c: PassCoefficients, prompt_tokens: float, lengths: np.ndarray,
                      slots: int, group: int = 1):
    """Continuous batching of the rows of a ``(draws, n)`` length matrix (module formula).

    Sequences are queued in column order (``group`` consecutive ones form a
    query).  Returns ``(time_s, dynamic_energy_j, energy_j, query_time_s,
    peak_power_w)``: per-draw totals, each draw's mean query wait (until its
    last sequence finishes), and the highest step power.
    """
    from ttcsim.engines.physics import continuous_schedule
    from ttcsim.simulator.phases import decode_matrix

    L = np.atleast_2d(np.asarray(lengths, dtype=float))
    draws, n = L.shape
    d = np.maximum(L - 1.0, 0.0)
    p = float(prompt_tokens)
    start, sat = continuous_schedule(d, slots)
    finish = start + d
    x_all = (d * p + d * (d + 1.0) / 2.0).sum(axis=1)
    # sequences still running when the queue empties: at most `slots` per draw
    k = min(slots, n)
    left = finish - sat[:, None]
    cols = np.argsort(-left, axis=1, kind="stable")[:, :k]
    r = np.maximum(np.take_along_axis(left, cols, axis=1), 0.0)
    age = sat[:, None] - np.take_along_axis(start, cols, axis=1)
    x_drain = (r * (p + age) + r * (r + 1.0) / 2.0).sum(axis=1)
    x_sat = x_all - x_drain
    with np.errstate(divide="ignore", invalid="ignore"):
        ctx0 = np.where(sat > 0, x_sat / (k * np.maximum(sat, 1.0)) - (sat - 1.0) / 2.0, p + 1.0)
    t_sat, ed_sat, e_sat = segment_cost(c, float(k), ctx0, sat)
    drain = decode_matrix(c, np.where(r > 0, p + age, 0.0), np.where(r > 0, r + 1.0, 0.0))
    # finish time of every sequence [s]: in the saturated phase at its mean step time
    step_s = np.where(sat > 0, t_sat / np.maximum(sat, 1.0), 0.0)
    when = finish * step_s[:, None]
    drain_finish = np.where(r > 0, t_sat[:, None] + drain.group_finish_s, 0.0)
    np.put_along_axis(when, cols, np.where(r > 0, drain_finish,
                                           np.take_along_axis(when, cols, axis=1)), axis=1)
    q_time = when.reshape(draws, -1, group).max(axis=2).mean(axis=1)
    x_peak = k * context_read_tokens(c, p + sat)
    peak = forward_pass(c, float(k), x_peak, x_peak)
    peak_w = float(np.max(average_power_w(peak.energy_j, peak.time_s), initial=0.0))
    return (t_sat + drain.time_s, ed_sat + drain.dynamic_energy_j, e_sat + drain.energy_j,
            q_time, max(peak_w, drain.peak_power_w))
