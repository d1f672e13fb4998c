"""Power model and the power-limit throttle.

A pass that needs ``t`` seconds unthrottled and ``E_dyn`` joules of dynamic
energy draws, per GPU::

    P = P_static + E_dyn / t          with P_static = P_idle + P_active   [W]

If ``P`` exceeds the board limit ``P_max`` the GPU lowers its clocks until
``P = P_max``; the work (and, to first order, its dynamic energy) is unchanged,
so the pass stretches to::

    t' = E_dyn / (P_max - P_static)                                       [s]

Assumption: dynamic energy per byte and per FLOP is the same at throttled
clocks (voltage scaling would lower it somewhat; calibration on power-limited
GEMMs absorbs the difference into ``compute_energy_j_per_flop``).
"""

from __future__ import annotations

import numpy as np


def throttled_time_s(time_s, dynamic_energy_j, static_power_w, power_limit_w):
    """Pass time after the power-limit throttle: ``max(t, E_dyn / (P_max - P_static))`` [s]."""
    headroom_w = np.maximum(np.asarray(power_limit_w) - static_power_w, 1e-9)
    return np.maximum(time_s, dynamic_energy_j / headroom_w)


def pass_energy_j(time_s, dynamic_energy_j, static_power_w):
    """Energy of one GPU over a pass: ``P_static * t + E_dyn`` [J]."""
    return static_power_w * time_s + dynamic_energy_j


def average_power_w(energy_j, time_s):
    """``E / t`` [W]; 0 where ``t`` is 0."""
    t = np.asarray(time_s, dtype=float)
    return np.divide(energy_j, t, out=np.zeros(np.broadcast(energy_j, t).shape), where=t > 0)
