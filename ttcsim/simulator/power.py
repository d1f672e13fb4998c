"""Power model and the power-limit throttle with voltage/frequency scaling.

A pass has, per GPU, a memory energy ``E_mem`` (bytes moved), a compute
energy ``E_comp`` (FLOPs, at the maximum clock) and a time ``t(s)`` that
depends on the clock scale ``s = f / f_max`` (compute parts take ``1/s``
longer; memory traffic does not).  Power::

    P(s) = P_static + (E_mem + s^gamma * E_comp) / t(s)               [W]

with ``P_static = P_idle + P_active``.  At ``s = 1`` the pass draws ``P(1)``;
if that exceeds the board limit ``P_max`` the GPU lowers its clock until
``P(s) = P_max``.  Lower clocks run at lower voltage, so each FLOP costs less
(``gamma`` = ``dvfs_energy_exponent``, calibrated from power-limited GEMMs).
``P(s)`` falls monotonically as ``s`` falls, so :func:`solve_clock_scale`
finds ``s`` by bisection, vectorised over passes.
"""

from __future__ import annotations

import numpy as np

#: Lowest clock scale considered (H100 power-limited GEMMs settle near 0.7).
MIN_CLOCK_SCALE = 0.05
BISECTION_STEPS = 30  # interval / 2**30: ~1e-9 relative


def solve_clock_scale(time_at, mem_energy_j, comp_energy_j, static_power_w, limit_w, gamma):
    """Clock scale ``s`` in ``[MIN_CLOCK_SCALE, 1]`` with ``P(s) = limit`` (arrays).

    ``time_at(s)`` returns the pass time at clock scale ``s`` (array in, array out).
    Callers pass only passes with ``P(1) > limit``.
    """
    lo = np.full(np.shape(mem_energy_j), MIN_CLOCK_SCALE)
    hi = np.ones_like(lo)
    for _ in range(BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        t = time_at(mid)
        power = static_power_w + (mem_energy_j + mid**gamma * comp_energy_j) / t
        over = power > limit_w
        hi = np.where(over, mid, hi)
        lo = np.where(over, lo, mid)
    return lo


def pass_energy_j(time_s, dynamic_energy_j, static_power_w):
    """Energy of one GPU over a pass: ``P_static * t + E_dyn`` [J]."""
    return static_power_w * time_s + dynamic_energy_j


def average_power_w(energy_j, time_s):
    """``E / t`` [W]; 0 where ``t`` is 0."""
    t = np.asarray(time_s, dtype=float)
    return np.divide(energy_j, t, out=np.zeros(np.broadcast(energy_j, t).shape), where=t > 0)


def throttled_time_s(time_s, dynamic_energy_j, static_power_w, power_limit_w):
    """Time stretched to the power limit at fixed energy: ``max(t, E_dyn / (P_max - P_static))``.

    The ``gamma = 0`` special case of the throttle (no voltage scaling); kept for
    models that mix work inside one pass.  :func:`solve_clock_scale` is the full one.
    """
    headroom_w = np.maximum(np.asarray(power_limit_w) - static_power_w, 1e-9)
    return np.maximum(time_s, dynamic_energy_j / headroom_w)
