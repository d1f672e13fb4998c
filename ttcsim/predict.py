"""``predict``: joules, seconds and watts of one query under a strategy.

Orchestration only: resolve names, check memory, run the strategy's phases
(:mod:`ttcsim.simulator.phases`) and summarise per query.  A batch of ``Q``
concurrent queries is simulated together; per-query energy is the batch's
energy divided by ``Q``.
"""

from __future__ import annotations

import math

import numpy as np
from pydantic import BaseModel, ConfigDict

from ttcsim.distributions import LengthDistribution, LengthList, parse_lengths
from ttcsim.errors import DoesNotFitError, TtcsimError
from ttcsim.hardware import HardwareProfile, get_profile
from ttcsim.models import ModelSpec, get_model
from ttcsim.simulator.coefficients import ACTIVATION_BYTES, PassCoefficients, pass_coefficients
from ttcsim.simulator.phases import Draws, PhaseCost
from ttcsim.strategies import Strategy, Workload, parse_strategy
from ttcsim.units import DTYPE_BYTES, JOULES_PER_KWH

#: Monte-Carlo draws for percentiles of random lengths.
DEFAULT_DRAWS = 2000
#: Largest tensor-parallel degree suggested when a model does not fit.
MAX_TP = 64


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

    def as_dict(self) -> dict:
        """Plain dict (JSON-ready)."""
        return self.model_dump()


def _check_positive_int(value, name: str, lo: int = 1, hi: int = 10_000_000) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TtcsimError(f"must be a whole number, got {value!r}", name)
    if not lo <= int(value) <= hi:
        raise TtcsimError(f"must be between {lo} and {hi}, got {value}", name)
    return int(value)


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
    return c.weight_bytes_total + kv_tokens * c.kv_bytes_per_token + workspace


_COEFF_CACHE: dict = {}


def _coefficients(profile, spec, weight_dtype, kv_dtype, tp) -> PassCoefficients:
    """Memoised :func:`pass_coefficients` (profiles and specs are frozen; keyed by identity)."""
    key = (id(profile), id(spec), weight_dtype, kv_dtype, tp)
    hit = _COEFF_CACHE.get(key)
    if hit is not None and hit[0] is profile and hit[1] is spec:
        return hit[2]
    if len(_COEFF_CACHE) > 512:
        _COEFF_CACHE.clear()
    c = pass_coefficients(profile, spec, weight_dtype, kv_dtype, tp)
    _COEFF_CACHE[key] = (profile, spec, c)
    return c


def _summaries(phases: list[PhaseCost], q: int):
    energy = sum(p.energy_j for p in phases) / q
    latency = sum(p.query_time_s for p in phases)
    return energy, latency


def predict(
    hw: str | HardwareProfile = "h100",
    model: str | ModelSpec = "8b",
    strategy: str | Strategy = "single",
    prompt_tokens: int = 512,
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
) -> Prediction:
    """Predict the energy and latency of one query.

    Parameters
    ----------
    hw : profile name, alias (``h100``) or YAML path
    model : catalog name, alias (``8b``) or path to a Hugging Face ``config.json``
    strategy : ``single``/``cot``, ``vote<N>``, ``bon<N>``, ...
    prompt_tokens : prompt length [tokens]
    output_tokens : length spec per generated sequence (int, comma list, or
        distribution, see :mod:`ttcsim.distributions`)
    concurrency : identical independent queries batched together
    tp : tensor-parallel GPUs per replica
    weight_dtype, kv_dtype : storage dtypes (``bf16``, ``fp16``, ``fp8``, ``int4``);
        the KV cache defaults to bf16 (fp8 when weights are fp8)
    prefix_cache : parallel samples share the prompt's prefill and KV
    pue, carbon_g_per_kwh, usd_per_kwh : facility overhead, grid carbon, price

    For random lengths ``energy_j`` and ``latency_s`` are exact expectations;
    ``*_p50/p90/p99`` come from ``draws`` seeded Monte-Carlo draws.
    """
    profile = get_profile(hw)
    spec = get_model(model)
    strat = parse_strategy(strategy, reward_model=reward_model)
    prompt_tokens = _check_positive_int(prompt_tokens, "--prompt-tokens")
    concurrency = _check_positive_int(concurrency, "--concurrency", hi=1_000_000)
    tp = _check_positive_int(tp, "--tp", hi=MAX_TP)
    for name, dt in (("--dtype", weight_dtype), ("--kv-dtype", kv_dtype)):
        if dt is not None and dt not in DTYPE_BYTES:
            raise TtcsimError(f"unknown dtype {dt!r}; valid: {', '.join(DTYPE_BYTES)}", name)
    if weight_dtype == "fp32":
        raise TtcsimError("fp32 weights are not an inference dtype here", "--dtype")
    kv_dtype = kv_dtype or ("fp8" if weight_dtype == "fp8" else "bf16")
    if not (math.isfinite(pue) and 1.0 <= pue <= 5.0):
        raise TtcsimError(f"must be in [1, 5], got {pue}", "--pue")
    for name, v in (("--carbon-g-per-kwh", carbon_g_per_kwh), ("--usd-per-kwh", usd_per_kwh)):
        if v is not None and not (math.isfinite(v) and v >= 0):
            raise TtcsimError(f"must be a finite number >= 0, got {v}", name)
    lengths = parse_lengths(output_tokens, "--output-tokens")
    samples = strat.samples_per_query

    c = _coefficients(profile, spec, weight_dtype, kv_dtype, tp)
    max_len = max(lengths.values) if isinstance(lengths, LengthList) else lengths.upper_bound()
    total_ctx = prompt_tokens + max_len
    if total_ctx > spec.max_context_tokens:
        raise TtcsimError(
            f"prompt + output = {total_ctx:.0f} tokens exceeds {spec.name}'s context of "
            f"{spec.max_context_tokens}",
            "--output-tokens",
        )
    need = memory_needed_bytes(
        profile, spec, c, prompt_tokens, max_len, concurrency, samples, prefix_cache
    )
    if need > c.memory_capacity_bytes:
        suggestion = next(
            (
                k
                for k in (2, 4, 8, 16, 32, 64)
                if k > tp
                and memory_needed_bytes(
                    profile,
                    spec,
                    _coefficients(profile, spec, weight_dtype, kv_dtype, k),
                    prompt_tokens,
                    max_len,
                    concurrency,
                    samples,
                    prefix_cache,
                )
                <= c.memory_capacity_bytes
            ),
            None,
        )
        hint = f"; try --tp {suggestion}" if suggestion else "; reduce concurrency or lengths"
        raise DoesNotFitError(
            f"{spec.name} ({weight_dtype}) with this batch needs {need / 1e9:.1f} GB per GPU, "
            f"{profile.name} has {c.memory_capacity_bytes / 1e9:.1f} GB usable{hint}",
            "--model",
        )

    reward_cache: dict = {}

    def reward(name: str | None) -> PassCoefficients:
        if name is None:
            return c
        if name not in reward_cache:
            reward_cache[name] = _coefficients(profile, get_model(name), weight_dtype, kv_dtype, tp)
        return reward_cache[name]

    def run(lens) -> list[PhaseCost]:
        w = Workload(c, prompt_tokens, lens, concurrency, prefix_cache, reward)
        return strat.phases(w)

    phases = run(lengths)
    energy, latency = _summaries(phases, concurrency)
    by_name = {"prefill": 0.0, "decode": 0.0, "score": 0.0}
    time_by_name = dict(by_name)
    for p in phases:
        key = p.name if p.name in by_name else "decode"
        by_name[key] += p.energy_j / concurrency
        time_by_name[key] += p.time_s
    dynamic = sum(p.dynamic_energy_j for p in phases) / concurrency
    # energy above idle: active static power counts as caused by the query
    dynamic += (
        (c.static_power_w - c.idle_power_w)
        * c.n_gpus
        * sum(p.time_s for p in phases)
        / (concurrency)
    )
    makespan = sum(p.time_s for p in phases)
    tokens = samples * (
        float(np.mean(_expand_list(lengths, concurrency, samples)))
        if isinstance(lengths, LengthList)
        else lengths.mean()
    )
    ttft = phases[0].query_time_s
    extra: dict = {}
    if isinstance(lengths, LengthDistribution) and not lengths.is_fixed and percentiles:
        rng = np.random.default_rng(seed)
        draw_values = lengths.sample(rng, (draws, concurrency * samples))
        mc = run(Draws(draw_values))
        e_draw = sum(np.broadcast_to(p.energy_j, (draws,)) for p in mc) / concurrency
        l_draw = sum(np.broadcast_to(p.query_time_s, (draws,)) for p in mc)
        extra = dict(
            energy_j_p50=float(np.percentile(e_draw, 50)),
            energy_j_p90=float(np.percentile(e_draw, 90)),
            energy_j_p99=float(np.percentile(e_draw, 99)),
            latency_s_p50=float(np.percentile(l_draw, 50)),
            latency_s_p90=float(np.percentile(l_draw, 90)),
            percentile_draws=draws,
        )
    kwh = energy * pue / JOULES_PER_KWH
    return Prediction(
        hw=profile.name,
        model=spec.name,
        strategy=strat.spec,
        prompt_tokens=prompt_tokens,
        output_tokens_spec=str(lengths),
        concurrency=concurrency,
        tp=tp,
        gpus=c.n_gpus,
        weight_dtype=weight_dtype,
        kv_dtype=kv_dtype,
        prefix_cache=prefix_cache,
        calibrated_profile=profile.calibrated,
        energy_j=float(energy),
        energy_prefill_j=float(by_name["prefill"]),
        energy_decode_j=float(by_name["decode"]),
        energy_score_j=float(by_name["score"]),
        energy_dynamic_j=float(dynamic),
        latency_s=float(latency),
        batch_latency_s=float(makespan),
        prefill_latency_s=float(time_by_name["prefill"]),
        decode_latency_s=float(time_by_name["decode"]),
        score_latency_s=float(time_by_name["score"]),
        ttft_s=float(ttft),
        output_tokens=float(tokens),
        j_per_output_token=float(energy / tokens),
        avg_power_w=float(energy * concurrency / makespan) if makespan > 0 else 0.0,
        peak_power_w=float(max(p.peak_power_w for p in phases)),
        power_limited=any(p.throttled for p in phases),
        pue=pue,
        energy_facility_j=float(energy * pue),
        co2_g=None if carbon_g_per_kwh is None else float(kwh * carbon_g_per_kwh),
        usd=None if usd_per_kwh is None else float(kwh * usd_per_kwh),
        **extra,
    )


def _expand_list(lengths: LengthList, q: int, samples: int) -> np.ndarray:
    from ttcsim.simulator.phases import _expand

    return _expand(lengths, q, samples, "--output-tokens")
