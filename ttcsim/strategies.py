"""Test-time-compute strategies: small classes behind one registry.

A strategy turns one query into phases (:mod:`ttcsim.simulator.phases`).
``ttcsim strategies`` lists every registered strategy with its cost formula.

Spec grammar (``--strategy``)::

    STRATEGY := NAME [COUNT] [":" KEY=VALUE ("," KEY=VALUE)*] ["(" STRATEGY ")"]

    single | cot                       one answer
    vote<N>                            N parallel samples, majority vote
    bon<N>[:rm=MODEL]                  best-of-N, outcome reward model
    prm-bon<N>[:step=T,rm=MODEL]       best-of-N, process reward model every T tokens
    beam<W>[:step=T,depth=D,expand=M,rm=MODEL]   step-level beam search
    refine<K>[:feedback=T,history=all|last]      K sequential revision rounds
    budget:min=T,max=T                 budget forcing of the thinking length
    adaptive-vote<N>[:p=P,batch=B]     sample until a majority of N is reached
    spec:draft=MODEL[,k=K,accept=A]    speculative decoding with a draft model
    vote<N>(S) | bon<N>(S)             N independent chains of strategy S, then vote / score

``COUNT`` is the strategy's main number (samples, beam width, rounds, the
adaptive maximum) and may also be written as an option (``adaptive-vote:max=16``,
``beam:width=4``).  Names are case-insensitive; option values are not (model
paths).  Examples: ``beam4:step=64,depth=8``, ``spec:draft=llama-3.2-1b,k=4,accept=0.7``,
``adaptive-vote:max=16,p=0.7``, ``vote4(refine2)``, ``bon8(budget:max=4000)``.
Every option is validated: an unknown name, key or value raises
:class:`~ttcsim.errors.TtcsimError` naming the valid ones.

Notation in the cost formulas: ``Q`` concurrent queries, ``N`` samples per
query, ``P`` prompt tokens, ``L_i`` output tokens of sample ``i``,
``Prefill(T)`` a prefill pass over ``T`` tokens, ``Decode(n; L)`` decoding
``n`` sequences in one batch that shrinks as they finish, ``RM`` the reward
model (default: the policy model).

Output lengths (``--output-tokens``) are read per strategy: one length per
sample for ``vote``/``bon``/``prm-bon``/``adaptive-vote``, one per round for
``refine``, one per query for ``beam`` (its search depth), ``budget`` and
``spec``.  A list gives them explicitly; a distribution draws them i.i.d.
Random lengths are priced by exact expectation where the strategy supports it
(:meth:`Strategy.exact_for`) and otherwise by seeded Monte Carlo in
:func:`ttcsim.predict.predict`, which states the standard error.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ttcsim.distributions import (
    LengthDistribution,
    LengthList,
    LengthSpec,
    clip_lengths,
)
from ttcsim.errors import TtcsimError, UnknownNameError
from ttcsim.simulator.coefficients import PassCoefficients, attention_pairs, context_read_tokens
from ttcsim.simulator.decode import (
    decode_time_per_query_s,
    deterministic_decode,
    segment_cost,
)
from ttcsim.simulator.expectation import binomial_grid, expected_decode
from ttcsim.simulator.phases import (
    KV_BLOCK_TOKENS,
    Draws,
    PhaseCost,
    _expand,
    decode_matrix,
    decode_matrix_phase,
    decode_phase,
    expected_steps_phase,
    kv_copy_phase,
    prefill_matrix_phase,
    prefill_phase,
    score_phase,
    speculative_segments,
    speculative_step_costs,
    squeeze,
    stepwise_score_phase,
)
from ttcsim.simulator.power import average_power_w
from ttcsim.simulator.roofline import forward_pass

#: Largest N accepted for parallel sampling.
MAX_SAMPLES = 4096
#: Largest number of sequential rounds (refine) or search steps (beam depth).
MAX_ROUNDS = 4096
#: Largest speculative draft length.
MAX_DRAFT_TOKENS = 32
_WHERE = "--strategy"


@dataclass(frozen=True)
class Workload:
    """What a strategy needs to build its phases.

    ``concurrency`` counts the batch's independent units ("chains"): queries,
    or ``group`` chains per query when a strategy runs inside ``vote<N>(...)``.
    """

    policy: PassCoefficients
    prompt_tokens: float
    lengths: object  #: a LengthSpec or phases.Draws
    concurrency: int
    prefix_cache: bool
    #: returns coefficients of a named model (None: the policy model)
    reward: Callable[[str | None], PassCoefficients]
    #: consecutive chains that belong to one query (share its prompt and latency)
    group: int = 1

    @property
    def queries(self) -> int:
        """Real queries in the batch: ``concurrency / group``."""
        return self.concurrency // self.group


@dataclass(frozen=True)
class Option:
    """One ``key=value`` option of a strategy spec."""

    field: str
    convert: Callable[[str], object]
    help: str


def _int(text: str) -> int:
    value = float(text)
    if not math.isfinite(value) or value != int(value):
        raise ValueError("must be a whole number")
    return int(value)


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


def _text(text: str) -> str:
    if not text:
        raise ValueError("must not be empty")
    return text


def _choice(*choices: str) -> Callable[[str], str]:
    def convert(text: str) -> str:
        if text.lower() not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return text.lower()

    return convert


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise TtcsimError(message, _WHERE)


def _is_random(lengths) -> bool:
    return isinstance(lengths, LengthDistribution) and not lengths.is_fixed


def _length_matrix(lengths, n_units: int, per_unit: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Lengths as a ``(draws, n_units * per_unit)`` matrix (one row unless Monte-Carlo draws)."""
    if isinstance(lengths, Draws):
        values = np.atleast_2d(np.asarray(lengths.values, dtype=float))
        if values.shape[1] != n_units * per_unit:
            raise ValueError(f"draws have {values.shape[1]} columns, need {n_units * per_unit}")
        return values, lengths.uniforms
    if isinstance(lengths, LengthList):
        return _expand(lengths, n_units, per_unit, "--output-tokens")[None, :], None
    if getattr(lengths, "is_fixed", False):
        return np.full((1, n_units * per_unit), float(lengths.tokens)), None
    raise TypeError(f"{lengths!r} needs an expectation, not a length matrix")


def _finish(phases: list[PhaseCost], lengths) -> list[PhaseCost]:
    """Floats for deterministic workloads; arrays over draws for Monte Carlo."""
    return phases if isinstance(lengths, Draws) else [squeeze(p) for p in phases]


def _chain_prefill(w: Workload, c: PassCoefficients | None = None) -> PhaseCost:
    """Prompt prefill of every chain; with prefix caching once per query."""
    n = w.queries if w.prefix_cache else w.concurrency
    return prefill_phase(c or w.policy, n, w.prompt_tokens)


def _slot_mean(lengths, n_units: int, per_unit: int) -> np.ndarray:
    """Mean length per slot (``per_unit`` slots), averaged over units [tokens]."""
    if isinstance(lengths, LengthList):
        v = _expand(lengths, n_units, per_unit, "--output-tokens")
        return v.reshape(n_units, per_unit).mean(axis=0)
    return np.full(per_unit, float(lengths.mean()))


class Strategy:
    """Base class; subclasses set ``name``, ``pattern`` and implement :meth:`phases`."""

    name: ClassVar[str]
    pattern: ClassVar[str]
    summary: ClassVar[str]
    samples_per_query: int = 1
    #: field that the spec's integer sets (``vote5`` -> n=5); None: takes no count
    count_field: ClassVar[str | None] = None
    count_label: ClassVar[str] = "count"
    count_required: ClassVar[bool] = False
    options: ClassVar[dict[str, Option]] = {}
    #: cost is random even for fixed lengths (needs Monte Carlo for percentiles)
    stochastic: ClassVar[bool] = False
    #: may run as the inner strategy of ``vote<N>(...)`` / ``bon<N>(...)``
    composable: ClassVar[bool] = False

    def phases(self, w: Workload) -> list[PhaseCost]:
        """The phases of a batch of ``w.concurrency`` queries."""
        raise NotImplementedError

    @classmethod
    def formula(cls) -> str:
        """The cost formula from the class docstring (the lines after the first)."""
        doc = (cls.__doc__ or "").strip().splitlines()
        return "\n".join(line.strip() for line in doc[1:] if line.strip())

    @property
    def spec(self) -> str:
        """Canonical spec string, e.g. ``vote5``."""
        return self.name

    @property
    def draws_per_query(self) -> int:
        """Output lengths one query consumes (one per sample, round...)."""
        return self.samples_per_query

    def exact_for(self, lengths) -> bool:
        """Whether :meth:`phases` prices these (random) lengths by exact expectation."""
        return True

    def token_counts(self, lengths: LengthSpec, n_queries: int) -> tuple[float, float]:
        """``(output, useful)`` tokens per query: generated, and in the returned answer."""
        if isinstance(lengths, LengthList):
            mean = float(np.mean(_expand(lengths, n_queries, self.draws_per_query, "")))
        else:
            mean = lengths.mean()
        return self.samples_per_query * mean, mean

    def final_lengths(self, lengths, n_units: int):
        """Lengths of each chain's returned answer (for scoring by an outer ``bon<N>``)."""
        return lengths

    def max_context_tokens(self, prompt_tokens: float, max_output_tokens: float) -> float:
        """Longest context one sequence reaches [tokens]."""
        return prompt_tokens + max_output_tokens

    def kv_footprint(
        self, prompt_tokens: float, max_output_tokens: float, prefix_cache: bool
    ) -> tuple[float, int]:
        """``(kv_tokens, sequences)`` held per query at the peak of the workload."""
        n = self.samples_per_query
        copies = 1 if prefix_cache else n
        return copies * prompt_tokens + n * max_output_tokens, n

    def extra_memory_bytes(
        self, coefficients, prompt_tokens: float, max_output_tokens: float, n_queries: int
    ) -> float:
        """Memory per GPU beyond the policy's weights and KV (e.g. a draft model) [B]."""
        return 0.0

    def length_quantum(self) -> int:
        """Granularity of output lengths [tokens] (the marginal cost steps by at least this)."""
        return 1

    def with_count(self, n: int) -> Strategy:
        """The same strategy with its count (samples, width, rounds) set to ``n``."""
        if self.count_field is None:
            raise TtcsimError(f"{self.name} has no sample count to vary", _WHERE)
        return dataclasses.replace(self, **{self.count_field: n})


_REGISTRY: dict[str, type[Strategy]] = {}
_ALIASES: dict[str, str] = {"cot": "single"}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator adding a strategy to the registry."""
    _REGISTRY[cls.name] = cls
    return cls


def _parallel_prefill(w: Workload, samples: int) -> PhaseCost:
    """Prompt prefill: once per query with prefix caching, else once per sample."""
    copies = 1 if w.prefix_cache else samples
    return prefill_phase(w.policy, w.concurrency * copies, w.prompt_tokens)


def _sampling_phases(w: Workload, n: int) -> list[PhaseCost]:
    """Prompt prefill and the decode of ``Q * n`` samples in one shrinking batch.

    With prefix caching the ``n`` samples share the prompt's prefill and KV.
    """
    return [
        _parallel_prefill(w, n),
        decode_phase(
            w.policy, w.prompt_tokens, w.lengths, w.concurrency, n, shared_prefix=w.prefix_cache
        ),
    ]


@register
@dataclass(frozen=True)
class Single(Strategy):
    """One answer (plain or chain-of-thought decoding).

    E = Prefill(Q*P) + Decode(Q; L)
    """

    name: ClassVar[str] = "single"
    pattern: ClassVar[str] = "single | cot"
    summary: ClassVar[str] = "one sample per query"
    composable: ClassVar[bool] = True

    def phases(self, w: Workload) -> list[PhaseCost]:  # noqa: D102
        return [
            _parallel_prefill(w, 1),
            decode_phase(w.policy, w.prompt_tokens, w.lengths, w.concurrency, 1),
        ]


@register
@dataclass(frozen=True)
class Vote(Strategy):
    """Self-consistency: N samples, majority vote on their answers.

    E = Prefill(Q*P) [x N without prefix cache] + Decode(Q*N; L_1..L_N); the longest sample
    sets the duration and the batch shrinks as samples finish (vote1 == single).
    """

    n: int = 5
    name: ClassVar[str] = "vote"
    pattern: ClassVar[str] = "vote<N>"
    summary: ClassVar[str] = "N parallel samples, majority vote"
    count_field: ClassVar[str] = "n"
    count_label: ClassVar[str] = "sample count"
    count_required: ClassVar[bool] = True

    @property
    def samples_per_query(self) -> int:  # noqa: D102
        return self.n

    @property
    def spec(self) -> str:  # noqa: D102
        return f"vote{self.n}"

    def phases(self, w: Workload) -> list[PhaseCost]:  # noqa: D102
        return _sampling_phases(w, self.n)


@register
@dataclass(frozen=True)
class BestOfN(Strategy):
    """Best-of-N: N samples, each scored by an outcome reward model.

    E = vote<N> + Prefill_RM(sum_i (P + L_i)): one reward-model prefill over prompt +
    candidate per candidate (reward model defaults to the policy model).
    """

    n: int = 4
    reward_model: str | None = None
    name: ClassVar[str] = "bon"
    pattern: ClassVar[str] = "bon<N>[:rm=MODEL]"
    summary: ClassVar[str] = "N samples scored by a reward model (--reward-model)"
    count_field: ClassVar[str] = "n"
    count_label: ClassVar[str] = "sample count"
    count_required: ClassVar[bool] = True
    options: ClassVar[dict[str, Option]] = {
        "rm": Option("reward_model", _text, "reward model (default --reward-model or the policy)")
    }

    @property
    def samples_per_query(self) -> int:  # noqa: D102
        return self.n

    @property
    def spec(self) -> str:  # noqa: D102
        return f"bon{self.n}"

    def phases(self, w: Workload) -> list[PhaseCost]:  # noqa: D102
        return [
            *_sampling_phases(w, self.n),
            score_phase(
                w.reward(self.reward_model), w.prompt_tokens, w.lengths, w.concurrency, self.n
            ),
        ]


@register
@dataclass(frozen=True)
class ProcessBestOfN(Strategy):
    """Best-of-N with a process reward model scoring every reasoning step of T tokens.

    E = vote<N> + [Prefill_RM(Q*P) with prefix cache] + sum_j Pass_RM(j), one RM pass per step
    boundary j = 0..ceil(max L/T)-1 over all running candidates: new tokens min(T, L_i - jT)
    over P + jT cached (prefix cache) or P + jT + chunk re-read (none). Scoring passes grow
    with the number of steps; prm-bon<N>:step>=L without prefix cache == bon<N>.
    """

    n: int = 4
    step_tokens: int = 128
    reward_model: str | None = None
    name: ClassVar[str] = "prm-bon"
    pattern: ClassVar[str] = "prm-bon<N>[:step=T,rm=MODEL]"
    summary: ClassVar[str] = "N samples, a process reward model scores every step"
    count_field: ClassVar[str] = "n"
    count_label: ClassVar[str] = "sample count"
    count_required: ClassVar[bool] = True
    options: ClassVar[dict[str, Option]] = {
        "step": Option("step_tokens", _int, "reasoning-step length [tokens] (default 128)"),
        "rm": Option("reward_model", _text, "process reward model (default the policy)"),
    }

    def __post_init__(self) -> None:
        _check(1 <= self.n <= MAX_SAMPLES, f"sample count must be 1..{MAX_SAMPLES}, got {self.n}")
        _check(self.step_tokens >= 1, f"step must be >= 1 token, got {self.step_tokens}")

    @property
    def samples_per_query(self) -> int:  # noqa: D102
        return self.n

    @property
    def spec(self) -> str:  # noqa: D102
        return _spec_string(self)

    def exact_for(self, lengths) -> bool:  # noqa: D102
        return not _is_random(lengths)

    def phases(self, w: Workload) -> list[PhaseCost]:  # noqa: D102
        rm = w.reward(self.reward_model)
        L, _ = _length_matrix(w.lengths, w.concurrency, self.n)
        out = _sampling_phases(w, self.n)
        scored = [
            stepwise_score_phase(rm, w.prompt_tokens, L, self.step_tokens, self.n, w.prefix_cache)
        ]
        if w.prefix_cache:
            scored.insert(0, prefill_phase(rm, w.concurrency, w.prompt_tokens, name="score"))
        if isinstance(w.lengths, Draws):
            return out + scored
        return out + [squeeze(p) for p in scored]


@register
@dataclass(frozen=True)
class Beam(Strategy):
    """Step-level beam search: W beams, each expanded into M candidates per step of T tokens.

    E = Prefill(Q*P) + Prefill_RM(Q*P) + sum_{k=1..D} [Decode(Q*W*M; T tokens after P + (k-1)T)
    + Pass_RM(k) + CopyOnWrite(k)], depth D = min(depth, ceil(L/T)), L the query's output length.
    The W*M candidates share their prefix's KV blocks (stored once, copy-on-write), but paged
    attention reads them once per candidate. Pass_RM scores the W*M new steps (prefix cache: T new
    tokens over P + (k-1)T cached; none: P + kT re-read); the top W survive, pruned candidates
    free their blocks, and each survivor forks M children, copying its partial KV block
    ((P + kT) mod 16 tokens). M defaults to W; beam1 == single(L = DT) + one RM pass per step.
    """

    width: int = 4
    step_tokens: int = 128
    depth: int | None = None
    expand: int | None = None
    reward_model: str | None = None
    name: ClassVar[str] = "beam"
    pattern: ClassVar[str] = "beam<W>[:step=T,depth=D,expand=M,rm=MODEL]"
    summary: ClassVar[str] = "step-level beam search with a verifier"
    count_field: ClassVar[str] = "width"
    count_label: ClassVar[str] = "beam width"
    count_required: ClassVar[bool] = True
    composable: ClassVar[bool] = True
    options: ClassVar[dict[str, Option]] = {
        "width": Option("width", _int, "beams kept per step"),
        "step": Option("step_tokens", _int, "tokens per search step (default 128)"),
        "depth": Option("depth", _int, "maximum steps (default: ceil(output tokens / step))"),
        "expand": Option("expand", _int, "candidates per kept beam (default W)"),
        "rm": Option("reward_model", _text, "verifier / process reward model (default policy)"),
    }

    def __post_init__(self) -> None:
        _check(1 <= self.width <= MAX_SAMPLES, f"beam width must be 1..{MAX_SAMPLES}")
        _check(self.step_tokens >= 1, f"step must be >= 1 token, got {self.step_tokens}")
        _check(
            self.depth is None or 1 <= self.depth <= MAX_ROUNDS, f"depth must be 1..{MAX_ROUNDS}"
        )
        _check(self.expand is None or self.expand >= 1, "expand must be >= 1")
        _check(self.candidates <= MAX_SAMPLES, f"W*M must be <= {MAX_SAMPLES}")

    @property
    def expansion(self) -> int:
        """Candidates per kept beam, M."""
        return self.width if self.expand is None else self.expand

    @property
    def candidates(self) -> int:
        """Sequences decoded per query per step, W*M."""
        return self.width * self.expansion

    @property
    def samples_per_query(self) -> int:  # noqa: D102
        return self.candidates

    @property
    def draws_per_query(self) -> int:  # noqa: D102
        return 1

    @property
    def spec(self) -> str:  # noqa: D102
        return _spec_string(self)

    def length_quantum(self) -> int:  # noqa: D102
        return self.step_tokens

    def _depths(self, lengths: np.ndarray) -> np.ndarray:
        d = np.maximum(np.ceil(lengths / self.step_tokens), 1.0)
        return d if self.depth is None else np.minimum(d, self.depth)

    def _depth_survival(self, lengths: LengthDistribution) -> np.ndarray:
        """``P(D >= k)`` for k = 1..K (``D = min(depth, ceil(L/T))``)."""
        k_max = int(np.ceil(lengths.upper_bound() / self.step_tokens))
        if self.depth is not None:
            k_max = min(k_max, self.depth)
        k = np.arange(1, max(k_max, 1) + 1, dtype=float)
        return np.where(k == 1, 1.0, lengths.survival((k - 1) * self.step_tokens))

    def max_context_tokens(self, prompt_tokens, max_output_tokens):  # noqa: D102
        return prompt_tokens + self._max_depth(max_output_tokens) * self.step_tokens

    def _max_depth(self, max_output_tokens: float) -> float:
        return float(self._depths(np.asarray(float(max_output_tokens))))

    def kv_footprint(self, prompt_tokens, max_output_tokens, prefix_cache):  # noqa: D102
        history = self._max_depth(max_output_tokens) * self.step_tokens
        kv = prompt_tokens + self.width * history + self.candidates * self.step_tokens
        return kv, self.candidates

    def token_counts(self, lengths, n_queries):  # noqa: D102
        if isinstance(lengths, LengthList):
            depth = float(self._depths(_expand(lengths, n_queries, 1, "")).mean())
        elif lengths.is_fixed:
            depth = float(self._depths(np.asarray(float(lengths.tokens))))
        else:
            depth = float(self._depth_survival(lengths).sum())
        useful = depth * self.step_tokens
        return self.candidates * useful, useful

    def final_lengths(self, lengths, n_units):  # noqa: D102
        if isinstance(lengths, Draws):
            return Draws(self._depths(lengths.values) * self.step_tokens)
        if isinstance(lengths, LengthList) or lengths.is_fixed:
            v, _ = _length_matrix(lengths, n_units, 1)
            return LengthList(tuple(int(x) for x in self._depths(v[0]) * self.step_tokens))
        raise TypeError("beam's answer lengths of random lengths need Monte Carlo")

    def _step_costs(self, w: Workload, rm: PassCoefficients, chains, k):
        """Verifier pass, its new tokens, and copy-on-write tokens at step ``k`` (arrays)."""
        p, t_step, m = w.prompt_tokens, self.step_tokens, self.candidates
        n = chains * m
        if w.prefix_cache:
            ctx = p + (k - 1) * t_step
            tokens = n * t_step
            verify = forward_pass(
                rm, tokens, n * context_read_tokens(rm, ctx), n * attention_pairs(rm, t_step, ctx)
            )
        else:
            full = p + k * t_step
            tokens = n * full
            verify = forward_pass(rm, tokens, 0.0, n * attention_pairs(rm, full, 0.0))
        filled = np.mod(p + (k - 1) * t_step, KV_BLOCK_TOKENS)
        forks = np.where(k == 1, m - 1, self.width * (self.expansion - 1))
        copied = chains * forks * filled
        return verify, tokens, copied

    def phases(self, w: Workload) -> list[PhaseCost]:  # noqa: D102
        rm = w.reward(self.reward_model)
        prefills = [_chain_prefill(w)]
        if w.prefix_cache:
            prefills.append(prefill_phase(rm, w.queries, w.prompt_tokens, name="score"))
        if _is_random(w.lengths):
            return prefills + self._expected_phases(w, rm)
        L, _ = _length_matrix(w.lengths, w.concurrency, 1)
        depths = self._depths(L)  # (draws, chains)
        draws = depths.shape[0]
        seq = np.repeat(depths * self.step_tokens, self.candidates, axis=1)
        decode = decode_matrix_phase(
            w.policy, w.prompt_tokens, seq, group=w.group * self.candidates
        )
        k = np.arange(1, int(depths.max()) + 1, dtype=float)
        chains = (depths[:, :, None] >= k[None, None, :]).sum(axis=1)  # (draws, K)
        verify, scored, copied = self._step_costs(w, rm, chains, k[None, :])
        last = depths.reshape(draws, -1, w.group).max(axis=2).astype(int) - 1
        cum = np.cumsum(verify.time_s, axis=1)
        score = PhaseCost(
            name="score",
            time_s=verify.time_s.sum(axis=1),
            query_time_s=np.take_along_axis(cum, last, axis=1).mean(axis=1),
            energy_j=verify.energy_j.sum(axis=1),
            dynamic_energy_j=verify.dynamic_energy_j.sum(axis=1),
            peak_power_w=float(np.max(average_power_w(verify.energy_j, verify.time_s))),
            throttled=bool(np.any(verify.throttled)),
            processed_tokens=np.broadcast_to(scored, chains.shape).sum(axis=1),
        )
        cow = kv_copy_phase(w.policy, copied.sum(axis=1))
        return prefills + _finish([decode, cow, score], w.lengths)

    def _expected_phases(self, w: Workload, rm: PassCoefficients) -> list[PhaseCost]:
        """Exact expectation over random depths: chains active at step k ~ Binomial(n, P(D>=k))."""
        p_k = self._depth_survival(w.lengths)
        k = np.arange(1, p_k.size + 1, dtype=float)[:, None]
        n, g = w.concurrency, w.group

        def step_totals(n_chains: int):
            a, pmf = binomial_grid(n_chains, p_k)
            start = np.where(k == 1, 1.0, (k - 1) * self.step_tokens)
            first_ctx = w.prompt_tokens + start
            n_steps = np.where(k == 1, self.step_tokens - 1.0, float(self.step_tokens))
            dec = segment_cost(w.policy, a * self.candidates, first_ctx, n_steps)
            verify, scored, copied = self._step_costs(w, rm, a, k)
            return a, pmf, dec, verify, scored, copied

        a, pmf, dec, verify, scored, copied = step_totals(n)
        cow = kv_copy_phase(w.policy, copied)

        def query_time(times, times_others, pmf_others):
            total = float((pmf * times).sum())
            if pmf_others is None:
                return total
            gone = (1.0 - p_k[:, None]) ** g
            return total - float((gone * pmf_others * times_others).sum())

        if n > g:
            _, pmf_o, dec_o, verify_o, _, copied_o = step_totals(n - g)
            cow_o = kv_copy_phase(w.policy, copied_o)
        else:
            pmf_o = dec_o = verify_o = cow_o = None

        def phase(name, t, e_dyn, e, t_o, peak, tokens=0.0, throttled=False):
            return PhaseCost(
                name=name,
                time_s=float((pmf * t).sum()),
                query_time_s=query_time(t, t_o, pmf_o),
                energy_j=float((pmf * e).sum()),
                dynamic_energy_j=float((pmf * e_dyn).sum()),
                peak_power_w=peak,
                throttled=throttled,
                processed_tokens=tokens,
            )

        def peak_of(e, t):
            return float(np.max(average_power_w(e, t), initial=0.0))

        return [
            phase(
                "decode",
                dec[0],
                dec[1],
                dec[2],
                None if dec_o is None else dec_o[0],
                peak_of(dec[2], dec[0]),
            ),
            phase(
                "decode",
                cow.time_s,
                cow.dynamic_energy_j,
                cow.energy_j,
                None if cow_o is None else cow_o.time_s,
                cow.peak_power_w,
            ),
            phase(
                "score",
                verify.time_s,
                verify.dynamic_energy_j,
                verify.energy_j,
                None if verify_o is None else verify_o.time_s,
                peak_of(verify.energy_j, verify.time_s),
                float((pmf * scored).sum()),
                bool(np.any(verify.throttled & (pmf > 0))),
            ),
        ]


@register
@dataclass(frozen=True)
class Refine(Strategy):
    """Sequential revision (self-refine): K rounds, each reading prompt + earlier answers.

    Round 1 = single. Round r >= 2 appends F feedback tokens and decodes L_r over context
    C_r = P + sum_{j<r} L_j + (r-1)F (history=all; history=last: P + L_{r-1} + F).
    Prefix cache: Prefill(F new over C_r - F cached) [last, r >= 3: L_{r-1} + F over P]; none:
    Prefill(C_r) from scratch. E = sum_r [Prefill_r + Decode(Q; L_r | context C_r)].
    Rounds run in lock step over the batch; refine1 == single.
    """

    rounds: int = 2
    feedback_tokens: int = 32
    history: str = "all"
    name: ClassVar[str] = "refine"
    pattern: ClassVar[str] = "refine<K>[:feedback=T,history=all|last]"
    summary: ClassVar[str] = "K sequential revision rounds, context grows"
    count_field: ClassVar[str] = "rounds"
    count_label: ClassVar[str] = "round count"
    count_required: ClassVar[bool] = True
    composable: ClassVar[bool] = True
    options: ClassVar[dict[str, Option]] = {
        "rounds": Option("rounds", _int, "revision rounds K"),
        "feedback": Option("feedback_tokens", _int, "instruction tokens per round (default 32)"),
        "history": Option("history", _choice("all", "last"), "context kept (default all)"),
    }

    def __post_init__(self) -> None:
        _check(1 <= self.rounds <= MAX_ROUNDS, f"round count must be 1..{MAX_ROUNDS}")
        _check(self.feedback_tokens >= 1, "feedback must be >= 1 token")
        _check(self.history in ("all", "last"), "history must be all or last")

    @property
    def draws_per_query(self) -> int:  # noqa: D102
        return self.rounds

    @property
    def spec(self) -> str:  # noqa: D102
        return _spec_string(self)

    def exact_for(self, lengths) -> bool:  # noqa: D102
        return self.rounds == 1 or not _is_random(lengths)

    def max_context_tokens(self, prompt_tokens, max_output_tokens):  # noqa: D102
        k, f = self.rounds, self.feedback_tokens
        if self.history == "all":
            return prompt_tokens + k * max_output_tokens + (k - 1) * f
        return prompt_tokens + (2 if k > 1 else 1) * max_output_tokens + (f if k > 1 else 0)

    def kv_footprint(self, prompt_tokens, max_output_tokens, prefix_cache):  # noqa: D102
        return self.max_context_tokens(prompt_tokens, max_output_tokens), 1

    def token_counts(self, lengths, n_queries):  # noqa: D102
        slots = _slot_mean(lengths, n_queries, self.rounds)
        return float(slots.sum()), float(slots[-1])

    def final_lengths(self, lengths, n_units):  # noqa: D102
        if isinstance(lengths, Draws):
            v = lengths.values.reshape(lengths.values.shape[0], n_units, self.rounds)
            return Draws(v[:, :, -1])
        if isinstance(lengths, LengthList):
            v = _expand(lengths, n_units, self.rounds, "--output-tokens")
            return LengthList(tuple(int(x) for x in v.reshape(n_units, -1)[:, -1]))
        return lengths

    def phases(self, w: Workload) -> list[PhaseCost]:  # noqa: D102
        first = _chain_prefill(w)
        if _is_random(w.lengths):  # rounds == 1 (exact_for)
            return [
                first,
                decode_phase(
                    w.policy,
                    w.prompt_tokens,
                    w.lengths,
                    w.queries,
                    w.group,
                    shared_prefix=w.prefix_cache,
                ),
            ]
        k, f, p = self.rounds, self.feedback_tokens, w.prompt_tokens
        values, _ = _length_matrix(w.lengths, w.concurrency, k)
        L = values.reshape(values.shape[0], w.concurrency, k)
        out = [first, decode_matrix_phase(w.policy, p, L[:, :, 0], w.group, wait_for_batch=k > 1)]
        answers = np.zeros_like(L[:, :, 0])
        for r in range(2, k + 1):
            previous = L[:, :, r - 2]
            answers = answers + previous
            if self.history == "all":
                context = p + answers + (r - 1) * f
                new = np.full_like(context, float(f)) if w.prefix_cache else context
            else:
                context = p + previous + f
                # round 2 re-reads exactly what round 1 left in the cache
                fresh = np.full_like(context, float(f)) if r == 2 else previous + f
                new = fresh if w.prefix_cache else context
            out.append(prefill_matrix_phase(w.policy, new, context - new))
            decode = decode_matrix_phase(
                w.policy, context, L[:, :, r - 1], w.group, wait_for_batch=r < k
            )
            out.append(decode)
        return _finish(out, w.lengths)


@register
@dataclass(frozen=True)
class Budget(Strategy):
    """Budget forcing (s1): thinking lengths forced into [min, max].

    L' = min(max(L, min), max): below min the end of thinking is suppressed and "Wait"
    appended (a forced continuation, decoded like any token); at max the end is forced.
    E = Prefill(Q*P) + Decode(Q; L'), exact for random L through the clipped distribution.
    """

    min_tokens: int = 1
    max_tokens: int | None = None
    name: ClassVar[str] = "budget"
    pattern: ClassVar[str] = "budget:min=T,max=T"
    summary: ClassVar[str] = "budget forcing: thinking length clipped to [min, max]"
    composable: ClassVar[bool] = True
    options: ClassVar[dict[str, Option]] = {
        "min": Option("min_tokens", _int, "minimum thinking tokens (forced continuations)"),
        "max": Option("max_tokens", _int, "maximum thinking tokens (forced end)"),
    }

    def __post_init__(self) -> None:
        _check(self.min_tokens >= 1, "min must be >= 1 token")
        _check(
            self.max_tokens is None or self.max_tokens >= self.min_tokens,
            f"max={self.max_tokens} is below min={self.min_tokens}",
        )
        _check(
            self.min_tokens > 1 or self.max_tokens is not None,
            "budget needs min= and/or max=, e.g. budget:max=4000",
        )

    @property
    def spec(self) -> str:  # noqa: D102
        return _spec_string(self)

    def clip(self, lengths):
        """The lengths after forcing: a LengthSpec or Draws."""
        if isinstance(lengths, Draws):
            return Draws(
                np.clip(lengths.values, self.min_tokens, self.max_tokens), lengths.uniforms
            )
        return clip_lengths(lengths, self.min_tokens, self.max_tokens)

    def max_context_tokens(self, prompt_tokens, max_output_tokens):  # noqa: D102
        return prompt_tokens + self._max_len(max_output_tokens)

    def _max_len(self, max_output_tokens: float) -> float:
        return float(np.clip(max_output_tokens, self.min_tokens, self.max_tokens))

    def kv_footprint(self, prompt_tokens, max_output_tokens, prefix_cache):  # noqa: D102
        return prompt_tokens + self._max_len(max_output_tokens), 1

    def token_counts(self, lengths, n_queries):  # noqa: D102
        return super().token_counts(self.clip(lengths), n_queries)

    def final_lengths(self, lengths, n_units):  # noqa: D102
        return self.clip(lengths)

    def phases(self, w: Workload) -> list[PhaseCost]:  # noqa: D102
        clipped = self.clip(w.lengths)
        return [
            _chain_prefill(w),
            decode_phase(
                w.policy, w.prompt_tokens, clipped, w.queries, w.group, shared_prefix=w.prefix_cache
            ),
        ]


def adaptive_vote_rounds(
    max_samples: int, batch: int, agreement: float, votes: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Round sizes ``b_j`` and ``P(round j runs)`` of adaptive majority voting.

    Samples are drawn in sequential rounds of ``b`` (the last one smaller) up to
    ``N``; each agrees with the modal answer independently with probability
    ``p``.  Sampling stops once the modal answer holds ``m`` votes, by default
    ``m = floor(N/2) + 1`` (a majority of ``N``: more samples cannot change the
    vote, so the answer equals ``vote<N>``'s).  Round ``j`` (0-based, starting
    after ``s_j = j*b`` samples) runs iff fewer than ``m`` of the first ``s_j``
    samples agree::

        P(run_j) = P(Binomial(s_j, p) <= m - 1)

    so the number of samples drawn, ``S``, has ``P(S > s_j) = P(run_j)`` and
    ``E[S] = sum_j b_j P(run_j)``; for ``b = 1`` and no cap, ``S - m`` is
    negative binomial with mean ``m (1 - p) / p``.  Other answers are assumed
    never to reach ``m`` themselves, so ``S`` is stochastically an upper bound
    for a vote that may also stop on another answer.
    """
    from scipy import stats

    starts = np.arange(0, max_samples, batch)
    sizes = np.minimum(batch, max_samples - starts)
    m = max_samples // 2 + 1 if votes is None else votes
    return sizes, stats.binom.cdf(m - 1, starts, agreement)


def adaptive_vote_sample_pmf(
    max_samples: int, batch: int, agreement: float, votes: int | None = None
):
    """``(s, P(S = s))``: the distribution of the number of samples drawn (see above)."""
    sizes, run = adaptive_vote_rounds(max_samples, batch, agreement, votes)
    drawn = np.cumsum(sizes)
    return drawn, run - np.append(run[1:], 0.0)


@register
@dataclass(frozen=True)
class AdaptiveVote(Strategy):
    """Adaptive voting: sample in rounds of b until m answers agree (m = majority of N).

    Each sample agrees with the modal answer w.p. p; round j (after s_j = jb samples) runs
    w.p. P(Binomial(s_j, p) < m), m = floor(N/2)+1 or votes=, so E[S] = sum_j b_j P(run_j) <= N.
    E = Prefill(Q*P) [x samples without cache] + sum_j sum_q P(q queries active) Decode(q*b_j; L).
    Rounds run in sequence: fewer samples, but smaller decode batches (at batch 1 on a
    memory-bound GPU it can cost more energy than vote<N>, which batches all N at once).
    """

    max_samples: int = 16
    agreement: float = 0.7
    batch: int = 1
    votes: int | None = None
    name: ClassVar[str] = "adaptive-vote"
    pattern: ClassVar[str] = "adaptive-vote<N>[:p=P,batch=B,votes=M]"
    summary: ClassVar[str] = "sample until a majority of N agrees (agreement prob. p)"
    count_field: ClassVar[str] = "max_samples"
    count_label: ClassVar[str] = "maximum sample count"
    stochastic: ClassVar[bool] = True
    options: ClassVar[dict[str, Option]] = {
        "max": Option("max_samples", _int, "maximum samples N (default 16)"),
        "p": Option("agreement", _float, "probability a sample gives the modal answer (0.7)"),
        "batch": Option("batch", _int, "samples drawn per round (default 1)"),
        "votes": Option("votes", _int, "agreeing answers that stop sampling (majority of N)"),
    }

    def __post_init__(self) -> None:
        _check(1 <= self.max_samples <= MAX_SAMPLES, f"max must be 1..{MAX_SAMPLES}")
        _check(0.0 <= self.agreement <= 1.0, f"p must be in [0, 1], got {self.agreement}")
        _check(1 <= self.batch <= self.max_samples, f"batch must be 1..max ({self.max_samples})")
        _check(
            self.votes is None or 1 <= self.votes <= self.max_samples,
            f"votes must be 1..max ({self.max_samples})",
        )

    def rounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Round sizes and run probabilities (:func:`adaptive_vote_rounds`)."""
        return adaptive_vote_rounds(self.max_samples, self.batch, self.agreement, self.votes)

    @property
    def samples_per_query(self) -> int:  # noqa: D102
        return self.batch

    @property
    def draws_per_query(self) -> int:  # noqa: D102
        return self.max_samples

    @property
    def spec(self) -> str:  # noqa: D102
        return _spec_string(self)

    def expected_samples(self) -> float:
        """``E[S]``: expected number of samples drawn per query."""
        sizes, run = self.rounds()
        return float((sizes * run).sum())

    def kv_footprint(self, prompt_tokens, max_output_tokens, prefix_cache):  # noqa: D102
        copies = 1 if prefix_cache else self.batch
        return copies * prompt_tokens + self.batch * max_output_tokens, self.batch

    def token_counts(self, lengths, n_queries):  # noqa: D102
        slots = self._slot_lengths(lengths)
        sizes, run = self.rounds()
        per_round = np.add.reduceat(slots, np.cumsum(sizes) - sizes)
        return float((per_round * run).sum()), float(slots.mean())

    def _slot_lengths(self, lengths) -> np.ndarray:
        """One (mean) length per sample slot; lists must be the same for every query."""
        if isinstance(lengths, LengthList):
            n = len(lengths.values)
            if n not in (1, self.max_samples):
                raise TtcsimError(
                    f"adaptive-vote takes 1 length or one per sample ({self.max_samples}), got {n}",
                    "--output-tokens",
                )
            return _expand(lengths, 1, self.max_samples, "--output-tokens")
        return np.full(self.max_samples, float(lengths.mean()))

    def phases(self, w: Workload) -> list[PhaseCost]:  # noqa: D102
        if isinstance(w.lengths, Draws):
            return self._draw_phases(w)
        return self._expected_phases(w)

    def _expected_phases(self, w: Workload) -> list[PhaseCost]:
        from scipy import stats

        q_total, p = w.concurrency, w.prompt_tokens
        sizes, run = self.rounds()
        stops = run - np.append(run[1:], 0.0)  # P(last round is j)
        random = _is_random(w.lengths)
        slots = None if random else self._slot_lengths(w.lengths)
        starts = np.cumsum(sizes) - sizes
        cache: dict = {}

        def decode(j: int, q: int):
            """(batch time, own time, e_dyn, e, peak) of round j with q active queries."""
            key = (j if slots is not None else int(sizes[j]), q)
            if key not in cache:
                b = int(sizes[j])
                if random:
                    cost, own = expected_decode(
                        w.policy, p, w.lengths.survival_steps(), q * b, b, w.prefix_cache
                    )
                else:
                    values = np.tile(slots[starts[j] : starts[j] + b], q)
                    cost = deterministic_decode(w.policy, p, values, b, w.prefix_cache)
                    own = float(
                        decode_time_per_query_s(w.policy, p, values, b, w.prefix_cache).max()
                    )
                x = q * b * context_read_tokens(w.policy, p + 1.0)
                first = forward_pass(w.policy, q * b, x, x)
                peak = float(average_power_w(first.energy_j, first.time_s))
                cache[key] = (cost.time_s, own, cost.dynamic_energy_j, cost.energy_j, peak)
            return cache[key]

        def mixture(n: int, prob: float):
            qs = np.arange(n + 1)
            pmf = stats.binom.pmf(qs, n, prob)
            keep = pmf > 1e-14
            return qs[keep], pmf[keep]

        tot = dict(
            dec_t=0.0,
            dec_q=0.0,
            dec_dyn=0.0,
            dec_e=0.0,
            pre_t=0.0,
            pre_q=0.0,
            pre_dyn=0.0,
            pre_e=0.0,
        )
        peak, throttled = 0.0, False
        first = prefill_phase(w.policy, q_total, p) if w.prefix_cache else None
        if first is not None:
            tot.update(
                pre_t=first.time_s,
                pre_q=first.time_s,
                pre_dyn=first.dynamic_energy_j,
                pre_e=first.energy_j,
            )
            peak, throttled = first.peak_power_w, first.throttled
        for j in range(sizes.size):
            if run[j] < 1e-14:
                break
            b = int(sizes[j])
            for q, pr in zip(*mixture(q_total, run[j]), strict=True):
                if q == 0:
                    continue
                t, _, e_dyn, e, pk = decode(j, int(q))
                tot["dec_t"] += pr * t
                tot["dec_dyn"] += pr * e_dyn
                tot["dec_e"] += pr * e
                peak = max(peak, pk)
                if not w.prefix_cache:
                    pre = prefill_phase(w.policy, int(q) * b, p)
                    tot["pre_t"] += pr * pre.time_s
                    tot["pre_dyn"] += pr * pre.dynamic_energy_j
                    tot["pre_e"] += pr * pre.energy_j
                    throttled = throttled or pre.throttled
            # latency of one query: it is active in round j w.p. run[j]; the others ~ Bin(Q-1)
            for q, pr in zip(*mixture(q_total - 1, run[j]), strict=True):
                t, own, *_ = decode(j, int(q) + 1)
                tot["dec_q"] += pr * ((run[j] - stops[j]) * t + stops[j] * own)
                if not w.prefix_cache:
                    pre = prefill_phase(w.policy, (int(q) + 1) * b, p)
                    tot["pre_q"] += pr * run[j] * pre.time_s
        return [
            PhaseCost(
                "prefill",
                tot["pre_t"],
                tot["pre_q"],
                tot["pre_e"],
                tot["pre_dyn"],
                peak,
                throttled=throttled,
            ),
            PhaseCost("decode", tot["dec_t"], tot["dec_q"], tot["dec_e"], tot["dec_dyn"], peak),
        ]

    def _draw_phases(self, w: Workload) -> list[PhaseCost]:
        if w.lengths.uniforms is None:
            raise TypeError("adaptive-vote draws need uniforms (Draws.uniforms)")
        q_total, p, n = w.concurrency, w.prompt_tokens, self.max_samples
        values = np.asarray(w.lengths.values, dtype=float)
        draws = values.shape[0]
        lengths = values.reshape(draws, q_total, n)
        u = np.asarray(w.lengths.uniforms).reshape(draws, q_total, n)[:, :, 0]
        sizes, run = self.rounds()
        rounds_run = (run[None, None, :] > u[:, :, None]).sum(axis=2)  # (draws, Q) >= 1
        starts = np.cumsum(sizes) - sizes
        zero = np.zeros(draws)
        dec_t, dec_dyn, dec_e = zero.copy(), zero.copy(), zero.copy()
        pre_t, pre_dyn, pre_e = zero.copy(), zero.copy(), zero.copy()
        latency_dec, latency_pre = np.zeros((draws, q_total)), np.zeros((draws, q_total))
        peak, throttled = 0.0, False
        if w.prefix_cache:
            first = prefill_phase(w.policy, q_total, p)
            pre_t += first.time_s
            pre_dyn += first.dynamic_energy_j
            pre_e += first.energy_j
            latency_pre += first.time_s
            peak, throttled = first.peak_power_w, first.throttled
        for j in range(sizes.size):
            active = rounds_run > j
            if not active.any():
                break
            b = int(sizes[j])
            chunk = lengths[:, :, starts[j] : starts[j] + b] * active[:, :, None]
            d = decode_matrix(
                w.policy, p, chunk.reshape(draws, -1), b, shared_prefix=w.prefix_cache
            )
            dec_t += d.time_s
            dec_dyn += d.dynamic_energy_j
            dec_e += d.energy_j
            peak = max(peak, d.peak_power_w)
            last = rounds_run == j + 1
            latency_dec += np.where(last, d.group_finish_s, d.time_s[:, None]) * active
            if not w.prefix_cache:
                pre = forward_pass(
                    w.policy,
                    active.sum(axis=1) * b * p,
                    0.0,
                    active.sum(axis=1) * b * attention_pairs(w.policy, p),
                )
                pre_t += pre.time_s
                pre_dyn += pre.dynamic_energy_j
                pre_e += pre.energy_j
                latency_pre += pre.time_s[:, None] * active
                throttled = throttled or bool(np.any(pre.throttled))
        return [
            PhaseCost(
                "prefill",
                pre_t,
                latency_pre.mean(axis=1),
                pre_e,
                pre_dyn,
                peak,
                throttled=throttled,
            ),
            PhaseCost("decode", dec_t, latency_dec.mean(axis=1), dec_e, dec_dyn, peak),
        ]


@register
@dataclass(frozen=True)
class Speculative(Strategy):
    """Speculative decoding: a draft model proposes k tokens, the target verifies k+1 at once.

    tau = (1 - a^(k+1)) / (1 - a) tokens per target pass (acceptance rate a). Per output
    token at context P + s: [k * Pass_draft(b; P+s+(k-1)/2) + Pass_target(b(k+1) tokens;
    P+s)] / tau. E = Prefill(Q*P) + Prefill_draft(Q*P) + sum over decode steps (batch
    shrinking as sequences finish). Draft weights and KV count toward memory.
    """

    draft: str | None = None
    draft_tokens: int = 4
    acceptance: float = 0.7
    name: ClassVar[str] = "spec"
    pattern: ClassVar[str] = "spec:draft=MODEL[,k=K,accept=A]"
    summary: ClassVar[str] = "speculative decoding with a draft model"
    composable: ClassVar[bool] = True
    options: ClassVar[dict[str, Option]] = {
        "draft": Option("draft", _text, "draft model (catalog name, alias or config.json)"),
        "k": Option("draft_tokens", _int, "draft tokens per verification (default 4)"),
        "accept": Option("acceptance", _float, "per-token acceptance rate a (default 0.7)"),
    }

    def __post_init__(self) -> None:
        _check(self.draft is not None, "spec needs a draft model, e.g. spec:draft=llama-3.2-1b")
        _check(1 <= self.draft_tokens <= MAX_DRAFT_TOKENS, f"k must be 1..{MAX_DRAFT_TOKENS}")
        _check(0.0 <= self.acceptance <= 1.0, f"accept must be in [0, 1], got {self.acceptance}")

    @property
    def spec(self) -> str:  # noqa: D102
        return f"spec:draft={self.draft},k={self.draft_tokens},accept={self.acceptance:g}"

    def max_context_tokens(self, prompt_tokens, max_output_tokens):  # noqa: D102
        return prompt_tokens + max_output_tokens + self.draft_tokens

    def kv_footprint(self, prompt_tokens, max_output_tokens, prefix_cache):  # noqa: D102
        return prompt_tokens + max_output_tokens + self.draft_tokens, 1

    def extra_memory_bytes(self, coefficients, prompt_tokens, max_output_tokens, n_queries):
        """Draft weights plus the draft's KV cache for every sequence [B]."""
        c = coefficients(self.draft)
        kv = n_queries * (prompt_tokens + max_output_tokens + self.draft_tokens)
        return c.weight_bytes_total + kv * c.kv_bytes_per_token

    def phases(self, w: Workload) -> list[PhaseCost]:  # noqa: D102
        draft = w.reward(self.draft)
        prefills = [_chain_prefill(w), _chain_prefill(w, draft)]
        if _is_random(w.lengths):
            target_step, draft_step = speculative_step_costs(
                w.policy, draft, self.draft_tokens, self.acceptance
            )
            survival = w.lengths.survival_steps()
            return prefills + [
                expected_steps_phase(
                    target_step, w.prompt_tokens, survival, w.concurrency, w.group, "decode"
                ),
                expected_steps_phase(
                    draft_step, w.prompt_tokens, survival, w.concurrency, w.group, "draft"
                ),
            ]
        target_seg, draft_seg = speculative_segments(
            w.policy, draft, self.draft_tokens, self.acceptance
        )
        L, _ = _length_matrix(w.lengths, w.concurrency, 1)
        return prefills + _finish(
            [
                decode_matrix_phase(w.policy, w.prompt_tokens, L, w.group, "decode", target_seg),
                decode_matrix_phase(draft, w.prompt_tokens, L, w.group, "draft", draft_seg),
            ],
            w.lengths,
        )


@register
@dataclass(frozen=True)
class Composite(Strategy):
    """Parallel over sequential: N independent chains of an inner strategy S, then vote/score.

    E = S's phases with Q*N chains (the N chains of a query share its prompt prefill with
    prefix caching) [+ Prefill_RM(sum_i (P + A_i)) over the N final answers A_i for bon].
    A query waits for its slowest chain. vote4(single) == vote4.
    """

    outer: Strategy = dataclasses.field(default_factory=lambda: Vote(4))
    inner: Strategy = dataclasses.field(default_factory=Single)
    name: ClassVar[str] = "(composition)"
    pattern: ClassVar[str] = "vote<N>(S) | bon<N>(S)"
    summary: ClassVar[str] = "N parallel chains of strategy S, e.g. vote4(refine2)"
    count_field: ClassVar[str] = "outer"

    @property
    def chains(self) -> int:
        """Chains per query, N."""
        return self.outer.n

    @property
    def samples_per_query(self) -> int:  # noqa: D102
        return self.chains * self.inner.samples_per_query

    @property
    def draws_per_query(self) -> int:  # noqa: D102
        return self.chains * self.inner.draws_per_query

    @property
    def spec(self) -> str:  # noqa: D102
        return f"{self.outer.spec}({self.inner.spec})"

    def with_count(self, n: int) -> Strategy:  # noqa: D102
        return dataclasses.replace(self, outer=self.outer.with_count(n))

    def exact_for(self, lengths) -> bool:  # noqa: D102
        if not self.inner.exact_for(lengths):
            return False
        return not (
            isinstance(self.outer, BestOfN) and _is_random(lengths) and isinstance(self.inner, Beam)
        )

    def length_quantum(self) -> int:  # noqa: D102
        return self.inner.length_quantum()

    def _inner_lengths(self, lengths, n_queries: int):
        """Lengths as the inner strategy sees them (a full list for per-query lists)."""
        if isinstance(lengths, LengthList):
            per_chain = self.inner.draws_per_query
            if len(lengths.values) in (1, per_chain):
                return lengths
            v = _expand(lengths, n_queries, self.draws_per_query, "--output-tokens")
            return LengthList(tuple(int(x) for x in v))
        return lengths

    def max_context_tokens(self, prompt_tokens, max_output_tokens):  # noqa: D102
        return self.inner.max_context_tokens(prompt_tokens, max_output_tokens)

    def kv_footprint(self, prompt_tokens, max_output_tokens, prefix_cache):  # noqa: D102
        kv, seqs = self.inner.kv_footprint(prompt_tokens, max_output_tokens, prefix_cache)
        shared = (self.chains - 1) * prompt_tokens if prefix_cache else 0.0
        return self.chains * kv - shared, self.chains * seqs

    def extra_memory_bytes(self, coefficients, prompt_tokens, max_output_tokens, n_queries):  # noqa: D102
        return self.inner.extra_memory_bytes(
            coefficients, prompt_tokens, max_output_tokens, n_queries * self.chains
        )

    def token_counts(self, lengths, n_queries):  # noqa: D102
        out, useful = self.inner.token_counts(
            self._inner_lengths(lengths, n_queries), n_queries * self.chains
        )
        return self.chains * out, useful

    def phases(self, w: Workload) -> list[PhaseCost]:  # noqa: D102
        lengths = self._inner_lengths(w.lengths, w.concurrency)
        inner_w = dataclasses.replace(
            w, lengths=lengths, concurrency=w.concurrency * self.chains, group=self.chains
        )
        phases = self.inner.phases(inner_w)
        if isinstance(self.outer, BestOfN):
            answers = self.inner.final_lengths(lengths, inner_w.concurrency)
            rm = w.reward(self.outer.reward_model)
            phases.append(score_phase(rm, w.prompt_tokens, answers, w.concurrency, self.chains))
        return phases


def _spec_string(s: Strategy) -> str:
    """``name[count][:key=value,...]`` with the options that differ from their defaults."""
    head = s.name
    if s.count_field:
        head += str(getattr(s, s.count_field))
    parts = []
    for key, opt in s.options.items():
        if opt.field == s.count_field:
            continue
        value = getattr(s, opt.field)
        default = next(f.default for f in dataclasses.fields(s) if f.name == opt.field)
        if value != default and value is not None:
            parts.append(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}")
    return head + (":" + ",".join(parts) if parts else "")


_HEAD = re.compile(r"^([a-zA-Z][a-zA-Z\-]*?)(\d+)?$")


def strategy_names() -> list[str]:
    """Patterns of every registered strategy, e.g. ``['single | cot', 'vote<N>', ...]``."""
    return [cls.pattern for cls in _REGISTRY.values()]


def registry() -> dict[str, type[Strategy]]:
    """The registry (name -> class), for listing."""
    return dict(_REGISTRY)


def _parse_options(cls: type[Strategy], text: str, spec: str) -> dict[str, object]:
    kwargs: dict[str, object] = {}
    for part in text.split(","):
        key, eq, value = part.partition("=")
        key, value = key.strip().lower(), value.strip()
        if not eq or not key:
            raise TtcsimError(f"{spec!r}: expected key=value, got {part!r}", _WHERE)
        if key not in cls.options:
            valid = ", ".join(cls.options) or "none"
            raise TtcsimError(f"unknown option {key!r} for {cls.name}; valid: {valid}", _WHERE)
        opt = cls.options[key]
        if opt.field in kwargs:
            raise TtcsimError(f"{spec!r}: {key} given twice", _WHERE)
        try:
            kwargs[opt.field] = opt.convert(value)
        except ValueError as exc:
            raise TtcsimError(f"{cls.name} {key}={value!r}: {exc}", _WHERE) from None
    return kwargs


def _split_composition(text: str) -> tuple[str, str | None]:
    """``outer(inner)`` -> ``(outer, inner)``; no parentheses -> ``(text, None)``."""
    if "(" not in text and ")" not in text:
        return text, None
    i = text.find("(")
    if i <= 0 or not text.endswith(")") or text.count("(") != text.count(")"):
        raise TtcsimError(
            f"cannot parse {text!r}; compose as OUTER(INNER), e.g. vote4(refine2)", _WHERE
        )
    return text[:i].strip(), text[i + 1 : -1].strip()


def parse_strategy(spec: str | Strategy, reward_model: str | None = None) -> Strategy:
    """Parse a strategy spec (see the module docstring) into a strategy object.

    ``reward_model`` is the default reward/verifier model of ``bon``,
    ``prm-bon`` and ``beam`` when the spec gives no ``rm=``.
    """
    if isinstance(spec, Strategy):
        return spec
    text = str(spec).strip()
    outer_text, inner_text = _split_composition(text)
    if inner_text is not None:
        outer = parse_strategy(outer_text, reward_model)
        if not isinstance(outer, (Vote, BestOfN)):
            raise TtcsimError(
                f"only vote<N>(...) and bon<N>(...) can wrap a strategy, not {outer.spec}", _WHERE
            )
        inner = parse_strategy(inner_text, reward_model)
        if not inner.composable:
            valid = ", ".join(c.name for c in _REGISTRY.values() if c.composable)
            raise TtcsimError(
                f"{inner.spec} cannot run inside {outer.spec}; inner strategies: {valid}", _WHERE
            )
        if isinstance(inner, Single):
            return outer
        return Composite(outer=outer, inner=inner)
    head, _, options = outer_text.partition(":")
    m = _HEAD.match(head.strip())
    name = _ALIASES.get(m.group(1).lower(), m.group(1).lower()) if m else None
    if not m or name not in _REGISTRY or _REGISTRY[name] is Composite:
        raise UnknownNameError("strategy", str(spec), strategy_names(), _WHERE)
    cls = _REGISTRY[name]
    count = m.group(2)
    kwargs = _parse_options(cls, options, text) if options.strip() else {}
    if cls is Single:
        if count:
            raise TtcsimError(f"{name} takes no count", _WHERE)
        return Single()
    if count is not None:
        if cls.count_field is None:
            raise TtcsimError(f"{name} takes no count; options: {', '.join(cls.options)}", _WHERE)
        if cls.count_field in kwargs:
            raise TtcsimError(f"{text!r}: the {cls.count_label} is given twice", _WHERE)
        kwargs[cls.count_field] = int(count)
    if cls.count_required and cls.count_field not in kwargs:
        raise TtcsimError(f"{name} needs a {cls.count_label}, e.g. {name}5", _WHERE)
    if cls in (Vote, BestOfN):
        n = int(kwargs["n"])
        if not 1 <= n <= MAX_SAMPLES:
            raise TtcsimError(f"sample count must be 1..{MAX_SAMPLES}, got {n}", _WHERE)
    if "reward_model" in {f.name for f in dataclasses.fields(cls)}:
        kwargs.setdefault("reward_model", reward_model)
    if cls is Speculative and "draft" in kwargs:
        from ttcsim.models import get_model

        try:
            get_model(str(kwargs["draft"]))
        except TtcsimError as exc:
            raise TtcsimError(f"draft model: {exc}", _WHERE) from None
    return cls(**kwargs)
