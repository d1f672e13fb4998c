"""Phases a strategy is built from: prefill, decode, scoring.

Each function returns a :class:`PhaseCost` for a *batch* of ``Q`` concurrent
queries.  Lengths come in three forms:

* a :class:`~ttcsim.distributions.LengthList` or a fixed length -- exact,
  deterministic cost;
* a random :class:`~ttcsim.distributions.LengthDistribution` -- the exact
  expectation (see :func:`ttcsim.simulator.decode.expected_decode`);
* a :class:`Draws` matrix -- one deterministic cost per Monte-Carlo draw
  (used for percentiles); then every field is an array over draws.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ttcsim.distributions import LengthDistribution, LengthList
from ttcsim.errors import TtcsimError
from ttcsim.simulator import architecture as arch
from ttcsim.simulator.coefficients import PassCoefficients
from ttcsim.simulator.decode import (
    decode_draws,
    decode_time_per_query_s,
    deterministic_decode,
    expected_decode,
)
from ttcsim.simulator.power import average_power_w
from ttcsim.simulator.roofline import forward_pass


@dataclass(frozen=True)
class Draws:
    """Monte-Carlo lengths: ``values[d, i]`` is sequence ``i``'s length in draw ``d``."""

    values: np.ndarray


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
    cost = forward_pass(
        c,
        tokens,
        n_prompts * cached_tokens,
        n_prompts * arch.causal_pairs(new_tokens, cached_tokens),
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
    )


def decode_phase(
    c: PassCoefficients,
    prompt_tokens: float,
    lengths,
    n_queries: int,
    samples: int,
    name: str = "decode",
) -> PhaseCost:
    """Decode ``n_queries * samples`` sequences as one batch that shrinks as they finish."""
    n = n_queries * samples
    first = forward_pass(c, n, n * (prompt_tokens + 1.0), n * (prompt_tokens + 1.0))
    peak = float(average_power_w(first.energy_j, first.time_s))
    if isinstance(lengths, Draws):
        t, e_dyn, e, q_time = decode_draws(c, prompt_tokens, lengths.values, samples)
        return PhaseCost(
            name, t, q_time.mean(axis=1), e, e_dyn, peak, (lengths.values - 1).sum(axis=1)
        )
    if isinstance(lengths, LengthList) or getattr(lengths, "is_fixed", False):
        if isinstance(lengths, LengthList):
            values = _expand(lengths, n_queries, samples, "--output-tokens")
        else:
            values = np.full(n, float(lengths.tokens))
        cost = deterministic_decode(c, prompt_tokens, values)
        q_time = float(decode_time_per_query_s(c, prompt_tokens, values, samples).mean())
    elif isinstance(lengths, LengthDistribution):
        cost, q_time = expected_decode(c, prompt_tokens, lengths.survival_steps(), n, samples)
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
        tokens, pairs = seq.sum(axis=1), (seq * (seq + 1) / 2).sum(axis=1)
    elif isinstance(lengths, LengthList) or getattr(lengths, "is_fixed", False):
        if isinstance(lengths, LengthList):
            seq = prompt_tokens + _expand(lengths, n_queries, candidates, "--output-tokens")
        else:
            seq = np.full(n, prompt_tokens + float(lengths.tokens))
        tokens, pairs = seq.sum(), (seq * (seq + 1) / 2).sum()
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
    )
