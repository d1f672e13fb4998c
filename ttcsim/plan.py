"""``plan``: the fewest GPUs that serve a load under latency targets, and what they cost.

Orchestration over :mod:`ttcsim.serving`.  For every hardware profile and
tensor-parallel degree (an *option*):

1. **Capacity per replica.**  Poisson arrivals at a per-replica rate ``r`` are
   simulated on a grid of rates (all options and rates in one vectorised run),
   then on a finer grid inside the bracket where the SLOs start to fail.  The
   capacity ``r*`` is the highest simulated rate that meets every SLO *with
   every lower simulated rate meeting them too* (so noise can never make a
   higher load pass where a lower one failed).
2. **Replicas.**  Load is split evenly at random over ``R`` replicas (each sees
   Poisson at ``qps / R``), so ``R = ceil(qps / r*)`` and ``gpus = R * tp``.
   ``R`` depends on the load only through ``qps / r*`` and on the SLOs only
   through ``r*``: more QPS or a tighter SLO never needs fewer GPUs.
3. **Operating point.**  One more simulation at exactly ``qps / R`` gives the
   batch, utilisation, power, energy and latency percentiles reported; if noise
   near the threshold makes it miss an SLO, one replica is added.

Fleet quantities (GPU level: board power of all the fleet's GPUs, idle ones
included; no host, network or cooling)::

    avg_power_kw  = R * P_replica(qps / R) / 1000
    kwh_per_day   = avg_power_kw * 24
    j_per_query   = 1000 * avg_power_kw / qps            (= predict's energy_j at very low load
                                                          plus idle power over the idle time)
    facility_kwh_per_day = kwh_per_day * PUE
    usd_per_day   = gpus * 24 * usd_per_gpu_hour + facility_kwh_per_day * usd_per_kwh
    usd_per_million_output_tokens = 1e6 * usd_per_day / (qps * 86400 * tokens per query)
    co2_tonnes_per_year = facility_kwh_per_day * 365 * carbon_g_per_kwh / 1e6

Output tokens count every generated token of every sample (vote5 generates five
answers).  The cheapest option (lowest $/day, then energy) is recommended.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict

from ttcsim.deployment import dtype_problem, tensor_parallel_problem
from ttcsim.distributions import LengthDistribution, LengthList, parse_lengths
from ttcsim.errors import TtcsimError
from ttcsim.hardware import HardwareProfile, get_profile
from ttcsim.models import ModelSpec, get_model
from ttcsim.serving import (
    QueryStream,
    ReplicaLimits,
    Scheduler,
    ServingStats,
    compatibility_key,
    poisson_stream,
    query_fits,
    simulate,
    unit_poisson_arrivals,
)
from ttcsim.simulator.coefficients import PassCoefficients, pass_coefficients
from ttcsim.simulator.roofline import forward_pass
from ttcsim.units import DTYPE_BYTES, SECONDS_PER_DAY

#: Strategies whose serving shape the model knows: one prefill per query, N
#: sequences decoding independently, optional scoring passes after them.
SERVABLE_STRATEGIES = ("single", "vote", "bon", "prm-bon")
#: Default measured queries per simulated scenario (warm-up and tail are added).
DEFAULT_QUERIES = 300
#: Coarse grid of per-replica load as a fraction of the estimated capacity.
COARSE_LOAD = (0.001, 0.01, 0.05, 0.1, 0.15, 0.22, 0.32, 0.45, 0.6, 0.75, 0.9, 1.05, 1.25, 1.6)
#: Rates of the refinement inside the bracket where the SLOs start to fail.
FINE_POINTS = 9
#: A load is sustainable if the queries in the system grow by at most this
#: fraction of the arrivals over the measured window (overload: 1 - capacity / load).
MAX_BACKLOG_GROWTH = 0.05
#: Replicas added at most when the operating-point check misses an SLO.
MAX_BUMPS = 3
HOURS_PER_DAY = 24.0
DAYS_PER_YEAR = 365.0
GRAMS_PER_TONNE = 1e6
PERCENTILE = 90.0


@dataclass(frozen=True)
class Slo:
    """Latency targets at the 90th percentile [s]; ``None`` means no target."""

    ttft_p90_s: float | None = None
    tpot_p90_s: float | None = None
    e2e_p90_s: float | None = None

    def __post_init__(self) -> None:
        for name, v in (
            ("--slo-ttft-p90-ms", self.ttft_p90_s),
            ("--slo-tpot-p90-ms", self.tpot_p90_s),
            ("--slo-e2e-p90-s", self.e2e_p90_s),
        ):
            if v is not None and not (math.isfinite(v) and v > 0):
                raise TtcsimError(f"must be a positive number, got {v}", name)

    def targets(self) -> list[tuple[str, float]]:
        """``(metric, target)`` pairs that are set; metric names of :class:`ServingStats`."""
        pairs = [
            ("ttft_s", self.ttft_p90_s),
            ("tpot_s", self.tpot_p90_s),
            ("e2e_s", self.e2e_p90_s),
        ]
        return [(k, v) for k, v in pairs if v is not None]


@dataclass(frozen=True)
class Prices:
    """Money and carbon: GPU rental or amortisation, electricity, grid carbon, facility overhead."""

    usd_per_gpu_hour: float = 2.5
    usd_per_kwh: float = 0.12
    carbon_g_per_kwh: float = 400.0
    pue: float = 1.2

    def __post_init__(self) -> None:
        for name, v in (
            ("--usd-per-gpu-hour", self.usd_per_gpu_hour),
            ("--usd-per-kwh", self.usd_per_kwh),
            ("--carbon-g-per-kwh", self.carbon_g_per_kwh),
        ):
            if not (math.isfinite(v) and v >= 0):
                raise TtcsimError(f"must be a finite number >= 0, got {v}", name)
        if not (math.isfinite(self.pue) and 1.0 <= self.pue <= 5.0):
            raise TtcsimError(f"must be in [1, 5], got {self.pue}", "--pue")


class PlanOption(BaseModel):
    """One hardware x tensor-parallel option at the requested load (SI units or as named)."""

    model_config = ConfigDict(frozen=True)

    hw: str
    tp: int
    fits: bool
    slo_met: bool
    reason: str | None = None
    #: why the option is out: memory, setup (tp, dtype, --max-batch), slo or power
    cause: str | None = None
    gpus: int | None = None
    replicas: int | None = None
    capacity_qps_per_replica: float | None = None
    qps_per_replica: float | None = None
    batch: float | None = None  #: sequences per decode pass while running
    mean_running_sequences: float | None = None  #: time average, idle included
    utilization: float | None = None
    avg_power_kw: float | None = None
    peak_power_kw: float | None = None
    kwh_per_day: float | None = None
    facility_kwh_per_day: float | None = None
    j_per_query: float | None = None
    wh_per_query: float | None = None
    j_per_output_token: float | None = None
    usd_per_day: float | None = None
    usd_per_day_gpus: float | None = None
    usd_per_day_energy: float | None = None
    usd_per_million_output_tokens: float | None = None
    co2_tonnes_per_year: float | None = None
    ttft_p50_s: float | None = None
    ttft_p90_s: float | None = None
    tpot_p50_s: float | None = None
    tpot_p90_s: float | None = None
    e2e_p50_s: float | None = None
    e2e_p90_s: float | None = None
    queue_p90_s: float | None = None
    #: latency p90s with one query alone (the floor no replica count can beat)
    floor_ttft_p90_s: float | None = None
    floor_tpot_p90_s: float | None = None
    floor_e2e_p90_s: float | None = None
    kv_capacity_tokens: float | None = None
    cheapest: bool = False
    lowest_energy: bool = False
    # power limit priced and the error band (ttcsim.uncertainty): real latency within
    # the band moves the capacity by 1 -/+ band_latency_ape, so the GPU count lies in
    # [gpus_low, gpus_high]; real energy within its band gives the kWh range
    power_limit_w: float | None = None
    profile_status: str | None = None
    band_energy_ape: float | None = None
    band_latency_ape: float | None = None
    gpus_low: int | None = None
    gpus_high: int | None = None
    kwh_per_day_low: float | None = None
    kwh_per_day_high: float | None = None
    #: with ``search_power_limit``: the cap of this hardware x tp with the lowest energy
    best_power_limit: bool = False


#: Power limits tried by ``plan(search_power_limit=True)``, as fractions of the
#: datasheet limit (those below the board's minimum are skipped; the minimum is added).
POWER_LIMIT_FRACTIONS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4)


def power_limit_grid(profile: HardwareProfile) -> list[float]:
    """Caps [W] the search tries for ``profile``: :data:`POWER_LIMIT_FRACTIONS` of its limit."""
    limit, low = profile.datasheet.power_limit_w, profile.min_power_limit()
    caps = sorted({round(f * limit) for f in POWER_LIMIT_FRACTIONS if f * limit >= low}
                  | {float(low)}, reverse=True)
    return [float(c) for c in caps]


class PlanCurve(BaseModel):
    """Energy and cost of one option against fleet QPS (for ``--plot``)."""

    model_config = ConfigDict(frozen=True)

    hw: str
    tp: int
    qps: list[float]
    gpus: list[int]
    j_per_query: list[float]
    usd_per_day: list[float]
    usd_per_million_output_tokens: list[float]


class Plan(BaseModel):
    """Result of :func:`plan`."""

    model_config = ConfigDict(frozen=True)

    model: str
    strategy: str
    qps: float
    prompt_tokens_spec: str
    output_tokens_spec: str
    arrivals: str
    slo_ttft_p90_s: float | None
    slo_tpot_p90_s: float | None
    slo_e2e_p90_s: float | None
    max_batch: int
    chunk_tokens: int
    weight_dtype: str
    kv_dtype: str
    prefix_cache: bool
    usd_per_gpu_hour: float
    usd_per_kwh: float
    carbon_g_per_kwh: float
    pue: float
    output_tokens_per_query: float
    queries_simulated: int
    calibrated_profiles: dict[str, bool]
    feasible: bool
    reason: str | None
    #: why no option is feasible: memory, setup, slo or power (None when feasible)
    cause: str | None = None
    options: list[PlanOption]
    recommended: PlanOption | None
    curves: list[PlanCurve] = []
    notes: list[str] = []

    def as_dict(self, curves: bool = False) -> dict:
        """Plain dict (JSON-ready); the plot curves only when asked."""
        return self.model_dump(exclude=None if curves else {"curves"})


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class _Option:
    """An option that fits, with what the simulation needs."""

    index: int
    profile: HardwareProfile
    tp: int
    coefficients: PassCoefficients
    kv_capacity_tokens: float
    extra_time_s: float
    extra_energy_j: float
    capacity_guess_qps: float


@dataclass(frozen=True)
class Trace:
    """Recorded arrivals (seconds from any origin) with optional lengths per query."""

    arrival_s: np.ndarray
    prompt_tokens: np.ndarray | None = None
    output_tokens: np.ndarray | None = None
    label: str = "trace"

    @property
    def rate_qps(self) -> float:
        """Mean arrival rate: ``(n - 1) / (last - first)``."""
        span = float(self.arrival_s[-1] - self.arrival_s[0])
        return (self.arrival_s.size - 1) / span


def read_trace(path: str | Path) -> Trace:
    """Read a CSV trace: column ``arrival_s`` (required), ``prompt_tokens``, ``output_tokens``.

    Rows are sorted by arrival; at least 10 rows and a positive time span are needed.
    """
    import pandas as pd

    path = Path(path)
    try:
        frame = pd.read_csv(path)
    except FileNotFoundError:
        raise TtcsimError("no such file", str(path)) from None
    except Exception as exc:  # pandas raises many parser errors
        raise TtcsimError(f"cannot read CSV: {exc}", str(path)) from None
    if "arrival_s" not in frame:
        raise TtcsimError(f"needs an arrival_s column, has {list(frame.columns)}", str(path))
    frame = frame.sort_values("arrival_s", kind="stable")
    arrival = pd.to_numeric(frame["arrival_s"], errors="coerce").to_numpy(dtype=float)
    if arrival.size < 10 or not np.all(np.isfinite(arrival)):
        raise TtcsimError("needs at least 10 rows of finite arrival_s", str(path))
    if arrival[-1] <= arrival[0]:
        raise TtcsimError("arrivals span no time", str(path))

    def column(name):
        if name not in frame:
            return None
        v = pd.to_numeric(frame[name], errors="coerce").to_numpy(dtype=float)
        if not np.all(np.isfinite(v) & (v >= 1)):
            raise TtcsimError(f"{name} must be whole numbers >= 1 in every row", str(path))
        return np.ceil(v)

    return Trace(arrival, column("prompt_tokens"), column("output_tokens"), f"trace:{path.name}")


def _parse_list(text, where: str) -> list:
    """A comma-separated string or a sequence as a list (profile objects pass through)."""
    if isinstance(text, HardwareProfile):
        return [text]
    items = text.split(",") if isinstance(text, str) else list(text)
    items = [i.strip() if isinstance(i, str) else i for i in items]
    items = [i for i in items if not isinstance(i, str) or i]
    if not items:
        raise TtcsimError("empty list", where)
    return items


def _parse_tp(tp) -> list[int]:
    out = []
    for item in _parse_list(tp if not isinstance(tp, int) else [tp], "--tp"):
        try:
            value = int(str(item))
        except ValueError:
            raise TtcsimError(f"not a whole number: {item!r}", "--tp") from None
        if value < 1 or value > 64:
            raise TtcsimError(f"tensor-parallel degree must be 1..64, got {value}", "--tp")
        out.append(value)
    return sorted(set(out))


def _length_table(spec, rng, shape, where: str) -> tuple[np.ndarray, float, float]:
    """Draw lengths of ``shape`` from a spec; returns ``(values, mean, max)``.

    A list of ``N`` lengths for ``N`` samples gives every query those lengths.
    """
    lengths = parse_lengths(spec, where)
    if isinstance(lengths, LengthList):
        values = np.asarray(lengths.values, dtype=float)
        per = shape[-1] if len(shape) > 1 else 1
        if values.size == 1:
            return np.full(shape, values[0]), float(values[0]), float(values[0])
        if values.size == per:
            return np.broadcast_to(values, shape).copy(), float(values.mean()), float(values.max())
        raise TtcsimError(f"{values.size} lengths given; need 1 or {per} (one per sample)", where)
    assert isinstance(lengths, LengthDistribution)
    return lengths.sample(rng, shape), float(lengths.mean()), float(lengths.upper_bound())


def _workspace_bytes(spec: ModelSpec, c: PassCoefficients, scheduler: Scheduler) -> float:
    """Activations of one full chunk and fp32 logits of every sequence, per GPU [B].

    Same rule as :func:`ttcsim.predict.memory_needed_bytes`'s workspace term.
    """
    from ttcsim.simulator.coefficients import ACTIVATION_BYTES

    chunk = scheduler.chunk_tokens
    activations = chunk * (4 * spec.hidden_size + 3 * spec.intermediate_size / c.n_gpus)
    return activations * ACTIVATION_BYTES + scheduler.max_batch * spec.vocab_size * 4.0


def _extra_phases(
    strategy, c, prompt_mean, sample_means, prefix_cache, reward
) -> tuple[float, float]:
    """Time and energy of a strategy's phases after decode, for one query [s, J]."""
    from ttcsim.strategies import Workload

    lengths = LengthList(tuple(max(1, int(round(v))) for v in sample_means))
    w = Workload(
        policy=c,
        prompt_tokens=max(1, int(round(prompt_mean))),
        lengths=lengths,
        concurrency=1,
        prefix_cache=prefix_cache,
        reward=reward,
    )
    phases = strategy.phases(w)
    names = [p.name for p in phases[:2]]
    if names != ["prefill", "decode"]:
        raise TtcsimError(
            f"{strategy.spec}: its phases start {names}, not prefill then decode", "--strategy"
        )
    extra = phases[2:]
    return (
        float(sum(float(np.mean(p.time_s)) for p in extra)),
        float(sum(float(np.mean(p.energy_j)) for p in extra)),
    )


def _capacity_guess(c, samples, prompt_mean, output_mean, copies, kv_cap, scheduler) -> float:
    """Rough saturated throughput of one replica [queries/s] (only centres the rate grid).

    A full batch ``B`` (sequence or KV limited) decodes at context ``P + E[L]/2``;
    each query needs ``N (E[L] - 1)`` sequence-passes and one prefill.
    """
    footprint = copies * prompt_mean + samples * output_mean
    batch = max(1.0, min(scheduler.max_batch, samples * kv_cap / footprint))
    ctx = batch * (prompt_mean + output_mean / 2.0)
    step = float(forward_pass(c, batch, ctx, ctx).time_s)
    decode_s = samples * max(output_mean - 1.0, 1.0) * step / batch
    p = copies * prompt_mean
    prefill_s = float(forward_pass(c, p, 0.0, copies * prompt_mean * (prompt_mean + 1) / 2).time_s)
    return 1.0 / (decode_s + prefill_s)


# --------------------------------------------------------------------------- plan


def plan(
    hw: str | Sequence[str] = "h100",
    model: str | ModelSpec = "8b",
    strategy: str = "single",
    qps: float | None = None,
    prompt_tokens="512",
    output_tokens="1024",
    slo: Slo | None = None,
    tp="1,2,4,8",
    max_batch: int = 256,
    chunk_tokens: int = 8192,
    prices: Prices | None = None,
    weight_dtype: str = "bf16",
    kv_dtype: str | None = None,
    prefix_cache: bool = True,
    reward_model: str | None = None,
    trace: str | Path | Trace | None = None,
    queries: int = DEFAULT_QUERIES,
    seed: int = 0,
    curves: bool = False,
    power_limit_w: float | None = None,
    search_power_limit: bool = False,
    engine=None,
) -> Plan:
    """Plan a deployment: per option the fewest GPUs meeting every SLO, and its costs.

    Parameters
    ----------
    hw : profile names/aliases, comma-separated or a list (``"h100,h200,a100"``)
    model, strategy : as in :func:`ttcsim.predict.predict` (strategies: single,
        vote<N>, bon<N>, prm-bon<N>)
    qps : fleet load [queries/s]; with a trace, rescales its mean rate (None keeps it)
    prompt_tokens, output_tokens : length specs (:mod:`ttcsim.distributions`);
        ``output_tokens`` is per sample
    slo : p90 targets; ``None`` plans for throughput alone
    tp : tensor-parallel degrees to consider
    max_batch, chunk_tokens : scheduler limits (:class:`ttcsim.serving.Scheduler`)
    trace : CSV of ``arrival_s[, prompt_tokens, output_tokens]`` instead of Poisson
    queries : measured queries per simulated load (more: smoother percentiles, slower)
    curves : also compute energy and cost against QPS for plotting
    power_limit_w : what-if board power limit per GPU [W] for every option
    search_power_limit : also try :func:`power_limit_grid` caps per hardware; each
        cap is an option, and per hardware x tp the one with the lowest energy that
        meets the SLO is flagged ``best_power_limit``
    engine : engine profile (:mod:`ttcsim.engines`); its host time, kernels,
        usable memory and prefix sharing price the passes, while the serving
        scheduler (:class:`ttcsim.serving.Scheduler`, continuous batching with
        ``max_batch``/``chunk_tokens``) schedules them whatever the engine's policy
    """
    from ttcsim.engines import get_engine
    from ttcsim.engines.physics import shares_prefix
    from ttcsim.strategies import parse_strategy

    eng = get_engine(engine)
    eng = None if eng.is_reference else eng
    prefix_cache = shares_prefix(eng, prefix_cache)
    slo = slo or Slo()
    prices = prices or Prices()
    scheduler = Scheduler(max_batch=max_batch, chunk_tokens=chunk_tokens, prefix_cache=prefix_cache)
    spec = get_model(model)
    strat = parse_strategy(strategy, reward_model=reward_model)
    if strat.name not in SERVABLE_STRATEGIES:
        raise TtcsimError(
            f"plan models the serving of {', '.join(SERVABLE_STRATEGIES)} (one prefill, N "
            f"sequences, optional scoring); {strat.spec} has a different shape",
            "--strategy",
        )
    for name, dt in (("--dtype", weight_dtype), ("--kv-dtype", kv_dtype)):
        if dt is not None and (dt not in DTYPE_BYTES or dt == "fp32"):
            raise TtcsimError(f"unknown dtype {dt!r}", name)
    kv_dtype = kv_dtype or ("fp8" if weight_dtype == "fp8" else "bf16")
    if not isinstance(queries, int) or not 50 <= queries <= 20000:
        raise TtcsimError(f"must be a whole number in [50, 20000], got {queries}", "--queries")
    if search_power_limit:
        if power_limit_w is not None:
            raise TtcsimError("give --power-limit-w or --search-power-limit, not both",
                              "--search-power-limit")
        return _search_power_limit(
            hw, dict(model=model, strategy=strategy, qps=qps, prompt_tokens=prompt_tokens,
                     output_tokens=output_tokens, slo=slo, tp=tp, max_batch=max_batch,
                     chunk_tokens=chunk_tokens, prices=prices, weight_dtype=weight_dtype,
                     kv_dtype=kv_dtype, prefix_cache=prefix_cache, reward_model=reward_model,
                     trace=trace, queries=queries, seed=seed, curves=curves, engine=engine),
        )
    profiles = [get_profile(h).with_power_limit(power_limit_w) for h in _parse_list(hw, "--hw")]
    tps = _parse_tp(tp)
    samples = strat.samples_per_query
    copies = 1 if prefix_cache else samples

    if isinstance(trace, (str, Path)):
        trace = read_trace(trace)
    if trace is None:
        if qps is None or not (math.isfinite(qps) and qps > 0):
            raise TtcsimError(f"must be a positive number, got {qps}", "--qps")
        fleet_qps = float(qps)
    else:
        fleet_qps = float(qps) if qps else trace.rate_qps
        if not (math.isfinite(fleet_qps) and fleet_qps > 0):
            raise TtcsimError(f"must be a positive number, got {qps}", "--qps")

    # Length tables (seeded), shared by every scenario.
    rng = np.random.default_rng(seed)
    probe_rng = np.random.default_rng(seed + 1)
    _, prompt_mean, prompt_max = _length_table(prompt_tokens, probe_rng, (1,), "--prompt-tokens")
    _, output_mean, output_max = _length_table(
        output_tokens, probe_rng, (1, samples), "--output-tokens"
    )
    if trace is not None and trace.prompt_tokens is not None:
        prompt_mean, prompt_max = (
            float(trace.prompt_tokens.mean()),
            float(trace.prompt_tokens.max()),
        )
    if trace is not None and trace.output_tokens is not None:
        output_mean, output_max = (
            float(trace.output_tokens.mean()),
            float(trace.output_tokens.max()),
        )
    if prompt_max + output_max > spec.max_context_tokens:
        raise TtcsimError(
            f"prompt + output can reach {prompt_max + output_max:.0f} tokens, over "
            f"{spec.name}'s context of {spec.max_context_tokens}; cap the distributions with max=",
            "--output-tokens",
        )

    # Options.
    options: list[PlanOption | _Option] = []
    reward_cache: dict = {}
    for profile in profiles:
        for k in tps:
            c = pass_coefficients(profile, spec, weight_dtype, kv_dtype, k, eng)
            reason = dtype_problem(profile, weight_dtype) or tensor_parallel_problem(spec, k)
            cause = "setup"
            workspace = _workspace_bytes(spec, c, scheduler)
            free = c.memory_capacity_bytes - c.weight_bytes_total - workspace
            kv_cap = max(free, 0.0) / c.kv_bytes_per_token
            if reason is None and free <= 0:
                reason = (
                    f"weights {c.weight_bytes_total * k / 1e9:.0f} GB + workspace do not fit "
                    f"{k}x {c.memory_capacity_bytes / 1e9:.0f} GB usable"
                )
                cause = "memory"
            if reason is None:
                reason = query_fits(
                    samples, copies * prompt_max + samples * output_max, scheduler, kv_cap
                )
                cause = "setup" if samples > scheduler.max_batch else "memory"
            if reason is not None:
                options.append(
                    PlanOption(
                        hw=profile.name, tp=k, fits=False, slo_met=False, reason=reason,
                        cause=cause, power_limit_w=profile.datasheet.power_limit_w,
                        profile_status=profile.provenance.parameters.status,
                    )
                )
                continue

            def reward(name, profile=profile, k=k, c=c):
                if name is None:
                    return c
                key = (profile.name, name, k)
                if key not in reward_cache:
                    reward_cache[key] = pass_coefficients(
                        profile, get_model(name), weight_dtype, kv_dtype, k, eng
                    )
                return reward_cache[key]

            extra_t, extra_e = _extra_phases(
                strat, c, prompt_mean, [output_mean] * samples, prefix_cache, reward
            )
            guess = _capacity_guess(c, samples, prompt_mean, output_mean, copies, kv_cap, scheduler)
            if trace is not None:
                guess = min(guess, fleet_qps)
            options.append(_Option(len(options), profile, k, c, kv_cap, extra_t, extra_e, guess))
    live = [o for o in options if isinstance(o, _Option)]
    notes: list[str] = []
    if any(o.extra_time_s > 0 for o in live):
        notes.append(
            f"{strat.spec}'s scoring runs after each query's last sample, serially at its "
            "single-query cost (not batched): conservative"
        )

    # Query tables (seeded, shared by every scenario: common random numbers).
    warm = _warmup_queries(live, samples, scheduler, prompt_mean, output_mean, copies)
    n_total = queries + 2 * warm
    first, last = warm, n_total - warm
    if trace is None:
        prompt_table = _length_table(prompt_tokens, rng, (n_total,), "--prompt-tokens")[0]
        output_table = _length_table(output_tokens, rng, (n_total, samples), "--output-tokens")[0]
        unit = unit_poisson_arrivals(rng, n_total)
        # Exactly (last - first) unit-rate arrivals in the measured window, so the
        # measured rate is the nominal one and energy per query carries no rate noise.
        unit = unit * (last - first) / (unit[last] - unit[first])
    else:
        prompt_table, output_table = _trace_tables(
            trace, rng, prompt_tokens, output_tokens, n_total, samples
        )
    prompt_table = np.minimum(prompt_table, prompt_max)
    output_table = np.minimum(output_table, output_max)

    def stream_for(rates: np.ndarray) -> QueryStream:
        if trace is None:
            return poisson_stream(rates, prompt_table, output_table, unit)
        return _thinned_trace_stream(
            trace, fleet_qps, rates, n_total, prompt_table, output_table, seed
        )

    # Options whose coefficients can share one vectorised simulation.
    groups: dict = {}
    for i, o in enumerate(live):
        groups.setdefault(compatibility_key(o.coefficients), []).append(i)

    def run(opt_idx: np.ndarray, rates: np.ndarray) -> list[tuple[ServingStats, int]]:
        """Simulate scenario ``k`` (option ``opt_idx[k]`` at ``rates[k]``): its (stats, row)."""
        out: list = [None] * len(opt_idx)
        for members in groups.values():
            sel = np.flatnonzero(np.isin(opt_idx, members))
            if not sel.size:
                continue
            local = {g: k for k, g in enumerate(members)}
            opts = [live[g] for g in members]
            limits = ReplicaLimits(
                np.array([o.kv_capacity_tokens for o in opts]),
                np.array([o.extra_time_s for o in opts]),
                np.array([o.extra_energy_j for o in opts]),
            )
            stats = simulate(
                [o.coefficients for o in opts],
                np.array([local[int(i)] for i in opt_idx[sel]]),
                stream_for(rates[sel]),
                scheduler,
                limits,
                warmup_queries=first,
                tail_queries=n_total - last,
            )
            for row, k in enumerate(sel):
                out[k] = (stats, row)
        return out

    targets = slo.targets()
    results: dict[int, list] = {i: [] for i in range(len(live))}  # (rate, stats row)
    if live:
        max_rate = fleet_qps if trace is not None else np.inf
        opt_idx = np.repeat(np.arange(len(live)), len(COARSE_LOAD))
        rates = np.concatenate([o.capacity_guess_qps * np.asarray(COARSE_LOAD) for o in live])
        rates = np.minimum(rates, max_rate)
        _collect(results, opt_idx, rates, run(opt_idx, rates))
        # Refine inside each option's bracket.
        fine_idx, fine_rates = [], []
        for i in range(len(live)):
            lo, hi = _bracket(results[i], targets)
            if hi is None:
                grid = lo * np.geomspace(1.25, 4.0, FINE_POINTS)
            elif lo is None:
                grid = hi * np.geomspace(1e-4, 0.8, FINE_POINTS)
            else:
                grid = np.linspace(lo, hi, FINE_POINTS + 2)[1:-1]
            grid = np.unique(np.minimum(grid, max_rate))
            fine_idx.append(np.full(grid.size, i))
            fine_rates.append(grid)
        fine_idx, fine_rates = np.concatenate(fine_idx), np.concatenate(fine_rates)
        _collect(results, fine_idx, fine_rates, run(fine_idx, fine_rates))

    # Replicas and operating points.
    capacity = {i: _capacity(results[i], targets) for i in range(len(live))}
    replicas = {
        i: (max(1, math.ceil(fleet_qps / cap - 1e-9)) if cap else None)
        for i, cap in capacity.items()
    }
    op_stats: dict[int, tuple] = {}
    pending = [i for i in range(len(live)) if replicas[i] is not None]
    for _ in range(MAX_BUMPS + 1):
        if not pending:
            break
        idx = np.array(pending)
        rates = np.array([fleet_qps / replicas[i] for i in pending])
        simulated = run(idx, rates)
        retry = []
        for k, i in enumerate(pending):
            stats, row = simulated[k]
            results[i].append((float(rates[k]), stats, row))
            op_stats[i] = (stats, row)
            if not _meets(stats, row, targets) and replicas[i] < 10**6:
                retry.append(i)
                replicas[i] += 1
        pending = retry
    for i in pending:  # still missing after the bumps: report as not met
        replicas[i] = None

    tokens_per_query = samples * output_mean
    built: list[PlanOption] = []
    for o in options:
        if isinstance(o, PlanOption):
            built.append(o)
            continue
        i = live.index(o)
        floor = _floor(results[i])
        base = dict(
            hw=o.profile.name,
            tp=o.tp,
            fits=True,
            power_limit_w=o.profile.datasheet.power_limit_w,
            profile_status=o.profile.provenance.parameters.status,
            kv_capacity_tokens=o.kv_capacity_tokens,
            floor_ttft_p90_s=floor.get("ttft_s"),
            floor_tpot_p90_s=floor.get("tpot_s"),
            floor_e2e_p90_s=floor.get("e2e_s"),
        )
        if replicas[i] is None or i not in op_stats:
            why = _why(o, floor, targets, capacity[i])
            phase = _power_bound_phase(
                o.coefficients, floor, targets, prompt_mean, output_mean, samples, copies
            )
            if phase:
                why += f" (power-limited {phase}: without the limit the floor would meet it)"
            built.append(
                PlanOption(
                    slo_met=False, reason=why, cause="power" if phase else "slo", **base
                )
            )
            continue
        stats, row = op_stats[i]
        built.append(
            _priced(
                base, o, replicas[i], capacity[i], fleet_qps, tokens_per_query, stats, row, prices
            )
        )
    _mark(built)
    good = [b for b in built if b.slo_met]
    recommended = next((b for b in good if b.cheapest), None)
    reason = cause = None
    if not good:
        cause = _plan_cause([b.cause for b in built])
        reasons = [f"{b.hw} tp{b.tp}: {b.reason}" for b in built]
        reason = _CAUSE_TEXT[cause] + "; " + "; ".join(reasons)
    plan_curves = []
    if curves:
        plan_curves = [
            _curve(
                o,
                results[live.index(o)],
                capacity[live.index(o)],
                fleet_qps,
                tokens_per_query,
                prices,
            )
            for o in live
            if capacity[live.index(o)]
        ]
    return Plan(
        model=spec.name,
        strategy=strat.spec,
        qps=fleet_qps,
        prompt_tokens_spec=str(prompt_tokens)
        if trace is None or trace.prompt_tokens is None
        else trace.label,
        output_tokens_spec=str(output_tokens)
        if trace is None or trace.output_tokens is None
        else trace.label,
        arrivals="poisson" if trace is None else trace.label,
        slo_ttft_p90_s=slo.ttft_p90_s,
        slo_tpot_p90_s=slo.tpot_p90_s,
        slo_e2e_p90_s=slo.e2e_p90_s,
        max_batch=max_batch,
        chunk_tokens=chunk_tokens,
        weight_dtype=weight_dtype,
        kv_dtype=kv_dtype,
        prefix_cache=prefix_cache,
        usd_per_gpu_hour=prices.usd_per_gpu_hour,
        usd_per_kwh=prices.usd_per_kwh,
        carbon_g_per_kwh=prices.carbon_g_per_kwh,
        pue=prices.pue,
        output_tokens_per_query=tokens_per_query,
        queries_simulated=n_total,
        calibrated_profiles={p.name: p.calibrated for p in profiles},
        feasible=bool(good),
        reason=reason,
        cause=cause,
        options=built,
        recommended=recommended,
        curves=plan_curves,
        notes=notes,
    )


# --------------------------------------------------------------------------- pieces


def _warmup_queries(live, samples, scheduler, prompt_mean, output_mean, copies) -> int:
    """Queries to discard at each end: about the most queries one replica holds at once.

    A full replica holds ``min(max_batch / N, KV / footprint)`` queries; the
    simulation discards that many arrivals (at least 30) before measuring, and
    keeps arriving that many after, so measured queries see a steady state.
    """
    if not live:
        return 30
    footprint = copies * prompt_mean + samples * output_mean
    held = max(min(scheduler.max_batch / samples, o.kv_capacity_tokens / footprint) for o in live)
    return int(max(30, math.ceil(1.2 * held)))


def _trace_tables(trace: Trace, rng, prompt_spec, output_spec, n_total, samples):
    """Lengths per trace row, tiled to at least ``n_total`` rows (a multiple of the trace).

    Trace columns give a row's prompt and its first sample's length; the other
    samples are drawn from the trace's output lengths.  Missing columns are
    drawn from ``--prompt-tokens``/``--output-tokens``.
    """
    size = trace.arrival_s.size * int(math.ceil(n_total / trace.arrival_s.size))
    row = np.arange(size) % trace.arrival_s.size
    if trace.prompt_tokens is not None:
        prompt = trace.prompt_tokens[row]
    else:
        prompt = _length_table(prompt_spec, rng, (size,), "--prompt-tokens")[0]
    if trace.output_tokens is not None:
        output = rng.choice(trace.output_tokens, size=(size, samples))
        output[:, 0] = trace.output_tokens[row]
    else:
        output = _length_table(output_spec, rng, (size, samples), "--output-tokens")[0]
    return prompt, output


def _thinned_trace_stream(trace, fleet_qps, rates, n, prompt_table, output_table, seed):
    """Per-replica streams from a trace: each arrival kept with probability ``rate / fleet``.

    The trace, time-scaled to ``fleet_qps``, repeats end to end as needed; one
    uniform per arrival (shared by every scenario) decides whether a replica
    sees it, so a lower rate sees a subset of a higher rate's arrivals.
    """
    base = trace.arrival_s - trace.arrival_s[0]
    base = base * (trace.rate_qps / fleet_qps)
    period = base[-1] * base.size / max(base.size - 1, 1)
    p = np.minimum(np.asarray(rates, dtype=float) / fleet_qps, 1.0)
    need = int(math.ceil(n / p.min() * 1.3)) + base.size
    reps = int(math.ceil(need / base.size))
    times = (base[None, :] + period * np.arange(reps)[:, None]).ravel()
    u = np.random.default_rng(seed + 7).uniform(size=times.size)
    u[0] = 0.0  # every stream starts at the trace's first arrival
    arrivals = np.empty((p.size, n))
    which = np.empty((p.size, n), dtype=np.int64)
    for s, ps in enumerate(p):
        kept = np.flatnonzero(u < ps)[:n]
        if kept.size < n:  # pragma: no cover - ``need`` is sized for this
            raise RuntimeError("trace thinning ran short")
        arrivals[s] = times[kept]
        which[s] = kept % prompt_table.shape[0]
    return QueryStream(arrivals, prompt_table[which], output_table[which])


def _collect(results, opt_idx, rates, simulated) -> None:
    """File each simulated scenario's ``(rate, stats, row)`` under its option."""
    for k, (stats, row) in enumerate(simulated):
        results[int(opt_idx[k])].append((float(rates[k]), stats, row))


def _p(stats: ServingStats, name: str, row: int, q: float = PERCENTILE) -> float:
    """Percentile over a scenario's queries (NaN, e.g. TPOT of one-token answers, ignored)."""
    values = getattr(stats, name)[row]
    values = values[~np.isnan(values)]
    return float(np.percentile(values, q)) if values.size else 0.0


def _meets(stats, row, targets) -> bool:
    """Every p90 target met and the replica keeps up with its arrivals."""
    if stats.backlog_growth[row] > MAX_BACKLOG_GROWTH:
        return False
    return all(_p(stats, name, row) <= target for name, target in targets)


def _sorted(points):
    return sorted(points, key=lambda x: x[0])


def _bracket(points, targets):
    """``(last rate passing with all lower passing, first failing rate)``; None at an open end."""
    lo = None
    for rate, stats, row in _sorted(points):
        if not _meets(stats, row, targets):
            return lo, rate
        lo = rate
    return lo, None


def _capacity(points, targets) -> float | None:
    """Highest simulated rate meeting the SLOs with every lower simulated rate meeting them."""
    lo, _ = _bracket(points, targets)
    return lo


def _floor(points) -> dict[str, float]:
    """Latency p90s at the lowest simulated load (one query at a time, in effect)."""
    rate, stats, row = _sorted(points)[0]
    return {k: _p(stats, k, row) for k in ("ttft_s", "tpot_s", "e2e_s")}


_CAUSE_TEXT = {
    "memory": "no option fits in GPU memory",
    "setup": "no option can run (tensor parallelism, dtype or --max-batch)",
    "slo": "no option meets the SLO",
    "power": "no option meets the SLO because of the GPUs' power limit",
}
_LATENCY_PHASE = {"ttft_s": "prefill", "tpot_s": "decode", "e2e_s": "decode"}


def _plan_cause(causes: list[str | None]) -> str:
    """The plan's cause: of the options that fit, slo unless all are power-bound.

    With none fitting: memory if any is out for memory, else setup.
    """
    fitting = [c for c in causes if c in ("slo", "power")]
    if fitting:
        return "power" if all(c == "power" for c in fitting) else "slo"
    return "memory" if "memory" in causes else "setup"


def _power_bound_phase(
    c, floor, targets, prompt_mean, output_mean, samples, copies
) -> str | None:
    """The phase whose power limit alone makes a missed target unreachable, if any.

    For each missed p90 target, the single-query floor is scaled by the time
    ratio ``t(no limit) / t(limit)`` of that target's pass (TTFT: one query's
    prefill; TPOT and E2E: a decode pass of its ``N`` samples at mid-output
    context).  If the scaled floor meets the target, the power limit is the
    cause.  An estimate: it ignores queueing, which the floor excludes anyway.
    """
    free = dataclasses.replace(c, power_limit_w=np.inf)
    p = copies * prompt_mean
    pairs = copies * prompt_mean * (prompt_mean + 1) / 2
    ctx = samples * (prompt_mean + output_mean / 2.0)
    passes = {
        "prefill": ((p, 0.0, pairs), {"prefill": True}),
        "decode": ((samples, ctx, ctx), {}),
    }
    for name, target in targets:
        value = floor.get(name)
        if value is None or value <= target:
            continue
        phase = _LATENCY_PHASE[name]
        args, kw = passes[phase]
        limited = forward_pass(c, *args, **kw)
        if not bool(np.any(limited.throttled)):
            continue
        ratio = float(forward_pass(free, *args, **kw).time_s) / float(limited.time_s)
        if value * ratio <= target:
            return phase
    return None


def _why(o: _Option, floor, targets, capacity) -> str:
    """Why an option cannot meet the SLOs (the floor a single query already misses)."""
    labels = {
        "ttft_s": ("TTFT", 1e3, "ms"),
        "tpot_s": ("TPOT", 1e3, "ms"),
        "e2e_s": ("E2E", 1.0, "s"),
    }
    missed = []
    for name, target in targets:
        if floor.get(name, 0.0) > target:
            label, scale, unit = labels[name]
            missed.append(
                f"{label} p90 floor {floor[name] * scale:.4g} {unit} (one query alone on "
                f"{o.tp}x {o.profile.name}) exceeds the {target * scale:.4g} {unit} target"
            )
    if missed:
        return "; ".join(missed)
    return "the SLO holds only at a vanishing load per replica (near the single-query floor)"


def _priced(
    base, o, replicas, capacity, fleet_qps, tokens_per_query, stats, row, prices
) -> PlanOption:
    """Fleet power, energy, money and carbon at the operating point."""
    gpus = replicas * o.tp
    avg_kw = replicas * float(stats.avg_power_w[row]) / 1e3
    peak_kw = replicas * float(stats.peak_power_w[row]) / 1e3
    kwh_day = avg_kw * HOURS_PER_DAY
    facility = kwh_day * prices.pue
    usd_gpus = gpus * HOURS_PER_DAY * prices.usd_per_gpu_hour
    usd_energy = facility * prices.usd_per_kwh
    usd_day = usd_gpus + usd_energy
    j_query = avg_kw * 1e3 / fleet_qps
    tokens_day = fleet_qps * SECONDS_PER_DAY * tokens_per_query
    from ttcsim.uncertainty import interval, profile_band

    band = profile_band(o.profile)
    w_t = band.latency_ape
    reps_low = math.ceil(fleet_qps / (capacity * (1.0 + w_t))) if capacity else replicas
    reps_high = math.ceil(fleet_qps / (capacity * (1.0 - w_t))) if capacity else replicas
    kwh_low, kwh_high = interval(kwh_day, band.energy_ape)
    return PlanOption(
        **base,
        band_energy_ape=band.energy_ape,
        band_latency_ape=w_t,
        gpus_low=min(reps_low, replicas) * o.tp,
        gpus_high=max(reps_high, replicas) * o.tp,
        kwh_per_day_low=float(kwh_low),
        kwh_per_day_high=float(kwh_high),
        slo_met=True,
        gpus=gpus,
        replicas=replicas,
        capacity_qps_per_replica=capacity,
        qps_per_replica=fleet_qps / replicas,
        batch=float(stats.busy_batch[row]),
        mean_running_sequences=float(stats.mean_batch[row]),
        utilization=float(stats.utilization[row]),
        avg_power_kw=avg_kw,
        peak_power_kw=peak_kw,
        kwh_per_day=kwh_day,
        facility_kwh_per_day=facility,
        j_per_query=j_query,
        wh_per_query=j_query / 3600.0,
        j_per_output_token=j_query / tokens_per_query,
        usd_per_day=usd_day,
        usd_per_day_gpus=usd_gpus,
        usd_per_day_energy=usd_energy,
        usd_per_million_output_tokens=1e6 * usd_day / tokens_day,
        co2_tonnes_per_year=facility * DAYS_PER_YEAR * prices.carbon_g_per_kwh / GRAMS_PER_TONNE,
        ttft_p50_s=_p(stats, "ttft_s", row, 50),
        ttft_p90_s=_p(stats, "ttft_s", row),
        tpot_p50_s=_p(stats, "tpot_s", row, 50),
        tpot_p90_s=_p(stats, "tpot_s", row),
        e2e_p50_s=_p(stats, "e2e_s", row, 50),
        e2e_p90_s=_p(stats, "e2e_s", row),
        queue_p90_s=_p(stats, "queue_s", row),
    )


def _search_power_limit(hw, kw: dict) -> Plan:
    """:func:`plan` once per cap level of :func:`power_limit_grid`, merged.

    Every (hardware, cap, tp) is an option; per hardware x tp the cap with the
    lowest kWh/day meeting the SLO gets ``best_power_limit``.

    Each level is its own plan (the hardware of one level share a simulation, as in
    a plain plan), so an extreme cap cannot disturb another cap's capacity search.
    """
    bases = [get_profile(h) for h in _parse_list(hw, "--hw")]
    grids = {p.name: power_limit_grid(p) for p in bases}
    levels = max(len(g) for g in grids.values())
    parts = []
    for j in range(levels):
        capped = [p.with_power_limit(grids[p.name][j], "--search-power-limit")
                  for p in bases if j < len(grids[p.name])]
        parts.append(plan(hw=capped, **kw))
    built = [o.model_copy(update={"cheapest": False, "lowest_energy": False})
             for part in parts for o in part.options]
    base_of = {o.hw: b.name for b in bases for o in built
               if o.hw == b.name or o.hw.startswith(b.name + "-pl")}
    _mark(built)
    _mark_best_power_limit(built, base_of)
    good = [b for b in built if b.slo_met]
    first = parts[0]
    return first.model_copy(update={
        "options": built,
        "recommended": next((b for b in good if b.cheapest), None),
        "feasible": bool(good),
        "reason": None if good else "no option at any power cap meets the SLO",
        "calibrated_profiles": {
            k: v for part in parts for k, v in part.calibrated_profiles.items()
        },
        "curves": [c for part in parts for c in part.curves],
        "notes": sorted({n for part in parts for n in part.notes}),
    })


def _mark_best_power_limit(built: list[PlanOption], base_of: dict[str, str]) -> None:
    """Per base hardware x tp, flag the option (cap) with the lowest kWh/day meeting the SLO."""
    groups: dict[tuple[str, int], list[int]] = {}
    for i, b in enumerate(built):
        if b.slo_met:
            groups.setdefault((base_of.get(b.hw, b.hw), b.tp), []).append(i)
    for idx in groups.values():
        best = min(idx, key=lambda i: (
            built[i].kwh_per_day, built[i].gpus, -built[i].power_limit_w))
        built[best] = built[best].model_copy(update={"best_power_limit": True})


def _mark(built: list[PlanOption]) -> None:
    """Flag the cheapest and the lowest-energy options that meet the SLO (in place)."""
    good = [i for i, b in enumerate(built) if b.slo_met]
    if not good:
        return
    cheap = min(good, key=lambda i: (built[i].usd_per_day, built[i].kwh_per_day, built[i].gpus))
    green = min(good, key=lambda i: (built[i].kwh_per_day, built[i].usd_per_day, built[i].gpus))
    built[cheap] = built[cheap].model_copy(update={"cheapest": True})
    built[green] = built[green].model_copy(update={"lowest_energy": True})


def _curve(o: _Option, points, capacity, fleet_qps, tokens_per_query, prices) -> PlanCurve:
    """Energy per query and cost against fleet QPS, replicas re-sized at each QPS.

    Replica power at a per-replica rate is interpolated (linearly in rate) between
    simulated loads; at low load power is exactly affine in rate.
    """
    pts = _sorted(points)
    pts = [p for p in pts if np.isfinite(p[1].avg_power_w[p[2]])]  # abandoned overloads
    rate = np.array([p[0] for p in pts])
    power = np.array([float(p[1].avg_power_w[p[2]]) for p in pts])
    keep = np.concatenate([[True], np.diff(rate) > 0])
    rate, power = rate[keep], power[keep]
    qps = np.geomspace(fleet_qps / 20.0, fleet_qps * 5.0, 240)
    reps = np.maximum(1, np.ceil(qps / capacity - 1e-9))
    per = qps / reps
    p_rep = np.interp(per, rate, power)
    kw = reps * p_rep / 1e3
    j = kw * 1e3 / qps
    usd = (
        reps * o.tp * HOURS_PER_DAY * prices.usd_per_gpu_hour
        + kw * HOURS_PER_DAY * prices.pue * prices.usd_per_kwh
    )
    per_m = 1e6 * usd / (qps * SECONDS_PER_DAY * tokens_per_query)
    return PlanCurve(
        hw=o.profile.name,
        tp=o.tp,
        qps=qps.tolist(),
        gpus=(reps * o.tp).astype(int).tolist(),
        j_per_query=j.tolist(),
        usd_per_day=usd.tolist(),
        usd_per_million_output_tokens=per_m.tolist(),
    )


def energy_per_query_low_load_j(
    single_query_energy_j: float,
    single_query_busy_s: float,
    idle_power_w: float,
    gpus: int,
    qps_per_replica: float,
) -> float:
    """The low-load limit of the plan's energy per query [J].

    With queries that never overlap, a replica spends ``predict``'s energy
    ``E_1`` on each and idles the rest of the mean gap ``1 / r``::

        E = E_1 + gpus * P_idle * (1 / r - t_1)

    where ``t_1`` is the single query's busy time (``Prediction.batch_latency_s``).
    """
    return single_query_energy_j + gpus * idle_power_w * (
        1.0 / qps_per_replica - single_query_busy_s
    )


__all__ = [
    "Plan",
    "PlanCurve",
    "PlanOption",
    "Prices",
    "Slo",
    "Trace",
    "energy_per_query_low_load_j",
    "plan",
    "read_trace",
]
