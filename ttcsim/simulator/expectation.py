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
model or the prompt (:func:`decode_expectation` builds it once).  At full clock
a decode step with batch ``b`` and prompt ``P`` is affine in ``s``
(:func:`ttcsim.simulator.decode.segment_cost`)::

    t(b, s) = t0(b) + a(b) * b * (P + s)
    e(b, s) = e0(b) + e1 * b * (P + s) - e_B * b_kv * P * h_b(s)

(``h_b(s)`` sequences whose shared prompt is read from L2, see below), so

    E[t] = sum_b t0(b) M0(b) + a(b) b (P M0(b) + M1(b))                  [s]
    E[e] = sum_b e0(b) M0(b) + e1 b (P M0(b) + M1(b)) - e_B b_kv P H(b)   [J]

with ``H(b) = sum_s mu_b(s) h_b(s)``: exact, and affine in ``P``.

**One query's wait.**  A query (``N`` of the ``n`` sequences) still runs at
step ``s`` unless all its samples are done.  Given ``B(s) = b``, the ``b``
running sequences are a uniform subset (exchangeability), so the query is done
with probability ``r(b) = C(n - N, b) / C(n, b)``, whatever ``s``::

    E[T_q] = sum_b (1 - r(b)) * sum_s mu_b(s) t(b, s)                     [s]

(equal to ``E[T] - sum_s F(s)^N sum_b P_{n-N}(B(s) = b) t(b, s)``, since
``P_n(b) r(b) = F^N P_{n-N}(b)``): one more weight per batch size.

**Power limit.**  Power-limited steps are not affine in ``s``.  Step power at
fixed ``b`` is a ratio of affine functions of ``s``, hence monotone, so a batch
size reaches the limit only if one end of its support ``[s_min(b), s_max(b)]``
does (the check ignores L2 hits, which only lower the power, so it is
conservative).  For those, the difference between the true step cost and the
full-clock one is added by quadrature: batch sizes are grouped in *bands*
(each size up to :data:`BAND_EXACT`, then ranges of ratio :data:`BAND_RATIO`),
each band's measure in ``(b, s)`` is cut into :data:`PANELS` equal-mass panels,
and each panel gets the two-point Gauss rule of its measure in ``s`` (exact for
cubics) with ``b`` regressed on ``s`` within the panel;
:func:`~ttcsim.simulator.roofline.forward_pass` prices each node.  Against the
full grid sum this is within 5e-6 relative on the shipped profiles
(``bench/bench_expectation.py``) and 1e-4 on a deliberately hot test profile
(the residue comes from the kink where the limit starts inside a panel, and
from ``h``'s kink).

**Prefix sharing.**  With ``Q = n / N`` queries of ``N`` samples sharing a
prompt, ``g(s) = Q * (1 - (1 - S(s))^N)`` queries are expected to run at step
``s`` and ``h_b(s) = max(b - g(s), 0)`` samples read the prompt from L2 (the
model of :func:`~ttcsim.simulator.decode.segment_cost`, with the expected
number of running queries).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ttcsim.simulator.coefficients import PassCoefficients, context_read_tokens
from ttcsim.simulator.decode import DecodeCost, step_coefficients
from ttcsim.simulator.roofline import forward_pass

#: Step grids longer than this are integrated in blocks (see :func:`step_grid`).
MAX_EXACT_STEPS = 16384
#: Binomial window half-width in standard deviations for large batches.
WINDOW_SIGMAS = 9.0
#: Batches up to this size use the whole binomial support ``0..n`` at every step.
EXACT_BATCH = 128
#: Equal-mass panels per band of batch sizes for power-limited bands (2 Gauss nodes each).
PANELS = 4


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
    """The step measure ``mu_b(s)`` of every batch size ``b = 1..n`` that has cells.

    Column arrays are over batch sizes (``k`` of them).  ``l2_hits[i] = sum_s
    mu_b(s) h_b(s)`` (zeros without ``running_groups``).  Node arrays are over
    *bands* of neighbouring batch sizes (:func:`band_of`), ``(bands, 2 *
    PANELS)``: each band's measure in ``(b, s)`` cut into equal-mass panels,
    two Gauss nodes in ``s`` per panel, at the batch size regressed on ``s``
    within the panel and the panel's mean ``h``.
    """

    batch: np.ndarray
    mass: np.ndarray  #: M0(b)
    first_moment: np.ndarray  #: M1(b) [steps]
    l2_hits: np.ndarray  #: H(b) [sequences]
    first_step: np.ndarray  #: smallest s with a non-negligible share of the column
    last_step: np.ndarray  #: largest such s
    band_start: np.ndarray  #: first column of each band
    node_batch: np.ndarray
    node_steps: np.ndarray
    node_weights: np.ndarray
    node_l2_hits: np.ndarray


#: Cells below this share of their column are left out of its support.
NEGLIGIBLE = 1e-15
#: Batch sizes up to this are bands of their own; above, bands grow geometrically.
BAND_EXACT = 32
#: Ratio of the largest to the smallest batch size of a band above BAND_EXACT.
BAND_RATIO = 1.1


def band_of(batch: np.ndarray) -> np.ndarray:
    """Band index of each batch size: ``b`` up to :data:`BAND_EXACT`, then geometric."""
    b = np.asarray(batch, dtype=float)
    over = np.log(np.maximum(b, BAND_EXACT) / BAND_EXACT) / np.log(BAND_RATIO)
    return np.where(b <= BAND_EXACT, b, BAND_EXACT + np.ceil(over)).astype(np.int64)


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


def _gauss_panels(key, size, muf, sf, bf, hf):
    """Two-point Gauss rules in ``s`` of the cells grouped by ``key`` (sorted; ``size`` groups).

    From each group's mass and first four moments of ``s`` (centred): nodes
    ``mean + sd * (k -+ r) / 2`` with ``r = sqrt(k^2 + 4)`` (``k`` the skewness),
    weights ``mass * u2 / r`` and ``-mass * u1 / r``: exact for cubics in ``s``.
    The batch size at a node is the group's least-squares line of ``b`` on
    ``s``; ``h`` is the group mean.  Returns ``(batch, steps, weights, hits)``,
    each ``(size, 2)``; empty groups get zero weight.
    """
    starts = np.searchsorted(key, np.arange(size))  # key is sorted (cells are panel-major)
    empty = np.diff(np.append(starts, key.size)) == 0
    at = np.minimum(starts, key.size - 1)

    def total(v):
        return np.where(empty, 0.0, np.add.reduceat(v, at))

    p0 = total(muf)
    filled = p0 > 0
    safe0 = np.where(filled, p0, 1.0)
    mean = total(muf * sf) / safe0
    d = sf - mean[key]
    mud = muf * d
    var = total(mud * d) / safe0
    third = total(mud * d * d) / safe0
    # a group at one step (spread at rounding level) is a point mass: no skew, no slope
    spread = var > (1e-9 * np.maximum(np.abs(mean), 1.0)) ** 2
    var = np.where(spread, var, 0.0)
    sd = np.sqrt(var)
    skew = np.divide(third, sd**3, out=np.zeros(size), where=spread)
    r = np.sqrt(skew * skew + 4.0)
    u1, u2 = (skew - r) / 2.0, (skew + r) / 2.0
    steps = np.where(filled[:, None], np.stack([mean + sd * u1, mean + sd * u2], axis=1), 0.0)
    weights = np.where(filled[:, None], np.stack([p0 * u2 / r, -p0 * u1 / r], axis=1), 0.0)
    b_mean = total(muf * bf) / safe0
    cov = total(mud * bf) / safe0  # E[d * b] = Cov(s, b), as E[d] = 0
    slope = np.divide(cov, var, out=np.zeros(size), where=spread)
    batch = b_mean[:, None] + slope[:, None] * (steps - mean[:, None])
    hits = np.repeat((total(muf * hf) / safe0)[:, None], 2, axis=1)
    return batch, steps, weights, hits


def batch_measure(grid: StepGrid, n: int, running_groups=None) -> BatchMeasure:
    """:class:`BatchMeasure` of ``n`` sequences: ``mu_b(s) = w_s * P(B(s) = b)``.

    ``running_groups`` (per grid step) is ``g(s)`` for prefix sharing (``None``:
    no sharing).  Cells are laid out batch by batch (steps ascending within a
    batch size) over the binomial windows of :func:`_windows`: O(steps *
    window) work, no sort.
    """
    surv = np.asarray(grid.survival, dtype=float)
    lo, hi = _windows(n, surv)
    batches = np.arange(1, n + 1)  # b = 0 runs no pass
    first = np.searchsorted(-lo, -batches, side="left")  # first step with lo <= b
    last = np.searchsorted(-hi, -batches, side="right") - 1  # last step with hi >= b
    count = np.maximum(last - first + 1, 0)
    has = count > 0
    batches, first, count = batches[has], first[has], count[has]
    k = batches.size
    start = np.cumsum(count) - count
    col = np.repeat(np.arange(k), count)
    row = np.arange(col.size) - np.repeat(start - first, count)
    bf = batches[col].astype(float)
    with np.errstate(divide="ignore"):
        log_p = np.where(surv > 0, np.log(surv), -1e300)
        log_q = np.where(surv < 1, np.log1p(-surv), -1e300)
    muf = binomial_pmf(n, bf, log_p[row], log_q[row])
    if not np.all(grid.weight == 1.0):
        muf *= grid.weight[row]
    sf = grid.steps[row]
    if running_groups is None:
        hf = np.zeros_like(bf)
    else:
        hf = np.maximum(bf - np.asarray(running_groups, dtype=float)[row], 0.0)
    mass = np.add.reduceat(muf, start)
    # support: first and last step of each column with a non-negligible share
    idx = np.arange(col.size)
    big = muf > NEGLIGIBLE * mass[col]
    lo_i = np.minimum.reduceat(np.where(big, idx, col.size), start)
    hi_i = np.maximum.reduceat(np.where(big, idx, -1), start)
    # bands are runs of columns, so cells are band-major too
    band_ids, band_col = np.unique(band_of(batches), return_inverse=True)
    n_bands = band_ids.size
    band_start = np.searchsorted(band_col, np.arange(n_bands))
    cb = band_col[col]
    cell_start = start[band_start]
    band_mass = np.add.reduceat(muf, cell_start)
    # equal-mass panels: position of each cell's mid-mass within its band
    # (normalised per band first, so a band's share is exact to ~bands ulps)
    share = muf / np.where(band_mass > 0, band_mass, 1.0)[cb]  # empty bands: zero weight
    cum = np.cumsum(share)
    u = cum - 0.5 * share - np.repeat(cum[cell_start] - share[cell_start],
                                      np.diff(np.append(cell_start, col.size)))
    panel = cb * PANELS + np.clip((u * PANELS).astype(np.int64), 0, PANELS - 1)
    nb, ns, nw, nh = _gauss_panels(panel, n_bands * PANELS, muf, sf, bf, hf)
    shape = (n_bands, 2 * PANELS)
    big_lo = np.minimum(lo_i, col.size - 1)
    return BatchMeasure(
        batch=batches.astype(float),
        mass=mass,
        first_moment=np.add.reduceat(muf * sf, start),
        l2_hits=np.add.reduceat(muf * hf, start),
        first_step=sf[big_lo],
        last_step=sf[np.maximum(hi_i, 0)],
        band_start=band_start,
        node_batch=nb.reshape(shape),
        node_steps=ns.reshape(shape),
        node_weights=nw.reshape(shape),
        node_l2_hits=nh.reshape(shape),
    )


def query_running_share(n: int, samples: int, batch) -> np.ndarray:
    """``1 - C(n - N, b) / C(n, b)``: P(a given query still runs | ``b`` of ``n`` sequences do).

    The ``b`` running sequences are a uniform subset of the ``n``; the query's
    ``N = samples`` are all done iff none of them is in it.  Real ``b`` (band
    nodes) through ``lgamma``; 1 where ``b > n - N``.
    """
    from scipy.special import gammaln  # lazy, as in binomial_grid

    b = np.asarray(batch, dtype=float)
    free = n - samples - b  # sequences outside the query and not running
    with np.errstate(invalid="ignore"):
        log_r = (
            gammaln(n - b + 1.0) - gammaln(np.maximum(free, 0.0) + 1.0)
            - gammaln(n + 1.0) + gammaln(n - samples + 1.0)
        )
    return np.where(free >= 0, -np.expm1(log_r), 1.0)


@dataclass(frozen=True)
class DecodeExpectation:
    """What the expected decode of ``n`` random lengths needs, independent of the deployment.

    ``measure`` carries the L2 hits of prefix sharing when ``N > 1``; whether
    they apply is chosen when evaluating (:func:`expected_decode_totals`).
    ``query_share`` / ``node_query_share``: :func:`query_running_share` per
    column and per band node.
    """

    n_sequences: int
    samples_per_query: int
    measure: BatchMeasure
    query_share: np.ndarray
    node_query_share: np.ndarray
    decode_steps: float  #: E[longest decode] = sum_s w_s (1 - F(s)^n)
    generated_tokens: float  #: E[tokens from decode steps] = sum_s w_s E[B(s)]


def decode_expectation(survival, n_sequences: int, samples_per_query: int) -> DecodeExpectation:
    """Build the :class:`DecodeExpectation` of ``n_sequences`` lengths with ``survival``.

    ``survival[s-1] = P(L > s)`` for ``s = 1 .. len(survival)`` (reaching near 0);
    the sequences are ``n / N`` queries of ``samples_per_query = N`` samples.
    """
    grid = step_grid(survival)
    n, per = int(n_sequences), int(samples_per_query)
    done = 1.0 - grid.survival
    groups = (n // per) * (1.0 - done**per) if per > 1 else None
    m = batch_measure(grid, n, running_groups=groups)
    return DecodeExpectation(
        n_sequences=n,
        samples_per_query=per,
        measure=m,
        query_share=query_running_share(n, per, m.batch),
        node_query_share=query_running_share(n, per, m.node_batch),
        decode_steps=float((grid.weight * (1.0 - done**n)).sum()),
        generated_tokens=float((m.batch * m.mass).sum()),
    )


#: Expectations kept by :func:`cached_decode_expectation` (each is O(n) floats).
CACHE_ENTRIES = 128
_CACHE: OrderedDict = OrderedDict()


def cached_decode_expectation(survival, n_sequences: int, samples_per_query: int):
    """:func:`decode_expectation`, remembered for the last :data:`CACHE_ENTRIES` inputs.

    Keyed by a digest of the survival values, so repeated ``predict()`` calls
    with one length distribution (curves, plans, loops) build it once.
    """
    surv = np.ascontiguousarray(survival, dtype=float)
    key = (hashlib.blake2b(surv.tobytes(), digest_size=16).digest(), surv.size,
           int(n_sequences), int(samples_per_query))
    hit = _CACHE.get(key)
    if hit is None:
        hit = decode_expectation(surv, n_sequences, samples_per_query)
        _CACHE[key] = hit
        while len(_CACHE) > CACHE_ENTRIES:
            _CACHE.popitem(last=False)
    else:
        _CACHE.move_to_end(key)
    return hit


def _step_coefficients(c: PassCoefficients, b: np.ndarray):
    """``(t0, a*b, e0, e1*b)`` of a decode step with batch ``b`` at full clock (per GPU).

    :func:`~ttcsim.simulator.decode.step_coefficients` with the batch folded
    into the slopes, which are then per unit of ``P + s``.
    """
    t0, a, e0, e1 = step_coefficients(c, b)
    return t0, a * b, e0, e1 * b


def _hot_pairs(c: PassCoefficients, m: BatchMeasure, coef, prompts: np.ndarray):
    """``(prompt index, band)`` pairs where some batch size of the band may reach the limit.

    Per batch size, step power (without L2 credit, an upper bound) is over the
    limit at context ``m = P + s`` iff ``alpha > beta * m`` with ``alpha = e0 -
    H t0`` and ``beta = H a b - e1 b`` (``H`` the headroom over static power);
    it is monotone in ``m``, so checking both ends of the support suffices.  A
    per-prompt bound on the thresholds first skips prompts with no candidate.
    """
    t0, a_b, e0, e1_b = coef
    head = c.power_limit_w - c.static_power_w
    alpha = e0 - head * t0
    beta = head * a_b - e1_b
    with np.errstate(divide="ignore", invalid="ignore"):
        limit = alpha / beta  # hot for contexts below (beta > 0) or above (beta < 0)
    pos, neg = beta > 0, beta < 0
    always = bool(np.any(~pos & ~neg & (alpha > 0)))
    below = np.max(limit[pos] - m.first_step[pos], initial=-np.inf)
    above = np.min(limit[neg] - m.last_step[neg], initial=np.inf)
    slack = 1e-6 * (np.abs(prompts) + 1.0)
    cand = np.flatnonzero(always | (prompts < below + slack) | (prompts > above - slack))
    if np.any(c.windowed_fraction):  # thresholds are on the attended context: check all
        cand = np.arange(prompts.size)
    if cand.size == 0:
        return cand, cand
    p = prompts[cand][:, None]
    hot = np.zeros((cand.size, m.batch.size), dtype=bool)
    for s_end in (m.first_step, m.last_step):
        ctx = context_read_tokens(c, p + s_end[None, :])
        hot |= e0 + e1_b * ctx > head * (t0 + a_b * ctx)
    rows, bands = np.nonzero(np.logical_or.reduceat(hot, m.band_start, axis=1))
    return cand[rows], bands


def expected_decode_totals(
    c: PassCoefficients, exp: DecodeExpectation, prompt_tokens, shared_prefix=False
):
    """Expected decode totals for every prompt length in ``prompt_tokens`` (an array).

    Returns ``(time_s, dynamic_energy_j, energy_j, query_time_s)`` arrays (all
    GPUs): batch time, dynamic and total energy, and the expected time until
    one query's samples have all finished (module docstring).  Closed form,
    affine in the prompt, then bands that may reach the power limit corrected
    by their Gauss nodes: ``sum_nodes w * (cost - cost at full clock)``.
    ``shared_prefix`` (a bool, or one per prompt): each query's samples share
    its prompt's KV (L2 hits; only with ``N > 1``).  Each prompt's result
    depends on that prompt and its flag alone (no cross-prompt arithmetic), so
    one prompt gives the same bits alone or in an array.
    """
    prompts = np.atleast_1d(np.asarray(prompt_tokens, dtype=float))
    shared = np.broadcast_to(np.asarray(shared_prefix, dtype=bool), prompts.shape)
    shared = shared & (exp.samples_per_query > 1)
    m, share = exp.measure, exp.query_share
    coef = _step_coefficients(c, m.batch)
    t0, a_b, e0, e1_b = coef
    kv_j = c.energy_per_byte_j * c.kv_bytes_per_token
    col_t0 = t0 * m.mass + a_b * m.first_moment  # column time at P = 0 ...
    col_t1 = a_b * m.mass  # ... and its slope in P
    time = float(col_t0.sum()) + prompts * float(col_t1.sum())
    q_time = float((share * col_t0).sum()) + prompts * float((share * col_t1).sum())
    dyn0 = float((e0 * m.mass + e1_b * m.first_moment).sum())
    dyn1 = float((e1_b * m.mass).sum())
    dyn1_shared = dyn1 - kv_j * float(m.l2_hits.sum())
    dyn = dyn0 + prompts * np.where(shared, dyn1_shared, dyn1)
    if np.any(c.windowed_fraction) and m.batch.size:
        time, q_time, dyn = _window_correction(c, exp, prompts, shared, (time, q_time, dyn))
    rows, bands = _hot_pairs(c, m, coef, prompts) if m.batch.size else ([], [])
    if len(rows):
        pk = prompts[rows][:, None]
        bk, sk, w = m.node_batch[bands], m.node_steps[bands], m.node_weights[bands]
        hk = m.node_l2_hits[bands] * shared[rows][:, None]
        read, pk_read = context_read_tokens(c, pk + sk), context_read_tokens(c, pk)
        ctx = bk * read
        cost = forward_pass(c, bk, ctx, ctx, kv_hbm_tokens=ctx - hk * pk_read)
        nt0, na_b, ne0, ne1_b = _step_coefficients(c, bk)
        extra_t = w * (cost.time_s - (nt0 + na_b * read))
        extra_d = w * (
            cost.dynamic_energy_j / c.n_gpus - (ne0 + ne1_b * read - kv_j * pk_read * hk)
        )
        n_p = prompts.size
        time = time + np.bincount(rows, extra_t.sum(axis=1), minlength=n_p)
        q_extra = (exp.node_query_share[bands] * extra_t).sum(axis=1)
        q_time = q_time + np.bincount(rows, q_extra, minlength=n_p)
        dyn = dyn + np.bincount(rows, extra_d.sum(axis=1), minlength=n_p)
    dyn = c.n_gpus * dyn
    energy = c.n_gpus * c.static_power_w * time + dyn
    return time, dyn, energy, q_time


def _window_correction(c: PassCoefficients, exp: DecodeExpectation, prompts, shared, totals):
    """Take the reads sliding-window layers skip off the full-context totals (per GPU).

    Step ``s`` of a prompt ``P`` reads ``phi * max(P + s - W, 0)`` fewer tokens
    per sequence; its expectation over the step measure is not affine in ``P``,
    so it is summed over every band's Gauss nodes (as the power-limit
    correction is): ``sum_nodes w * (a b, e1 b) * phi * max(P + s - W, 0)``.
    The shared-prefix L2 credit shrinks by ``kv_j * H * (P - attended(P))``.
    """
    time, q_time, dyn = totals
    m = exp.measure
    bk, sk, w = m.node_batch, m.node_steps, m.node_weights
    _, na_b, _, ne1_b = _step_coefficients(c, bk)
    p = prompts[:, None, None]
    skipped = w * ((p + sk) - context_read_tokens(c, p + sk))  # (prompts, bands, nodes)
    time = time - (skipped * na_b).sum(axis=(1, 2))
    q_time = q_time - (skipped * (exp.node_query_share * na_b)).sum(axis=(1, 2))
    kv_j = c.energy_per_byte_j * c.kv_bytes_per_token
    credit = kv_j * float(m.l2_hits.sum()) * (prompts - context_read_tokens(c, prompts))
    dyn = dyn - (skipped * ne1_b).sum(axis=(1, 2)) + np.where(shared, credit, 0.0)
    return time, q_time, dyn


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
    exp = cached_decode_expectation(survival, n_sequences, samples_per_query)
    time, dyn, energy, q_time = expected_decode_totals(c, exp, [prompt_tokens], shared_prefix)
    cost = DecodeCost(
        time_s=float(time[0]),
        dynamic_energy_j=float(dyn[0]),
        energy_j=float(energy[0]),
        decode_steps=exp.decode_steps,
        generated_tokens=exp.generated_tokens,
    )
    return cost, float(q_time[0])


class ReferenceTotals(NamedTuple):
    """What :func:`reference_decode_totals` returns.

    Expected totals, and whether any cell of the grid (any step and batch size,
    L2 credit included) is power-limited.
    """

    time_s: float
    energy_j: float
    query_time_s: float
    generated_tokens: float
    power_limited: bool


def reference_decode_totals(
    c: PassCoefficients,
    prompt_tokens: float,
    survival,
    n_sequences: int,
    samples_per_query: int,
    shared_prefix: bool = False,
):
    """The definition, summed cell by cell: ``sum_s w_s sum_b P(B(s) = b) cost(b, s)``.

    Every ``(step, batch)`` cell of the whole binomial support ``b = 0..n`` is
    priced by :func:`~ttcsim.simulator.roofline.forward_pass`: O(steps * n)
    work and memory, for checking :func:`expected_decode_totals` (tests,
    ``bench/bench_expectation.py``), not for use.  The query's wait uses the
    second grid, ``E[T] - sum_s F(s)^N sum_b P_{n-N}(B(s) = b) t(b, s)``.
    Returns a :class:`ReferenceTotals`.
    """
    from scipy import stats

    g = step_grid(survival)
    n, per = int(n_sequences), int(samples_per_query)
    groups = (n // per) * (1.0 - (1.0 - g.survival) ** per)

    def priced(m: int, weight):
        b = np.arange(m + 1, dtype=float)[None, :]
        pmf = stats.binom.pmf(b, m, g.survival[:, None]) * weight[:, None]
        ctx = b * context_read_tokens(c, prompt_tokens + g.steps[:, None])
        hbm = ctx
        if shared_prefix and per > 1:
            hbm = ctx - np.maximum(b - groups[:, None], 0.0) * context_read_tokens(c, prompt_tokens)
        cost = forward_pass(c, np.broadcast_to(b, ctx.shape), ctx, ctx, kv_hbm_tokens=hbm)
        return b, pmf, cost

    b, pmf, cost = priced(n, g.weight)
    time = float((pmf * cost.time_s).sum())
    q_time = time
    if n > per:
        _, pmf_o, cost_o = priced(n - per, g.weight * (1.0 - g.survival) ** per)
        q_time = time - float((pmf_o * cost_o.time_s).sum())
    return ReferenceTotals(
        time_s=time,
        energy_j=float((pmf * cost.energy_j).sum()),
        query_time_s=q_time,
        generated_tokens=float((pmf * b).sum()),
        power_limited=bool(cost.throttled.any()),
    )
