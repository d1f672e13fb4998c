"""Expected decode cost over random output lengths, in O(batch sizes) per scenario.

``n`` sequences with i.i.d. lengths of survival function ``S(s) = P(L > s)``
decode as one shrinking batch: at step ``s`` the batch is ``B(s) ~ Binomial(n,
S(s))``, so the exact expected cost is (:mod:`ttcsim.simulator.decode`)::

    E[cost] = sum_s w_s sum_b P(B(s) = b) * cost(b, s)

(``w_s = 1`` per step; long grids are blocked, see :func:`step_grid`).  Summing
that ``(steps x batch)`` grid per scenario is O(steps * n).  Swap the sums
instead: per batch size ``b`` the step weights form a measure over ``s``,

    mu_b(s) = w_s * P(B(s) = b),   M0(b) = sum_s mu_b(s),   M1(b) = sum_s mu_b(s) * s,

which depends on the length distribution and ``n`` only -- not on the GPU, the
model or the prompt.  At full clock a decode step with batch ``b`` and prompt
``P`` is affine in ``s`` (:func:`ttcsim.simulator.decode.segment_cost`)::

    t(b, s) = t0(b) + a(b) * b * (P + s)
    e(b, s) = e0(b) + e1 * b * (P + s) - e_B * b_kv * P * h_b(s)

(``h_b(s)`` sequences whose shared prompt is read from L2, see below), so

    E[t] = sum_b t0(b) M0(b) + a(b) b (P M0(b) + M1(b))                  [s]
    E[e] = sum_b e0(b) M0(b) + e1 b (P M0(b) + M1(b)) - e_B b_kv P H(b)   [J]

with ``H(b) = sum_s mu_b(s) h_b(s)``: exact, and affine in ``P``.

Power-limited steps are not affine in ``s``.  Step power at fixed ``b`` is a
ratio of affine functions of ``s``, hence monotone, so a batch column reaches
the limit only if one end of its support ``[s_min(b), s_max(b)]`` does (the
check ignores L2 hits, which only lower the power, so it is conservative).
Such columns are priced by quadrature instead: ``mu_b`` is cut into
:data:`PANELS` panels of equal mass and each panel gets the two-point Gauss
rule of its own measure (nodes and weights from its first four moments; exact
for cubics in ``s``), and :func:`~ttcsim.simulator.roofline.forward_pass`
prices each node.  The error is that of a 16-point composite Gauss rule on a
smooth step cost (below 1e-5 relative in our tests against the full grid sum;
larger only where a panel straddles the point where the limit starts).

Prefix sharing: with ``Q = n / N`` queries of ``N`` samples sharing a prompt,
``g(s) = Q * (1 - (1 - S(s))^N)`` queries are expected to run at step ``s``
and ``h_b(s) = max(b - g(s), 0)`` samples read the prompt from L2 (the model
of :func:`~ttcsim.simulator.decode.segment_cost`, with the expected number of
running queries as in the full-grid sum).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ttcsim.simulator.coefficients import PassCoefficients
from ttcsim.simulator.decode import DecodeCost
from ttcsim.simulator.roofline import (
    attention_time_per_pair_s,
    fixed_time_s,
    forward_pass,
    linear_time_s,
    weight_bytes_read,
)

#: Step grids longer than this are integrated in blocks (see :func:`step_grid`).
MAX_EXACT_STEPS = 16384
#: Binomial window half-width in standard deviations for large batches.
WINDOW_SIGMAS = 9.0
#: Batches up to this size use the whole binomial support ``0..n`` at every step.
EXACT_BATCH = 128
#: Equal-mass panels per batch column for power-limited columns (2 Gauss nodes each).
PANELS = 8


def binomial_grid(n: int, survival: np.ndarray):
    """Batch values and probabilities per step: exact for small ``n``, windowed for large.

    Returns ``(b, pmf)`` of shape ``(steps, width)``: ``pmf[j, i] = P(B = b[j, i])``
    with ``B ~ Binomial(n, survival[j])``.  Up to :data:`EXACT_BATCH` the row is
    ``0..n``; above, a window of :data:`WINDOW_SIGMAS` standard deviations
    around the mean (the mass outside is below 1e-18).  Used where a strategy
    sums a whole ``(steps x batch)`` grid; :func:`batch_measure` lays its cells
    out by batch instead.
    """
    survival = np.asarray(survival, dtype=float)
    if n <= EXACT_BATCH:
        b = np.arange(n + 1, dtype=float)[None, :].repeat(survival.size, axis=0)
    else:
        mu = n * survival
        sd = np.sqrt(n * survival * (1 - survival))
        width = int(np.ceil(2 * WINDOW_SIGMAS * sd.max() + 6))
        width = min(width, n + 1)
        lo = np.clip(np.floor(mu - WINDOW_SIGMAS * sd - 3), 0, n + 1 - width)
        b = lo[:, None] + np.arange(width)[None, :]
    from scipy import stats  # lazy: keeps fixed-length predictions free of scipy's import time

    pmf = stats.binom.pmf(b, n, survival[:, None])
    return b, pmf


def binomial_pmf(n: int, b: np.ndarray, log_p: np.ndarray, log_q: np.ndarray) -> np.ndarray:
    """``P(B = b)`` for ``B ~ Binomial(n, p)`` from ``log p`` and ``log(1 - p)`` (arrays).

    ``log C(n, b) + b log p + (n - b) log(1 - p)`` through ``lgamma``; pass a large
    negative finite number for ``log 0`` (so ``0 * log 0`` is 0).  Relative
    error about ``1e-16 * n log n``.
    """
    from scipy.special import gammaln  # lazy, as above

    lg = gammaln(np.arange(n + 1, dtype=float) + 1.0)
    bi = b.astype(np.int64)
    return np.exp(lg[n] - lg[bi] - lg[n - bi] + b * log_p + (n - b) * log_q)


@dataclass(frozen=True)
class StepGrid:
    """Decode steps of a survival function, blocked when long.

    ``survival[j] = P(L > s)`` at step ``steps[j]``, which stands for ``weight[j]``
    steps.  Grids up to :data:`MAX_EXACT_STEPS` steps are exact (``steps = 1,
    2, ...``, weights 1); longer ones are cut into equal blocks evaluated at the
    block centre with the block's mean survival (the cost is affine in ``s``
    within a block at fixed batch; only ``S``'s variation inside a block is lost).
    """

    survival: np.ndarray
    steps: np.ndarray
    weight: np.ndarray


def step_grid(survival) -> StepGrid:
    """:class:`StepGrid` of ``survival[s-1] = P(L > s)``, ``s = 1 .. len(survival)``."""
    survival = np.asarray(survival, dtype=float)
    n_steps = survival.size
    block = max(1, int(np.ceil(n_steps / MAX_EXACT_STEPS)))
    if block == 1:
        return StepGrid(survival, np.arange(1, n_steps + 1, dtype=float), np.ones(n_steps))
    n_blocks = int(np.ceil(n_steps / block))
    pad = np.concatenate([survival, np.zeros(n_blocks * block - n_steps)])
    return StepGrid(
        pad.reshape(n_blocks, block).mean(axis=1),
        np.arange(n_blocks) * block + (block + 1) / 2.0,
        np.full(n_blocks, float(block)),
    )


@dataclass(frozen=True)
class BatchMeasure:
    """The step measure ``mu_b(s)`` of every batch size ``b >= 1`` that has mass.

    Arrays are over batch sizes (``k`` of them); the node arrays are ``(k, 2 *
    PANELS)``.  ``l2_hits[i] = sum_s mu_b(s) h_b(s)`` and ``node_l2_hits`` the
    panel means of ``h_b`` (zeros without prefix sharing).
    """

    batch: np.ndarray
    mass: np.ndarray  #: M0(b)
    first_moment: np.ndarray  #: M1(b) [steps]
    l2_hits: np.ndarray  #: H(b) [sequences]
    first_step: np.ndarray  #: smallest s with mass
    last_step: np.ndarray  #: largest s with mass
    node_steps: np.ndarray
    node_weights: np.ndarray
    node_l2_hits: np.ndarray


#: Cells and columns below this share of their column / of the measure are ignored.
NEGLIGIBLE = 1e-15


def _windows(n: int, survival: np.ndarray):
    """Per step, the batch range ``[lo, hi]`` holding all but ~1e-18 of ``Binomial(n, S)``.

    Mean +- :data:`WINDOW_SIGMAS` standard deviations + 3, widened so that both
    ends are non-increasing along the steps (survival is non-increasing), which
    makes every batch size's steps one contiguous run.
    """
    mean = n * survival
    sd = np.sqrt(n * survival * (1.0 - survival))
    lo = np.clip(np.floor(mean - WINDOW_SIGMAS * sd - 3.0), 0, n).astype(np.int64)
    hi = np.clip(np.ceil(mean + WINDOW_SIGMAS * sd + 3.0), 0, n).astype(np.int64)
    lo = np.minimum.accumulate(lo)
    hi = np.maximum.accumulate(hi[::-1])[::-1]
    return lo, hi


def batch_measure(grid: StepGrid, n: int, factor=None, running_groups=None) -> BatchMeasure:
    """:class:`BatchMeasure` of ``n`` sequences: ``mu_b(s) = w_s * factor_s * P(B(s) = b)``.

    ``factor`` (per grid step, default 1) reweights steps, e.g. ``F(s)^N`` for
    the batch left once one query is done.  ``running_groups`` (per grid step)
    is ``g(s)`` for prefix sharing (``None``: no sharing).

    Cells are laid out batch by batch (steps ascending within a batch size),
    over the binomial windows of :func:`_windows`: O(steps * window) work, no
    sort.  Batch sizes holding less than :data:`NEGLIGIBLE` of the measure are
    dropped, and a column's support (for the power-limit check) ignores its
    cells below that share of the column.
    """
    surv = np.asarray(grid.survival, dtype=float)
    weight = grid.weight if factor is None else grid.weight * np.asarray(factor, dtype=float)
    lo, hi = _windows(n, surv)
    batches = np.arange(1, n + 1)  # b = 0 runs no pass
    first = np.searchsorted(-lo, -batches, side="left")  # first step with lo <= b
    last = np.searchsorted(-hi, -batches, side="right") - 1  # last step with hi >= b
    count = np.maximum(last - first + 1, 0)
    batches, first, count = batches[count > 0], first[count > 0], count[count > 0]
    start = np.cumsum(count) - count
    col = np.repeat(np.arange(batches.size), count)
    row = first[col] + np.arange(col.size) - start[col]
    bf = batches[col].astype(float)
    with np.errstate(divide="ignore"):
        log_p = np.where(surv > 0, np.log(surv), -1e300)
        log_q = np.where(surv < 1, np.log1p(-surv), -1e300)
    muf = binomial_pmf(n, bf, log_p[row], log_q[row]) * weight[row]
    sf = grid.steps[row]
    if running_groups is None:
        hf = np.zeros_like(bf)
    else:
        hf = np.maximum(bf - np.asarray(running_groups, dtype=float)[row], 0.0)
    k = batches.size

    def per_col(v):
        return np.bincount(col, v, minlength=k)

    mass = per_col(muf)
    # equal-mass panels: position of each cell's mid-mass within its column
    # (normalised per column first, so a column's share is exact to ~k ulps)
    share = muf / np.where(mass > 0, mass, 1.0)[col]
    cum = np.cumsum(share)
    u = cum - 0.5 * share - np.repeat(cum[start] - share[start], count)
    panel = col * PANELS + np.clip((u * PANELS).astype(np.int64), 0, PANELS - 1)
    size = k * PANELS

    def per_panel(v):
        return np.bincount(panel, v, minlength=size)

    p0 = per_panel(muf)
    filled = p0 > 0
    safe0 = np.where(filled, p0, 1.0)
    mean = per_panel(muf * sf) / safe0
    d = sf - mean[panel]
    var = per_panel(muf * d * d) / safe0
    third = per_panel(muf * d * d * d) / safe0
    sd = np.sqrt(np.maximum(var, 0.0))
    skew = np.divide(third, sd**3, out=np.zeros(size), where=sd > 0)
    # two-point Gauss rule of a standardised measure with skewness k:
    # nodes (k -+ r) / 2, r = sqrt(k^2 + 4), weights u2 / r and -u1 / r
    r = np.sqrt(skew * skew + 4.0)
    u1, u2 = (skew - r) / 2.0, (skew + r) / 2.0
    nodes = np.stack([mean + sd * u1, mean + sd * u2], axis=1)
    weights = np.stack([p0 * u2 / r, -p0 * u1 / r], axis=1)
    hits = np.repeat((per_panel(muf * hf) / safe0)[:, None], 2, axis=1)
    # support: first and last step of each column with a non-negligible share
    idx = np.arange(col.size)
    big = share > NEGLIGIBLE
    lo_i = np.minimum.reduceat(np.where(big, idx, col.size), start)
    hi_i = np.maximum.reduceat(np.where(big, idx, -1), start)
    keep = (mass > NEGLIGIBLE * mass.sum()) & (hi_i >= 0)
    lo_i, hi_i = lo_i[keep], hi_i[keep]
    nodes = np.where(filled[:, None], nodes, 0.0).reshape(k, 2 * PANELS)[keep]
    return BatchMeasure(
        batch=batches[keep].astype(float),
        mass=mass[keep],
        first_moment=per_col(muf * sf)[keep],
        l2_hits=per_col(muf * hf)[keep],
        first_step=sf[lo_i],
        last_step=sf[hi_i],
        node_steps=nodes,
        node_weights=np.where(filled[:, None], weights, 0.0).reshape(k, 2 * PANELS)[keep],
        node_l2_hits=hits.reshape(k, 2 * PANELS)[keep],
    )


@dataclass(frozen=True)
class DecodeExpectation:
    """What the expected decode of ``n`` random lengths needs, independent of the deployment.

    ``batch``: the measure of all ``n`` sequences; ``others``: the batch left
    once one query's ``N`` samples are all done (``n - N`` sequences, steps
    weighted by ``F(s)^N``), ``None`` when ``n == N``.
    """

    n_sequences: int
    samples_per_query: int
    shared_prefix: bool
    batch: BatchMeasure
    others: BatchMeasure | None
    decode_steps: float  #: E[longest decode] = sum_s w_s (1 - F(s)^n)
    generated_tokens: float  #: E[tokens from decode steps] = sum_s w_s E[B(s)]


def decode_expectation(
    survival, n_sequences: int, samples_per_query: int, shared_prefix: bool = False
) -> DecodeExpectation:
    """Build the :class:`DecodeExpectation` of ``n_sequences`` lengths with ``survival``.

    ``survival[s-1] = P(L > s)`` for ``s = 1 .. len(survival)`` (reaching near 0);
    the sequences are ``n / N`` queries of ``samples_per_query = N`` samples.
    """
    grid = step_grid(survival)
    n, per = int(n_sequences), int(samples_per_query)
    done = 1.0 - grid.survival
    groups = None
    if shared_prefix and per > 1:
        groups = (n // per) * (1.0 - done**per)
    batch = batch_measure(grid, n, running_groups=groups)
    others = None
    if n > per:
        others = batch_measure(grid, n - per, factor=done**per, running_groups=groups)
    return DecodeExpectation(
        n_sequences=n,
        samples_per_query=per,
        shared_prefix=groups is not None,
        batch=batch,
        others=others,
        decode_steps=float((grid.weight * (1.0 - done**n)).sum()),
        generated_tokens=float((batch.batch * batch.mass).sum()),
    )


def _step_coefficients(c: PassCoefficients, b: np.ndarray):
    """``(t0, a*b, e0, e1*b)`` of a decode step with batch ``b`` at full clock (per GPU)."""
    t0 = linear_time_s(c, b) + fixed_time_s(c, b)
    a_b = attention_time_per_pair_s(c, b) * b
    e0 = (
        c.energy_per_byte_j * (weight_bytes_read(c, b) + b * c.kv_bytes_per_token)
        + c.energy_per_linear_flop_j * b * c.linear_flops_per_token
    )
    e1 = c.energy_per_byte_j * c.kv_bytes_per_token + (
        c.energy_per_attention_flop_j * c.attention_flops_per_pair
    )
    return t0, a_b, e0, e1 * b


def _measure_totals(c: PassCoefficients, m: BatchMeasure, prompts: np.ndarray):
    """``(time_s, dynamic_energy_j)`` per prompt of one measure (energy summed over GPUs).

    Closed form over all columns, then power-limited columns re-priced by
    their Gauss nodes (the difference added per prompt, in column order).
    """
    b = m.batch
    t0, a_b, e0, e1_b = _step_coefficients(c, b)
    kv_j = c.energy_per_byte_j * c.kv_bytes_per_token
    time0 = float((t0 * m.mass + a_b * m.first_moment).sum())
    time1 = float((a_b * m.mass).sum())
    dyn0 = float((e0 * m.mass + e1_b * m.first_moment).sum())
    dyn1 = float((e1_b * m.mass).sum()) - kv_j * float(m.l2_hits.sum())
    time = time0 + prompts * time1
    dyn = dyn0 + prompts * dyn1
    if b.size == 0:
        return time, c.n_gpus * dyn
    # power-limit check at both ends of every column (no L2 credit: an upper bound)
    head = c.power_limit_w - c.static_power_w
    p = prompts[:, None]
    hot = np.zeros((prompts.size, b.size), dtype=bool)
    for s_end in (m.first_step, m.last_step):
        ctx = p + s_end[None, :]
        hot |= e0 + e1_b * ctx > head * (t0 + a_b * ctx)
    rows, cols = np.nonzero(hot)
    if rows.size:
        pk, bk = prompts[rows][:, None], b[cols][:, None]
        ctx = bk * (pk + m.node_steps[cols])
        cost = forward_pass(c, bk, ctx, ctx, kv_hbm_tokens=ctx - m.node_l2_hits[cols] * pk)
        w = m.node_weights[cols]
        pr = prompts[rows]
        mass, first = m.mass[cols], m.first_moment[cols]
        free_t = t0[cols] * mass + a_b[cols] * (pr * mass + first)
        free_d = e0[cols] * mass + e1_b[cols] * (pr * mass + first) - kv_j * pr * m.l2_hits[cols]
        dt = (w * cost.time_s).sum(axis=1) - free_t
        dd = (w * cost.dynamic_energy_j).sum(axis=1) / c.n_gpus - free_d
        time = time + np.bincount(rows, dt, minlength=prompts.size)
        dyn = dyn + np.bincount(rows, dd, minlength=prompts.size)
    return time, c.n_gpus * dyn


def expected_decode_totals(c: PassCoefficients, exp: DecodeExpectation, prompt_tokens):
    """Expected decode totals for every prompt length in ``prompt_tokens`` (an array).

    Returns ``(time_s, dynamic_energy_j, energy_j, query_time_s)`` arrays (all
    GPUs): batch time, dynamic and total energy, and the expected time until
    one query's samples have all finished::

        E[T_q] = E[T] - sum_b sum_s w_s F(s)^N P_{n-N}(B(s) = b) t(b, s)

    (a query still runs at step ``s`` unless its ``N`` samples are done, in which
    case the batch holds the other ``n - N`` sequences only).  Each prompt's
    result depends on that prompt alone (no cross-prompt arithmetic), so one
    prompt gives the same bits alone or in an array.
    """
    prompts = np.atleast_1d(np.asarray(prompt_tokens, dtype=float))
    time, dyn = _measure_totals(c, exp.batch, prompts)
    energy = c.n_gpus * c.static_power_w * time + dyn
    q_time = time
    if exp.others is not None:
        q_time = time - _measure_totals(c, exp.others, prompts)[0]
    return time, dyn, energy, q_time


def expected_decode(
    c: PassCoefficients,
    prompt_tokens: float,
    survival: np.ndarray,
    n_sequences: int,
    samples_per_query: int,
    shared_prefix: bool = False,
):
    """Expected decode cost for ``n_sequences`` i.i.d. random lengths, one prompt length.

    ``survival[s-1] = P(L > s)``; see :func:`expected_decode_totals`.  Returns
    ``(DecodeCost, query_time_s)``.
    """
    exp = decode_expectation(survival, n_sequences, samples_per_query, shared_prefix)
    time, dyn, energy, q_time = expected_decode_totals(c, exp, [prompt_tokens])
    cost = DecodeCost(
        time_s=float(time[0]),
        dynamic_energy_j=float(dyn[0]),
        energy_j=float(energy[0]),
        decode_steps=exp.decode_steps,
        generated_tokens=exp.generated_tokens,
    )
    return cost, float(q_time[0])
