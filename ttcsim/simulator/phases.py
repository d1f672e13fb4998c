"""Phases a strategy is built from: prefill, decode, scoring, and their building blocks.

Each function returns a :class:`PhaseCost` for a *batch* of ``Q`` concurrent
queries.  Lengths come in three forms:

* a :class:`~ttcsim.distributions.LengthList` or a fixed length -- exact,
  deterministic cost;
* a random :class:`~ttcsim.distributions.LengthDistribution` -- the exact
  expectation (see :mod:`ttcsim.simulator.expectation`);
* a :class:`Draws` matrix -- one deterministic cost per Monte-Carlo draw
  (used for percentiles); then every field is an array over draws.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ttcsim.distributions import LengthDistribution, LengthList
from ttcsim.errors import TtcsimError
from ttcsim.simulator.coefficients import PassCoefficients, attention_pairs, context_read_tokens
from ttcsim.simulator.decode import (
    decode_draws,
    decode_time_per_query_s,
    deterministic_decode,
    segment_cost,
)
from ttcsim.simulator.expectation import binomial_grid, expected_decode, step_grid
from ttcsim.simulator.power import average_power_w
from ttcsim.simulator.roofline import forward_pass


@dataclass(frozen=True)
class Draws:
    """Monte-Carlo lengths: ``values[d, i]`` is sequence ``i``'s length in draw ``d``.

    ``uniforms`` (same shape, optional) are independent U(0,1) variates for
    strategies whose cost is random beyond the lengths (adaptive voting draws
    its number of samples from them).
    """

    values: np.ndarray
    uniforms: np.ndarray | None = None


@dataclass(frozen=True)
class PhaseCost:
    """Cost of one phase for the whole batch (all GPUs).

    ``query_time_s`` is how long one query waits on this phase (equal to
    ``time_s`` except for decode, where a query can finish before the batch).
    Fields are floats, or arrays over draws for :class:`Draws` lengths.
    """

    name: str
    time_s: float | np.ndarray
    query_time_s: float | np.ndarray
    energy_j: float | np.ndarray
    dynamic_energy_j: float | np.ndarray
    peak_power_w: float
    generated_tokens: float | np.ndarray = 0.0
    throttled: bool = False
    #: new tokens run through the model in this phase (prefill/score: tokens read in)
    processed_tokens: float | np.ndarray = 0.0


def _expand(lengths, n_queries: int, samples: int, where: str) -> np.ndarray:
    """A length list as one value per sequence (broadcast one length or one per sample)."""
    values = np.asarray(lengths.values, dtype=float)
    n = n_queries * samples
    if values.size == n:
        return values
    if values.size == samples:
        return np.tile(values, n_queries)
    if values.size == 1:
        return np.full(n, values[0])
    raise TtcsimError(
        f"{values.size} lengths given; need 1, {samples} (one per sample) or {n} "
        f"(concurrent queries x samples)",
        where,
    )


def prefill_phase(
    c: PassCoefficients,
    n_prompts: float,
    new_tokens: float,
    cached_tokens: float = 0.0,
    name: str = "prefill",
) -> PhaseCost:
    """One batched prefill of ``n_prompts`` prompts of ``new_tokens`` tokens each.

    ``cached_tokens`` of each prompt's prefix are already in the KV cache
    (prefix caching): their K/V are read, not recomputed.  Causal pairs per
    prompt: ``S*C + S*(S+1)/2``.
    """
    tokens = n_prompts * new_tokens
    if c.prefill_tokens_per_pass:
        return _split_prefill(c, n_prompts, new_tokens, cached_tokens, name)
    cost = forward_pass(
        c,
        tokens,
        n_prompts * context_read_tokens(c, cached_tokens),
        n_prompts * attention_pairs(c, new_tokens, cached_tokens),
        sequences=n_prompts,
        prefill=True,
    )
    t, e = float(cost.time_s), float(cost.energy_j)
    return PhaseCost(
        name=name,
        time_s=t,
        query_time_s=t,
        energy_j=e,
        dynamic_energy_j=float(cost.dynamic_energy_j),
        peak_power_w=float(average_power_w(e, t)),
        throttled=bool(cost.throttled),
        processed_tokens=float(tokens),
    )


def _split_prefill(c: PassCoefficients, n_prompts, new_tokens, cached_tokens, name: str):
    """A prefill cut into ``m`` equal passes by the engine's token budget.

    ``m`` from :func:`ttcsim.engines.physics.prefill_passes`; each pass holds
    ``1/m`` of the prompts, tokens, cached reads and attention pairs.
    """
    from ttcsim.engines.physics import prefill_passes

    m = prefill_passes(n_prompts, new_tokens, c.prefill_tokens_per_pass, c.prefill_chunked)
    cost = forward_pass(
        c,
        n_prompts * new_tokens / m,
        n_prompts * context_read_tokens(c, cached_tokens) / m,
        n_prompts * attention_pairs(c, new_tokens, cached_tokens) / m,
        sequences=n_prompts / m,
        prefill=True,
    )
    t, e = float(cost.time_s), float(cost.energy_j)
    return PhaseCost(
        name=name,
        time_s=m * t,
        query_time_s=m * t,
        energy_j=m * e,
        dynamic_energy_j=m * float(cost.dynamic_energy_j),
        peak_power_w=float(average_power_w(e, t)),
        throttled=bool(cost.throttled),
        processed_tokens=float(n_prompts * new_tokens),
    )


def decode_peak_power_w(c: PassCoefficients, n_sequences, prompt_tokens, shortest, longest):
    """Highest step power of a shrinking-batch decode [W], all GPUs (broadcasting).

    Step power grows with the context read and with the batch, so the peak is
    at one of: the first step (full batch), the full batch's last step (when
    the shortest sequence ends) or the last step of the longest sequence alone.
    """
    n, p, lo, hi = np.broadcast_arrays(
        *(np.asarray(v, dtype=float) for v in (n_sequences, prompt_tokens, shortest, longest))
    )
    b = np.stack([n, n, np.minimum(n, 1.0)])
    ctx = b * context_read_tokens(
        c, p + np.stack([np.ones_like(lo), np.maximum(lo - 1.0, 1.0), np.maximum(hi - 1.0, 1.0)])
    )
    cost = forward_pass(c, b, ctx, ctx)
    return average_power_w(cost.energy_j, cost.time_s).max(axis=0)


def length_extremes(lengths, n: int) -> tuple[float, float]:
    """(shortest, longest) output length of ``n`` sequences, for :func:`decode_peak_power_w`.

    Random lengths: the expected minimum (the ``1/(n+1)`` quantile) and the
    distribution's upper bound.
    """
    if isinstance(lengths, Draws):
        return float(lengths.values.min()), float(lengths.values.max())
    if isinstance(lengths, LengthList):
        return float(min(lengths.values)), float(max(lengths.values))
    if getattr(lengths, "is_fixed", False):
        return float(lengths.tokens), float(lengths.tokens)
    return float(lengths.quantile(1.0 / (n + 1.0))), float(lengths.upper_bound())


def decode_phase(
    c: PassCoefficients,
    prompt_tokens: float,
    lengths,
    n_queries: int,
    samples: int,
    name: str = "decode",
    shared_prefix: bool = False,
) -> PhaseCost:
    """Decode ``n_queries * samples`` sequences as one batch that shrinks as they finish.

    ``shared_prefix``: each query's samples share its prompt's KV (prefix caching),
    so the prompt part of their KV reads comes from HBM once per query and step.
    """
    n = n_queries * samples
    if c.batching != "lockstep":
        engine_phase = _engine_decode(c, prompt_tokens, lengths, n_queries, samples, name,
                                      shared_prefix)
        if engine_phase is not None:
            return engine_phase
    peak = float(decode_peak_power_w(c, n, prompt_tokens, *length_extremes(lengths, n)))
    if isinstance(lengths, Draws):
        t, e_dyn, e, q_time = decode_draws(c, prompt_tokens, lengths.values, samples, shared_prefix)
        return PhaseCost(
            name, t, q_time.mean(axis=1), e, e_dyn, peak, (lengths.values - 1).sum(axis=1)
        )
    if isinstance(lengths, LengthList) or getattr(lengths, "is_fixed", False):
        if isinstance(lengths, LengthList):
            values = _expand(lengths, n_queries, samples, "--output-tokens")
        else:
            values = np.full(n, float(lengths.tokens))
        cost = deterministic_decode(c, prompt_tokens, values, samples, shared_prefix)
        q_time = float(
            decode_time_per_query_s(c, prompt_tokens, values, samples, shared_prefix).mean()
        )
    elif isinstance(lengths, LengthDistribution):
        cost, q_time = expected_decode(
            c, prompt_tokens, lengths.survival_steps(), n, samples, shared_prefix
        )
    else:
        raise TypeError(f"unsupported lengths {lengths!r}")
    return PhaseCost(
        name=name,
        time_s=cost.time_s,
        query_time_s=q_time,
        energy_j=cost.energy_j,
        dynamic_energy_j=cost.dynamic_energy_j,
        peak_power_w=peak,
        generated_tokens=cost.generated_tokens,
    )


def _engine_decode(c, prompt_tokens, lengths, n_queries, samples, name, shared_prefix):
    """:func:`decode_phase` under a static-padded or continuous engine (None: lock step).

    See :mod:`ttcsim.simulator.batching`.  Continuous batching with no more
    sequences than slots is lock step.
    """
    from ttcsim.engines.physics import padded_lengths
    from ttcsim.simulator.batching import (
        continuous_decode,
        quantile_lengths,
        static_padded_expected,
    )

    n = n_queries * samples
    fixed = getattr(lengths, "is_fixed", False)
    if c.batching == "continuous":
        if n <= c.max_num_seqs or c.max_num_seqs < 1:
            return None
        if isinstance(lengths, Draws):
            values = lengths.values
        elif isinstance(lengths, LengthList):
            values = _expand(lengths, n_queries, samples, "--output-tokens")
        elif fixed:
            values = np.full(n, float(lengths.tokens))
        else:
            values = quantile_lengths(lengths, n)
        t, e_dyn, e, q_time, peak = continuous_decode(c, prompt_tokens, values, c.max_num_seqs,
                                                      samples)
        tokens = np.maximum(np.atleast_2d(values) - 1.0, 0.0).sum(axis=1)
        if not isinstance(lengths, Draws):
            t, e_dyn, e, q_time, tokens = (float(v[0]) for v in (t, e_dyn, e, q_time, tokens))
        return PhaseCost(name, t, q_time, e, e_dyn, peak, tokens)
    if c.batching != "static-padded" or fixed:
        return None
    if isinstance(lengths, LengthDistribution):
        cost, peak = static_padded_expected(c, prompt_tokens, lengths.survival_steps(), n,
                                            n_queries, shared_prefix)
        return PhaseCost(name, cost.time_s, cost.time_s, cost.energy_j, cost.dynamic_energy_j,
                         peak, cost.generated_tokens)
    if isinstance(lengths, Draws):
        real = (lengths.values - 1).sum(axis=1)
        padded = padded_lengths(lengths.values)
        t, e_dyn, e, _ = decode_draws(c, prompt_tokens, padded, samples, shared_prefix)
        longest = float(padded.max())
        peak = float(decode_peak_power_w(c, n, prompt_tokens, longest, longest))
        return PhaseCost(name, t, t, e, e_dyn, peak, real)
    values = _expand(lengths, n_queries, samples, "--output-tokens")
    padded = padded_lengths(values)
    cost = deterministic_decode(c, prompt_tokens, padded, samples, shared_prefix)
    longest = float(padded.max())
    peak = float(decode_peak_power_w(c, n, prompt_tokens, longest, longest))
    return PhaseCost(name, cost.time_s, cost.time_s, cost.energy_j, cost.dynamic_energy_j, peak,
                     float((values - 1).sum()))


def score_phase(
    c: PassCoefficients,
    prompt_tokens: float,
    lengths,
    n_queries: int,
    candidates: int,
    name: str = "score",
) -> PhaseCost:
    """Reward-model scoring: one prefill over prompt + candidate for every candidate.

    Tokens ``T = sum_i (P + L_i)`` and pairs ``sum_i (P+L_i)(P+L_i+1)/2``, batched
    in one pass.  For a random length the pass is evaluated at ``E[T]`` and
    ``E[pairs]`` (from ``E[L]`` and ``E[L^2]``): exact while the pass stays
    compute-bound, which a batch of full sequences is.
    """
    n = n_queries * candidates
    if isinstance(lengths, Draws):
        seq = prompt_tokens + lengths.values
        tokens, pairs = seq.sum(axis=1), attention_pairs(c, seq).sum(axis=1)
    elif isinstance(lengths, LengthList) or getattr(lengths, "is_fixed", False):
        if isinstance(lengths, LengthList):
            seq = prompt_tokens + _expand(lengths, n_queries, candidates, "--output-tokens")
        else:
            seq = np.full(n, prompt_tokens + float(lengths.tokens))
        tokens, pairs = seq.sum(), attention_pairs(c, seq).sum()
    else:
        m1, m2 = lengths.mean(), lengths.second_moment()
        p = prompt_tokens
        tokens = n * (p + m1)
        pairs = n * ((p * p + 2 * p * m1 + m2) + (p + m1)) / 2.0
    cost = forward_pass(c, tokens, 0.0, pairs)
    energy = cost.energy_j
    peak = float(np.max(average_power_w(energy, cost.time_s)))
    t = cost.time_s if np.ndim(cost.time_s) else float(cost.time_s)
    return PhaseCost(
        name=name,
        time_s=t,
        query_time_s=t,
        energy_j=energy if np.ndim(energy) else float(energy),
        dynamic_energy_j=cost.dynamic_energy_j if np.ndim(energy) else float(cost.dynamic_energy_j),
        peak_power_w=peak,
        throttled=bool(np.any(cost.throttled)),
        processed_tokens=tokens if np.ndim(tokens) else float(tokens),
    )


# ---------------------------------------------------------------------------
# Primitives for the richer strategies (beam, refine, speculative decoding...).
# All of them take a matrix of lengths ``(draws, sequences)``: one row for a
# deterministic workload, many for Monte Carlo.  Fields of the returned
# PhaseCost are arrays over draws; :func:`squeeze` turns a one-row result into
# floats.
# ---------------------------------------------------------------------------

#: Tokens per KV-cache block (vLLM's default page size): the unit of copy-on-write.
KV_BLOCK_TOKENS = 16


def squeeze(phase: PhaseCost) -> PhaseCost:
    """A one-draw PhaseCost with float fields (arrays of shape ``(1,)`` become floats)."""

    def f(v):
        return float(np.asarray(v).reshape(-1)[0]) if np.ndim(v) else v

    return PhaseCost(
        name=phase.name,
        time_s=f(phase.time_s),
        query_time_s=f(phase.query_time_s),
        energy_j=f(phase.energy_j),
        dynamic_energy_j=f(phase.dynamic_energy_j),
        peak_power_w=phase.peak_power_w,
        generated_tokens=f(phase.generated_tokens),
        throttled=phase.throttled,
        processed_tokens=f(phase.processed_tokens),
    )


#: Passes evaluated at once by :func:`pass_series_cost` (bounds its memory).
_SERIES_CHUNK = 2_000_000
#: Elements of the (draws, steps, candidates) arrays of stepwise_score_phase at once.
_CHUNK_ELEMENTS = 2_000_000


def pass_series_cost(c: PassCoefficients, tokens, kv0, dkv, pairs0, dpairs, n_passes):
    """Totals of series of forward passes whose context grows linearly.

    Series ``i`` has ``n_i`` passes; pass ``k = 0 .. n_i - 1`` runs ``T_i`` new
    tokens, reads ``K0_i + k*dK_i`` cached tokens and computes
    ``A0_i + k*dA_i`` attention pairs, priced by
    :func:`ttcsim.simulator.roofline.forward_pass` (whatever its roofline and
    power-limit model).  Every pass is evaluated, vectorised over all series in
    chunks of :data:`_SERIES_CHUNK` passes: O(passes) work, no Python loop per
    pass.  This generalises :func:`~ttcsim.simulator.decode.segment_cost`
    (``T = b``, ``K = A = b*(P+s)``) to passes with several query tokens per
    sequence, such as a speculative verification pass, whose attention pairs
    are not proportional to its cached reads.  Arguments broadcast.

    Returns ``(time_s, dynamic_energy_j, energy_j)`` with the broadcast shape;
    energies summed over GPUs.
    """
    args = np.broadcast_arrays(
        *(np.asarray(v, dtype=float) for v in (tokens, kv0, dkv, pairs0, dpairs, n_passes))
    )
    shape = args[0].shape
    t_tok, k0, dk, a0, da, n = (a.ravel() for a in args)
    n = np.where(t_tok > 0, np.maximum(np.round(n), 0), 0).astype(np.int64)
    time = np.zeros(n.size)
    e_dyn = np.zeros(n.size)
    energy = np.zeros(n.size)
    ends = np.cumsum(n)
    start = 0
    while start < n.size:
        # series [start, stop) hold at most _SERIES_CHUNK passes (at least one series)
        base = ends[start - 1] if start else 0
        stop = max(start + 1, int(np.searchsorted(ends, base + _SERIES_CHUNK, side="right")))
        counts = n[start:stop]
        owner = np.repeat(np.arange(counts.size), counts)
        k = np.arange(owner.size) - np.repeat(np.cumsum(counts) - counts, counts)
        idx = start + owner
        cost = forward_pass(c, t_tok[idx], k0[idx] + k * dk[idx], a0[idx] + k * da[idx])
        time[start:stop] = np.bincount(owner, cost.time_s, counts.size)
        e_dyn[start:stop] = np.bincount(owner, cost.dynamic_energy_j, counts.size)
        energy[start:stop] = np.bincount(owner, cost.energy_j, counts.size)
        start = stop
    return time.reshape(shape), e_dyn.reshape(shape), energy.reshape(shape)


@dataclass(frozen=True)
class MatrixDecode:
    """A decode over a ``(draws, sequences)`` length matrix: totals per draw.

    ``group_finish_s[d, g]`` is when the last sequence of group ``g`` (``group``
    consecutive sequences, e.g. one query's samples) finishes in draw ``d``.
    """

    time_s: np.ndarray
    dynamic_energy_j: np.ndarray
    energy_j: np.ndarray
    group_finish_s: np.ndarray
    generated_tokens: np.ndarray
    peak_power_w: float


def decode_matrix(
    c: PassCoefficients,
    prompt_tokens,
    lengths: np.ndarray,
    group: int = 1,
    segment=None,
    shared_prefix: bool = False,
) -> MatrixDecode:
    """Decode the rows of a ``(draws, n)`` length matrix, each as one shrinking batch.

    Like :func:`ttcsim.simulator.decode.deterministic_decode`, vectorised over
    draws, and with a prompt length per sequence (``prompt_tokens`` scalar or
    ``(draws, n)``): sorted by length, segment ``j`` holds the ``b_j = n - j``
    longest sequences, whose attention reads ``sum_{i active} (P_i + s)``; the
    segment's first context is therefore the mean prompt of its active
    sequences plus ``s``.  A length of 0 marks an idle slot (no work).

    ``segment(batch, first_context_tokens, n_steps) -> (t, e_dyn, e)`` prices a
    run of steps at fixed batch (default: plain decode,
    :func:`~ttcsim.simulator.decode.segment_cost`).
    """
    L = np.atleast_2d(np.asarray(lengths, dtype=float))
    if c.batching == "static-padded":  # finished rows stay until the row's longest ends
        from ttcsim.engines.physics import padded_lengths

        L = padded_lengths(L)
    draws, n = L.shape
    default_segment = segment is None
    if segment is None:

        def segment(b, ctx, k):
            return segment_cost(c, b, ctx, k)

    steps = np.maximum(L - 1.0, 0.0)
    order = np.argsort(steps, axis=1, kind="stable")
    s_sorted = np.take_along_axis(steps, order, axis=1)
    bounds = np.concatenate([np.zeros((draws, 1)), s_sorted], axis=1)
    batch = (n - np.arange(n, dtype=float))[None, :]
    if np.ndim(prompt_tokens) == 0:
        first_ctx = float(prompt_tokens) + bounds[:, :-1] + 1.0
    else:
        p = np.broadcast_to(np.asarray(prompt_tokens, dtype=float), L.shape)
        p_sorted = np.take_along_axis(p, order, axis=1)
        suffix = np.cumsum(p_sorted[:, ::-1], axis=1)[:, ::-1]
        first_ctx = suffix / batch + bounds[:, :-1] + 1.0
    seg_steps = np.diff(bounds, axis=1)
    if shared_prefix and group > 1 and np.ndim(prompt_tokens) == 0 and default_segment:
        # a query's samples share its prompt KV: count the queries still running
        last = np.sort(steps.reshape(draws, -1, group).max(axis=2), axis=1)
        below = (last[:, None, :] <= bounds[:, :-1, None]).sum(axis=2)
        priced = segment_cost(
            c, batch, first_ctx, seg_steps, float(prompt_tokens), last.shape[1] - below
        )
    else:
        priced = segment(batch, first_ctx, seg_steps)
    t, e_dyn, e = (np.broadcast_to(x, seg_steps.shape) for x in priced)
    finish = np.empty_like(t)
    np.put_along_axis(finish, order, np.cumsum(t, axis=1), axis=1)
    power = average_power_w(e, t)
    return MatrixDecode(
        time_s=t.sum(axis=1),
        dynamic_energy_j=e_dyn.sum(axis=1),
        energy_j=e.sum(axis=1),
        group_finish_s=finish.reshape(draws, -1, group).max(axis=2),
        generated_tokens=steps.sum(axis=1),
        peak_power_w=float(power.max()) if power.size else 0.0,
    )


def decode_matrix_phase(
    c: PassCoefficients,
    prompt_tokens,
    lengths: np.ndarray,
    group: int = 1,
    name: str = "decode",
    segment=None,
    wait_for_batch: bool = False,
) -> PhaseCost:
    """:func:`decode_matrix` as a phase; ``query_time_s`` is the mean group finish time.

    With ``wait_for_batch`` a query waits for the whole batch (a round of a
    sequential strategy that runs in lock step), so ``query_time_s = time_s``.
    """
    d = decode_matrix(c, prompt_tokens, lengths, group, segment)
    q_time = d.time_s if wait_for_batch else d.group_finish_s.mean(axis=1)
    return PhaseCost(
        name=name,
        time_s=d.time_s,
        query_time_s=q_time,
        energy_j=d.energy_j,
        dynamic_energy_j=d.dynamic_energy_j,
        peak_power_w=d.peak_power_w,
        generated_tokens=d.generated_tokens,
    )


def prefill_matrix_phase(
    c: PassCoefficients, new_tokens, cached_tokens=0.0, name: str = "prefill"
) -> PhaseCost:
    """One batched prefill per draw over sequences of different lengths.

    ``new_tokens`` and ``cached_tokens`` are ``(draws, n)`` (or broadcast to it):
    tokens ``sum_i S_i``, cached reads ``sum_i C_i``, pairs ``sum_i (S_i*C_i +
    S_i*(S_i+1)/2)``.  A row of zeros costs nothing.
    """
    new = np.atleast_2d(np.asarray(new_tokens, dtype=float))
    cached = np.broadcast_to(np.asarray(cached_tokens, dtype=float), new.shape) * (new > 0)
    tokens = new.sum(axis=1)
    cost = forward_pass(
        c,
        tokens,
        context_read_tokens(c, cached).sum(axis=1),
        attention_pairs(c, new, cached).sum(axis=1),
        sequences=(new > 0).sum(axis=1),
        prefill=True,
    )
    return PhaseCost(
        name=name,
        time_s=cost.time_s,
        query_time_s=cost.time_s,
        energy_j=cost.energy_j,
        dynamic_energy_j=cost.dynamic_energy_j,
        peak_power_w=float(np.max(average_power_w(cost.energy_j, cost.time_s))),
        throttled=bool(np.any(cost.throttled)),
        processed_tokens=tokens,
    )


def kv_copy_phase(c: PassCoefficients, copied_tokens, name: str = "decode") -> PhaseCost:
    """Copy-on-write of partially filled KV blocks: read + write ``copied_tokens`` tokens.

    ``t = 2 * N * b_kv / B_attn`` and ``E = n_gpus * (P_static * t + e_B * 2 * N * b_kv)``
    per GPU's shard (``copied_tokens`` per draw, an array).
    """
    moved = 2.0 * np.atleast_1d(np.asarray(copied_tokens, dtype=float)) * c.kv_bytes_per_token
    t = moved / c.attention_bandwidth_bytes_per_s
    e_dyn = c.energy_per_byte_j * moved
    energy = c.n_gpus * (c.static_power_w * t + e_dyn)
    return PhaseCost(
        name=name,
        time_s=t,
        query_time_s=t,
        energy_j=energy,
        dynamic_energy_j=c.n_gpus * e_dyn,
        peak_power_w=float(np.max(average_power_w(energy, t))),
    )


def speculation_tokens_per_pass(draft_tokens: int, acceptance: float) -> float:
    """Expected tokens a target pass yields: ``tau = (1 - a^(k+1)) / (1 - a)`` (``k+1`` at a=1).

    Leviathan et al. (2023), eq. 1: with i.i.d. per-token acceptance ``a`` the
    accepted prefix of ``k`` drafted tokens plus the target's own correction
    (or bonus) token.
    """
    k, a = draft_tokens, acceptance
    return float(k + 1) if a >= 1.0 else (1.0 - a ** (k + 1)) / (1.0 - a)


def speculative_segments(
    target: PassCoefficients, draft: PassCoefficients, draft_tokens: int, acceptance: float
):
    """Segment pricers ``(target_segment, draft_segment)`` for :func:`decode_matrix`.

    Fluid model: an iteration (``k`` draft decode passes, then one target pass
    verifying ``k+1`` tokens) yields ``tau`` tokens on average, so each decoded
    token position ``s`` costs ``1/tau`` of an iteration taken at context
    ``P + s``.  Target pass at batch ``b``: ``T = b(k+1)`` tokens, ``K = b(P+s)``
    cached reads, ``A = b((k+1)(P+s) + k(k+1)/2)`` pairs; draft passes: ``k``
    plain decode steps at the mean draft context ``P + s + (k-1)/2``.
    """
    k = draft_tokens
    tau = speculation_tokens_per_pass(k, acceptance)

    def target_segment(b, ctx, n):
        t, e_dyn, e = pass_series_cost(
            target, b * (k + 1), b * ctx, b, b * ((k + 1) * ctx + k * (k + 1) / 2.0), b * (k + 1), n
        )
        return t / tau, e_dyn / tau, e / tau

    def draft_segment(b, ctx, n):
        t, e_dyn, e = segment_cost(draft, b, ctx + (k - 1) / 2.0, n)
        return k * t / tau, k * e_dyn / tau, k * e / tau

    return target_segment, draft_segment


def speculative_step_costs(
    target: PassCoefficients, draft: PassCoefficients, draft_tokens: int, acceptance: float
):
    """Per-step pricers ``(target, draft)`` ``f(b, ctx) -> PassCost``-like tuples (same model)."""
    k = draft_tokens
    tau = speculation_tokens_per_pass(k, acceptance)

    def target_step(b, ctx):
        cost = forward_pass(target, b * (k + 1), b * ctx, b * ((k + 1) * ctx + k * (k + 1) / 2.0))
        return cost.time_s / tau, cost.dynamic_energy_j / tau, cost.energy_j / tau

    def draft_step(b, ctx):
        x = b * (ctx + (k - 1) / 2.0)
        cost = forward_pass(draft, b, x, x)
        return k * cost.time_s / tau, k * cost.dynamic_energy_j / tau, k * cost.energy_j / tau

    return target_step, draft_step


def expected_steps_phase(
    step_cost,
    prompt_tokens: float,
    survival: np.ndarray,
    n_sequences: int,
    samples_per_query: int,
    name: str = "decode",
) -> PhaseCost:
    """Expected cost of a decode whose step is priced by ``step_cost(b, ctx) -> (t, e_dyn, e)``.

    Same expectation as :mod:`ttcsim.simulator.expectation` (batch ``B(s) ~
    Binomial(n, S(s))`` at step ``s``, context ``P + s``, the same
    :func:`~ttcsim.simulator.expectation.step_grid`), for any per-step price,
    e.g. a speculative-decoding iteration, summed over the whole ``(steps x
    batch)`` grid.
    """
    sg = step_grid(survival)
    surv, steps_s, weight = sg.survival, sg.steps, sg.weight

    def grid(n: int):
        b, pmf = binomial_grid(n, surv)
        return b, pmf, step_cost(b, prompt_tokens + steps_s[:, None])

    b, pmf, (t, e_dyn, e) = grid(n_sequences)
    w = pmf * weight[:, None]
    time_s = float((w * t).sum())
    q_time = time_s
    others = n_sequences - samples_per_query
    if others > 0:
        _, pmf_o, (t_o, _, _) = grid(others)
        done = (1.0 - surv) ** samples_per_query
        q_time = time_s - float((weight[:, None] * done[:, None] * pmf_o * t_o).sum())
    peak = float(np.max(average_power_w(e, t), initial=0.0))
    return PhaseCost(
        name=name,
        time_s=time_s,
        query_time_s=q_time,
        energy_j=float((w * e).sum()),
        dynamic_energy_j=float((w * e_dyn).sum()),
        peak_power_w=peak,
        generated_tokens=float((w * b).sum()),
    )


def stepwise_score_phase(
    rm: PassCoefficients,
    prompt_tokens: float,
    lengths: np.ndarray,
    step_tokens: int,
    group: int,
    prefix_cache: bool,
) -> PhaseCost:
    """A reward-model pass over every candidate after each reasoning step of ``T`` tokens.

    Boundary ``j = 0, 1, ...`` scores chunk ``c_i = clip(L_i - jT, 0, T)`` of every
    candidate still running, all candidates in one batched pass.  With prefix
    caching the RM keeps each candidate's KV: new tokens ``c_i`` over ``P + jT``
    cached; without it the pass re-reads the whole prefix, ``P + jT + c_i`` new
    tokens.  ``lengths`` is ``(draws, n)``; a query (``group`` candidates) waits
    until its longest candidate's last boundary.
    """
    L = np.atleast_2d(lengths)
    draws, n = L.shape
    k_max = max(int(np.ceil(L.max() / step_tokens)), 1)
    offsets = np.arange(k_max, dtype=float) * step_tokens
    rows = max(1, _CHUNK_ELEMENTS // (k_max * n))
    time = np.empty(draws)
    e_dyn = np.empty(draws)
    energy = np.empty(draws)
    tokens_total = np.empty(draws)
    finish = np.empty((draws, n // group))
    peak, throttled = 0.0, False
    last = np.ceil(L.reshape(draws, -1, group).max(axis=2) / step_tokens).astype(int) - 1
    for lo in range(0, draws, rows):
        hi = min(draws, lo + rows)
        chunk = np.clip(L[lo:hi, None, :] - offsets[None, :, None], 0.0, float(step_tokens))
        active = chunk > 0
        if prefix_cache:
            new = chunk
            cached = (prompt_tokens + offsets)[None, :, None] * active
        else:
            new = (prompt_tokens + offsets[None, :, None] + chunk) * active
            cached = np.zeros_like(new)
        tokens = new.sum(axis=2)
        cost = forward_pass(
            rm,
            tokens,
            context_read_tokens(rm, cached).sum(axis=2),
            attention_pairs(rm, new, cached).sum(axis=2),
        )
        time[lo:hi] = cost.time_s.sum(axis=1)
        e_dyn[lo:hi] = cost.dynamic_energy_j.sum(axis=1)
        energy[lo:hi] = cost.energy_j.sum(axis=1)
        tokens_total[lo:hi] = tokens.sum(axis=1)
        cumulative = np.cumsum(cost.time_s, axis=1)
        finish[lo:hi] = np.take_along_axis(cumulative, last[lo:hi], axis=1)
        peak = max(peak, float(np.max(average_power_w(cost.energy_j, cost.time_s))))
        throttled = throttled or bool(np.any(cost.throttled))
    return PhaseCost(
        name="score",
        time_s=time,
        query_time_s=finish.mean(axis=1),
        energy_j=energy,
        dynamic_energy_j=e_dyn,
        peak_power_w=peak,
        throttled=throttled,
        processed_tokens=tokens_total,
    )
