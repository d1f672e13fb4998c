"""Continuous-batching serving model: batch, queueing delay, latency and power under load.

One *replica* (a tensor-parallel group of ``tp`` GPUs) serves a stream of queries.
The scheduler is iteration-level, as in vLLM V1 with chunked prefill:

* every iteration is **one forward pass** over one decode token of every running
  sequence plus, if any prompt is waiting, a prefill chunk; decode tokens and
  the chunk share a budget of ``chunk_tokens`` tokens per pass;
* **admission** is first come, first served: a query is admitted when its ``N``
  sequences fit under ``max_batch`` running sequences *and* its final KV
  footprint fits the free KV cache (the scheduler reserves it, so nothing is
  ever preempted);
* admitted prompts are prefilled in order, in chunks; the pass that finishes a
  prompt yields the first token of each of the query's ``N`` samples (with
  prefix caching the samples share that one prefill; without it the prompt is
  prefilled ``N`` times);
* every sample then **joins the running batch**, decodes one token per pass and
  **leaves** after its last token, freeing its KV;
* phases of a strategy beyond prefill and decode (best-of-N reward scoring) run
  after the query's last sample, serially: the replica stalls for their
  single-query time and energy (conservative: they are not batched).

Cost of an iteration with ``b`` decoding sequences whose contexts sum to ``X``
and a prefill chunk of ``C`` tokens that computes ``A_C`` causal pairs after
reading ``K_C`` cached prompt tokens (from :func:`~ttcsim.simulator.roofline.forward_pass`)::

    pass = forward_pass(c, tokens = b + C, kv_read = X + K_C, pairs = X + A_C)

so prefill and decode share the pass's weight reads, and its attention is one
roofline over both (as one fused varlen attention kernel).  Between passes with
nothing to run the GPUs draw ``idle_power_w``.

Simulation.  Between *events* (an arrival, a prefill pass, a departure) the
decode batch is fixed and every sequence's context grows by one per pass, so
the pass time and dynamic energy are affine in the step index (the roofline's
``max`` of two affine branches after the power-limit throttle); a run of ``k``
passes is summed in closed form (:func:`decode_run`).  The simulation is
event-driven on those runs, and *vectorised over scenarios*: ``S`` scenarios
(hardware/parallelism options times loads) advance in lockstep, each taking its
own next event at every loop step, so a plan costs a few thousand numpy steps
over arrays of ``S``.  Scenarios share their random queries (common random
numbers): Poisson arrival times are one unit-rate stream divided by each
scenario's rate, so results are smooth and near-monotone in load.

Convention (as :mod:`ttcsim.simulator.decode`): a sample of ``L`` tokens gets its
first token from the prefill pass and ``L - 1`` decode passes; at its ``s``-th
decode pass it attends over ``P + s`` tokens.  With one query at a time this
reproduces :func:`ttcsim.predict.predict` exactly.

Latency definitions, per query: TTFT = first-token time - arrival; E2E = time
its last sample (and any scoring) finishes - arrival; TPOT = (time its longest
sample finishes - first-token time) / (longest length - 1); queueing delay =
admission time - arrival.  All SI: seconds, joules, watts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ttcsim.errors import TtcsimError
from ttcsim.simulator.coefficients import PassCoefficients
from ttcsim.simulator.roofline import forward_pass

#: Fraction of the simulated queries treated as warm-up (latencies and energy ignored).
WARMUP_FRACTION = 0.15
#: Fraction at the end ignored: arrivals stop there, so the load falls off.
TAIL_FRACTION = 0.1
#: Loop-step guard (events per query are about 2 + N; this only catches bugs).
MAX_STEPS_PER_QUERY = 64

#: Coefficient fields that must be one scalar across stacked options (the roofline
#: branches on them in Python); options that differ are simulated separately.
_SCALAR_FIELDS = (
    "n_layers",
    "hidden_size",
    "n_experts",
    "n_active_experts",
    "roofline_exponent",
    "attention_half_parallelism",
)


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class QueryStream:
    """Queries of ``S`` scenarios in arrival order (arrays broadcast over scenarios).

    ``arrival_s`` [s] has shape ``(S, n)`` and is non-decreasing along each row;
    ``prompt_tokens`` has shape ``(S, n)`` or ``(1, n)``; ``output_tokens`` holds
    every sample's length, shape ``(S, n, N)`` or ``(1, n, N)`` [tokens].
    """

    arrival_s: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray

    @property
    def n_scenarios(self) -> int:
        """``S``."""
        return self.arrival_s.shape[0]

    @property
    def n_queries(self) -> int:
        """``n``: queries per scenario."""
        return self.arrival_s.shape[1]

    @property
    def samples_per_query(self) -> int:
        """``N``: sequences per query."""
        return self.output_tokens.shape[2]


@dataclass(frozen=True)
class Scheduler:
    """Scheduler limits of one replica (vLLM names in brackets).

    ``max_batch`` -- running sequences at most [``max_num_seqs``];
    ``chunk_tokens`` -- tokens per forward pass, decode plus prefill
    [``max_num_batched_tokens``]; ``prefix_cache`` -- a query's samples share
    its prompt's prefill and KV; ``fused_prefill`` -- prefill chunks ride in the
    decode pass (vLLM V1 chunked prefill); ``False``: a pass with prompts waiting
    prefills only, and the running sequences wait for it (engines without
    chunked prefill, and ttcsim's reference decoder).
    """

    max_batch: int = 256
    chunk_tokens: int = 8192
    prefix_cache: bool = True
    fused_prefill: bool = True

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise TtcsimError(f"must be >= 1, got {self.max_batch}", "--max-batch")
        if self.chunk_tokens <= self.max_batch:
            raise TtcsimError(
                f"must exceed --max-batch ({self.max_batch}), got {self.chunk_tokens}",
                "--chunk-tokens",
            )


@dataclass(frozen=True)
class ReplicaLimits:
    """Per-option quantities beyond the pass coefficients (arrays over options).

    ``kv_capacity_tokens`` -- KV-cache tokens a replica holds beside its weights
    and workspace; ``extra_time_s``/``extra_energy_j`` -- serial work per query
    after its last sample (reward scoring), time and energy over all GPUs.
    """

    kv_capacity_tokens: np.ndarray
    extra_time_s: np.ndarray
    extra_energy_j: np.ndarray


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class ServingStats:
    """Steady-state results per scenario (arrays of shape ``(S,)`` unless noted).

    Power and energy are at the GPUs (all ``tp`` GPUs of a replica), measured over
    the window from the first to the last measured arrival; latencies over the
    measured queries (warm-up and tail excluded).
    """

    arrival_rate_qps: np.ndarray  #: realised arrivals per second in the window
    energy_per_query_j: np.ndarray  #: window energy / window arrivals [J]
    avg_power_w: np.ndarray  #: window energy / window time [W]
    peak_power_w: np.ndarray  #: highest pass power in the window [W]
    utilization: np.ndarray  #: fraction of the window the replica runs a pass
    mean_batch: np.ndarray  #: time-average running (decoding) sequences
    busy_batch: np.ndarray  #: running sequences averaged over busy time only
    output_tokens_per_s: np.ndarray  #: tokens generated in the window / its length
    #: window energy / tokens generated in it [J]; unlike energy_per_query_j it
    #: stays right when the replica is overloaded (arrivals outpace completions)
    energy_per_output_token_j: np.ndarray
    #: growth of the queries in the system over the window per window arrival:
    #: about 0 when the replica keeps up, ``1 - capacity / load`` when overloaded
    backlog_growth: np.ndarray
    ttft_s: np.ndarray  #: (S, m) per measured query
    tpot_s: np.ndarray  #: (S, m); NaN where every sample has one token
    e2e_s: np.ndarray  #: (S, m)
    queue_s: np.ndarray  #: (S, m) arrival to admission
    output_tokens: np.ndarray  #: (S, m) tokens generated per query (all samples)
    steps: int  #: loop steps the simulation took

    def percentile(self, name: str, q: float) -> np.ndarray:
        """``q``-th percentile of a per-query field (``ttft_s``, ``tpot_s``, ...) per scenario."""
        values = getattr(self, name)
        with np.errstate(all="ignore"):
            out = np.nanpercentile(values, q, axis=1) if values.size else np.zeros(0)
        return out


# --------------------------------------------------------------------------- pass costs


def compatibility_key(c: PassCoefficients) -> tuple:
    """Options with equal keys can be simulated together (:func:`stack_coefficients`)."""
    return tuple(getattr(c, name, None) for name in _SCALAR_FIELDS)


def stack_coefficients(
    coefficients: Sequence[PassCoefficients], option: np.ndarray
) -> PassCoefficients:
    """One :class:`PassCoefficients` whose fields vary over scenarios.

    Scenario ``s`` gets ``coefficients[option[s]]``.  A field equal in every
    option stays a scalar; one that differs becomes an array over scenarios (the
    roofline broadcasts over it as long as no pass hits the power limit; see
    :class:`PassModel`).  The model-level fields (layers, widths, experts) and
    ``roofline_exponent`` must agree.
    """
    return _Columns(coefficients).stack(option)


class _Columns:
    """The fields of several options, as scalars (all equal) or arrays over options."""

    def __init__(self, coefficients: Sequence[PassCoefficients]) -> None:
        self.scalars: dict = {}
        self.arrays: dict = {}
        for f in dataclasses.fields(PassCoefficients):
            column = [getattr(c, f.name) for c in coefficients]
            if all(v == column[0] for v in column):
                self.scalars[f.name] = column[0]
            elif f.name in _SCALAR_FIELDS:
                raise ValueError(f"options disagree on {f.name}; simulate them separately")
            else:
                self.arrays[f.name] = np.asarray(column, dtype=float)

    def stack(self, option) -> PassCoefficients:
        """Coefficients of ``option[s]`` for every scenario ``s``."""
        option = np.asarray(option, dtype=int)
        arrays = {k: v[option] for k, v in self.arrays.items()}
        return PassCoefficients(**self.scalars, **arrays)


def sum_positive_affine(d0, d1, n) -> np.ndarray:
    """``sum_{k=0}^{n-1} max(0, d0 + d1*k)`` elementwise, in closed form."""
    d0, d1, n = np.broadcast_arrays(*(np.asarray(v, dtype=float) for v in (d0, d1, n)))
    safe = np.where(d1 != 0, d1, 1.0)
    root = np.where(d1 != 0, -d0 / safe, 0.0)
    # d1 > 0: positive for k > root; d1 < 0: positive for k < root; d1 == 0: all or none.
    start = np.where(d1 > 0, np.clip(np.floor(root) + 1.0, 0.0, n), 0.0)
    stop = np.where(d1 < 0, np.clip(np.ceil(root), 0.0, n), n)
    flat = d1 == 0
    start = np.where(flat, np.where(d0 > 0, 0.0, n), start)
    stop = np.where(flat, n, stop)
    m = np.maximum(stop - start, 0.0)
    return m * d0 + d1 * m * (start + stop - 1.0) / 2.0


#: Gauss-Legendre nodes for summing power-limited decode passes (smooth in the step).
_GAUSS_NODES, _GAUSS_WEIGHTS = np.polynomial.legendre.leggauss(6)
#: Runs of at most this many power-limited passes are summed pass by pass.
_EXACT_PASSES = 8


def _pass_keywords() -> frozenset:
    """Optional keywords of :func:`forward_pass` in this version of the core."""
    import inspect

    return frozenset(inspect.signature(forward_pass).parameters) - {
        "c",
        "tokens",
        "kv_read_tokens",
        "attention_pairs",
    }


_PASS_KEYWORDS = _pass_keywords()


def _forward(c, tokens, kv_read, pairs, sequences=None, kv_hbm=None, prefill=False):
    """:func:`forward_pass` with the optional keywords the core supports.

    ``sequences`` (attention parallelism), ``kv_hbm`` (KV tokens fetched from HBM
    when samples share a prompt) and ``prefill`` (fixed prefill-pass overhead).
    """
    kw = {}
    if sequences is not None and "sequences" in _PASS_KEYWORDS:
        kw["sequences"] = sequences
    if kv_hbm is not None and "kv_hbm_tokens" in _PASS_KEYWORDS:
        kw["kv_hbm_tokens"] = kv_hbm
    if prefill and "prefill" in _PASS_KEYWORDS:
        kw["prefill"] = True
    return forward_pass(c, tokens, kv_read, pairs, **kw)


class PassModel:
    """Pass costs of ``S`` scenarios, from :func:`forward_pass` only.

    A decode pass has ``tokens = sequences = b`` and reads ``x`` context tokens
    (``kv_read = pairs = x``), ``x - shared`` of them from HBM when samples share
    their prompt (the shared prefix is fetched once per query and step).  Two
    properties of ``forward_pass`` are used (the first checked at construction):

    * without a power limit, time and dynamic energy are affine in ``x`` at a
      fixed ``b`` (attention is a roofline of two terms proportional to ``x``),
      so a run of ``k`` passes at a fixed batch sums in closed form; the slopes
      are read off ``forward_pass`` at ``x`` and ``x + b``;
    * a pass hits the power limit exactly when its unlimited power
      ``P_static + E_dyn / t`` exceeds it.  Such passes are recomputed by
      ``forward_pass`` with the limit; in a decode run the unlimited power is
      monotone in ``x``, so they form one end of the run, summed pass by pass
      when few and by 6-point Gauss-Legendre quadrature over the step otherwise.
    """

    def __init__(self, coefficients: Sequence[PassCoefficients], option: np.ndarray) -> None:
        self.options = list(coefficients)
        self.option = np.asarray(option, dtype=int)
        n = self.option.size
        self.n = n
        self.columns = _Columns(self.options)
        self.c = self.columns.stack(self.option)
        self.c_free = dataclasses.replace(self.c, power_limit_w=np.inf)
        self.c_free2 = dataclasses.replace(
            self.columns.stack(np.concatenate([self.option, self.option])),
            power_limit_w=np.inf,
        )
        self.gpus = np.broadcast_to(np.asarray(self.c.n_gpus, dtype=float), (n,))
        self.static_w = np.broadcast_to(np.asarray(self.c.static_power_w, dtype=float), (n,))
        self.limit_w = np.broadcast_to(np.asarray(self.c.power_limit_w, dtype=float), (n,))
        b = np.full(n, 8.0)
        t = [_forward(self.c_free, b, b * x, b * x).time_s for x in (0.0, 1000.0, 2000.0)]
        if np.any(np.abs(t[2] - 2 * t[1] + t[0]) > 1e-9 * t[2]):
            raise RuntimeError(
                "forward_pass is no longer affine in the decode context; the serving "
                "model's closed-form runs need updating"
            )

    def _exact(self, rows, tokens, kv_read, pairs, sequences, kv_hbm, prefill=False):
        """``forward_pass`` with the real power limit for passes of scenarios ``rows``.

        Returns ``(time_s, dynamic_energy_per_gpu_j)`` aligned with ``rows``.  The
        callers pass passes over the limit, so one call over coefficients stacked
        for ``rows`` works (``forward_pass`` broadcasts them when every pass is
        limited); otherwise it goes option by option.
        """
        opts = self.option[rows]
        try:
            with np.errstate(all="ignore"):
                cost = _forward(
                    self.columns.stack(opts), tokens, kv_read, pairs, sequences, kv_hbm, prefill
                )
            if np.all(cost.throttled):
                return cost.time_s, cost.dynamic_energy_j / self.gpus[rows]
        except ValueError:  # coefficient arrays and a partly limited batch do not broadcast
            pass
        t = np.empty(rows.size)
        e = np.empty(rows.size)
        for i in np.unique(opts):
            sel = opts == i
            cost = _forward(
                self.options[i],
                tokens[sel],
                kv_read[sel],
                pairs[sel],
                sequences[sel],
                kv_hbm[sel],
                prefill,
            )
            t[sel] = cost.time_s
            e[sel] = cost.dynamic_energy_j / self.options[i].n_gpus
        return t, e

    def _over(self, time_s, dyn_j, rows=slice(None)):
        """Whether the unlimited pass power exceeds the limit."""
        safe = np.where(time_s > 0, time_s, 1.0)
        return (time_s > 0) & (self.static_w[rows] + dyn_j / safe > self.limit_w[rows])

    def branches(self, batch, context_sum, shared):
        """Decode passes at ``(batch, context_sum)`` without a power limit, as affine branches.

        Returns ``(f0, f1, e0, e1)``: pass ``k`` of a run takes ``f0 + f1*k``
        seconds and ``e0 + e1*k`` dynamic joules per GPU.
        """
        n = self.n
        b2 = np.concatenate([batch, batch])
        x = np.concatenate([context_sum, context_sum + batch])
        hbm = x - np.concatenate([shared, shared])
        cost = _forward(self.c_free2, b2, x, x, b2, hbm)
        e_dyn = cost.dynamic_energy_j / np.concatenate([self.gpus, self.gpus])
        f0, e0 = cost.time_s[:n], e_dyn[:n]
        return f0, cost.time_s[n:] - f0, e0, e_dyn[n:] - e0

    def mixed_rows(self, rows, tokens, kv_read, pairs, sequences, kv_hbm):
        """One pass with a prefill chunk for each scenario in ``rows``, exact.

        Returns ``(time_s, energy_j, power_w)`` aligned with ``rows`` (all GPUs).
        """
        c_free = dataclasses.replace(self.columns.stack(self.option[rows]), power_limit_w=np.inf)
        cost = _forward(c_free, tokens, kv_read, pairs, sequences, kv_hbm, prefill=True)
        gpus, static = self.gpus[rows], self.static_w[rows]
        t = cost.time_s.copy()
        e = cost.dynamic_energy_j / gpus
        over = np.flatnonzero(self._over(t, e, rows) & (tokens > 0))
        if over.size:
            t[over], e[over] = self._exact(
                rows[over],
                tokens[over],
                kv_read[over],
                pairs[over],
                sequences[over],
                kv_hbm[over],
                prefill=True,
            )
        energy = gpus * (static * t + e)
        power = np.divide(energy, t, out=np.zeros_like(t), where=t > 0)
        return t, energy, power

    def run(self, branches, n_steps, batch, context_sum, shared):
        """Totals of ``n_steps`` decode passes: ``(time_s, energy_j, peak_power_w)``, all GPUs."""
        f0, f1, e0, e1 = branches
        n = np.asarray(n_steps, dtype=float)
        tri = n * (n - 1.0) / 2.0
        time = n * f0 + f1 * tri
        e_dyn = n * e0 + e1 * tri
        last = np.maximum(n - 1.0, 0.0)
        p_first = self._power(f0, e0)
        p_last = self._power(f0 + f1 * last, e0 + e1 * last)
        peak = np.where(n > 0, np.maximum(p_first, p_last), 0.0)
        over_first = (n > 0) & (p_first > self.limit_w)
        over_last = (n > 0) & (p_last > self.limit_w)
        rows = np.flatnonzero(over_first | over_last)
        if rows.size:
            dt, de, limited_peak = self._limited_part(
                rows,
                f0[rows],
                f1[rows],
                e0[rows],
                e1[rows],
                n[rows],
                over_first[rows],
                over_last[rows],
                batch[rows],
                context_sum[rows],
                shared[rows],
            )
            time[rows] += dt
            e_dyn[rows] += de
            # the unlimited side's peak is at its end away from the limited range
            p_free = np.where(
                over_first[rows] & over_last[rows],
                0.0,
                np.where(over_first[rows], p_last[rows], p_first[rows]),
            )
            peak[rows] = np.maximum(limited_peak, p_free)
        energy = self.gpus * (self.static_w * time + e_dyn)
        return time, energy, peak * self.gpus

    def _power(self, t, e):
        """Unlimited pass power per GPU: ``P_static + E_dyn / t`` [W]."""
        return self.static_w + np.divide(e, t, out=np.zeros_like(t), where=t > 0)

    def _limited_part(self, rows, f0, f1, e0, e1, n, first, last, batch, ctx, shared):
        """Correction (time, dynamic energy per GPU, peak) for the power-limited end of runs.

        The unlimited power ``P_static + (e0 + e1 k) / (f0 + f1 k)`` crosses the
        limit ``L`` once, at ``k* = ((L - P_static) f0 - e0) / (e1 - (L - P_static) f1)``;
        passes on the limited side are replaced by ``forward_pass`` with the limit.
        """
        head = self.limit_w[rows] - self.static_w[rows]
        with np.errstate(divide="ignore", invalid="ignore"):
            k_star = (head * f0 - e0) / (e1 - head * f1)
        k_star = np.where(np.isfinite(k_star), k_star, np.where(first, n, 0.0))
        # limited passes: all if both ends are over; else [0, cut) or [cut, n)
        cut = np.clip(np.floor(k_star) + 1.0, 0.0, n)
        lo = np.where(first, 0.0, np.minimum(cut, n - 1.0))
        hi = np.where(first & ~last, np.clip(cut, 1.0, n), n)
        m = hi - lo
        # remove the unlimited sums over [lo, hi)
        s1 = m * (lo + hi - 1.0) / 2.0
        dt = -(m * f0 + f1 * s1)
        de = -(m * e0 + e1 * s1)
        # add forward_pass with the limit: pass by pass for short ranges, else quadrature
        short = m <= _EXACT_PASSES
        k_nodes = np.where(
            short[:, None],
            lo[:, None] + np.arange(_EXACT_PASSES)[None, :],
            (lo + hi - 1.0)[:, None] / 2.0 + (m[:, None] / 2.0) * _GAUSS_NODES_PADDED[None, :],
        )
        weights = np.where(
            short[:, None],
            (np.arange(_EXACT_PASSES)[None, :] < m[:, None]).astype(float),
            (m[:, None] / 2.0) * _GAUSS_WEIGHTS_PADDED[None, :],
        )
        # the range's end passes too (weight 0), for the peak power
        k_nodes = np.concatenate([k_nodes, lo[:, None], (hi - 1.0)[:, None]], axis=1)
        weights = np.concatenate([weights, np.zeros((rows.size, 2))], axis=1)
        width = k_nodes.shape[1]
        flat_rows = np.repeat(rows, width)
        b = np.repeat(batch, width)
        x = (ctx[:, None] + k_nodes * batch[:, None]).ravel()
        t, e = self._exact(flat_rows, b, x, x, b, x - np.repeat(shared, width))
        t, e = t.reshape(-1, width), e.reshape(-1, width)
        dt += (weights * t).sum(axis=1)
        de += (weights * e).sum(axis=1)
        power = self.static_w[rows] + (e[:, -2:] / t[:, -2:]).max(axis=1)
        return dt, de, power

    def passes_until(self, branches, delta):
        """Fewest decode passes (>= 1) after which ``delta`` seconds have surely passed.

        Solved on the unlimited times (a power limit only lengthens passes), so
        an arrival during a power-limited run is admitted at most a few passes late.
        """
        f0, f1, _, _ = branches
        return passes_until(f0, f1, delta)


_GAUSS_NODES_PADDED = np.concatenate([_GAUSS_NODES, np.zeros(_EXACT_PASSES - _GAUSS_NODES.size)])
_GAUSS_WEIGHTS_PADDED = np.concatenate(
    [_GAUSS_WEIGHTS, np.zeros(_EXACT_PASSES - _GAUSS_WEIGHTS.size)]
)


def decode_run(c: PassCoefficients, batch, context_sum, n_steps, shared_tokens=0.0):
    """Cost of ``n_steps`` decode passes of ``batch`` sequences with context sum ``context_sum``.

    Pass ``k`` (0-based) has ``tokens = b`` and ``kv_read = pairs = X + k*b``, of
    which ``shared_tokens`` are a shared prompt prefix re-read from L2.  Returns
    ``(time_s, energy_j, peak_power_w)`` (all GPUs): the sum of
    :func:`forward_pass` over the passes (tested).
    """
    b = np.atleast_1d(np.asarray(batch, dtype=float))
    model = PassModel([c], np.zeros(b.size, dtype=int))
    x0 = np.broadcast_to(np.asarray(context_sum, dtype=float), b.shape).copy()
    sh = np.broadcast_to(np.asarray(shared_tokens, dtype=float), b.shape).copy()
    steps = np.broadcast_to(np.asarray(n_steps, dtype=float), b.shape)
    return model.run(model.branches(b, x0, sh), steps, b, x0, sh)


def passes_until(d0, d1, delta) -> np.ndarray:
    """Smallest integer ``k >= 1`` with ``sum_{j<k} (d0 + d1*j) >= delta`` (``d1 >= 0``).

    Solves ``d1/2 k^2 + (d0 - d1/2) k - delta = 0`` in its cancellation-free form.
    """
    d0, d1, delta = (np.asarray(v, dtype=float) for v in (d0, d1, delta))
    a = d0 - d1 / 2.0
    with np.errstate(divide="ignore", invalid="ignore"):
        k = 2.0 * delta / (a + np.sqrt(a * a + 2.0 * d1 * np.maximum(delta, 0.0)))
    k = np.where(np.isfinite(k) & (k >= 0), k, np.inf)
    return np.maximum(np.ceil(k - 1e-9), 1.0)


# --------------------------------------------------------------------------- helpers


class _RowSearch:
    """``searchsorted`` on every row of a ``(S, m)`` array with non-decreasing rows, vectorised.

    Rows are laid end to end with offsets so one ``np.searchsorted`` answers all.
    """

    def __init__(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=float)
        s, m = rows.shape
        self.lo = float(rows.min())
        self.hi = float(rows.max())
        span = self.hi - self.lo + 1.0
        self.offset = np.arange(s) * span
        self.flat = ((rows - self.lo) + self.offset[:, None]).ravel()
        self.base = np.arange(s) * m

    def __call__(self, values, side: str = "right", rows=slice(None)) -> np.ndarray:
        v = np.clip(np.asarray(values, dtype=float), self.lo - 0.5, self.hi + 0.5)
        found = np.searchsorted(self.flat, (v - self.lo) + self.offset[rows], side=side)
        return found - self.base[rows]


def _prefix(values: np.ndarray) -> np.ndarray:
    """Prefix sums along the last axis with a leading 0: ``out[..., j] = sum(values[..., :j])``."""
    out = np.zeros(values.shape[:-1] + (values.shape[-1] + 1,))
    np.cumsum(values, axis=-1, out=out[..., 1:])
    return out


def _next_distinct(offsets: np.ndarray) -> np.ndarray:
    """``nxt[..., m]``: index of the first sorted offset larger than ``offsets[..., m]``."""
    n = offsets.shape[-1]
    nxt = np.empty(offsets.shape, dtype=np.int64)
    nxt[..., n - 1] = n
    for m in range(n - 2, -1, -1):
        nxt[..., m] = np.where(offsets[..., m + 1] > offsets[..., m], m + 1, nxt[..., m + 1])
    return nxt


def _ranges(lo: np.ndarray, hi: np.ndarray):
    """Rows and values of the integer ranges ``[lo[s], hi[s])`` concatenated over ``s``."""
    count = np.maximum(hi - lo, 0)
    rows = np.repeat(np.arange(lo.size), count)
    start = np.repeat(np.cumsum(count) - count, count)
    values = np.arange(rows.size) - start + np.repeat(lo, count)
    return rows, values


# --------------------------------------------------------------------------- simulation


class _Tables:
    """Per-query tables of ``S`` streams, prefix-summed so a range of queries costs two lookups."""

    def __init__(self, stream: QueryStream, prefix_cache: bool) -> None:
        s_count, n = stream.arrival_s.shape
        samples = stream.samples_per_query
        self.rows = np.arange(s_count)
        self.arrival = np.asarray(stream.arrival_s, dtype=float)
        self.prompt = np.broadcast_to(np.asarray(stream.prompt_tokens, dtype=float), (s_count, n))
        lengths = np.broadcast_to(
            np.asarray(stream.output_tokens, dtype=float), (s_count, n, samples)
        )
        copies = 1.0 if prefix_cache else float(samples)
        self.copies = copies
        self.prefill = self.prompt * copies
        self.cum_prefill = _prefix(self.prefill)
        self.cum_pairs = _prefix(copies * self.prompt * (self.prompt + 1.0) / 2.0)
        self.offsets = np.sort(np.maximum(lengths - 1.0, 0.0), axis=2)  # decode passes
        self.nxt = _next_distinct(self.offsets)
        self.n_zero = (self.offsets == 0).sum(axis=2)
        self.n_pos = samples - self.n_zero
        self.cum_pos = _prefix(self.n_pos.astype(float))
        self.cum_join_ctx = _prefix(self.n_pos * (self.prompt + 1.0))
        # prompt KV re-read from L2 by the other samples of a query (prefix caching)
        shared = np.maximum(self.n_pos - 1, 0) * self.prompt if prefix_cache else 0 * self.prompt
        self.cum_join_shared = _prefix(shared)
        self.prefix_cache = prefix_cache
        self.cum_zero = _prefix(self.n_zero.astype(float))
        immediate = (self.n_pos == 0).astype(float)
        self.cum_imm = _prefix(immediate)
        self.cum_imm_prefill = _prefix(immediate * self.prefill)
        self.cum_foot = _prefix(self.prefill + lengths.sum(axis=2))
        self.longest = self.offsets[:, :, -1]
        self.tokens = lengths.sum(axis=2)
        self.find_arrival = _RowSearch(self.arrival)
        self.find_prefill_done = _RowSearch(self.cum_prefill[:, 1:])
        self.find_prefill_pos = _RowSearch(self.cum_prefill)
        self.find_foot = _RowSearch(self.cum_foot)
        self.padded_prompt = np.concatenate([self.prompt, np.ones((s_count, 1))], axis=1)

    def pairs_before(self, pos, rows):
        """Prefill position ``pos`` (global prompt order): ``(pairs, offset, copy)``.

        ``pairs``: causal pairs of the first ``pos`` prefill tokens; ``offset``:
        ``pos``'s position inside its prompt copy (cached tokens before it);
        ``copy``: the global index of that prompt copy.
        """
        n = self.prompt.shape[1]
        j = np.minimum(self.find_prefill_pos(pos, "right", rows) - 1, n)
        u = pos - self.cum_prefill[rows, j]
        p = self.padded_prompt[rows, j]
        whole, r = np.floor(u / p), np.mod(u, p)
        pairs = self.cum_pairs[rows, j] + whole * p * (p + 1.0) / 2.0 + r * (r + 1.0) / 2.0
        return pairs, r, j * self.copies + whole


def simulate(
    coefficients: Sequence[PassCoefficients],
    option: np.ndarray,
    stream: QueryStream,
    scheduler: Scheduler,
    limits: ReplicaLimits,
    warmup_queries: int | None = None,
    tail_queries: int | None = None,
    abandon_queue: int | None = None,
) -> ServingStats:
    """Simulate ``S`` replicas (scenario ``s`` runs option ``option[s]``) on their query streams.

    ``coefficients[i]`` and the entries ``[i]`` of ``limits`` describe option ``i``.
    Every query must fit alone (``N <= max_batch`` and its KV footprint within
    the capacity); callers check that first (:func:`query_fits`).  Queries
    ``warmup_queries .. n - tail_queries - 1`` are measured (defaults:
    :data:`WARMUP_FRACTION` and :data:`TAIL_FRACTION` of ``n``); energy and power
    over the window from the first measured arrival to the first arrival after them.

    ``abandon_queue``: a scenario whose queue of arrived, unadmitted queries
    exceeds this is overloaded beyond doubt and stops there (its latencies are
    ``inf``, its energy and power ``NaN`` and its ``backlog_growth`` 1); default
    ``max(64, measured / 2)``.
    """
    option = np.asarray(option, dtype=int)
    s_count, n = stream.arrival_s.shape
    if option.shape != (s_count,):
        raise ValueError("option needs one entry per scenario")
    first = int(WARMUP_FRACTION * n) if warmup_queries is None else int(warmup_queries)
    tail = int(TAIL_FRACTION * n) if tail_queries is None else int(tail_queries)
    last = n - max(tail, 1)
    if not 0 <= first < last:
        raise ValueError(f"nothing to measure: {n} queries, warm-up {first}, tail {tail}")
    if abandon_queue is None:
        abandon_queue = max(64, (last - first) // 2)
    abandoned = np.zeros(s_count, dtype=bool)
    samples = stream.samples_per_query
    model = PassModel(coefficients, option)
    tab = _Tables(stream, scheduler.prefix_cache)
    rows = tab.rows
    kv_cap = np.asarray(limits.kv_capacity_tokens, dtype=float)[option]
    extra_t = np.asarray(limits.extra_time_s, dtype=float)[option]
    extra_e = np.asarray(limits.extra_energy_j, dtype=float)[option]
    has_extra = bool(np.any(extra_t > 0) or np.any(extra_e > 0))
    idle_w = model.gpus * np.asarray(model.c.idle_power_w, dtype=float)
    budget = float(scheduler.chunk_tokens)

    t = np.zeros(s_count)
    it = np.zeros(s_count)
    energy = np.zeros(s_count)
    busy = np.zeros(s_count)
    batch_time = np.zeros(s_count)
    generated = np.zeros(s_count)  # output tokens produced so far
    n_arr = np.zeros(s_count, dtype=np.int64)  # arrived by time t
    n_adm = np.zeros(s_count, dtype=np.int64)  # admitted (prefill queued or done)
    n_pref = np.zeros(s_count, dtype=np.int64)  # prefill finished
    n_done = np.zeros(s_count, dtype=np.int64)  # finished
    done_pos = np.zeros(s_count)  # prefill tokens done, in global prompt order
    pairs_done = np.zeros(s_count)  # causal pairs of those tokens
    offset_done = np.zeros(s_count)  # position of done_pos inside its prompt (cached tokens)
    copy_done = np.zeros(s_count)  # index of the prompt copy done_pos is in
    shared = np.zeros(s_count)  # decode KV tokens re-read from L2 (shared prompts)
    b = np.zeros(s_count)  # decoding sequences
    ctx = np.zeros(s_count)  # their contexts at the next pass, summed
    seq_res = np.zeros(s_count)  # sequences reserved by admitted queries
    kv_res = np.zeros(s_count)  # KV tokens reserved by admitted queries

    # In-flight queries (prefill done, samples decoding), one slot each.
    width_max = scheduler.max_batch
    slot_q = np.full((s_count, width_max), -1, dtype=np.int64)
    slot_k0 = np.zeros((s_count, width_max))
    slot_m = np.zeros((s_count, width_max), dtype=np.int64)
    slot_next = np.full((s_count, width_max), np.inf)
    next_dep = np.full(s_count, np.inf)  # min of slot_next per row
    # free slots per row as a stack (lowest index on top), so placing never scans
    free_stack = np.tile(np.arange(width_max - 1, -1, -1), (s_count, 1))
    free_top = np.full(s_count, width_max)
    width = 1

    keys = ("t", "t_pre", "it", "adm", "pref", "e", "busy", "bt", "peak", "gen", "done")
    hist: dict[str, list] = {k: [] for k in keys}
    max_steps = MAX_STEPS_PER_QUERY * n * max(samples, 1) + 100
    zeros = np.zeros(s_count)
    steps = 0
    while True:
        active = n_done < n
        if not active.any():
            break
        steps += 1
        if steps > max_steps:
            raise RuntimeError("serving simulation did not finish (bug)")
        outstanding = tab.cum_prefill[rows, n_adm] - done_pos
        mixed = outstanding > 0
        dec = ~mixed & (b > 0)
        idle = active & ~mixed & ~dec

        # A mixed pass: decode tokens plus a prefill chunk (rows with prompts waiting).
        chunk = zeros.copy()
        cached = zeros.copy()
        chunk_pairs = zeros.copy()
        prompts = zeros.copy()  # prompt copies (sequences) the chunk touches
        mrows = np.flatnonzero(mixed)
        fused = scheduler.fused_prefill
        if mrows.size:
            room = budget - (b[mrows] if fused else 0.0)
            chunk[mrows] = np.minimum(room, outstanding[mrows])
            pos1 = done_pos[mrows] + chunk[mrows]
            g1, r1, c1 = tab.pairs_before(pos1, mrows)
            _, _, c_last = tab.pairs_before(pos1 - 0.5, mrows)
            chunk_pairs[mrows] = g1 - pairs_done[mrows]
            cached[mrows] = offset_done[mrows]
            prompts[mrows] = c_last - copy_done[mrows] + 1.0
            pairs_done[mrows] = g1
            offset_done[mrows] = r1
            copy_done[mrows] = c1
            riding = b[mrows] if fused else 0.0  # decode sequences in the prefill pass
            riding_ctx = ctx[mrows] if fused else 0.0
            riding_hbm = (ctx[mrows] - shared[mrows]) if fused else 0.0
            m_time, m_energy, m_power = (zeros.copy() for _ in range(3))
            m_time[mrows], m_energy[mrows], m_power[mrows] = model.mixed_rows(
                mrows,
                riding + chunk[mrows],
                riding_ctx + cached[mrows],
                riding_ctx + chunk_pairs[mrows],
                riding + prompts[mrows],
                riding_hbm + cached[mrows],
            )
        else:
            m_time = m_energy = m_power = zeros
        branches = model.branches(b, ctx, shared)

        # A decode run: until the next departure, or the pass in which the next arrival lands.
        has_next = n_arr < n
        gap = tab.arrival[rows, np.minimum(n_arr, n - 1)] - t
        k = np.where(has_next & (n_arr == n_adm), model.passes_until(branches, gap), np.inf)
        k = np.where(dec, np.minimum(next_dep - it, k), 0.0)
        r_time, r_energy, r_peak = model.run(branches, k, b, ctx, shared)

        idle_gap = np.where(idle & has_next, np.maximum(gap, 0.0), 0.0)
        dt = np.where(mixed, m_time, np.where(dec, r_time, idle_gap))
        t = t + dt
        energy = energy + np.where(mixed, m_energy, np.where(dec, r_energy, idle_w * idle_gap))
        busy = busy + np.where(idle, 0.0, dt)
        dit = np.where(mixed, 1.0 if scheduler.fused_prefill else 0.0, k)
        batch_time = batch_time + np.where(dit > 0, b * dt, 0.0)
        it = it + dit
        ctx = ctx + b * dit
        generated = generated + b * dit
        done_pos = done_pos + chunk
        peak = np.where(mixed, m_power, np.where(dec, r_peak, idle_w))
        done_before = n_done.copy()

        # Departures: slots whose next departure is the pass just run.
        drows = np.flatnonzero(next_dep == it)
        if drows.size:
            sub_r, hit_c = np.nonzero(slot_next[drows, :width] == it[drows, None])
            hit_r = drows[sub_r]
            q = slot_q[hit_r, hit_c]
            m = slot_m[hit_r, hit_c]
            m2 = tab.nxt[hit_r, q, m]
            if tab.prefix_cache:
                before = np.maximum(samples - m - 1, 0)
                after = np.maximum(samples - m2 - 1, 0)
                shared += np.bincount(hit_r, (after - before) * tab.prompt[hit_r, q], s_count)
            cnt = (m2 - m).astype(float)
            o = tab.offsets[hit_r, q, m]
            b -= np.bincount(hit_r, cnt, s_count)
            ctx -= np.bincount(hit_r, cnt * (tab.prompt[hit_r, q] + o + 1.0), s_count)
            seq_res -= np.bincount(hit_r, cnt, s_count)
            fin = m2 >= samples
            kv_release = cnt * (o + 1.0) + np.where(fin, tab.prefill[hit_r, q], 0.0)
            kv_res -= np.bincount(hit_r, kv_release, s_count)
            n_done += np.bincount(hit_r[fin], minlength=s_count)
            slot_m[hit_r, hit_c] = m2
            nxt_off = tab.offsets[hit_r, q, np.minimum(m2, samples - 1)]
            slot_next[hit_r, hit_c] = np.where(fin, np.inf, slot_k0[hit_r, hit_c] + nxt_off)
            fr, fc = hit_r[fin], hit_c[fin]
            slot_q[fr, fc] = -1
            if fr.size:  # push the freed slots (fr is sorted)
                rank = np.arange(fr.size) - np.searchsorted(fr, fr)
                free_stack[fr, free_top[fr] + rank] = fc
                free_top += np.bincount(fr, minlength=s_count)
            next_dep[drows] = slot_next[drows, :width].min(axis=1)

        # Prefill completions: their samples join the batch (or finish at once if L = 1).
        if mrows.size:
            new_pref = n_pref.copy()
            new_pref[mrows] = tab.find_prefill_done(done_pos[mrows], "right", mrows)
            lo, hi = n_pref, new_pref
            generated += samples * (hi - lo)
            b += tab.cum_pos[rows, hi] - tab.cum_pos[rows, lo]
            ctx += tab.cum_join_ctx[rows, hi] - tab.cum_join_ctx[rows, lo]
            shared += tab.cum_join_shared[rows, hi] - tab.cum_join_shared[rows, lo]
            zero = tab.cum_zero[rows, hi] - tab.cum_zero[rows, lo]
            seq_res -= zero
            kv_res -= zero + tab.cum_imm_prefill[rows, hi] - tab.cum_imm_prefill[rows, lo]
            n_done += (tab.cum_imm[rows, hi] - tab.cum_imm[rows, lo]).astype(np.int64)
            jr, jq = _ranges(lo, hi)
            keep = tab.n_pos[jr, jq] > 0
            jr, jq = jr[keep], jq[keep]
            if jr.size:  # pop free slots (jr is sorted)
                rank = np.arange(jr.size) - np.searchsorted(jr, jr)
                col = free_stack[jr, free_top[jr] - 1 - rank]
                free_top -= np.bincount(jr, minlength=s_count)
                m0 = tab.n_zero[jr, jq]
                slot_q[jr, col] = jq
                slot_k0[jr, col] = it[jr]
                slot_m[jr, col] = m0
                first_dep = it[jr] + tab.offsets[jr, jq, m0]
                slot_next[jr, col] = first_dep
                np.minimum.at(next_dep, jr, first_dep)
                width = max(width, int(col.max()) + 1)
            n_pref = new_pref

        # Serial extra phases (reward scoring) after each finished query.
        t_pre = t
        if has_extra:
            finished = (n_done - done_before).astype(float)
            t = t + finished * extra_t
            energy = energy + finished * extra_e
            busy = busy + finished * extra_t

        # Admission (FCFS) of arrived queries that fit the sequence and KV limits.
        n_arr = tab.find_arrival(t, "right")
        can_seq = np.floor((scheduler.max_batch - seq_res) / samples + 1e-9).astype(np.int64)
        free_kv = tab.cum_foot[rows, n_adm] + (kv_cap - kv_res)
        can_kv = tab.find_foot(free_kv, "right") - 1 - n_adm
        admit = np.maximum(np.minimum(np.minimum(n_arr - n_adm, can_seq), can_kv), 0)
        seq_res += admit * samples
        kv_res += tab.cum_foot[rows, n_adm + admit] - tab.cum_foot[rows, n_adm]
        n_adm = n_adm + admit

        # Hopelessly overloaded scenarios stop: their rows go quiet.
        over = active & ~abandoned & (n_arr - n_adm > abandon_queue)
        if over.any():
            abandoned |= over
            n_done[over] = n
            b[over] = 0.0
            ctx[over] = 0.0
            done_pos[over] = tab.cum_prefill[over, n_adm[over]]
            slot_next[over] = np.inf
            next_dep[over] = np.inf

        values = (t, t_pre, it, n_adm, n_pref, energy, busy, batch_time, peak, generated, n_done)
        for key, value in zip(keys, values, strict=True):
            hist[key].append(value.copy())

    return _summarise(hist, steps, tab, first, last, abandoned)


def _summarise(hist, steps, tab: _Tables, first: int, last: int, abandoned) -> ServingStats:
    """Per-query latencies of queries ``first .. last-1`` and averages over their arrival window."""
    h = {k: np.stack(v, axis=0) for k, v in hist.items()}  # (steps, S)
    arrival = tab.arrival
    s_count = arrival.shape[0]
    measured = np.arange(first, last)
    shape = (s_count, measured.size)
    ttft, tpot, e2e, queue = (np.empty(shape) for _ in range(4))
    names = ("rate", "epq", "power", "peak", "util", "mb", "bb", "tps", "ept", "growth")
    stats = {k: np.empty(s_count) for k in names}
    for s in range(s_count):
        if abandoned[s]:
            for field in (ttft, tpot, e2e, queue):
                field[s] = np.inf
            for k in stats:
                stats[k][s] = np.nan
            stats["growth"][s] = 1.0
            continue
        t_col, it_col = h["t"][:, s], h["it"][:, s]
        a = arrival[s, measured]
        adm_step = np.searchsorted(h["adm"][:, s], measured, side="right")
        pref_step = np.searchsorted(h["pref"][:, s], measured, side="right")
        k0 = it_col[pref_step]
        t_first = t_col[pref_step]
        longest = tab.longest[s, measured]
        done_step = np.searchsorted(it_col, k0 + longest, side="left")
        queue[s] = t_col[adm_step] - a
        ttft[s] = t_first - a
        e2e[s] = t_col[done_step] - a
        with np.errstate(divide="ignore", invalid="ignore"):
            tpot[s] = np.where(longest > 0, (h["t_pre"][done_step, s] - t_first) / longest, np.nan)
        t0, t1 = arrival[s, first], arrival[s, last]
        tt = np.concatenate([[0.0], t_col])

        def window(key, tt=tt, s=s, t0=t0, t1=t1):
            series = np.concatenate([[0.0], h[key][:, s]])
            return float(np.interp(t1, tt, series) - np.interp(t0, tt, series))

        span = max(t1 - t0, 1e-12)
        e_win, busy_win, bt_win = window("e"), window("busy"), window("bt")
        gen_win = window("gen")
        # queries in the system (arrived, unfinished) at the window's ends
        done_at = np.searchsorted(t_col, [t0, t1], side="right") - 1
        done = np.where(done_at >= 0, h["done"][np.maximum(done_at, 0), s], 0)
        in_system = np.array([first, last]) - done
        stats["growth"][s] = (in_system[1] - in_system[0]) / (last - first)
        stats["tps"][s] = gen_win / span
        stats["ept"][s] = e_win / gen_win if gen_win > 0 else np.nan
        stats["rate"][s] = (last - first) / span
        stats["epq"][s] = e_win / (last - first)
        stats["power"][s] = e_win / span
        stats["util"][s] = busy_win / span
        stats["mb"][s] = bt_win / span
        stats["bb"][s] = bt_win / busy_win if busy_win > 0 else 0.0
        t_prev = np.concatenate([[0.0], t_col[:-1]])
        in_win = (t_col >= t0) & (t_prev <= t1)
        stats["peak"][s] = h["peak"][in_win, s].max() if in_win.any() else 0.0
    return ServingStats(
        arrival_rate_qps=stats["rate"],
        energy_per_query_j=stats["epq"],
        avg_power_w=stats["power"],
        peak_power_w=stats["peak"],
        utilization=stats["util"],
        mean_batch=stats["mb"],
        busy_batch=stats["bb"],
        output_tokens_per_s=stats["tps"],
        energy_per_output_token_j=stats["ept"],
        backlog_growth=stats["growth"],
        ttft_s=ttft,
        tpot_s=tpot,
        e2e_s=e2e,
        queue_s=queue,
        output_tokens=np.array(tab.tokens[:, measured], dtype=float),
        steps=steps,
    )


# --------------------------------------------------------------------------- streams


def poisson_stream(
    rates_qps: np.ndarray,
    prompt_tokens: np.ndarray,
    output_tokens: np.ndarray,
    unit_arrivals: np.ndarray,
) -> QueryStream:
    """Poisson arrivals at ``rates_qps[s]`` sharing one unit-rate stream (common random numbers).

    ``unit_arrivals`` are cumulative ``Exp(1)`` gaps (:func:`unit_poisson_arrivals`);
    scenario ``s`` sees them divided by its rate.  ``prompt_tokens`` ``(n,)`` and
    ``output_tokens`` ``(n, N)`` are shared.
    """
    rates = np.asarray(rates_qps, dtype=float)
    if np.any(~(rates > 0)):
        raise ValueError("rates must be positive")
    return QueryStream(
        arrival_s=unit_arrivals[None, :] / rates[:, None],
        prompt_tokens=np.asarray(prompt_tokens, dtype=float)[None, :],
        output_tokens=np.asarray(output_tokens, dtype=float)[None, :, :],
    )


def unit_poisson_arrivals(rng: np.random.Generator, n: int) -> np.ndarray:
    """Arrival times of a rate-1 Poisson process: cumulative sums of ``Exp(1)`` gaps."""
    return np.cumsum(rng.exponential(1.0, n))


def query_fits(
    samples: int,
    max_footprint_tokens: float,
    scheduler: Scheduler,
    kv_capacity_tokens: float,
) -> str | None:
    """Why one query alone cannot be served (``None`` if it can)."""
    if samples > scheduler.max_batch:
        return f"a query's {samples} samples exceed --max-batch {scheduler.max_batch}"
    if max_footprint_tokens > kv_capacity_tokens:
        return (
            f"KV cache holds {kv_capacity_tokens:,.0f} tokens; the largest query needs "
            f"{max_footprint_tokens:,.0f}"
        )
    return None
