"""Vectorised sweeps: every combination of a grid of scenarios, a million per second.

A *grid* (YAML or a mapping, format in ``docs/SWEEP.md``) lists values per
axis; its scenarios are the Cartesian product, enumerated lazily in a fixed
order (:data:`GROUP_AXES` outermost, then :data:`INNER_AXES`, the last axis
varying fastest).  Scenarios that share a deployment -- hardware, model,
dtypes, tensor parallelism and reward model -- form a *group*: their
:class:`~ttcsim.simulator.coefficients.PassCoefficients` are scalars, and
everything else (prompt and output tokens, samples ``N``, concurrency ``Q``,
prefix caching) is a numpy axis.

Each result row equals :func:`ttcsim.predict.predict` (with
``percentiles=False``) for that scenario **bit for bit**: the kernels below call
the same pure functions of :mod:`ttcsim.simulator` (``forward_pass``,
``segment_cost``, ``causal_pairs``, ``average_power_w``) with arrays, and evaluate
every expression in the same order as the scalar path.  Two places need care:

* ``numpy.mean`` / ``numpy.sum`` over ``Q`` (or ``Q*N``) equal values use
  numpy's pairwise summation; :func:`repeat_sum` reproduces it elementwise.
* The exact expectation over a random length is the core's
  :func:`~ttcsim.simulator.expectation.expected_decode_totals`, which takes an
  array of prompt lengths and gives each the bits it gives alone; its
  deployment-independent part (per distribution, ``Q*N`` and ``N``) is built
  once per grid.

Strategies other than ``single``/``cot``, ``vote<N>`` and ``bon<N>``, and
explicit length lists, are evaluated by calling ``predict()`` per scenario
(the *slow path*); a :class:`SlowPathWarning` says so.

Memory stays bounded: scenarios are evaluated ``chunk_rows`` at a time.
"""

from __future__ import annotations

import inspect
import math
import os
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from ttcsim.deployment import dtype_problem, tensor_parallel_problem
from ttcsim.distributions import LengthList, parse_lengths
from ttcsim.engines import EngineProfile, get_engine
from ttcsim.errors import DoesNotFitError, TtcsimError
from ttcsim.hardware import HardwareProfile, get_profile
from ttcsim.models import ModelSpec, get_model
from ttcsim.simulator.coefficients import (
    ACTIVATION_BYTES,
    PassCoefficients,
    attention_pairs,
    context_read_tokens,
    kv_cache_tokens,
    pass_coefficients,
)
from ttcsim.simulator.decode import segment_cost
from ttcsim.simulator.expectation import (
    decode_expectation,
    expected_decode_totals,
)
from ttcsim.simulator.phases import decode_peak_power_w, length_extremes
from ttcsim.simulator.power import average_power_w
from ttcsim.simulator.roofline import forward_pass
from ttcsim.strategies import BestOfN, Single, Strategy, Vote, parse_strategy
from ttcsim.uncertainty import interval, profile_band
from ttcsim.units import DTYPE_BYTES, JOULES_PER_KWH

#: Deployment axes: one set of pass coefficients per combination.
GROUP_AXES = ("hw", "model", "weight_dtype", "kv_dtype", "tp", "reward_model", "engine")
#: Scenario axes evaluated as numpy arrays within a group (last varies fastest).
INNER_AXES = ("strategy", "output_tokens", "prefix_cache", "concurrency", "prompt_tokens")
#: Settings that are one value for the whole grid.
SCALAR_KEYS = ("pue", "carbon_g_per_kwh", "usd_per_kwh")
#: What-if board power limits [W]: each expands every ``hw`` value into a capped
#: profile (``HardwareProfile.with_power_limit``; label ``<name>-pl<W>w``).
CAP_KEY = "power_limit_w"
#: Rows evaluated at a time (bounds memory: about 1 kB per row in flight).
DEFAULT_CHUNK_ROWS = 1 << 17

_NUMERIC_LIMITS = {
    "prompt_tokens": (1, 10_000_000, "--prompt-tokens"),
    "concurrency": (1, 1_000_000, "--concurrency"),
    "tp": (1, 64, "--tp"),
}


class SlowPathWarning(UserWarning):
    """Some scenarios are evaluated by calling ``predict()`` one at a time."""


# ---------------------------------------------------------------------------
# Grid format
# ---------------------------------------------------------------------------


def _predict_defaults() -> dict:
    from ttcsim.predict import predict

    params = inspect.signature(predict).parameters
    return {name: params[name].default for name in GROUP_AXES + INNER_AXES + SCALAR_KEYS}


def _expand_range(spec: Mapping, where: str) -> list[int]:
    """Whole numbers of a range mapping; ``stop`` is inclusive.

    ``{start, stop, step}`` is arithmetic, ``{start, stop, factor}`` geometric
    (rounded, duplicates dropped), ``{start, stop, num[, log]}`` ``num`` points
    evenly (or log-evenly) spaced, rounded.
    """
    allowed = {"start", "stop", "step", "factor", "num", "log"}
    unknown = set(spec) - allowed
    if unknown:
        raise TtcsimError(
            f"unknown range key(s) {sorted(unknown)}; valid: {sorted(allowed)}", where
        )
    if "start" not in spec or "stop" not in spec:
        raise TtcsimError("a range needs start and stop", where)
    start, stop = _whole(spec["start"], where), _whole(spec["stop"], where)
    if stop < start:
        raise TtcsimError(f"stop {stop} is below start {start}", where)
    kinds = [k for k in ("step", "factor", "num") if k in spec]
    if len(kinds) != 1:
        raise TtcsimError("a range needs exactly one of step, factor or num", where)
    if "step" in spec:
        step = _whole(spec["step"], where)
        if step < 1:
            raise TtcsimError("step must be >= 1", where)
        if (stop - start) // step >= MAX_RANGE_VALUES:
            raise TtcsimError(f"a range may hold at most {MAX_RANGE_VALUES:,} values", where)
        values = list(range(start, stop + 1, step))
    elif "factor" in spec:
        factor = spec["factor"]
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not (
            math.isfinite(factor) and factor > 1
        ):
            raise TtcsimError(f"factor must be a number > 1, got {factor!r}", where)
        if start < 1:
            raise TtcsimError("a geometric range needs start >= 1", where)
        if math.log(stop / start) / math.log(factor) >= MAX_RANGE_VALUES:
            raise TtcsimError(f"a range may hold at most {MAX_RANGE_VALUES:,} values", where)
        values, v = [], float(start)
        while round(v) <= stop:
            if not values or round(v) != values[-1]:
                values.append(round(v))
            v *= factor
    else:
        num = _whole(spec["num"], where)
        if not 1 <= num <= MAX_RANGE_VALUES:
            raise TtcsimError(f"num must be between 1 and {MAX_RANGE_VALUES:,}", where)
        if spec.get("log", False):
            raw = np.geomspace(start, stop, num)
        else:
            raw = np.linspace(start, stop, num)
        values = sorted({int(round(v)) for v in raw})
    if len(values) > MAX_RANGE_VALUES:
        raise TtcsimError(f"a range may hold at most {MAX_RANGE_VALUES:,} values", where)
    return values


#: Most values one range axis may expand to.
MAX_RANGE_VALUES = 10_000_000


def _whole(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer)):
        raise TtcsimError(f"must be a whole number, got {value!r}", where)
    if isinstance(value, float) and (not math.isfinite(value) or value != int(value)):
        raise TtcsimError(f"must be a whole number, got {value!r}", where)
    return int(value)


def _as_list(value, where: str, ranges: bool = False) -> list:
    if isinstance(value, Mapping):
        if ranges:
            return _expand_range(value, where)
        raise TtcsimError("expected a value or a list of values", where)
    if isinstance(value, (list, tuple)):
        out: list = []
        for item in value:
            if ranges and isinstance(item, Mapping):
                out.extend(_expand_range(item, where))
            else:
                out.append(item)
        if not out:
            raise TtcsimError("empty list", where)
        return out
    return [value]


def _strategy_items(value, where: str) -> list[str]:
    """Strategy specs; ``{name: vote, n: [..] or {range}}`` expands to ``vote2, vote4, ...``."""
    out: list[str] = []
    for item in _as_list(value, where) if not isinstance(value, Mapping) else [value]:
        if isinstance(item, Mapping):
            if set(item) - {"name", "n"} or "name" not in item:
                raise TtcsimError("a strategy family is {name: NAME, n: counts}", where)
            counts = _as_list(item.get("n", []), where, ranges=True)
            out.extend(f"{item['name']}{_whole(n, where)}" for n in counts)
        else:
            out.append(str(item))
    return out


@dataclass(frozen=True)
class Grid:
    """A validated grid of scenarios (see the module docstring and ``docs/SWEEP.md``).

    ``axes`` maps every axis of :data:`GROUP_AXES` + :data:`INNER_AXES` to a tuple of
    resolved values; ``labels`` to the text each value has in the result table.
    """

    axes: dict
    labels: dict
    pue: float = 1.0
    carbon_g_per_kwh: float | None = None
    usd_per_kwh: float | None = None
    source: str = "grid"

    @property
    def shape(self) -> tuple[int, ...]:
        """Number of values per axis, in enumeration order."""
        return tuple(len(self.axes[a]) for a in GROUP_AXES + INNER_AXES)

    @property
    def n_scenarios(self) -> int:
        """Rows of the result table."""
        return math.prod(self.shape)

    @property
    def n_groups(self) -> int:
        """Deployments (hardware x model x dtypes x tp x reward model)."""
        return math.prod(len(self.axes[a]) for a in GROUP_AXES)

    @property
    def rows_per_group(self) -> int:
        """Scenarios per deployment."""
        return math.prod(len(self.axes[a]) for a in INNER_AXES)

    @classmethod
    def from_mapping(cls, data: Mapping, source: str = "grid") -> Grid:
        """Validate a grid mapping (parsed YAML); errors name the key."""
        if not isinstance(data, Mapping):
            raise TtcsimError("a grid must be a mapping of axis names to values", source)
        valid = GROUP_AXES + INNER_AXES + SCALAR_KEYS + (CAP_KEY,)
        aliases = {"dtype": "weight_dtype"}
        data = {aliases.get(k, k): v for k, v in data.items()}
        unknown = sorted(set(data) - set(valid))
        if unknown:
            raise TtcsimError(f"unknown key(s) {unknown}; valid: {', '.join(valid)}", source)
        defaults = _predict_defaults()
        raw = {a: data.get(a, defaults[a]) for a in GROUP_AXES + INNER_AXES}
        axes: dict = {}
        labels: dict = {}

        def where(axis: str) -> str:
            return f"{source}: {axis}"

        def resolve(axis: str, fn, value):
            """``fn(value)``, its error re-addressed from the CLI option to the grid key."""
            try:
                return fn(value)
            except TtcsimError as exc:
                message = str(exc)
                if exc.where and message.startswith(f"{exc.where}: "):
                    message = message[len(exc.where) + 2 :]
                raise TtcsimError(message, where(axis)) from None

        profiles = [resolve("hw", get_profile, v) for v in _as_list(raw["hw"], where("hw"))]
        caps = [None if v in (None, "default") else v
                for v in _as_list(data.get(CAP_KEY), where(CAP_KEY), True)]
        profiles = [p.with_power_limit(w, where(CAP_KEY)) for p in profiles for w in caps]
        axes["hw"], labels["hw"] = tuple(profiles), tuple(p.name for p in profiles)
        specs = [resolve("model", get_model, v)
                 for v in _as_list(raw["model"], where("model"))]
        axes["model"], labels["model"] = tuple(specs), tuple(s.name for s in specs)
        wdt = [str(v) for v in _as_list(raw["weight_dtype"], where("weight_dtype"))]
        for dt in wdt:
            if dt not in DTYPE_BYTES:
                raise TtcsimError(
                    f"unknown dtype {dt!r}; valid: {', '.join(DTYPE_BYTES)}", where("weight_dtype")
                )
            if dt == "fp32":
                raise TtcsimError("fp32 weights are not an inference dtype here", where("dtype"))
        axes["weight_dtype"] = labels["weight_dtype"] = tuple(wdt)
        kdt = [
            None if v in (None, "auto", "default") else str(v)
            for v in _as_list(raw["kv_dtype"], where("kv_dtype"))
        ]
        for dt in kdt:
            if dt is not None and dt not in DTYPE_BYTES:
                raise TtcsimError(
                    f"unknown dtype {dt!r}; valid: {', '.join(DTYPE_BYTES)} or auto",
                    where("kv_dtype"),
                )
        axes["kv_dtype"] = tuple(kdt)
        labels["kv_dtype"] = tuple("auto" if d is None else d for d in kdt)
        for axis in ("tp", "concurrency", "prompt_tokens"):
            lo, hi, flag = _NUMERIC_LIMITS[axis]
            values = [_whole(v, where(axis)) for v in _as_list(raw[axis], where(axis), True)]
            for v in values:
                if not lo <= v <= hi:
                    raise TtcsimError(f"must be between {lo} and {hi}, got {v}", where(axis))
            axes[axis] = tuple(values)
            labels[axis] = tuple(values)
        rms = [None if v in (None, "", "policy") else str(v) for v in _as_list(
            raw["reward_model"], where("reward_model"))]
        for rm in rms:
            if rm is not None:
                resolve("reward_model", get_model, rm)
        axes["reward_model"] = tuple(rms)
        labels["reward_model"] = tuple("" if r is None else r for r in rms)
        engines = [resolve("engine", get_engine, v)
                   for v in _as_list(raw["engine"], where("engine"))]
        axes["engine"], labels["engine"] = tuple(engines), tuple(e.name for e in engines)
        strategies = []
        for spec in _strategy_items(raw["strategy"], where("strategy")):
            strategies.append(resolve("strategy", parse_strategy, spec))
        axes["strategy"] = tuple(strategies)
        labels["strategy"] = tuple(s.spec for s in strategies)
        lengths = []
        for item in _as_list(raw["output_tokens"], where("output_tokens"), ranges=True):
            if isinstance(item, list):
                lengths.append(parse_lengths([_whole(v, where("output_tokens")) for v in item]))
            else:
                lengths.append(parse_lengths(item, where("output_tokens")))
        axes["output_tokens"] = tuple(lengths)
        labels["output_tokens"] = tuple(str(v) for v in lengths)
        prefix = _as_list(raw["prefix_cache"], where("prefix_cache"))
        for v in prefix:
            if not isinstance(v, bool):
                raise TtcsimError(f"must be true or false, got {v!r}", where("prefix_cache"))
        axes["prefix_cache"] = labels["prefix_cache"] = tuple(prefix)

        for axis in GROUP_AXES + INNER_AXES:  # one value per label (cot == single, aliases)
            keep = {}
            for value, label in zip(axes[axis], labels[axis], strict=True):
                keep.setdefault(label, value)
            labels[axis] = tuple(keep)
            axes[axis] = tuple(keep.values())
        scalars = {k: data.get(k, defaults[k]) for k in SCALAR_KEYS}
        pue = scalars["pue"]
        if isinstance(pue, bool) or not isinstance(pue, (int, float)) or not (
            math.isfinite(pue) and 1.0 <= pue <= 5.0
        ):
            raise TtcsimError(f"must be a number in [1, 5], got {pue!r}", where("pue"))
        for key in ("carbon_g_per_kwh", "usd_per_kwh"):
            v = scalars[key]
            if v is not None and (
                isinstance(v, bool)
                or not isinstance(v, (int, float))
                or not (math.isfinite(v) and v >= 0)
            ):
                raise TtcsimError(f"must be a finite number >= 0, got {v!r}", where(key))
        return cls(
            axes=axes,
            labels=labels,
            pue=float(pue),
            carbon_g_per_kwh=None if scalars["carbon_g_per_kwh"] is None else float(
                scalars["carbon_g_per_kwh"]),
            usd_per_kwh=None if scalars["usd_per_kwh"] is None else float(
                scalars["usd_per_kwh"]),
            source=source,
        )


def load_grid(path: str | Path) -> Grid:
    """Read and validate a grid YAML file; errors name the file and the key."""
    from ttcsim.io import parse_yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TtcsimError(f"cannot read grid: {exc}", str(path)) from None
    data = parse_yaml(text, str(path))
    return Grid.from_mapping(data if data is not None else {}, source=str(path))


def as_grid(grid: Grid | Mapping | str | Path) -> Grid:
    """A :class:`Grid` from a grid, a mapping or a YAML path."""
    if isinstance(grid, Grid):
        return grid
    if isinstance(grid, Mapping):
        return Grid.from_mapping(grid)
    return load_grid(grid)


# ---------------------------------------------------------------------------
# Vectorised kernels (array versions of ttcsim.simulator.phases + predict's summary)
# ---------------------------------------------------------------------------


def repeat_sum(x: np.ndarray, count: int) -> np.ndarray:
    """``np.full(count, v).sum()`` for every ``v`` in ``x``, bit for bit, elementwise.

    numpy sums float64 pairwise: below 8 elements one running sum from 0; up to
    128, eight running sums over interleaved elements combined as a tree, then
    the remainder; above 128, the two halves (split at a multiple of 8) are
    summed recursively.  For equal values every partial sum depends only on the
    count, so each distinct sub-length is evaluated once.
    """
    x = np.asarray(x, dtype=float)
    memo: dict[int, np.ndarray] = {}

    def pairwise(n: int) -> np.ndarray:
        hit = memo.get(n)
        if hit is not None:
            return hit
        if n < 8:
            res = np.zeros_like(x)
            for _ in range(n):
                res = res + x
        elif n <= 128:
            r = x
            for _ in range(8, n - n % 8, 8):
                r = r + x
            res = (r + r) + (r + r)
            res = res + res
            for _ in range(n % 8):
                res = res + x
        else:
            half = n // 2
            half -= half % 8
            res = pairwise(half) + pairwise(n - half)
        memo[n] = res
        return res

    return pairwise(int(count))


def _repeat_sum_by(x: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """:func:`repeat_sum` with a per-element count."""
    out = np.empty_like(x)
    uniq, inverse = np.unique(counts, return_inverse=True)
    if uniq.size == 1:
        return repeat_sum(x, int(uniq[0])) if uniq[0] != 1 else x.copy()
    for k, n in enumerate(uniq):
        sel = inverse == k
        out[sel] = x[sel] if n == 1 else repeat_sum(x[sel], int(n))
    return out


def _unique_rows(*columns: tuple[np.ndarray, int]) -> tuple[np.ndarray, np.ndarray]:
    """Distinct rows of small non-negative integer columns ``(values, bound)``.

    Returns ``(first, inverse)``: the index of one row per distinct combination
    and, for every row, its combination's position in ``first``.  Phases are
    priced once per combination; each scenario's numbers do not depend on which
    other scenarios share the array, so this changes no result.
    """
    span = math.prod(bound for _, bound in columns)
    if span >= 2**62:  # a combined int64 key would overflow
        stacked = np.stack([v for v, _ in columns], axis=1)
        _, first, inverse = np.unique(stacked, axis=0, return_index=True, return_inverse=True)
        return first, inverse.reshape(-1)
    key = np.zeros(columns[0][0].shape, dtype=np.int64)
    for values, bound in columns:
        key = key * bound + values
    if span <= 8 * max(key.size, 1):
        seen = np.zeros(span, dtype=bool)
        seen[key] = True
        position = np.cumsum(seen) - 1
        first = np.empty(int(position[-1]) + 1 if span else 0, dtype=np.int64)
        first[position[key]] = np.arange(key.size)
        return first, position[key]
    _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    return first, inverse.reshape(-1)


def _expand_phase(phase: PhaseArrays, inverse: np.ndarray) -> PhaseArrays:
    return PhaseArrays(*(np.asarray(getattr(phase, f.name))[inverse] for f in fields(phase)))


@dataclass
class PhaseArrays:
    """One phase for many scenarios: the fields of :class:`~ttcsim.simulator.phases.PhaseCost`."""

    time_s: np.ndarray
    query_time_s: np.ndarray
    energy_j: np.ndarray
    dynamic_energy_j: np.ndarray
    peak_power_w: np.ndarray
    throttled: np.ndarray


def prefill_arrays(c: PassCoefficients, n_prompts: np.ndarray, prompt_tokens: np.ndarray):
    """``prefill_phase(c, n_prompts, prompt_tokens)`` for arrays of whole numbers."""
    tokens = (n_prompts * prompt_tokens).astype(float)  # exact integer product, as in Python
    prompts = n_prompts.astype(float)
    pairs = prompts * attention_pairs(c, prompt_tokens.astype(float), 0.0)
    cost = forward_pass(c, tokens, 0.0, pairs, sequences=prompts, prefill=True)
    t, e = cost.time_s, cost.energy_j
    return PhaseArrays(t, t, e, cost.dynamic_energy_j, average_power_w(e, t), cost.throttled)


def decode_first_peak_w(c: PassCoefficients, n_sequences: np.ndarray, prompt: np.ndarray):
    """Peak power of a decode phase: its first step, ``decode_phase``'s ``peak_power_w``."""
    ctx = n_sequences * context_read_tokens(c, prompt + 1.0)
    first = forward_pass(c, n_sequences, ctx, ctx)
    return average_power_w(first.energy_j, first.time_s)


#: Decode steps priced at once where segments may reach the power limit: such
#: segments are summed step by step by ``segment_cost``, one array element per step.
HOT_STEP_BUDGET = 1 << 20


def bounded_segment_cost(
    c: PassCoefficients,
    batch,
    first_context,
    n_steps,
    first_power_w,
    shared_prefix_tokens=None,
    groups=None,
):
    """``segment_cost`` for many segments with bounded memory.

    ``segment_cost`` expands a segment that reaches the power limit into one
    element per step.  Segments whose first or last step draws more than 90 %
    of the limit (``first_power_w``: the first step's power summed over GPUs) are
    therefore priced in batches of at most :data:`HOT_STEP_BUDGET` steps; the rest
    in one call.  Each segment's result does not depend on its batch.
    ``shared_prefix_tokens`` and ``groups`` (arrays or None) are passed through.
    """

    def priced(sel):
        if shared_prefix_tokens is None:
            return segment_cost(c, batch[sel], first_context[sel], n_steps[sel])
        return segment_cost(c, batch[sel], first_context[sel], n_steps[sel],
                            shared_prefix_tokens[sel], groups[sel])

    last_ctx = batch * (first_context + np.maximum(n_steps - 1.0, 0.0))
    last = forward_pass(c, batch, last_ctx, last_ctx)
    last_power = average_power_w(last.energy_j, last.time_s)
    near = 0.9 * c.power_limit_w * c.n_gpus
    risky = (first_power_w > near) | (last_power > near) | last.throttled
    if not risky.any():
        return priced(slice(None))
    t, e_dyn, e = (np.empty(batch.shape) for _ in range(3))
    calm = np.flatnonzero(~risky)
    if calm.size:
        t[calm], e_dyn[calm], e[calm] = priced(calm)
    hot = np.flatnonzero(risky)
    ends = np.cumsum(n_steps[hot])
    lo = 0
    while lo < hot.size:
        hi = max(lo + 1, int(np.searchsorted(ends, ends[lo] - n_steps[hot[lo]] + HOT_STEP_BUDGET,
                                             side="right")))
        part = hot[lo:hi]
        t[part], e_dyn[part], e[part] = priced(part)
        lo = hi
    return t, e_dyn, e


def fixed_decode_arrays(
    c: PassCoefficients,
    prompt: np.ndarray,
    output_tokens: np.ndarray,
    n_queries: np.ndarray,
    samples: np.ndarray,
    shared_prefix: np.ndarray,
):
    """``decode_phase`` for a fixed output length (all ``Q*N`` sequences equal).

    All sequences finish together, so ``deterministic_decode`` has one active
    segment (the others have zero steps and cost exactly 0) and every query's
    decode time is that segment's time; ``query_time_s`` is numpy's mean of ``Q``
    equal values (:func:`repeat_sum` / ``Q``).  With ``shared_prefix`` (prefix
    caching and ``N > 1``) the ``Q`` queries' samples share their prompt's KV reads
    (``segment_cost``'s ``groups``); the per-query time is that same segment's
    (``decode_time_per_query_s`` prices the sharing too).
    """
    n = (n_queries * samples).astype(float)
    steps = np.maximum(output_tokens - 1.0, 0.0)
    peak = decode_first_peak_w(c, n, prompt)
    shared = shared_prefix & (samples > 1)
    first_ctx = prompt + 1.0
    if shared.any():
        p_shared = np.where(shared, prompt, 0.0)
        groups = np.where(shared, np.where(steps > 0, n_queries.astype(float), 0.0), n)
        t, e_dyn, e = bounded_segment_cost(c, n, first_ctx, steps, peak, p_shared, groups)
        t_query = t.copy()
    else:
        t, e_dyn, e = bounded_segment_cost(c, n, first_ctx, steps, peak)
        t_query = t
    per_query = _repeat_sum_by(t_query, n_queries) / n_queries.astype(float)
    q_time = np.where(steps > 0, per_query, 0.0)
    peak_out = decode_peak_power_w(c, n, prompt, output_tokens, output_tokens)
    return PhaseArrays(t, q_time, e, e_dyn, peak_out, np.zeros(t.shape, dtype=bool))


def score_arrays(c: PassCoefficients, tokens: np.ndarray, pairs: np.ndarray) -> PhaseArrays:
    """``score_phase`` given its pass totals ``tokens`` and ``pairs``."""
    cost = forward_pass(c, tokens, 0.0, pairs)
    t, e = cost.time_s, cost.energy_j
    return PhaseArrays(t, t, e, cost.dynamic_energy_j, average_power_w(e, t), cost.throttled)


def fixed_score_totals(prompt: np.ndarray, output_tokens: np.ndarray, n: np.ndarray):
    """``score_phase``'s tokens and pairs for ``n`` candidates of one fixed length."""
    seq = prompt + output_tokens
    return _repeat_sum_by(seq, n), _repeat_sum_by(seq * (seq + 1) / 2, n)


def random_score_totals(prompt: np.ndarray, m1: np.ndarray, m2: np.ndarray, n: np.ndarray):
    """``score_phase``'s tokens and pairs from ``E[L]`` and ``E[L^2]``."""
    p, nf = prompt, n.astype(float)
    tokens = nf * (p + m1)
    pairs = nf * ((p * p + 2 * p * m1 + m2) + (p + m1)) / 2.0
    return tokens, pairs


# ---------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------

#: Result columns and their dtypes ("category" for labels).
COLUMNS: dict[str, str] = {
    "hw": "category",
    "model": "category",
    "weight_dtype": "category",
    "kv_dtype": "category",
    "tp": "int64",
    "gpus": "int64",
    "reward_model": "category",
    "engine": "category",
    "strategy": "category",
    "samples": "int64",
    "output_tokens_spec": "category",
    "prefix_cache": "bool",
    "concurrency": "int64",
    "prompt_tokens": "int64",
    "power_limit_w": "float64",
    "calibrated_profile": "bool",
    "fits": "bool",
    "status": "category",
    "memory_per_gpu_bytes": "float64",
    "energy_j": "float64",
    "energy_prefill_j": "float64",
    "energy_decode_j": "float64",
    "energy_score_j": "float64",
    "energy_dynamic_j": "float64",
    "latency_s": "float64",
    "batch_latency_s": "float64",
    "prefill_latency_s": "float64",
    "decode_latency_s": "float64",
    "score_latency_s": "float64",
    "ttft_s": "float64",
    "output_tokens": "float64",
    "j_per_output_token": "float64",
    "avg_power_w": "float64",
    "peak_power_w": "float64",
    "power_limited": "bool",
    "energy_facility_j": "float64",
    "co2_g": "float64",
    "usd": "float64",
    "energy_j_low": "float64",
    "energy_j_high": "float64",
    "latency_s_low": "float64",
    "latency_s_high": "float64",
}
#: Values of the ``status`` column: why a row has no results.
STATUS = ("ok", "out-of-memory", "context-exceeded", "invalid")
#: Result columns that come from the physics (NaN where the scenario does not fit).
RESULT_COLUMNS = tuple(COLUMNS)[tuple(COLUMNS).index("energy_j") :]


@dataclass
class _Group:
    """One deployment: coefficients and the per-group label codes."""

    profile: HardwareProfile
    spec: ModelSpec
    c: PassCoefficients
    reward: PassCoefficients
    weight_dtype: str
    kv_dtype: str
    tp: int
    reward_model: str | None
    codes: dict
    #: why no engine could run this deployment (tp or dtype; ttcsim.deployment)
    problem: str | None = None
    engine: EngineProfile | None = None  #: None: the reference engine

    @property
    def vectorised_engine(self) -> bool:
        """Whether the kernels price this engine: its terms all live in the coefficients.

        True for the reference engine and for lock-step engines with static KV,
        unsplit prefills and prefix sharing; others take the slow path
        (``predict()`` per scenario), so sweep and predict agree by construction.
        """
        e = self.engine
        return e is None or (
            e.batching.policy == "lockstep" and e.kv_cache.allocation == "static"
            and not e.prefill.max_tokens_per_pass
            and e.prefix.share_parallel_prefill and e.prefix.prefix_caching
        )


@dataclass
class _Plan:
    """Per-axis lookup arrays indexed by the inner digits of a row."""

    samples: np.ndarray
    has_score: np.ndarray
    vectorised_strategy: np.ndarray
    length_kind: np.ndarray  #: 0 fixed, 1 random, 2 explicit list (slow path)
    fixed_tokens: np.ndarray
    max_tokens: np.ndarray
    mean_tokens: np.ndarray
    second_moment: np.ndarray
    prefix: np.ndarray
    concurrency: np.ndarray
    prompt: np.ndarray
    lengths: tuple = ()  #: the parsed output-length specs, by index
    expectations: dict = field(default_factory=dict)
    kv_lengths: dict = field(default_factory=dict)  #: (length index, n) -> KV sizing length
    length_extremes: dict = field(default_factory=dict)  #: (length index, n) -> (min, max)

    def kv_length(self, oi: np.ndarray, qi: np.ndarray, si: np.ndarray) -> np.ndarray:
        """:func:`ttcsim.predict.kv_sizing_length` per row (cached per length and batch)."""
        from ttcsim.predict import kv_sizing_length

        out = self.max_tokens[oi].astype(float)
        random = np.flatnonzero(self.length_kind[oi] == 1)
        if random.size:
            first, inv = _unique_rows((oi[random], len(self.lengths)),
                                      (qi[random], len(self.concurrency)),
                                      (si[random], len(self.samples)))
            vals = np.empty(first.size)
            for j, r in enumerate(random[first].tolist()):
                key = (int(oi[r]), int(self.concurrency[qi[r]] * self.samples[si[r]]))
                if key not in self.kv_lengths:
                    self.kv_lengths[key] = kv_sizing_length(self.lengths[key[0]], key[1])
                vals[j] = self.kv_lengths[key]
            out[random] = vals[inv]
        return out

    def extremes(self, o: int, n: int) -> tuple[float, float]:
        """:func:`~ttcsim.simulator.phases.length_extremes` of length ``o`` (cached)."""
        key = (o, n)
        if key not in self.length_extremes:
            self.length_extremes[key] = length_extremes(self.lengths[o], n)
        return self.length_extremes[key]


def _is_vectorised(strategy: Strategy) -> bool:
    return type(strategy) in (Single, Vote, BestOfN)


class Sweeper:
    """Evaluates a :class:`Grid` chunk by chunk; caches coefficients and distribution grids.

    ``columns(start, stop)`` returns the result columns of rows ``start..stop-1``
    as numpy arrays (labels as category codes; see :meth:`categories`).
    """

    def __init__(self, grid: Grid):
        self.grid = grid
        ax = grid.axes
        strategies = ax["strategy"]
        lengths = ax["output_tokens"]
        kinds, fixed, maxes, means, m2s = [], [], [], [], []
        for spec in lengths:
            if isinstance(spec, LengthList):
                kinds.append(2)
                fixed.append(np.nan)
                maxes.append(max(spec.values))
                means.append(np.nan)
                m2s.append(np.nan)
            elif spec.is_fixed:
                kinds.append(0)
                fixed.append(float(spec.tokens))
                maxes.append(spec.upper_bound())
                means.append(spec.mean())
                m2s.append(np.nan)
            else:
                kinds.append(1)
                fixed.append(np.nan)
                maxes.append(spec.upper_bound())
                means.append(spec.mean())
                m2s.append(spec.second_moment())
        self.plan = _Plan(
            samples=np.array([s.samples_per_query for s in strategies], dtype=np.int64),
            has_score=np.array([type(s) is BestOfN for s in strategies]),
            vectorised_strategy=np.array([_is_vectorised(s) for s in strategies]),
            length_kind=np.array(kinds, dtype=np.int8),
            fixed_tokens=np.array(fixed, dtype=float),
            max_tokens=np.array(maxes, dtype=np.int64),
            mean_tokens=np.array(means, dtype=float),
            second_moment=np.array(m2s, dtype=float),
            prefix=np.array(ax["prefix_cache"], dtype=bool),
            concurrency=np.array(ax["concurrency"], dtype=np.int64),
            prompt=np.array(ax["prompt_tokens"], dtype=np.int64),
            lengths=tuple(lengths),
        )
        self._group_shape = tuple(len(ax[a]) for a in GROUP_AXES)
        self._inner_shape = tuple(len(ax[a]) for a in INNER_AXES)
        self._coeff_cache: dict = {}
        self._group_cache: tuple | None = None
        self._kv_labels: list[str] = []
        for wdt in ax["weight_dtype"]:
            for kdt in ax["kv_dtype"]:
                label = kdt or ("fp8" if wdt == "fp8" else "bf16")
                if label not in self._kv_labels:
                    self._kv_labels.append(label)
        self._warned: set = set()
        self.slow_rows = 0
        #: threads that build random-length expectations (numpy releases the GIL)
        self.threads = min(2, os.cpu_count() or 1)

    # -- labels ---------------------------------------------------------------

    def categories(self) -> dict[str, list[str]]:
        """Category labels of every label column (codes index into these)."""
        lab = self.grid.labels
        return {
            "hw": list(lab["hw"]),
            "model": list(lab["model"]),
            "weight_dtype": list(lab["weight_dtype"]),
            "kv_dtype": list(self._kv_labels),
            "reward_model": list(lab["reward_model"]),
            "engine": list(lab["engine"]),
            "strategy": list(lab["strategy"]),
            "output_tokens_spec": list(lab["output_tokens"]),
            "status": list(STATUS),
        }

    def column_names(self) -> list[str]:
        """Columns present in this grid's table (``co2_g``/``usd`` only when priced)."""
        names = list(COLUMNS)
        if self.grid.carbon_g_per_kwh is None:
            names.remove("co2_g")
        if self.grid.usd_per_kwh is None:
            names.remove("usd")
        return names

    # -- groups ---------------------------------------------------------------

    def _coefficients(self, profile, spec, wdt, kdt, tp, engine=None) -> PassCoefficients:
        key = (profile.name, id(profile), spec.name, id(spec), wdt, kdt, tp, id(engine))
        hit = self._coeff_cache.get(key)
        if hit is None:
            hit = pass_coefficients(profile, spec, wdt, kdt, tp, engine)
            self._coeff_cache[key] = hit
        return hit

    def _group(self, g: int) -> _Group:
        if self._group_cache is not None and self._group_cache[0] == g:
            return self._group_cache[1]
        digits = np.unravel_index(g, self._group_shape)
        ax = self.grid.axes
        hi, mi, wi, ki, ti, ri, ei = (int(d) for d in digits)
        profile, spec = ax["hw"][hi], ax["model"][mi]
        wdt, tp, rm = ax["weight_dtype"][wi], ax["tp"][ti], ax["reward_model"][ri]
        kdt = ax["kv_dtype"][ki] or ("fp8" if wdt == "fp8" else "bf16")
        eng = None if ax["engine"][ei].is_reference else ax["engine"][ei]
        c = self._coefficients(profile, spec, wdt, kdt, tp, eng)
        reward = c if rm is None else self._coefficients(profile, get_model(rm), wdt, kdt, tp,
                                                         eng)
        codes = {
            "hw": hi,
            "model": mi,
            "weight_dtype": wi,
            "kv_dtype": self._kv_labels.index(kdt),
            "reward_model": ri,
            "engine": ei,
        }
        problem = dtype_problem(profile, wdt) or tensor_parallel_problem(spec, tp)
        if problem is None and rm is not None:
            problem = tensor_parallel_problem(get_model(rm), tp)
        group = _Group(profile, spec, c, reward, wdt, kdt, tp, rm, codes, problem, eng)
        self._group_cache = (g, group)
        return group

    # -- evaluation -----------------------------------------------------------

    def columns(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Result columns of rows ``start .. stop-1`` (label columns as integer codes)."""
        if not 0 <= start <= stop <= self.grid.n_scenarios:
            raise ValueError(f"rows {start}..{stop} outside 0..{self.grid.n_scenarios}")
        n = stop - start
        names = self.column_names()
        out: dict[str, np.ndarray] = {}
        for name in names:
            kind = COLUMNS[name]
            if kind == "float64":
                out[name] = np.full(n, np.nan)
            elif kind == "bool":
                out[name] = np.zeros(n, dtype=bool)
            elif kind == "int64":
                out[name] = np.zeros(n, dtype=np.int64)
            else:
                out[name] = np.zeros(n, dtype=np.int32)
        per_group = self.grid.rows_per_group
        row = start
        while row < stop:
            g, local = divmod(row, per_group)
            seg_stop = min(stop, (g + 1) * per_group)
            self._evaluate(g, local, local + seg_stop - row, out, row - start)
            row = seg_stop
        return out

    def _evaluate(self, g: int, lo: int, hi: int, out: dict, at: int) -> None:
        group = self._group(g)
        plan = self.plan
        sl = slice(at, at + hi - lo)
        si, oi, ci, qi, pi = np.unravel_index(np.arange(lo, hi), self._inner_shape)
        for key, code in group.codes.items():
            out[key][sl] = code
        out["strategy"][sl] = si
        out["output_tokens_spec"][sl] = oi
        out["tp"][sl] = group.tp
        out["gpus"][sl] = group.c.n_gpus
        out["calibrated_profile"][sl] = group.profile.calibrated
        out["power_limit_w"][sl] = group.profile.datasheet.power_limit_w
        samples = plan.samples[si]
        prefix = plan.prefix[ci]
        conc = plan.concurrency[qi]
        prompt_i = plan.prompt[pi]
        out["samples"][sl] = samples
        out["prefix_cache"][sl] = prefix
        out["concurrency"][sl] = conc
        out["prompt_tokens"][sl] = prompt_i
        if group.problem is not None:  # predict() refuses it: status 'invalid', NaN results
            out["status"][sl] = STATUS.index("invalid")
            if "invalid" not in self._warned:
                self._warned.add("invalid")
                warnings.warn(
                    f"a scenario cannot run ({group.problem}); such rows get status "
                    "'invalid' and NaN results",
                    SlowPathWarning,
                    stacklevel=3,
                )
            return

        # memory and context, as in predict (integer products are exact)
        c, spec = group.c, group.spec
        max_len = plan.max_tokens[oi]
        kv_len = plan.kv_length(oi, qi, si)
        prompts_i = conc * np.where(prefix, 1, samples)
        kv_tokens = (prompts_i * prompt_i).astype(float) + (conc * samples).astype(float) * kv_len
        per_token = 4 * spec.hidden_size + 3 * spec.intermediate_size / c.n_gpus
        workspace = (conc * prompt_i).astype(float) * per_token * ACTIVATION_BYTES + (
            conc * samples * spec.vocab_size
        ).astype(float) * 4.0
        kv_tokens = kv_cache_tokens(c, kv_tokens, conc * samples)
        need = c.weight_bytes_total + kv_tokens * c.kv_bytes_per_token + workspace
        out["memory_per_gpu_bytes"][sl] = need
        ctx_ok = prompt_i + max_len <= spec.max_context_tokens
        fits = ctx_ok & ~(need > c.memory_capacity_bytes)
        kind = plan.length_kind[oi]
        fast = plan.vectorised_strategy[si] & (kind != 2) & group.vectorised_engine
        out["fits"][sl] = fits
        out["status"][sl] = np.where(ctx_ok, np.where(fits, 0, 1), 2)

        ok = np.flatnonzero(fast & fits)
        if ok.size:
            self._fast(group, ok + at, si[ok], oi[ok], ci[ok], qi[ok], pi[ok], out)
        slow = np.flatnonzero(~fast)  # predict() decides fit and context for these
        if slow.size:
            self._slow(group, slow + at, si[slow], oi[slow], ci[slow], qi[slow], pi[slow], out)
        # the profile's error band, as predict's band_fields (ttcsim.uncertainty)
        band = profile_band(group.profile)
        out["energy_j_low"][sl], out["energy_j_high"][sl] = interval(
            out["energy_j"][sl], band.energy_ape)
        out["latency_s_low"][sl], out["latency_s_high"][sl] = interval(
            out["latency_s"][sl], band.latency_ape)

    def _fast(self, group, rows, si, oi, ci, qi, pi, out) -> None:
        """Vectorised scenarios; each phase is priced once per distinct set of its inputs."""
        plan = self.plan
        c = group.c
        samples = plan.samples[si]
        prefix = plan.prefix[ci]
        conc = plan.concurrency[qi]
        prompt_i = plan.prompt[pi]
        prompt = prompt_i.astype(float)
        n_seq = conc * samples
        kind = plan.length_kind[oi]
        m = rows.size
        n_s, n_o = len(plan.samples), len(plan.length_kind)
        n_q, n_p = len(plan.concurrency), len(plan.prompt)

        # prefill depends on (Q * copies, P)
        copies = np.where(prefix, 0, si + 1)
        first, inv = _unique_rows((pi, n_p), (qi, n_q), (copies, n_s + 1))
        n_prompts = conc[first] * np.where(prefix[first], 1, samples[first])
        pre = _expand_phase(prefill_arrays(c, n_prompts, prompt_i[first]), inv)

        dec_t, dec_q, dec_e, dec_d = np.empty(m), np.empty(m), np.empty(m), np.empty(m)
        dec_peak = np.empty(m)
        fixed = np.flatnonzero(kind == 0)
        if fixed.size:
            f = fixed
            first, inv = _unique_rows((pi[f], n_p), (qi[f], n_q), (si[f], n_s), (oi[f], n_o),
                                      (ci[f], len(plan.prefix)))
            u = f[first]
            dec = fixed_decode_arrays(c, prompt[u], plan.fixed_tokens[oi[u]], conc[u], samples[u],
                                      prefix[u])
            dec_t[f], dec_q[f] = dec.time_s[inv], dec.query_time_s[inv]
            dec_e[f], dec_d[f], dec_peak[f] = dec.energy_j[inv], dec.dynamic_energy_j[inv], (
                dec.peak_power_w[inv])
        rand = np.flatnonzero(kind == 1)
        if rand.size:
            dec_peak[rand] = self._random_peak(c, rand, (oi, qi, si, pi), n_seq, prompt)
            self._random_decode(group, rand, (oi, qi, si, pi), n_seq, samples, prompt, prefix,
                                (dec_t, dec_d, dec_e, dec_q))

        sc_t = np.zeros(m)
        sc_e, sc_d = np.zeros(m), np.zeros(m)
        sc_peak = np.full(m, -np.inf)
        sc_thr = np.zeros(m, dtype=bool)
        scored = np.flatnonzero(plan.has_score[si])
        if scored.size:
            first, inv = _unique_rows(
                (pi[scored], n_p), (qi[scored], n_q), (si[scored], n_s), (oi[scored], n_o))
            u = scored[first]
            p_s, o_s, nn = prompt[u], oi[u], n_seq[u]
            tokens, pairs = np.empty(u.size), np.empty(u.size)
            fx = plan.length_kind[o_s] == 0
            if fx.any():
                tokens[fx], pairs[fx] = fixed_score_totals(
                    p_s[fx], plan.fixed_tokens[o_s[fx]], nn[fx])
            if (~fx).any():
                tokens[~fx], pairs[~fx] = random_score_totals(
                    p_s[~fx], plan.mean_tokens[o_s[~fx]], plan.second_moment[o_s[~fx]], nn[~fx])
            sc = _expand_phase(score_arrays(group.reward, tokens, pairs), inv)
            sc_t[scored], sc_e[scored], sc_d[scored] = sc.time_s, sc.energy_j, sc.dynamic_energy_j
            sc_peak[scored], sc_thr[scored] = sc.peak_power_w, sc.throttled

        # predict's summary, same order of operations (x + 0.0 == x for absent phases)
        q = conc.astype(float)
        energy_sum = pre.energy_j + dec_e + sc_e
        energy = energy_sum / q
        time_sum = pre.time_s + dec_t + sc_t
        dynamic = (pre.dynamic_energy_j + dec_d + sc_d) / q
        dynamic = dynamic + (c.static_power_w - c.idle_power_w) * c.n_gpus * time_sum / q
        tokens_out = samples * plan.mean_tokens[oi]
        self._store(out, rows, {
            "energy_j": energy,
            "energy_prefill_j": pre.energy_j / q,
            "energy_decode_j": dec_e / q,
            "energy_score_j": sc_e / q,
            "energy_dynamic_j": dynamic,
            "latency_s": pre.query_time_s + dec_q + sc_t,
            "batch_latency_s": time_sum,
            "prefill_latency_s": pre.time_s,
            "decode_latency_s": dec_t,
            "score_latency_s": sc_t,
            "ttft_s": pre.query_time_s,
            "output_tokens": tokens_out,
            "j_per_output_token": energy / tokens_out,
            "avg_power_w": np.divide(
                energy * q, time_sum, out=np.zeros(m), where=time_sum > 0),
            "peak_power_w": np.maximum(np.maximum(pre.peak_power_w, dec_peak), sc_peak),
            "power_limited": pre.throttled | sc_thr,
        }, energy)

    def _store(self, out: dict, rows: np.ndarray, values: dict, energy: np.ndarray) -> None:
        grid = self.grid
        contiguous = rows.size == rows[-1] - rows[0] + 1
        where = slice(int(rows[0]), int(rows[-1]) + 1) if contiguous else rows
        for name, v in values.items():
            out[name][where] = v
        facility = energy * grid.pue
        out["energy_facility_j"][where] = facility
        kwh = facility / JOULES_PER_KWH
        if grid.carbon_g_per_kwh is not None:
            out["co2_g"][where] = kwh * grid.carbon_g_per_kwh
        if grid.usd_per_kwh is not None:
            out["usd"][where] = kwh * grid.usd_per_kwh

    def _random_peak(self, c, rand, digits, n_seq, prompt):
        """``decode_phase``'s peak power for the random-length rows ``rand``.

        Priced once per distinct (distribution, ``Q``, strategy, prompt).
        """
        plan = self.plan
        oi, qi, si, pi = (d[rand] for d in digits)
        first, inv = _unique_rows((oi, len(plan.lengths)), (qi, len(plan.concurrency)),
                                  (si, len(plan.samples)), (pi, len(plan.prompt)))
        u = rand[first]
        ext = np.array([plan.extremes(int(o), int(n))
                        for o, n in zip(oi[first].tolist(), n_seq[u].tolist(), strict=True)])
        ext = ext.reshape(-1, 2)
        peak = decode_peak_power_w(c, n_seq[u].astype(float), prompt[u], ext[:, 0], ext[:, 1])
        return peak[inv]

    def _random_decode(self, group, rand, digits, n_seq, samples, prompt, prefix, outs) -> None:
        """Expected decode of the random-length rows ``rand`` (indices into the fast rows).

        Rows sharing (distribution, ``Q``, strategy) are one task: one
        :class:`~ttcsim.simulator.expectation.DecodeExpectation` (cached per
        ``(distribution, Q*N, N)``, built on two threads when several are
        missing), evaluated by the core for all the task's distinct (prompt
        length, prefix sharing) pairs at once, as ``predict()`` does for one.
        """
        oi, qi, si, pi = (d[rand] for d in digits)
        plan = self.plan
        shared = prefix[rand] & (samples[rand] > 1)
        task = (oi, len(plan.lengths)), (qi, len(plan.concurrency)), (si, len(plan.samples))
        first, inverse = _unique_rows(*task, (shared.astype(np.int64), 2),
                                      (pi, len(plan.prompt)))
        u = rand[first]  # one row per distinct (task, sharing, prompt), sorted by task
        key = np.zeros(first.size, dtype=np.int64)
        for values, bound in task:
            key = key * bound + values[first]
        cuts = np.flatnonzero(np.diff(key)) + 1
        spans = list(zip(np.r_[0, cuts].tolist(), np.r_[cuts, first.size].tolist(), strict=True))
        keys = [(int(oi[first[lo]]), int(n_seq[u[lo]]), int(samples[u[lo]])) for lo, _ in spans]
        self._build_expectations(keys)
        results = tuple(np.empty(first.size) for _ in outs)
        for (lo, hi), k in zip(spans, keys, strict=True):
            exp = self.plan.expectations[k]
            values = expected_decode_totals(group.c, exp, prompt[u[lo:hi]], shared[first[lo:hi]])
            for res, vals in zip(results, values, strict=True):
                res[lo:hi] = vals
        for arr, res in zip(outs, results, strict=True):
            arr[rand] = res[inverse]

    def _build_expectations(self, keys) -> None:
        """Build the missing ``(distribution, n, N)`` expectations (two threads if several)."""
        exps = self.plan.expectations
        missing = sorted({k for k in keys if k not in exps}, key=lambda k: -k[1])

        def build(k):
            return decode_expectation(self.plan.lengths[k[0]].survival_steps(), k[1], k[2])

        if len(missing) > 1 and self.threads > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(self.threads) as pool:
                built = list(pool.map(build, missing))
        else:
            built = [build(k) for k in missing]
        exps.update(zip(missing, built, strict=True))

    def _slow(self, group, rows, si, oi, ci, qi, pi, out) -> None:
        """Scenarios the kernels do not cover: one ``predict()`` call each."""
        from ttcsim.predict import predict

        ax, grid = self.grid.axes, self.grid
        labels = self.grid.labels
        plan = self.plan
        reasons = {
            labels["strategy"][s] if not plan.vectorised_strategy[s] else labels["output_tokens"][o]
            for s, o in zip(si.tolist(), oi.tolist(), strict=True)
        } if group.vectorised_engine else {f"engine {group.engine.name}"}
        for reason in sorted(reasons - self._warned):
            self._warned.add(reason)
            warnings.warn(
                f"{reason!r} is not vectorised: its scenarios are evaluated by calling "
                "predict() one at a time (slow path)",
                SlowPathWarning,
                stacklevel=4,
            )
        self.slow_rows += rows.size
        for row, s, o, cc, qq, pp in zip(rows.tolist(), si.tolist(), oi.tolist(), ci.tolist(),
                                          qi.tolist(), pi.tolist(), strict=True):
            try:
                r = predict(
                    hw=group.profile, model=group.spec, strategy=labels["strategy"][s],
                    prompt_tokens=int(ax["prompt_tokens"][pp]),
                    output_tokens=ax["output_tokens"][o], concurrency=int(ax["concurrency"][qq]),
                    tp=group.tp, weight_dtype=group.weight_dtype, kv_dtype=group.kv_dtype,
                    prefix_cache=bool(ax["prefix_cache"][cc]), reward_model=group.reward_model,
                    pue=grid.pue, carbon_g_per_kwh=grid.carbon_g_per_kwh,
                    usd_per_kwh=grid.usd_per_kwh, percentiles=False, engine=group.engine,
                )
            except DoesNotFitError:
                out["fits"][row] = False
                out["status"][row] = STATUS.index("out-of-memory")
                continue
            except TtcsimError as exc:
                out["fits"][row] = False
                if "context" in str(exc):
                    out["status"][row] = STATUS.index("context-exceeded")
                    continue
                out["status"][row] = STATUS.index("invalid")
                if "invalid" not in self._warned:
                    self._warned.add("invalid")
                    warnings.warn(
                        f"predict() refused a scenario ({exc}); such rows get status "
                        "'invalid' and NaN results",
                        SlowPathWarning,
                        stacklevel=4,
                    )
                continue
            out["fits"][row] = True
            out["status"][row] = STATUS.index("ok")
            for name in RESULT_COLUMNS:
                if name in out:
                    value = getattr(r, name)
                    out[name][row] = np.nan if value is None else value


def _frame(sweeper: Sweeper, cols: dict[str, np.ndarray]):
    import pandas as pd

    cats = sweeper.categories()
    data = {}
    for name, values in cols.items():
        if name in cats:
            data[name] = pd.Categorical.from_codes(values, categories=pd.Index(cats[name]))
        else:
            data[name] = values
    return pd.DataFrame(data, copy=False)


def chunk_bounds(n_rows: int, chunk_rows: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of consecutive chunks covering ``n_rows`` rows."""
    if chunk_rows < 1:
        raise TtcsimError(f"must be >= 1, got {chunk_rows}", "--chunk-rows")
    for start in range(0, n_rows, chunk_rows):
        yield start, min(n_rows, start + chunk_rows)


def iter_sweep(grid: Grid | Mapping | str | Path, chunk_rows: int = DEFAULT_CHUNK_ROWS):
    """Yield the result table as pandas DataFrames of at most ``chunk_rows`` rows."""
    sweeper = Sweeper(as_grid(grid))
    for start, stop in chunk_bounds(sweeper.grid.n_scenarios, chunk_rows):
        yield _frame(sweeper, sweeper.columns(start, stop))


def sweep(
    grid: Grid | Mapping | str | Path,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    progress: bool = False,
):
    """Every scenario of ``grid`` as one tidy DataFrame (one row per scenario).

    Columns are those of :class:`~ttcsim.predict.Prediction` (per query, SI units in
    the names) plus ``samples``, ``fits`` and ``memory_per_gpu_bytes``; scenarios
    that do not fit in memory or in the model's context have ``fits=False`` and
    NaN results.  Row order: the grid's axes in :data:`GROUP_AXES` +
    :data:`INNER_AXES` order, the last varying fastest.
    """
    import pandas as pd

    sweeper = Sweeper(as_grid(grid))
    total = sweeper.grid.n_scenarios
    bar = ProgressBar(total, enabled=progress)
    parts = []
    for start, stop in chunk_bounds(total, chunk_rows):
        parts.append(_frame(sweeper, sweeper.columns(start, stop)))
        bar.update(stop - start)
    bar.close()
    if not parts:
        return _frame(sweeper, sweeper.columns(0, 0))
    return parts[0] if len(parts) == 1 else pd.concat(parts, ignore_index=True)


class ProgressBar:
    """A one-line progress bar on stderr, redrawn at most ten times a second."""

    def __init__(self, total: int, enabled: bool = True, label: str = "sweep", stream=None):
        import sys

        self.total, self.enabled, self.label = total, enabled, label
        self.stream = stream if stream is not None else sys.stderr
        self.done = 0
        self.start = time.perf_counter()
        self._last = 0.0

    def update(self, n: int) -> None:
        """Advance by ``n`` rows."""
        self.done += n
        now = time.perf_counter()
        if self.enabled and (now - self._last >= 0.1 or self.done >= self.total):
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        frac = self.done / self.total if self.total else 1.0
        width = 24
        filled = int(frac * width)
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        self.stream.write(
            f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {frac * 100:5.1f}% "
            f"{self.done:,}/{self.total:,} scenarios  {elapsed:6.1f} s  {rate:,.0f}/s "
        )
        self.stream.flush()

    def close(self) -> None:
        """Finish the line."""
        if self.enabled:
            self._draw(time.perf_counter())
            self.stream.write("\n")
            self.stream.flush()


@dataclass(frozen=True)
class SweepReport:
    """What :func:`write_sweep` wrote."""

    path: Path
    format: str
    rows: int
    fitting_rows: int
    slow_rows: int
    seconds: float

    @property
    def scenarios_per_s(self) -> float:
        """Rows evaluated and written per second of wall time."""
        return self.rows / self.seconds if self.seconds > 0 else float("inf")


def write_sweep(
    grid: Grid | Mapping | str | Path,
    out: str | Path,
    fmt: str = "auto",
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    progress: bool = False,
    overwrite: bool = True,
) -> SweepReport:
    """Evaluate ``grid`` chunk by chunk and stream the table to ``out`` (CSV or Parquet).

    ``fmt`` is ``csv``, ``parquet`` or ``auto`` (from the suffix; else Parquet when
    pyarrow is importable, CSV otherwise).  Memory is bounded by ``chunk_rows``:
    one chunk is evaluated while the previous one is written by a second thread.
    """
    import queue
    import threading

    from ttcsim.tablewriter import TableWriter

    start_time = time.perf_counter()
    g = as_grid(grid)
    sweeper = Sweeper(g)
    writer = TableWriter(out, sweeper.column_names(), sweeper.categories(), fmt, overwrite)
    bar = ProgressBar(g.n_scenarios, enabled=progress)
    pending: queue.Queue = queue.Queue(maxsize=1)
    failure: list[BaseException] = []
    fitting = 0

    def drain() -> None:
        while True:
            cols = pending.get()
            if cols is None:
                return
            if failure:
                continue
            try:
                writer.write(cols)
                bar.update(len(cols["fits"]))
            except BaseException as exc:  # handed to the main thread
                failure.append(exc)

    thread = threading.Thread(target=drain, name="ttcsim-sweep-writer", daemon=True)
    thread.start()
    try:
        for lo, hi in chunk_bounds(g.n_scenarios, chunk_rows):
            cols = sweeper.columns(lo, hi)
            fitting += int(cols["fits"].sum())
            pending.put(cols)
            if failure:
                break
    finally:
        pending.put(None)
        thread.join()
    if failure:
        writer.abort()
        raise failure[0]
    path = writer.close()
    bar.close()
    return SweepReport(
        path=path,
        format=writer.format,
        rows=writer.rows,
        fitting_rows=fitting,
        slow_rows=sweeper.slow_rows,
        seconds=time.perf_counter() - start_time,
    )


def plot_table(table_path, plot_path, x: str, y: str, color: str):
    """Read the needed columns of a written sweep table and draw it (:func:`plot_sweep`)."""
    import pandas as pd

    from ttcsim.plotting import plot_sweep

    columns = list(dict.fromkeys([x, y, color, "fits"]))
    table_path = Path(table_path)
    try:
        if table_path.suffix == ".parquet":
            frame = pd.read_parquet(table_path, columns=columns)
        else:
            frame = pd.read_csv(table_path, usecols=columns)
    except (ValueError, KeyError) as exc:
        raise TtcsimError(f"cannot plot: {exc}", "--plot") from None
    if not pd.api.types.is_numeric_dtype(frame[x]):  # e.g. output_tokens_spec
        numeric = pd.to_numeric(frame[x], errors="coerce")
        if numeric.notna().all():
            frame[x] = numeric
    if not pd.api.types.is_numeric_dtype(frame[y]):
        raise TtcsimError(f"column {y!r} is not numeric; choose a result column", "--y")
    return plot_sweep(frame, plot_path, x, y, color)
