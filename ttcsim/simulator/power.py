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
finds ``s`` by bracketed false position (Anderson-Bjorck), vectorised over passes.
"""

from __future__ import annotations

import numpy as np

#: Lowest clock scale considered (H100 power-limited GEMMs settle near 0.7).
MIN_CLOCK_SCALE = 0.05
#: Bracket width at which a pass's clock scale counts as solved.
CLOCK_TOLERANCE = 1e-12
#: Iteration cap of the root finder (it converges superlinearly, in ~6-10 steps).
MAX_CLOCK_STEPS = 100


def solve_clock_scale(time_at, mem_energy_j, comp_energy_j, static_power_w, limit_w, gamma):
    """Clock scale ``s`` in ``[MIN_CLOCK_SCALE, 1]`` with ``P(s) = limit`` (arrays).

    Root of ``g(s) = E_mem + s^gamma E_comp - (P_max - P_static) t(s)``, which
    rises with ``s`` (``t`` falls), bracketed by ``[MIN_CLOCK_SCALE, 1]``:
    false position with the Anderson-Bjorck step (when the same end is kept
    twice, its ``g`` is scaled by ``1 - g_new / g_old``, or 1/2), which
    converges superlinearly.  Each pass stops on its own once its bracket is
    narrower than :data:`CLOCK_TOLERANCE` or ``|g|`` is below that fraction of
    ``E_mem + E_comp``, so its result does not depend on the other passes in
    the array.  Where even the lowest clock stays
    over the limit, returns ``MIN_CLOCK_SCALE``.

    ``time_at(s, idx)`` returns the time of passes ``idx`` (``None``: all) at clock
    scales ``s``.  ``static_power_w``, ``limit_w`` and ``gamma`` are scalars or
    arrays with one value per pass (passes of different GPUs solved together);
    each pass uses its own values, so the result equals solving it alone.
    Callers pass only passes with ``P(1) > limit``.
    """
    mem = np.asarray(mem_energy_j, dtype=float)
    comp = np.asarray(comp_energy_j, dtype=float)
    head = np.broadcast_to(np.asarray(limit_w, dtype=float) - static_power_w, mem.shape)
    gamma = np.broadcast_to(np.asarray(gamma, dtype=float), mem.shape)

    def g(s, idx):
        if idx.size == mem.size:  # every pass still running: no gather
            return mem + s**gamma * comp - head * time_at(s, None)
        return mem[idx] + s ** gamma[idx] * comp[idx] - head[idx] * time_at(s, idx)

    scale = mem + comp  # g's scale [J]
    every = np.arange(mem.size)
    if mem.size == 1:  # one pass: the same steps in Python floats (same roundings)
        return _solve_one(g, every, float(scale[0]))
    a = np.full(mem.size, MIN_CLOCK_SCALE)
    b = np.ones(mem.size)
    ga = g(a, every)
    gb = g(b, every)
    out = a.copy()
    live = np.flatnonzero(ga < 0)  # else: over the limit even at the lowest clock
    a, b, ga, gb = a[live], b[live], ga[live], gb[live]
    last = np.zeros(live.size, dtype=np.int8)  # end replaced last time: +1 upper, -1 lower
    for _ in range(MAX_CLOCK_STEPS):
        if live.size == 0:
            break
        c = b - gb * (b - a) / (gb - ga)
        c = np.where((c > a) & (c < b), c, 0.5 * (a + b))  # rounding guard
        gc = g(c, live)
        upper = gc > 0  # the root is in [a, c]: c replaces the upper end
        # an end kept twice in a row gets its g scaled (Anderson-Bjorck)
        m_a = 1.0 - gc / gb  # for a, kept while c replaces b
        m_b = 1.0 - gc / ga  # for b, kept while c replaces a
        ga = np.where(upper, np.where(last == 1, ga * np.where(m_a > 0, m_a, 0.5), ga), gc)
        gb = np.where(upper, gc, np.where(last == -1, gb * np.where(m_b > 0, m_b, 0.5), gb))
        a = np.where(upper, a, c)
        b = np.where(upper, c, b)
        last = np.where(upper, 1, -1).astype(np.int8)
        small = np.abs(gc) <= CLOCK_TOLERANCE * scale[live]
        done = ((b - a) < CLOCK_TOLERANCE) | small
        if done.any():
            out[live[done]] = np.where(small[done], c[done], a[done])
            keep = ~done
            live, a, b, ga, gb, last = (v[keep] for v in (live, a, b, ga, gb, last))
    out[live] = a  # not converged within the cap: the lower end (power under the limit)
    return out


def _solve_one(g, every, scale: float) -> np.ndarray:
    """:func:`solve_clock_scale`'s loop for a single pass, without array overhead.

    Every arithmetic step is the vector loop's, on Python floats (IEEE doubles,
    rounded alike), so the result is the same to the bit.
    """

    def at(s: float) -> float:
        return float(g(np.array([s]), every)[0])

    a, b = MIN_CLOCK_SCALE, 1.0
    ga, gb = at(a), at(b)
    if not ga < 0:  # over the limit even at the lowest clock
        return np.array([a])
    last = 0  # end replaced last time: +1 upper, -1 lower
    for _ in range(MAX_CLOCK_STEPS):
        c = b - gb * (b - a) / (gb - ga)
        if not (c > a and c < b):  # rounding guard
            c = 0.5 * (a + b)
        gc = at(c)
        if gc > 0:  # the root is in [a, c]: c replaces the upper end
            if last == 1:
                m_a = 1.0 - gc / gb
                ga = ga * (m_a if m_a > 0 else 0.5)
            gb, b, last = gc, c, 1
        else:
            if last == -1:
                m_b = 1.0 - gc / ga
                gb = gb * (m_b if m_b > 0 else 0.5)
            ga, a, last = gc, c, -1
        small = abs(gc) <= CLOCK_TOLERANCE * scale
        if (b - a) < CLOCK_TOLERANCE or small:
            return np.array([c if small else a])
    return np.array([a])  # not converged within the cap: the lower end


def average_power_w(energy_j, time_s):
    """``E / t`` [W]; 0 where ``t`` is 0."""
    t = np.asarray(time_s, dtype=float)
    return np.divide(energy_j, t, out=np.zeros(np.broadcast(energy_j, t).shape), where=t > 0)
