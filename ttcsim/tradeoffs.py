"""Accuracy-energy trade-offs: Pareto frontiers, energy-aware routing, reasoning depth.

Three questions, one module:

* **Pareto** -- for every row of an accuracy table, joules per query from
  :func:`ttcsim.predict.predict`; the options no other option beats on both
  accuracy and energy; and for each accuracy level the cheapest option.
  Paths along model size (same strategy) and along test-time compute (same
  model) show whether "a bigger model" or "more samples" buys accuracy cheaper.
* **Routing** -- queries fall into difficulty classes with shares ``w_k``.
  Choose one option ``i`` per class to maximise ``sum_k w_k a_ki`` subject to
  ``sum_k w_k e_ki <= B`` (or minimise energy for a target accuracy).  This
  multiple-choice knapsack is solved exactly as a 0/1 integer program with
  :func:`scipy.optimize.milp` (HiGHS, relative gap 0).
* **Reasoning depth** -- accuracy as a function of the output-token cap
  ``c``, from table rows with caps (fitted saturating curve
  ``a(c) = a_max (1 - exp(-c / tau))``) or, for a single uncapped
  single-sample row, the *truncation model* ``a(c) = a P(L <= c)``: a
  response cut off before its answer is wrong and correctness is independent
  of length.  Shorter reasoning chains are in fact more often correct (Hassid
  et al., arXiv 2505.17813), so the truncation model understates accuracy at
  small caps.  The cap that maximises accuracy per joule is reported.

Accuracies are percentages [%]; energies are joules per query [J], summed over
all GPUs, as :class:`~ttcsim.predict.Prediction` reports them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict

from ttcsim.accuracy import AccuracyRow, AccuracyTable
from ttcsim.distributions import (
    Continuous,
    Empirical,
    Fixed,
    LengthDistribution,
    LengthList,
    LengthSpec,
    Mixture,
)
from ttcsim.errors import DoesNotFitError, TtcsimError

_FROZEN = ConfigDict(frozen=True)

#: Tensor-parallel degrees tried, smallest first, when a row leaves ``tp`` unset.
TP_CANDIDATES = (1, 2, 4, 8, 16, 32, 64)
#: Relative slack when checking a solved allocation against the budget.
BUDGET_RTOL = 1e-9
#: Allocations whose energies differ by less than this fraction count as one step
#: of the router's curve (well above HiGHS's feasibility tolerance of 1e-7).
FRONTIER_STEP_RTOL = 1e-6


# ----------------------------------------------------------------- lengths


def cap_lengths(lengths: LengthSpec, cap: int) -> LengthSpec:
    """Lengths under an output-token cap: ``min(L, cap)`` for every sequence."""
    if cap < 1:
        raise TtcsimError(f"an output-token cap must be >= 1, got {cap}", "--caps")
    if isinstance(lengths, Fixed):
        return Fixed(min(lengths.tokens, cap))
    if isinstance(lengths, LengthList):
        return LengthList(tuple(min(v, cap) for v in lengths.values))
    if isinstance(lengths, Empirical):
        return Empirical(tuple(min(v, cap) for v in lengths.values), f"{lengths.label} cap {cap}")
    if isinstance(lengths, Mixture):
        parts = tuple(cap_lengths(p, cap) for p in lengths.parts)
        return Mixture(lengths.weights, parts, f"{lengths.label} cap {cap}")
    if isinstance(lengths, Continuous):
        if cap <= lengths.lo:
            return Fixed(cap)
        hi = cap if lengths.hi is None else min(lengths.hi, cap)
        return dataclasses.replace(lengths, hi=hi, spec=f"{lengths.spec} cap {cap}")
    raise TtcsimError(f"cannot cap lengths of kind {type(lengths).__name__}")


def completion_probability(lengths: LengthSpec, cap: float) -> float:
    """``P(L <= cap)``: the chance a generation finishes within ``cap`` tokens."""
    if not math.isfinite(cap):
        return 1.0
    if isinstance(lengths, LengthList):
        return float(np.mean(np.asarray(lengths.values) <= cap))
    assert isinstance(lengths, LengthDistribution)
    return float(1.0 - lengths.survival(np.array([float(math.floor(cap))]))[0])


def upper_length(lengths: LengthSpec) -> int:
    """Longest generation the spec allows [tokens]."""
    if isinstance(lengths, LengthList):
        return max(lengths.values)
    return int(lengths.upper_bound())


# ------------------------------------------------------------------ options


class Option(BaseModel):
    """One (model, strategy, cap) option on one benchmark, with its energy per query."""

    model_config = _FROZEN

    label: str
    model: str
    strategy: str
    samples: int
    benchmark: str
    difficulty: str | None
    max_output_tokens: int | None
    accuracy_pct: float
    accuracy_source: str  #: "table", "truncation model" or "fitted curve"
    energy_j: float
    latency_s: float
    output_tokens: float  #: expected generated tokens per query (all samples)
    gpus: int
    source: str
    where: str

    @property
    def key(self) -> tuple[str, str, int | None]:
        """(model, strategy, cap): the same option on another benchmark has the same key."""
        return (self.model, self.strategy, self.max_output_tokens)


def _predict_row(row: AccuracyRow, hw, lengths: LengthSpec, where: str, engine=None):
    from ttcsim.predict import predict

    tps = (row.tp,) if row.tp else TP_CANDIDATES
    for i, tp in enumerate(tps):
        try:
            return predict(
                hw=hw,
                model=row.model,
                strategy=row.strategy,
                prompt_tokens=row.prompt_tokens,
                output_tokens=lengths,
                concurrency=row.concurrency,
                tp=tp,
                weight_dtype=row.weight_dtype,
                reward_model=row.reward_model,
                percentiles=False,
                engine=engine,
            )
        except DoesNotFitError as exc:
            if i == len(tps) - 1:
                raise TtcsimError(str(exc), where) from None
        except TtcsimError as exc:
            raise TtcsimError(str(exc), where) from None
    raise AssertionError("unreachable")


def evaluate_row(
    row: AccuracyRow, hw, where: str, cap: int | None = None, accuracy_pct: float | None = None,
    engine=None,
) -> Option:
    """Energy of one row through ``predict``; ``cap`` overrides the row's own cap.

    The accuracy is ``accuracy_pct`` when given (a fitted curve), the row's own
    at its own cap, and otherwise the truncation model
    ``a P(L <= cap) / P(L <= row cap)`` (single-sample strategies only).
    """
    lengths = row.lengths()
    effective_cap = cap if cap is not None else row.max_output_tokens
    if accuracy_pct is not None:
        accuracy, source = accuracy_pct, "fitted curve"
    elif effective_cap == row.max_output_tokens:
        accuracy, source = row.accuracy_pct, "table"
    else:
        if row.samples_per_query != 1:
            raise TtcsimError(
                f"the truncation model needs a single-sample strategy, not {row.strategy}; "
                "add rows with max_output_tokens instead",
                where,
            )
        base = completion_probability(lengths, row.max_output_tokens or math.inf)
        if base <= 0:
            raise TtcsimError("no generation finishes within the row's own cap", where)
        accuracy = row.accuracy_pct * completion_probability(lengths, effective_cap) / base
        source = "truncation model"
    if effective_cap is not None:
        lengths = cap_lengths(lengths, effective_cap)
    p = _predict_row(row, hw, lengths, where, engine)
    cap_text = f" cap {effective_cap}" if effective_cap else ""
    return Option(
        label=f"{row.model} {row.strategy}{cap_text}",
        model=row.model,
        strategy=row.strategy,
        samples=row.samples_per_query,
        benchmark=row.benchmark,
        difficulty=row.difficulty,
        max_output_tokens=effective_cap,
        accuracy_pct=float(min(accuracy, 100.0)),
        accuracy_source=source,
        energy_j=p.energy_j,
        latency_s=p.latency_s,
        output_tokens=p.output_tokens,
        gpus=p.gpus,
        source=row.source,
        where=where,
    )


def evaluate_table(
    table: AccuracyTable, hw, benchmark: str | None = None, caps: Sequence[int] = (),
    engine=None,
) -> list[Option]:
    """Every row (of ``benchmark`` if given) as an option, plus truncation-model variants.

    For each cap in ``caps`` every uncapped single-sample row gains a variant
    capped there, its accuracy from the truncation model.
    """
    options: list[Option] = []
    for i, row in enumerate(table.rows):
        if benchmark is not None and row.benchmark != benchmark:
            continue
        options.append(evaluate_row(row, hw, table.location(i), engine=engine))
        if row.max_output_tokens is None and row.samples_per_query == 1:
            for cap in caps:
                if cap < upper_length(row.lengths()):
                    options.append(evaluate_row(row, hw, table.location(i), cap=cap,
                                                engine=engine))
    return options


def check_benchmark(table: AccuracyTable, benchmark: str | None) -> str | None:
    """Normalise ``--benchmark`` and check that the table has it."""
    if benchmark is None:
        return None
    name = benchmark.strip().lower()
    if name not in table.benchmarks:
        raise TtcsimError(
            f"table {table.name!r} has no benchmark {benchmark!r}; it has: "
            + ", ".join(table.benchmarks),
            "--benchmark",
        )
    return name


# ------------------------------------------------------------------ frontier


def pareto_front(accuracy_pct: Sequence[float], energy_j: Sequence[float]) -> np.ndarray:
    """Mask of the non-dominated points (accuracy up, energy down).

    Point ``p`` is dominated when some ``q`` has ``a_q >= a_p`` and
    ``e_q <= e_p`` with at least one strict.  Exact duplicates are both kept.
    Sort by energy, then sweep: ``p`` survives when its accuracy beats every
    strictly cheaper point and ties the best point of equal energy.
    """
    a = np.asarray(accuracy_pct, dtype=float)
    e = np.asarray(energy_j, dtype=float)
    if a.shape != e.shape or a.ndim != 1:
        raise ValueError("accuracy and energy must be 1-D of equal length")
    order = np.lexsort((-a, e))
    keep = np.zeros(a.size, dtype=bool)
    best_cheaper = -math.inf
    i = 0
    while i < order.size:
        j = i
        while j < order.size and e[order[j]] == e[order[i]]:
            j += 1
        group = order[i:j]
        top = a[group].max()
        if top > best_cheaper:
            keep[group[a[group] == top]] = True
        best_cheaper = max(best_cheaper, top)
        i = j
    return keep


def cheapest_at_least(
    accuracy_pct: Sequence[float], energy_j: Sequence[float], level_pct: float
) -> int | None:
    """Index of the cheapest point with accuracy ``>= level_pct`` (most accurate on ties)."""
    a = np.asarray(accuracy_pct, dtype=float)
    e = np.asarray(energy_j, dtype=float)
    ok = np.flatnonzero(a >= level_pct)
    if ok.size == 0:
        return None
    return int(ok[np.lexsort((-a[ok], e[ok]))[0]])


class LevelChoice(BaseModel):
    """The cheapest option that reaches an accuracy level."""

    model_config = _FROZEN

    accuracy_at_least_pct: float
    label: str
    accuracy_pct: float
    energy_j: float


class ScalingPath(BaseModel):
    """Options joined along one axis: model size (fixed strategy) or samples (fixed model)."""

    model_config = _FROZEN

    kind: str  #: "model scaling" or "test-time scaling"
    fixed: str  #: the strategy (model scaling) or model (test-time scaling) held fixed
    labels: list[str]
    accuracy_pct: list[float]
    energy_j: list[float]


class BenchmarkFrontier(BaseModel):
    """Frontier, cheapest-by-level table and scaling paths of one benchmark."""

    model_config = _FROZEN

    benchmark: str
    options: list[Option]
    on_frontier: list[bool]
    frontier: list[str]  #: labels, cheapest first
    cheapest_by_level: list[LevelChoice]
    paths: list[ScalingPath]


class ParetoResult(BaseModel):
    """Result of :func:`pareto`."""

    model_config = _FROZEN

    table: str
    example: bool
    hw: str
    calibrated_profile: bool
    benchmarks: list[BenchmarkFrontier]

    def as_dict(self) -> dict:
        """Plain dict (JSON-ready)."""
        return self.model_dump()


def _model_size(name: str) -> float:
    from ttcsim.models import get_model
    from ttcsim.simulator.architecture import parameter_count

    return parameter_count(get_model(name))


def scaling_paths(options: Sequence[Option]) -> list[ScalingPath]:
    """Model-scaling paths (same strategy and cap, models by size) and test-time paths.

    A test-time path joins one model's options (same cap) in order of samples
    per query.  Paths with fewer than two options are dropped.
    """
    paths: list[ScalingPath] = []

    def make(kind: str, fixed: str, group: list[Option]) -> None:
        if len(group) >= 2:
            paths.append(
                ScalingPath(
                    kind=kind,
                    fixed=fixed,
                    labels=[o.label for o in group],
                    accuracy_pct=[o.accuracy_pct for o in group],
                    energy_j=[o.energy_j for o in group],
                )
            )

    table_options = [o for o in options if o.accuracy_source == "table"]
    by_strategy: dict[tuple, list[Option]] = {}
    by_model: dict[tuple, list[Option]] = {}
    for o in table_options:
        by_strategy.setdefault((o.strategy, o.max_output_tokens), []).append(o)
        by_model.setdefault((o.model, o.max_output_tokens), []).append(o)
    for (strategy, cap), group in by_strategy.items():
        fixed = strategy + (f" cap {cap}" if cap else "")
        make("model scaling", fixed, sorted(group, key=lambda o: _model_size(o.model)))
    for (model, cap), group in by_model.items():
        fixed = model + (f" cap {cap}" if cap else "")
        make("test-time scaling", fixed, sorted(group, key=lambda o: (o.samples, o.energy_j)))
    return paths


def frontier_of(benchmark: str, options: list[Option]) -> BenchmarkFrontier:
    """Frontier, cheapest option per accuracy level and scaling paths of ``options``."""
    acc = [o.accuracy_pct for o in options]
    energy = [o.energy_j for o in options]
    mask = pareto_front(acc, energy)
    front = sorted(np.flatnonzero(mask), key=lambda i: (energy[i], -acc[i]))
    levels = []
    for level in sorted(set(acc)):
        i = cheapest_at_least(acc, energy, level)
        assert i is not None
        levels.append(
            LevelChoice(
                accuracy_at_least_pct=level,
                label=options[i].label,
                accuracy_pct=acc[i],
                energy_j=energy[i],
            )
        )
    return BenchmarkFrontier(
        benchmark=benchmark,
        options=options,
        on_frontier=[bool(m) for m in mask],
        frontier=[options[i].label for i in front],
        cheapest_by_level=levels,
        paths=scaling_paths(options),
    )


def pareto(
    table: AccuracyTable, hw="h100", benchmark: str | None = None, engine=None
) -> ParetoResult:
    """Joules per query of every row, and the accuracy-energy frontier per benchmark."""
    from ttcsim.hardware import get_profile

    profile = get_profile(hw)
    bench = check_benchmark(table, benchmark)
    options = evaluate_table(table, profile, bench, engine=engine)
    names = [bench] if bench else table.benchmarks
    return ParetoResult(
        table=table.name,
        example=table.example,
        hw=profile.name,
        calibrated_profile=profile.calibrated,
        benchmarks=[frontier_of(b, [o for o in options if o.benchmark == b]) for b in names],
    )


# ------------------------------------------------------------------- routing


class Allocation(BaseModel):
    """Solution of :func:`solve_allocation`: one option index per class."""

    model_config = _FROZEN

    choice: list[int]
    accuracy_pct: float  #: expected accuracy sum_k w_k a_k [%]
    energy_j: float  #: expected energy per query sum_k w_k e_k [J]
    status: str  #: "optimal" (anything else raises)
    solver_message: str
    mip_gap: float  #: relative gap between the solution and the proven bound


def _milp(c, a_rows, lo, hi, sizes):
    from scipy.optimize import Bounds, LinearConstraint, milp

    n = int(sum(sizes))
    pick = np.zeros((len(sizes), n))
    start = 0
    for k, size in enumerate(sizes):
        pick[k, start : start + size] = 1.0
        start += size
    constraints = [LinearConstraint(pick, 1.0, 1.0)]
    constraints += [
        LinearConstraint(row[None, :], lo_, hi_)
        for row, lo_, hi_ in zip(a_rows, lo, hi, strict=True)
    ]
    return milp(
        c=c,
        integrality=np.ones(n),
        bounds=Bounds(0.0, 1.0),
        constraints=constraints,
        options={"mip_rel_gap": 0.0, "presolve": True},
    )


def _decode(x, sizes) -> list[int]:
    out, start = [], 0
    for size in sizes:
        out.append(int(np.argmax(x[start : start + size])))
        start += size
    return out


def solve_allocation(
    accuracy_pct: Sequence[Sequence[float]],
    energy_j: Sequence[Sequence[float]],
    weights: Sequence[float],
    budget_j: float | None = None,
    target_pct: float | None = None,
) -> Allocation:
    """One option per class: max accuracy within ``budget_j``, or min energy for ``target_pct``.

    Binary ``x_ki`` (class ``k`` uses option ``i``), ``sum_i x_ki = 1``.
    Budget mode: maximise ``sum w_k a_ki x_ki`` s.t. ``sum w_k e_ki x_ki <= B``,
    then, among allocations with that accuracy, the least energy.  Target mode:
    minimise ``sum w_k e_ki x_ki`` s.t. ``sum w_k a_ki x_ki >= target``.
    Both are solved with ``scipy.optimize.milp`` at relative gap 0.
    """
    if (budget_j is None) == (target_pct is None):
        raise TtcsimError("give exactly one of a budget or a target accuracy")
    sizes = [len(a) for a in accuracy_pct]
    if len(sizes) != len(weights) or any(s == 0 for s in sizes):
        raise TtcsimError("every class needs at least one option")
    w = np.asarray(weights, dtype=float)
    acc = np.concatenate([wk * np.asarray(a, float) for wk, a in zip(w, accuracy_pct, strict=True)])
    en = np.concatenate([wk * np.asarray(e, float) for wk, e in zip(w, energy_j, strict=True)])

    def finish(res) -> Allocation:
        choice = _decode(res.x, sizes)
        a = sum(w[k] * accuracy_pct[k][i] for k, i in enumerate(choice))
        e = sum(w[k] * energy_j[k][i] for k, i in enumerate(choice))
        return Allocation(
            choice=choice,
            accuracy_pct=float(a),
            energy_j=float(e),
            status="optimal",
            solver_message=str(res.message),
            mip_gap=float(res.mip_gap or 0.0),
        )

    if budget_j is not None:
        cheapest = float(sum(wk * min(e) for wk, e in zip(w, energy_j, strict=True)))
        if budget_j < cheapest * (1 - BUDGET_RTOL):
            raise TtcsimError(
                f"budget {budget_j:.6g} J is below the cheapest allocation ({cheapest:.6g} J)",
                "--budget-j-per-query",
            )
        # energy rows are scaled by the budget, so HiGHS's feasibility tolerance (1e-7)
        # is relative to it; a solution that still overshoots is re-solved with less
        limit = 1.0
        for _ in range(6):
            res = _milp(-acc, [en / budget_j], [-np.inf], [limit], sizes)
            if res.status != 0:
                raise TtcsimError(f"solver failed: {res.message}")
            best = -res.fun
            res2 = _milp(
                en / budget_j,
                [en / budget_j, acc],
                [-np.inf, best - 1e-9 * max(1.0, abs(best))],
                [limit, np.inf],
                sizes,
            )
            res = res2 if res2.status == 0 else res
            out = finish(res)
            if out.energy_j <= budget_j * (1 + BUDGET_RTOL):
                return out
            limit -= 2 * (out.energy_j / budget_j - limit) + 2e-7
        raise TtcsimError("solver could not meet the budget within tolerance")
    best_possible = float(sum(wk * max(a) for wk, a in zip(w, accuracy_pct, strict=True)))
    if target_pct > best_possible + 1e-9:
        raise TtcsimError(
            f"target {target_pct:g} % is above the best reachable {best_possible:.4g} %",
            "--target-accuracy",
        )
    goal = min(target_pct, best_possible)
    e_scale = float(en.max()) or 1.0
    slack = 0.0
    for _ in range(6):  # tighten if the solver's feasibility tolerance undershoots
        res = _milp(en / e_scale, [acc], [min(goal + slack, best_possible)], [np.inf], sizes)
        if res.status != 0:
            raise TtcsimError(f"solver failed: {res.message}")
        out = finish(res)
        if out.accuracy_pct >= goal - 1e-9 * max(1.0, goal):
            return out
        slack += (goal - out.accuracy_pct) * 2 + 2e-7
    raise TtcsimError("solver could not meet the target within tolerance")


class ClassChoice(BaseModel):
    """What one difficulty class is routed to."""

    model_config = _FROZEN

    difficulty: str
    weight: float
    option: Option


class SweepPoint(BaseModel):
    """The router's allocation at one budget of the sweep."""

    model_config = _FROZEN

    budget_j: float
    accuracy_pct: float
    energy_j: float
    labels: list[str]  #: chosen option per class, in mix order


class FixedChoice(BaseModel):
    """One option used for every class (available in all of them)."""

    model_config = _FROZEN

    label: str
    accuracy_pct: float
    energy_j: float


class RouteResult(BaseModel):
    """Result of :func:`route`."""

    model_config = _FROZEN

    table: str
    example: bool
    hw: str
    calibrated_profile: bool
    mix: dict[str, float]
    objective: str  #: "max accuracy within budget" or "min energy for target"
    budget_j_per_query: float | None
    target_accuracy_pct: float | None
    solver: str
    status: str
    solver_message: str
    mip_gap: float
    allocation: list[ClassChoice]
    expected_accuracy_pct: float
    expected_energy_j: float
    options_per_class: dict[str, int]
    fixed_choices: list[FixedChoice]
    curve: list[SweepPoint]  #: every efficient allocation, cheapest first (exact step curve)
    sweep: list[SweepPoint]  #: allocations at log-spaced budgets

    def as_dict(self) -> dict:
        """Plain dict (JSON-ready)."""
        return self.model_dump()


def parse_mix(text: str) -> dict[str, float]:
    """``easy=0.6,hard=0.4`` -> shares per class, normalised to sum to 1."""
    mix: dict[str, float] = {}
    for part in str(text).split(","):
        name, sep, value = part.partition("=")
        name = name.strip().lower()
        if not sep or not name:
            raise TtcsimError(f"expected CLASS=SHARE, got {part!r}", "--mix")
        try:
            share = float(value)
        except ValueError:
            raise TtcsimError(f"share of {name!r} is not a number: {value!r}", "--mix") from None
        if not (math.isfinite(share) and share > 0):
            raise TtcsimError(f"share of {name!r} must be positive, got {value}", "--mix")
        if name in mix:
            raise TtcsimError(f"class {name!r} given twice", "--mix")
        mix[name] = share
    total = sum(mix.values())
    return {k: v / total for k, v in mix.items()}


def _class_of(option: Option) -> str:
    return option.difficulty or option.benchmark


def route(
    table: AccuracyTable,
    hw="h100",
    mix: dict[str, float] | str = "easy=0.5,hard=0.5",
    budget_j: float | None = None,
    target_pct: float | None = None,
    benchmark: str | None = None,
    caps: Sequence[int] = (),
    sweep_points: int = 0,
    engine=None,
) -> RouteResult:
    """Route each difficulty class to the option that serves the mix best.

    A row belongs to class ``difficulty`` (or, without one, to its benchmark's
    name).  ``caps`` adds truncation-model variants of single-sample rows.
    ``sweep_points > 1`` also solves the budget problem on a log-spaced grid
    from the cheapest to the most accurate allocation's energy.
    """
    from ttcsim.hardware import get_profile

    if (budget_j is None) == (target_pct is None):
        raise TtcsimError("give one of --budget-j-per-query or --target-accuracy")
    if budget_j is not None and not (math.isfinite(budget_j) and budget_j > 0):
        raise TtcsimError(f"must be a positive number, got {budget_j}", "--budget-j-per-query")
    if target_pct is not None and not (math.isfinite(target_pct) and 0 <= target_pct <= 100):
        raise TtcsimError(f"must be in [0, 100] %, got {target_pct}", "--target-accuracy")
    shares = parse_mix(mix) if isinstance(mix, str) else dict(mix)
    profile = get_profile(hw)
    bench = check_benchmark(table, benchmark)
    options = evaluate_table(table, profile, bench, caps, engine=engine)
    classes: list[list[Option]] = []
    known = sorted({_class_of(o) for o in options})
    for name in shares:
        group = [o for o in options if _class_of(o) == name]
        if not group:
            raise TtcsimError(
                f"no rows for class {name!r}; the table has: {', '.join(known)}", "--mix"
            )
        classes.append(group)
    acc = [[o.accuracy_pct for o in g] for g in classes]
    en = [[o.energy_j for o in g] for g in classes]
    weights = list(shares.values())
    sol = solve_allocation(acc, en, weights, budget_j=budget_j, target_pct=target_pct)

    keys = set.intersection(*({o.key for o in g} for g in classes))
    fixed = []
    for key in sorted(keys, key=str):
        picks = [next(o for o in g if o.key == key) for g in classes]
        fixed.append(
            FixedChoice(
                label=picks[0].label,
                accuracy_pct=float(
                    sum(w * o.accuracy_pct for w, o in zip(weights, picks, strict=True))
                ),
                energy_j=float(sum(w * o.energy_j for w, o in zip(weights, picks, strict=True))),
            )
        )
    sweep = budget_sweep(classes, weights, sweep_points) if sweep_points > 1 else []
    curve = (
        [
            SweepPoint(
                budget_j=a.energy_j,
                accuracy_pct=a.accuracy_pct,
                energy_j=a.energy_j,
                labels=[g[i].label for g, i in zip(classes, a.choice, strict=True)],
            )
            for a in allocation_frontier(acc, en, weights)
        ]
        if sweep_points > 1
        else []
    )
    return RouteResult(
        table=table.name,
        example=table.example,
        hw=profile.name,
        calibrated_profile=profile.calibrated,
        mix=shares,
        objective="max accuracy within budget" if budget_j is not None else "min energy for target",
        budget_j_per_query=budget_j,
        target_accuracy_pct=target_pct,
        solver="scipy.optimize.milp (HiGHS branch and bound, mip_rel_gap=0)",
        status=sol.status,
        solver_message=sol.solver_message,
        mip_gap=sol.mip_gap,
        allocation=[
            ClassChoice(difficulty=name, weight=w, option=g[i])
            for name, w, g, i in zip(shares, weights, classes, sol.choice, strict=True)
        ],
        expected_accuracy_pct=sol.accuracy_pct,
        expected_energy_j=sol.energy_j,
        options_per_class={name: len(g) for name, g in zip(shares, classes, strict=True)},
        fixed_choices=fixed,
        curve=curve,
        sweep=sweep,
    )


def allocation_frontier(
    accuracy_pct: Sequence[Sequence[float]],
    energy_j: Sequence[Sequence[float]],
    weights: Sequence[float],
    max_points: int = 400,
) -> list[Allocation]:
    """Every efficient allocation (no other is as accurate for less energy), cheapest first.

    Start from the cheapest allocation of the highest reachable accuracy, then
    repeatedly solve the budget problem with a budget just below the last
    allocation's energy.  Each solve returns the next lower step of the exact
    accuracy-vs-budget curve; the walk stops below the cheapest allocation or
    after ``max_points`` steps.
    """
    w = list(weights)
    low = float(sum(wk * min(e) for wk, e in zip(w, energy_j, strict=True)))
    top = float(sum(wk * max(a) for wk, a in zip(w, accuracy_pct, strict=True)))
    out = [solve_allocation(accuracy_pct, energy_j, w, target_pct=top)]
    while len(out) < max_points:
        budget = out[-1].energy_j * (1 - FRONTIER_STEP_RTOL)
        if budget < low:
            break
        nxt = solve_allocation(accuracy_pct, energy_j, w, budget_j=budget)
        if nxt.energy_j >= out[-1].energy_j:
            break
        out.append(nxt)
    return out[::-1]


def budget_sweep(
    classes: list[list[Option]], weights: list[float], points: int
) -> list[SweepPoint]:
    """Router allocations on ``points`` log-spaced budgets, cheapest to most accurate."""
    acc = [[o.accuracy_pct for o in g] for g in classes]
    en = [[o.energy_j for o in g] for g in classes]
    low = float(sum(w * min(e) for w, e in zip(weights, en, strict=True)))
    top_acc = float(sum(w * max(a) for w, a in zip(weights, acc, strict=True)))
    high = solve_allocation(acc, en, weights, target_pct=top_acc).energy_j
    budgets = np.geomspace(low, max(high, low), points) if high > low else np.array([low])
    out = []
    for b in budgets:
        sol = solve_allocation(acc, en, weights, budget_j=float(b))
        out.append(
            SweepPoint(
                budget_j=float(b),
                accuracy_pct=sol.accuracy_pct,
                energy_j=sol.energy_j,
                labels=[g[i].label for g, i in zip(classes, sol.choice, strict=True)],
            )
        )
    return out


# ------------------------------------------------------------ reasoning depth


def saturating_accuracy(cap_tokens, accuracy_max_pct: float, scale_tokens: float):
    """``a(c) = a_max (1 - exp(-c / tau))`` [%] at output-token cap ``c``."""
    c = np.asarray(cap_tokens, dtype=float)
    return accuracy_max_pct * (1.0 - np.exp(-c / scale_tokens))


def fit_saturating(
    cap_tokens: Sequence[float], accuracy_pct: Sequence[float]
) -> tuple[float, float, float]:
    """Least-squares ``(a_max [%], tau [tokens], rms residual [%])`` of :func:`saturating_accuracy`.

    Exact inverse of the forward curve: data generated by it returns its parameters.
    """
    from scipy.optimize import curve_fit

    c = np.asarray(cap_tokens, dtype=float)
    a = np.asarray(accuracy_pct, dtype=float)
    if c.size < 2 or np.unique(c).size < 2:
        raise TtcsimError("fitting a curve needs rows at two or more different caps")
    guess = (min(100.0, a.max() * 1.05 + 1e-6), float(np.median(c)))
    try:
        (a_max, tau), _ = curve_fit(
            saturating_accuracy,
            c,
            a,
            p0=guess,
            bounds=([0.0, 1e-3], [100.0, 1e8]),
            maxfev=20000,
        )
    except RuntimeError as exc:
        raise TtcsimError(f"could not fit a saturating curve: {exc}") from None
    rms = float(np.sqrt(np.mean((saturating_accuracy(c, a_max, tau) - a) ** 2)))
    return float(a_max), float(tau), rms


class DepthPoint(BaseModel):
    """Accuracy and energy at one output-token cap."""

    model_config = _FROZEN

    cap_tokens: int
    accuracy_pct: float
    energy_j: float
    accuracy_pct_per_kj: float
    completion_probability: float
    gpus: int


class DepthResult(BaseModel):
    """Result of :func:`depth`."""

    model_config = _FROZEN

    table: str
    example: bool
    hw: str
    calibrated_profile: bool
    model: str
    strategy: str
    benchmark: str
    curve: str  #: "truncation model" or "saturating fit"
    fit_accuracy_max_pct: float | None
    fit_scale_tokens: float | None
    fit_rms_pct: float | None
    table_points: list[tuple[int, float]]  #: (cap, accuracy %) rows the curve rests on
    points: list[DepthPoint]
    best: DepthPoint
    uncapped: DepthPoint

    def as_dict(self) -> dict:
        """Plain dict (JSON-ready)."""
        return self.model_dump()


def default_cap_grid(longest: int, points: int = 24, shortest: int = 128) -> list[int]:
    """Log-spaced integer caps from ``shortest`` to ``longest`` [tokens]."""
    if longest <= shortest:
        return [longest]
    grid = np.unique(np.round(np.geomspace(shortest, longest, points)).astype(int))
    return [int(c) for c in grid]


def depth(
    table: AccuracyTable,
    hw="h100",
    model: str = "",
    strategy: str = "single",
    benchmark: str | None = None,
    caps: Sequence[int] | None = None,
    points: int = 24,
    engine=None,
) -> DepthResult:
    """Accuracy per joule over output-token caps, and the cap that maximises it.

    Every cap runs on the same GPUs: those the longest cap needs (or the row's ``tp``).
    """
    from ttcsim.hardware import get_profile
    from ttcsim.models import get_model
    from ttcsim.strategies import parse_strategy

    profile = get_profile(hw)
    bench = check_benchmark(table, benchmark)
    model_name = get_model(model).name if model else ""
    strat = parse_strategy(strategy).spec
    picked = [
        (i, r)
        for i, r in enumerate(table.rows)
        if r.model == model_name and r.strategy == strat and (bench is None or r.benchmark == bench)
    ]
    if not picked:
        have = sorted({f"{r.model} {r.strategy} on {r.benchmark}" for r in table.rows})
        raise TtcsimError(
            f"no rows for {model_name or model!r} {strat}"
            + (f" on {bench}" if bench else "")
            + "; the table has: "
            + "; ".join(have),
            "--model",
        )
    benches = {r.benchmark for _, r in picked}
    if len(benches) > 1:
        raise TtcsimError(
            f"rows on several benchmarks {sorted(benches)}; pass --benchmark", "--benchmark"
        )
    # the least-truncated row supplies the uncapped lengths
    base_index, base = max(
        picked, key=lambda ir: ir[1].max_output_tokens or upper_length(ir[1].lengths())
    )
    where = table.location(base_index)
    longest = base.max_output_tokens or upper_length(base.lengths())
    table_points = sorted(
        {(r.max_output_tokens or upper_length(r.lengths()), r.accuracy_pct) for _, r in picked}
    )
    fit = (None, None, None)
    if len({c for c, _ in table_points}) >= 2:
        fit = fit_saturating([c for c, _ in table_points], [a for _, a in table_points])
        curve = "saturating fit"
    else:
        curve = "truncation model"
    wanted = set(caps) if caps else set(default_cap_grid(longest, points))
    grid = sorted({c for c in wanted if c < longest} | {c for c, _ in table_points} | {longest})
    lengths = base.lengths()
    if base.tp is None:  # one deployment for every cap: the GPUs the longest cap needs
        gpus = evaluate_row(base, profile, where, cap=longest, accuracy_pct=0.0,
                            engine=engine).gpus
        base = base.model_copy(update={"tp": gpus})
    out = []
    for cap in grid:
        if curve == "saturating fit":
            accuracy = float(saturating_accuracy(cap, fit[0], fit[1]))
            option = evaluate_row(base, profile, where, cap=cap, accuracy_pct=accuracy,
                                  engine=engine)
        else:
            option = evaluate_row(base, profile, where, cap=cap, engine=engine)
        out.append(
            DepthPoint(
                cap_tokens=cap,
                accuracy_pct=option.accuracy_pct,
                energy_j=option.energy_j,
                accuracy_pct_per_kj=option.accuracy_pct / option.energy_j * 1e3,
                completion_probability=completion_probability(lengths, cap),
                gpus=option.gpus,
            )
        )
    best = max(out, key=lambda p: (p.accuracy_pct_per_kj, -p.cap_tokens))
    return DepthResult(
        table=table.name,
        example=table.example,
        hw=profile.name,
        calibrated_profile=profile.calibrated,
        model=model_name,
        strategy=strat,
        benchmark=base.benchmark,
        curve=curve,
        fit_accuracy_max_pct=fit[0],
        fit_scale_tokens=fit[1],
        fit_rms_pct=fit[2],
        table_points=table_points,
        points=out,
        best=best,
        uncapped=out[-1],
    )
