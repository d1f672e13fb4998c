"""``predict``: joules, seconds and watts of one query under a strategy.

Orchestration only: resolve names, check memory, run the strategy's phases
(:mod:`ttcsim.simulator.phases`) and summarise per query.  A batch of ``Q``
concurrent queries is simulated together; per-query energy is the batch's
energy divided by ``Q``.

Random workloads.  Output lengths drawn from a distribution are priced by the
strategy's exact expectation where it has one (:meth:`Strategy.exact_for`),
else by the mean of ``draws`` seeded Monte-Carlo draws with its standard error
(``energy_j_stderr``).  A prompt-length distribution is integrated over
:func:`~ttcsim.distributions.quadrature_nodes` (exact for up to 64 distinct
lengths, equal-probability strata beyond); the ``Q`` queries of a batch share
one prompt length.  Percentiles (p50/p90/p99) always come from the draws.
Energy-per-token metrics are defined in :mod:`ttcsim.metrics`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ttcsim import metrics as m
from ttcsim.deployment import check_deployment, tensor_parallel_problem
from ttcsim.distributions import (
    Fixed,
    LengthDistribution,
    LengthList,
    as_distribution,
    parse_lengths,
    quadrature_nodes,
    shift_lengths,
)
from ttcsim.engines import EngineProfile, get_engine
from ttcsim.engines import physics as engine_physics
from ttcsim.errors import DoesNotFitError, TtcsimError
from ttcsim.hardware import HardwareProfile, get_profile
from ttcsim.models import ModelSpec, get_model
from ttcsim.simulator.coefficients import (
    ACTIVATION_BYTES,
    PassCoefficients,
    context_read_tokens,
    kv_cache_tokens,
    pass_coefficients,
)
from ttcsim.simulator.phases import Draws, PhaseCost, _expand
from ttcsim.strategies import Strategy, Workload, parse_strategy
from ttcsim.units import DTYPE_BYTES, JOULES_PER_KWH

#: Monte-Carlo draws for percentiles of random lengths.
DEFAULT_DRAWS = 2000
#: Largest tensor-parallel degree suggested when a model does not fit.
MAX_TP = 64
#: Monte-Carlo draws reused (with common random numbers) for marginal costs.
MARGINAL_DRAWS = 500


class Prediction(BaseModel):
    """Per-query result of :func:`predict`.  SI units; energies summed over all GPUs.

    ``latency_s`` is one query's expected latency; ``batch_latency_s`` the time until
    the whole batch of ``concurrency`` queries is done (they differ when lengths vary).
    """

    model_config = ConfigDict(frozen=True)

    hw: str
    model: str
    strategy: str
    prompt_tokens: int
    output_tokens_spec: str
    concurrency: int
    tp: int
    gpus: int
    weight_dtype: str
    kv_dtype: str
    prefix_cache: bool
    calibrated_profile: bool
    engine: str = "reference"

    energy_j: float
    energy_prefill_j: float
    energy_decode_j: float
    energy_score_j: float
    energy_dynamic_j: float
    latency_s: float
    batch_latency_s: float
    prefill_latency_s: float
    decode_latency_s: float
    score_latency_s: float
    ttft_s: float
    output_tokens: float
    j_per_output_token: float
    avg_power_w: float
    peak_power_w: float
    power_limited: bool
    #: phases in which the model's power limit lowered the clock (prefill, decode, ...)
    power_limited_phases: list[str] = Field(default_factory=list)

    energy_j_p50: float | None = None
    energy_j_p90: float | None = None
    energy_j_p99: float | None = None
    latency_s_p50: float | None = None
    latency_s_p90: float | None = None
    percentile_draws: int | None = None

    pue: float = 1.0
    energy_facility_j: float
    co2_g: float | None = None
    usd: float | None = None

    # random workloads: how the mean was computed (see ttcsim.metrics)
    expectation: str = "exact"  #: "exact" or "monte-carlo"
    energy_j_stderr: float = 0.0  #: standard error of energy_j (0 when exact)
    prompt_tokens_spec: str = ""
    prompt_tokens_mean: float | None = None

    # energy-per-token metrics (see ttcsim.metrics for the definitions)
    useful_tokens: float | None = None
    energy_by_phase_j: dict[str, float] = Field(default_factory=dict)
    tokens_by_phase: dict[str, float] = Field(default_factory=dict)
    j_per_token_by_phase: dict[str, float] = Field(default_factory=dict)
    j_per_prompt_token: float | None = None
    j_per_prompt_token_marginal: float | None = None
    j_per_output_token_marginal: float | None = None
    j_per_useful_token: float | None = None
    output_tokens_per_j: float | None = None
    useful_tokens_per_j: float | None = None

    # uncertainty (ttcsim.uncertainty) and the power-limit what-if
    profile_status: str = "datasheet-default"
    energy_j_low: float = 0.0
    energy_j_high: float = 0.0
    latency_s_low: float = 0.0
    latency_s_high: float = 0.0
    band_energy_ape: float = 0.0  #: relative error the energy band allows (vs measured)
    band_latency_ape: float = 0.0
    band_method: str = ""
    power_limit_w: float = 0.0  #: board power limit priced [W] (a what-if cap, or the datasheet's)

    def as_dict(self) -> dict:
        """Plain dict (JSON-ready)."""
        return self.model_dump()


def _check_positive_int(value, name: str, lo: int = 1, hi: int = 10_000_000) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TtcsimError(f"must be a whole number, got {value!r}", name)
    if not lo <= int(value) <= hi:
        raise TtcsimError(f"must be between {lo} and {hi}, got {value}", name)
    return int(value)


def _is_number(value) -> bool:
    """A real number (bool excluded)."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def memory_needed_bytes(
    profile: HardwareProfile,
    spec: ModelSpec,
    c: PassCoefficients,
    prompt_tokens: int,
    max_output_tokens: float,
    n_queries: int,
    samples: int,
    prefix_cache: bool,
) -> float:
    """Per-GPU memory: weights + KV cache at the longest context + workspace [B].

    KV: prompt once per query with prefix caching (else once per sample) plus
    every sample's own output.  Workspace: prefill activations
    ``Q*P*(4H + 3I/tp)`` and fp32 logits for every sequence.
    """
    prompts = n_queries * (1 if prefix_cache else samples)
    kv_tokens = prompts * prompt_tokens + n_queries * samples * max_output_tokens
    workspace = (
        n_queries
        * prompt_tokens
        * (4 * spec.hidden_size + 3 * spec.intermediate_size / c.n_gpus)
        * ACTIVATION_BYTES
        + n_queries * samples * spec.vocab_size * 4.0
    )
    kv_tokens = kv_cache_tokens(c, kv_tokens, n_queries * samples)
    return c.weight_bytes_total + kv_tokens * c.kv_bytes_per_token + workspace


#: Standard deviations above the expected running batch used to size the KV cache.
KV_SIZING_SIGMAS = 3.0


def kv_sizing_length(lengths, n_sequences: int) -> float:
    """Output length per sequence to size the KV cache with [tokens].

    Known lengths: the longest.  Random lengths: finished sequences free their
    cache, so the output KV held at step ``s`` is ``B(s) * s`` with
    ``B(s) ~ Binomial(n, S(s))``; the cache is sized for the step where
    ``(E[B] + 3 sd[B]) * s`` peaks, divided by ``n`` (a 99.9 % band, rather than
    every sequence at the distribution's maximum).
    """
    if isinstance(lengths, LengthList):
        return float(max(lengths.values))
    if getattr(lengths, "is_fixed", False):
        return float(lengths.tokens)
    steps = np.arange(1, max(lengths.upper_bound(), 1) + 1, dtype=float)
    surv = lengths.survival(steps - 1.0)  # P(L > s - 1): still holding KV at step s
    n = float(n_sequences)
    band = n * surv + KV_SIZING_SIGMAS * np.sqrt(n * surv * (1.0 - surv))
    return float(min(np.max(np.minimum(band, n) * steps) / n, lengths.upper_bound()))


def strategy_memory_bytes(
    strategy: Strategy,
    spec: ModelSpec,
    c: PassCoefficients,
    prompt_tokens: float,
    max_output_tokens: float,
    n_queries: int,
    prefix_cache: bool,
    coefficients=None,
) -> float:
    """Per-GPU memory of a strategy: as :func:`memory_needed_bytes`, with the strategy's KV.

    The KV tokens and sequences per query come from
    :meth:`~ttcsim.strategies.Strategy.kv_footprint` (a beam search holds its
    tree, not W*M full copies); extra models (a speculative draft) from
    :meth:`~ttcsim.strategies.Strategy.extra_memory_bytes`.
    """
    kv, sequences = strategy.kv_footprint(prompt_tokens, max_output_tokens, prefix_cache)
    workspace = (
        n_queries
        * prompt_tokens
        * (4 * spec.hidden_size + 3 * spec.intermediate_size / c.n_gpus)
        * ACTIVATION_BYTES
        + n_queries * sequences * spec.vocab_size * 4.0
    )
    extra = 0.0
    if coefficients is not None:
        extra = strategy.extra_memory_bytes(
            coefficients, prompt_tokens, max_output_tokens, n_queries
        )
    kv_tokens = kv_cache_tokens(c, n_queries * kv, n_queries * sequences)
    return c.weight_bytes_total + kv_tokens * c.kv_bytes_per_token + workspace + extra


_COEFF_CACHE: dict = {}


def _coefficients(profile, spec, weight_dtype, kv_dtype, tp, engine=None) -> PassCoefficients:
    """Memoised :func:`pass_coefficients` (frozen profiles, specs and engines; keyed by id)."""
    key = (id(profile), id(spec), weight_dtype, kv_dtype, tp, id(engine))
    hit = _COEFF_CACHE.get(key)
    if hit is not None and hit[0] is profile and hit[1] is spec and hit[3] is engine:
        return hit[2]
    if len(_COEFF_CACHE) > 512:
        _COEFF_CACHE.clear()
    c = pass_coefficients(profile, spec, weight_dtype, kv_dtype, tp, engine)
    _COEFF_CACHE[key] = (profile, spec, c, engine)
    return c


@dataclass
class _Totals:
    """Per-query totals of one evaluation: floats, or arrays over Monte-Carlo draws."""

    energy: object
    latency: object
    makespan: object
    dynamic: object
    ttft: object
    peak: float
    throttled: tuple  #: names of the phases the power limit slowed (in order)
    energy_by: dict = field(default_factory=dict)  # bucket -> J per query
    time_by: dict = field(default_factory=dict)  # bucket -> batch seconds
    tokens_by: dict = field(default_factory=dict)  # bucket -> processed tokens per query

    def scaled(self, w: float) -> _Totals:
        """Every additive field times ``w`` (peak and throttled kept)."""
        return _Totals(
            self.energy * w,
            self.latency * w,
            self.makespan * w,
            self.dynamic * w,
            self.ttft * w,
            self.peak,
            self.throttled,
            {k: v * w for k, v in self.energy_by.items()},
            {k: v * w for k, v in self.time_by.items()},
            {k: v * w for k, v in self.tokens_by.items()},
        )

    def plus(self, o: _Totals) -> _Totals:
        """Sum of the additive fields (max of peaks, any throttle)."""

        def add(a: dict, b: dict) -> dict:
            return {k: a.get(k, 0.0) + b.get(k, 0.0) for k in {**a, **b}}

        return _Totals(
            self.energy + o.energy,
            self.latency + o.latency,
            self.makespan + o.makespan,
            self.dynamic + o.dynamic,
            self.ttft + o.ttft,
            max(self.peak, o.peak),
            self.throttled + tuple(n for n in o.throttled if n not in self.throttled),
            add(self.energy_by, o.energy_by),
            add(self.time_by, o.time_by),
            add(self.tokens_by, o.tokens_by),
        )

    def mean(self) -> _Totals:
        """Means over draws of array fields."""

        def f(v):
            return float(np.mean(v))

        return _Totals(
            f(self.energy),
            f(self.latency),
            f(self.makespan),
            f(self.dynamic),
            f(self.ttft),
            self.peak,
            self.throttled,
            {k: f(v) for k, v in self.energy_by.items()},
            {k: f(v) for k, v in self.time_by.items()},
            {k: f(v) for k, v in self.tokens_by.items()},
        )


def _summaries(phases: list[PhaseCost], q: int):
    energy = sum(p.energy_j for p in phases) / q
    latency = sum(p.query_time_s for p in phases)
    return energy, latency


def _totals(phases: list[PhaseCost], q: int, c: PassCoefficients) -> _Totals:
    """Per-query totals of a batch's phases (the order of operations of the original predict)."""
    energy, latency = _summaries(phases, q)
    by_name = {"prefill": 0.0, "decode": 0.0, "score": 0.0}
    time_by_name = dict(by_name)
    energy_by = {}
    time_by = {}
    tokens_by = {}
    for p in phases:
        key = p.name if p.name in by_name else "decode"
        by_name[key] += p.energy_j / q
        time_by_name[key] += p.time_s
        bucket = m.phase_bucket(p.name)
        energy_by[bucket] = energy_by.get(bucket, 0.0) + p.energy_j / q
        time_by[bucket] = time_by.get(bucket, 0.0) + p.time_s
        tokens_by[bucket] = tokens_by.get(bucket, 0.0) + p.processed_tokens / q
    dynamic = sum(p.dynamic_energy_j for p in phases) / q
    # energy above idle: active static power counts as caused by the query
    dynamic += (c.static_power_w - c.idle_power_w) * c.n_gpus * sum(p.time_s for p in phases) / (q)
    # legacy three buckets (draft counts as decode) and the full breakdown
    energy_by = {"legacy": by_name, **energy_by}
    time_by = {"legacy": time_by_name, **time_by}
    return _Totals(
        energy=energy,
        latency=latency,
        makespan=sum(p.time_s for p in phases),
        dynamic=dynamic,
        ttft=phases[0].query_time_s,
        peak=float(max(p.peak_power_w for p in phases)),
        throttled=tuple(dict.fromkeys(p.name for p in phases if p.throttled)),
        energy_by=energy_by,
        time_by=time_by,
        tokens_by=tokens_by,
    )


def _flatten(t: _Totals) -> _Totals:
    """Move the legacy buckets to ``_prefill/_decode/_score`` keys so totals add up."""
    e = dict(t.energy_by)
    tb = dict(t.time_by)
    for k, v in e.pop("legacy").items():
        e[f"_{k}"] = v
    for k, v in tb.pop("legacy").items():
        tb[f"_{k}"] = v
    return dataclasses.replace(t, energy_by=e, time_by=tb)


@dataclass(frozen=True)
class _Setup:
    """Everything predict needs after validation: names resolved, checks done."""

    profile: HardwareProfile
    spec: ModelSpec
    strategy: Strategy
    c: PassCoefficients
    lengths: object
    prompt: LengthDistribution
    nodes: np.ndarray
    weights: np.ndarray
    concurrency: int
    prefix_cache: bool
    reward: object
    weight_dtype: str
    kv_dtype: str
    tp: int
    engine: EngineProfile | None = None

    @property
    def random_lengths(self) -> bool:
        return isinstance(self.lengths, LengthDistribution) and not self.lengths.is_fixed

    @property
    def exact(self) -> bool:
        return not self.random_lengths or self.strategy.exact_for(self.lengths)

    @property
    def random_cost(self) -> bool:
        """Whether the per-query cost varies between draws."""
        return self.random_lengths or self.strategy.stochastic or self.nodes.size > 1

    def run(self, prompt_tokens, lens) -> list[PhaseCost]:
        w = Workload(
            self.c, prompt_tokens, lens, self.concurrency, self.prefix_cache, self.reward
        )
        return self.strategy.phases(w)

    def _node_prompt(self, i: int, shift: int = 0):
        """Prompt length of node i: an int for a fixed prompt (identical arithmetic)."""
        if self.nodes.size == 1 and isinstance(self.prompt, Fixed):
            return self.prompt.tokens + shift
        return float(self.nodes[i]) + shift

    def exact_totals(self, lens, prompt_shift: int = 0) -> _Totals:
        """Expected totals: weighted over prompt nodes, exact in the lengths."""
        out = None
        for i, wgt in enumerate(self.weights):
            t = _flatten(_totals(self.run(self._node_prompt(i, prompt_shift), lens),
                                 self.concurrency, self.c))
            t = t if self.weights.size == 1 else t.scaled(float(wgt))
            out = t if out is None else out.plus(t)
        return out

    def draws(self, n_draws: int, seed: int):
        """Seeded draws: ``(values, uniforms, node_of_draw)``."""
        rng = np.random.default_rng(seed)
        per_query = self.strategy.draws_per_query
        shape = (n_draws, self.concurrency * per_query)
        if isinstance(self.lengths, LengthList):
            row = _expand(self.lengths, self.concurrency, per_query, "--output-tokens")
            values = np.broadcast_to(row, shape).copy()
        else:
            values = self.lengths.sample(rng, shape)
        uniforms = rng.uniform(size=shape) if self.strategy.stochastic else None
        if self.nodes.size > 1:
            node = rng.choice(self.nodes.size, size=n_draws, p=self.weights)
        else:
            node = np.zeros(n_draws, dtype=int)
        return values, uniforms, node

    def draw_totals(self, values, uniforms, node, length_shift: int = 0, prompt_shift: int = 0):
        """Per-draw totals (arrays over draws), grouped by prompt node."""
        n = values.shape[0]
        energy, latency = np.zeros(n), np.zeros(n)
        combined = None
        for i in np.unique(node):
            idx = np.flatnonzero(node == i)
            d = Draws(
                values[idx] + length_shift, None if uniforms is None else uniforms[idx]
            )
            t = _flatten(_totals(self.run(self._node_prompt(i, prompt_shift), d),
                                 self.concurrency, self.c))
            energy[idx] = np.broadcast_to(t.energy, idx.shape)
            latency[idx] = np.broadcast_to(t.latency, idx.shape)
            share = t.mean().scaled(idx.size / n)
            combined = share if combined is None else combined.plus(share)
        return energy, latency, combined


def _prepare(
    hw, model, strategy, prompt_tokens, output_tokens, concurrency, tp, weight_dtype, kv_dtype,
    prefix_cache, reward_model, engine=None,
) -> _Setup:
    eng = get_engine(engine)
    eng = None if eng.is_reference else eng
    prefix_cache = engine_physics.shares_prefix(eng, prefix_cache)
    profile = get_profile(hw)
    spec = get_model(model)
    strat = parse_strategy(strategy, reward_model=reward_model)
    prompt = as_distribution(parse_lengths(prompt_tokens, "--prompt-tokens"))
    concurrency = _check_positive_int(concurrency, "--concurrency", hi=1_000_000)
    tp = _check_positive_int(tp, "--tp", hi=MAX_TP)
    for name, dt in (("--dtype", weight_dtype), ("--kv-dtype", kv_dtype)):
        if (dt is not None or name == "--dtype") and dt not in DTYPE_BYTES:
            raise TtcsimError(f"unknown dtype {dt!r}; valid: {', '.join(DTYPE_BYTES)}", name)
    if weight_dtype == "fp32":
        raise TtcsimError("fp32 weights are not an inference dtype here", "--dtype")
    kv_dtype = kv_dtype or ("fp8" if weight_dtype == "fp8" else "bf16")
    check_deployment(profile, spec, weight_dtype, tp)
    lengths = parse_lengths(output_tokens, "--output-tokens")
    if isinstance(lengths, LengthList):
        _expand(lengths, concurrency, strat.draws_per_query, "--output-tokens")

    c = _coefficients(profile, spec, weight_dtype, kv_dtype, tp, eng)
    nodes, weights = quadrature_nodes(prompt)
    p_max = int(prompt.tokens) if isinstance(prompt, Fixed) else float(nodes.max())
    max_len = max(lengths.values) if isinstance(lengths, LengthList) else lengths.upper_bound()
    kv_len = kv_sizing_length(lengths, concurrency * strat.samples_per_query)
    mem_queries = concurrency
    if eng is not None:
        kv_len = _engine_kv_length(eng, lengths, kv_len, concurrency * strat.draws_per_query)
        if eng.batching.policy == "continuous":
            c, mem_queries = _continuous_batch(c, spec, eng, p_max, kv_len, concurrency,
                                               strat.samples_per_query)
    total_ctx = strat.max_context_tokens(p_max, max_len)
    if total_ctx > spec.max_context_tokens:
        raise TtcsimError(
            f"prompt + output = {total_ctx:.0f} tokens exceeds {spec.name}'s context of "
            f"{spec.max_context_tokens}",
            "--prompt-tokens" if p_max >= spec.max_context_tokens else "--output-tokens",
        )

    reward_cache: dict = {}

    def coefficients_for(tp_k: int):
        def reward(name: str | None) -> PassCoefficients:
            if name is None:
                return _coefficients(profile, spec, weight_dtype, kv_dtype, tp_k, eng)
            key = (name, tp_k)
            if key not in reward_cache:
                try:
                    rm_spec = get_model(name)
                except TtcsimError as exc:  # name the option or spec it came from
                    where = "--reward-model" if name == reward_model else "--strategy"
                    text = str(exc).removeprefix("--model: ")
                    raise TtcsimError(f"reward model: {text}", where) from None
                problem = tensor_parallel_problem(rm_spec, tp_k)
                if problem:
                    where = "--reward-model" if name == reward_model else "--strategy"
                    raise TtcsimError(f"reward model: {problem} (--tp {tp_k})", where)
                reward_cache[key] = _coefficients(
                    profile, rm_spec, weight_dtype, kv_dtype, tp_k, eng
                )
            return reward_cache[key]

        return reward

    custom = type(strat).kv_footprint is not Strategy.kv_footprint or (
        type(strat).extra_memory_bytes is not Strategy.extra_memory_bytes
    )

    def need_for(tp_k: int) -> float:
        ck = _coefficients(profile, spec, weight_dtype, kv_dtype, tp_k, eng)
        if not custom:
            return memory_needed_bytes(
                profile, spec, ck, p_max, kv_len, mem_queries, strat.samples_per_query,
                prefix_cache,
            )
        return strategy_memory_bytes(
            strat, spec, ck, p_max, kv_len, mem_queries, prefix_cache, coefficients_for(tp_k)
        )

    need = need_for(tp)
    if need > c.memory_capacity_bytes:
        suggestion = next(
            (
                k
                for k in (2, 4, 8, 16, 32, 64)
                if k > tp
                and tensor_parallel_problem(spec, k) is None
                and need_for(k)
                <= _coefficients(
                    profile, spec, weight_dtype, kv_dtype, k, eng
                ).memory_capacity_bytes
            ),
            None,
        )
        hint = f"; try --tp {suggestion}" if suggestion else "; reduce concurrency or lengths"
        raise DoesNotFitError(
            f"{spec.name} ({weight_dtype}) with this batch needs {need / 1e9:.1f} GB per GPU, "
            f"{profile.name} has {c.memory_capacity_bytes / 1e9:.1f} GB usable{hint}",
            "--model",
        )
    return _Setup(
        profile=profile,
        spec=spec,
        strategy=strat,
        c=c,
        lengths=lengths,
        prompt=prompt,
        nodes=nodes,
        weights=weights,
        concurrency=concurrency,
        prefix_cache=prefix_cache,
        reward=coefficients_for(tp),
        weight_dtype=weight_dtype,
        kv_dtype=kv_dtype,
        tp=tp,
        engine=eng,
    )


def _engine_kv_length(eng: EngineProfile, lengths, kv_len: float, n_sequences: int) -> float:
    """Output tokens per sequence the engine's KV cache is sized for.

    Known lengths: ``static`` the longest, ``paged`` the peak in use
    (:func:`~ttcsim.engines.physics.kv_sizing_tokens`).  Random lengths keep the
    band of :func:`kv_sizing_length`, except a static padded batch, whose rows
    all grow to the batch's longest: the expected maximum of ``n`` draws.
    """
    padded = eng.batching.policy == "static-padded"
    if isinstance(lengths, LengthList):
        values = _expand(lengths, 1, len(lengths.values), "--output-tokens")
        alloc = "static" if padded else eng.kv_cache.allocation
        return engine_physics.kv_sizing_tokens(values, alloc)
    if padded and not getattr(lengths, "is_fixed", False):
        return float(lengths.quantile(n_sequences / (n_sequences + 1.0)))
    return kv_len


def _continuous_batch(c: PassCoefficients, spec: ModelSpec, eng: EngineProfile, p_max: float,
                      kv_len: float, concurrency: int, samples: int):
    """Running batch of a continuous engine: ``min(max_num_seqs, KV-feasible)``.

    The paged pool is the usable memory less weights and workspace; each
    running sequence holds ``P + L_kv`` tokens in blocks.  Returns the
    coefficients with ``max_num_seqs`` set to that batch and the number of
    queries the memory check must hold at once.  Raises
    :class:`~ttcsim.errors.DoesNotFitError` when not one sequence fits.
    """
    slots = min(eng.batching.max_num_seqs or 1, concurrency * samples)
    workspace = slots * spec.vocab_size * 4.0 + slots * p_max * (
        4 * spec.hidden_size + 3 * spec.intermediate_size / c.n_gpus
    ) * ACTIVATION_BYTES  # logits and prefill activations, as memory_needed_bytes
    free = c.memory_capacity_bytes - c.weight_bytes_total - workspace
    kept = float(context_read_tokens(c, p_max + kv_len))  # a sliding layer keeps its window
    fit = engine_physics.kv_feasible_batch(free, c.kv_bytes_per_token, kept,
                                           eng.kv_cache.block_tokens)
    if fit < 1:
        raise DoesNotFitError(
            f"{spec.name}: one sequence of {p_max + kv_len:.0f} tokens does not fit the KV "
            f"cache left after the weights ({max(free, 0) / 1e9:.1f} GB per GPU)", "--model")
    batch = int(min(slots, fit))
    return dataclasses.replace(c, max_num_seqs=batch), max(1, min(concurrency, batch // samples))


def predict(
    hw: str | HardwareProfile = "h100",
    model: str | ModelSpec = "8b",
    strategy: str | Strategy = "single",
    prompt_tokens: int | str = 512,
    output_tokens="1024",
    concurrency: int = 1,
    tp: int = 1,
    weight_dtype: str = "bf16",
    kv_dtype: str | None = None,
    prefix_cache: bool = True,
    reward_model: str | None = None,
    pue: float = 1.0,
    carbon_g_per_kwh: float | None = None,
    usd_per_kwh: float | None = None,
    percentiles: bool = True,
    draws: int = DEFAULT_DRAWS,
    seed: int = 0,
    marginal: bool = True,
    power_limit_w: float | None = None,
    engine: str | EngineProfile | None = None,
) -> Prediction:
    """Predict the energy and latency of one query.

    Parameters
    ----------
    hw : profile name, alias (``h100``) or YAML path
    model : catalog name, alias (``8b``) or path to a Hugging Face ``config.json``
    strategy : a strategy spec (``single``, ``vote8``, ``beam4:step=64,depth=8``,
        ``vote4(refine2)``, ...; see :mod:`ttcsim.strategies`)
    prompt_tokens : prompt length [tokens]: an int, or a length spec (list of
        equally likely lengths, or a distribution) integrated over
    output_tokens : length spec per generated sequence (int, comma list, or
        distribution, see :mod:`ttcsim.distributions`)
    concurrency : identical independent queries batched together
    tp : tensor-parallel GPUs per replica
    weight_dtype, kv_dtype : storage dtypes (``bf16``, ``fp16``, ``fp8``, ``int4``);
        the KV cache defaults to bf16 (fp8 when weights are fp8)
    prefix_cache : parallel samples share the prompt's prefill and KV
    pue, carbon_g_per_kwh, usd_per_kwh : facility overhead, grid carbon, price
    percentiles, draws, seed : Monte-Carlo percentiles of random workloads
    marginal : also compute the marginal J per output / prompt token (two
        more evaluations)
    power_limit_w : what-if board power limit [W] per GPU, between the board's
        minimum and its datasheet limit (``None``: the datasheet limit); priced by
        the DVFS throttle of :mod:`ttcsim.simulator.power`
    engine : engine profile name (``reference``, ``hf-transformers``, ``vllm``),
        alias or YAML path; None is ``reference`` (see :mod:`ttcsim.engines`)

    Every result carries a band (``energy_j_low/high``, ``latency_s_low/high``)
    from the profile's status and measured spread (:mod:`ttcsim.uncertainty`).

    For random lengths ``energy_j`` and ``latency_s`` are exact expectations
    where the strategy has one, else Monte-Carlo means (``expectation``,
    ``energy_j_stderr``); ``*_p50/p90/p99`` come from ``draws`` seeded draws.
    """
    if not (_is_number(pue) and math.isfinite(pue) and 1.0 <= pue <= 5.0):
        raise TtcsimError(f"must be in [1, 5], got {pue!r}", "--pue")
    for name, v in (("--carbon-g-per-kwh", carbon_g_per_kwh), ("--usd-per-kwh", usd_per_kwh)):
        if v is not None and not (_is_number(v) and math.isfinite(v) and v >= 0):
            raise TtcsimError(f"must be a finite number >= 0, got {v}", name)
    draws = _check_positive_int(draws, "--draws", lo=2, hi=1_000_000)
    seed = _check_positive_int(seed, "--seed", lo=0, hi=2**63 - 1)
    hw = get_profile(hw).with_power_limit(power_limit_w)
    s = _prepare(
        hw, model, strategy, prompt_tokens, output_tokens, concurrency, tp, weight_dtype,
        kv_dtype, prefix_cache, reward_model, engine,
    )
    strat, c, q, lengths = s.strategy, s.c, s.concurrency, s.lengths

    extra: dict = {}
    stderr, expectation = 0.0, "exact"
    mc = None
    if not s.exact or (percentiles and s.random_cost):
        values, uniforms, node = s.draws(draws, seed)
        e_draw, l_draw, mc_totals = s.draw_totals(values, uniforms, node)
        mc = (values, uniforms, node, e_draw)
        if percentiles:
            extra = dict(
                energy_j_p50=float(np.percentile(e_draw, 50)),
                energy_j_p90=float(np.percentile(e_draw, 90)),
                energy_j_p99=float(np.percentile(e_draw, 99)),
                latency_s_p50=float(np.percentile(l_draw, 50)),
                latency_s_p90=float(np.percentile(l_draw, 90)),
                percentile_draws=draws,
            )
    if s.exact:
        totals = s.exact_totals(lengths)
    else:
        totals = mc_totals
        _, stderr = m.mean_and_stderr(mc[3])
        expectation = "monte-carlo"

    energy = totals.energy
    tokens, useful = strat.token_counts(lengths, q)
    prompt_mean = float(s.prompt.mean())
    by = totals.energy_by
    makespan = totals.makespan

    marg_out = marg_prompt = None
    if marginal:
        marg_out, marg_prompt = _marginals(s, energy, tokens, prompt_mean, mc)

    kwh = energy * pue / JOULES_PER_KWH
    buckets = [b for b in m.PHASES if b in by]
    tokens_by = {b: float(totals.tokens_by.get(b, 0.0)) for b in buckets}
    for b in ("decode", "draft"):
        if b in tokens_by:
            tokens_by[b] = float(tokens)
    return Prediction(
        hw=s.profile.name,
        model=s.spec.name,
        strategy=strat.spec,
        prompt_tokens=int(round(prompt_mean)),
        output_tokens_spec=str(lengths),
        concurrency=q,
        tp=s.tp,
        gpus=c.n_gpus,
        weight_dtype=s.weight_dtype,
        kv_dtype=s.kv_dtype,
        prefix_cache=s.prefix_cache,
        calibrated_profile=s.profile.calibrated,
        engine=s.engine.name if s.engine is not None else "reference",
        energy_j=float(energy),
        energy_prefill_j=float(by["_prefill"]),
        energy_decode_j=float(by["_decode"]),
        energy_score_j=float(by["_score"]),
        energy_dynamic_j=float(totals.dynamic),
        latency_s=float(totals.latency),
        batch_latency_s=float(makespan),
        prefill_latency_s=float(totals.time_by["_prefill"]),
        decode_latency_s=float(totals.time_by["_decode"]),
        score_latency_s=float(totals.time_by["_score"]),
        ttft_s=float(totals.ttft),
        output_tokens=float(tokens),
        j_per_output_token=float(energy / tokens),
        avg_power_w=float(energy * q / makespan) if makespan > 0 else 0.0,
        peak_power_w=float(totals.peak),
        power_limited=bool(totals.throttled),
        power_limited_phases=list(totals.throttled),
        pue=pue,
        energy_facility_j=float(energy * pue),
        co2_g=None if carbon_g_per_kwh is None else float(kwh * carbon_g_per_kwh),
        usd=None if usd_per_kwh is None else float(kwh * usd_per_kwh),
        expectation=expectation,
        energy_j_stderr=float(stderr),
        prompt_tokens_spec=str(s.prompt),
        prompt_tokens_mean=prompt_mean,
        useful_tokens=float(useful),
        energy_by_phase_j={b: float(by[b]) for b in buckets},
        tokens_by_phase=tokens_by,
        j_per_token_by_phase={
            b: v for b in buckets if (v := m.per_token(by[b], tokens_by[b])) is not None
        },
        j_per_prompt_token=m.per_token(by.get("prefill", 0.0), prompt_mean),
        j_per_prompt_token_marginal=marg_prompt,
        j_per_output_token_marginal=marg_out,
        j_per_useful_token=m.per_token(energy, useful),
        output_tokens_per_j=m.tokens_per_joule(tokens, energy),
        useful_tokens_per_j=m.tokens_per_joule(useful, energy),
        **band_fields(s.profile, float(energy), float(totals.latency)),
        **extra,
    )


def band_fields(profile: HardwareProfile, energy_j: float, latency_s: float) -> dict:
    """The band and power-limit fields of a :class:`Prediction` (see :mod:`ttcsim.uncertainty`)."""
    from ttcsim.uncertainty import interval, profile_band

    band = profile_band(profile)
    e_lo, e_hi = interval(energy_j, band.energy_ape)
    t_lo, t_hi = interval(latency_s, band.latency_ape)
    return dict(
        profile_status=profile.provenance.parameters.status,
        energy_j_low=float(e_lo),
        energy_j_high=float(e_hi),
        latency_s_low=float(t_lo),
        latency_s_high=float(t_hi),
        band_energy_ape=band.energy_ape,
        band_latency_ape=band.latency_ape,
        band_method=band.method,
        power_limit_w=profile.datasheet.power_limit_w,
    )


def _marginals(s: _Setup, energy: float, tokens: float, prompt_mean: float, mc):
    """Forward differences dE/dL_out and dE/dP (see :mod:`ttcsim.metrics`)."""
    strat = s.strategy
    mean_len = tokens / max(strat.samples_per_query, 1)
    d_len = max(strat.length_quantum(), int(round(mean_len / 100.0)), 1)
    d_prompt = max(1, int(round(prompt_mean / 100.0)))
    shifted = shift_lengths(s.lengths, d_len)
    extra_tokens = strat.token_counts(shifted, s.concurrency)[0] - tokens
    if s.exact:
        e_len = s.exact_totals(shifted).energy
        e_prompt = s.exact_totals(s.lengths, prompt_shift=d_prompt).energy
        base = energy
    else:  # common random numbers on a subset of the draws
        values, uniforms, node, e_draw = mc
        k = min(MARGINAL_DRAWS, values.shape[0])
        sub = (values[:k], None if uniforms is None else uniforms[:k], node[:k])
        base = float(np.mean(e_draw[:k]))
        e_len = float(np.mean(s.draw_totals(*sub, length_shift=d_len)[0]))
        e_prompt = float(np.mean(s.draw_totals(*sub, prompt_shift=d_prompt)[0]))
    return m.marginal(base, e_len, extra_tokens), m.marginal(base, e_prompt, d_prompt)


def predict_draws(
    hw: str | HardwareProfile = "h100",
    model: str | ModelSpec = "8b",
    strategy: str | Strategy = "single",
    prompt_tokens: int | str = 512,
    output_tokens="1024",
    concurrency: int = 1,
    tp: int = 1,
    weight_dtype: str = "bf16",
    kv_dtype: str | None = None,
    prefix_cache: bool = True,
    reward_model: str | None = None,
    draws: int = DEFAULT_DRAWS,
    seed: int = 0,
    power_limit_w: float | None = None,
    engine: str | EngineProfile | None = None,
) -> tuple[np.ndarray, np.ndarray, str]:
    """Per-query energy [J] and latency [s] of each seeded Monte-Carlo draw, and the spec.

    The same draws as :func:`predict`'s percentiles.  A deterministic workload
    returns one value (its exact cost).
    """
    draws = _check_positive_int(draws, "--draws", lo=2, hi=1_000_000)
    seed = _check_positive_int(seed, "--seed", lo=0, hi=2**63 - 1)
    hw = get_profile(hw).with_power_limit(power_limit_w)
    s = _prepare(
        hw, model, strategy, prompt_tokens, output_tokens, concurrency, tp, weight_dtype,
        kv_dtype, prefix_cache, reward_model, engine,
    )
    if not s.random_cost:
        t = s.exact_totals(s.lengths)
        return np.array([float(t.energy)]), np.array([float(t.latency)]), s.strategy.spec
    values, uniforms, node = s.draws(draws, seed)
    energy, latency, _ = s.draw_totals(values, uniforms, node)
    return energy, latency, s.strategy.spec
