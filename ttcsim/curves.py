"""Operating curves: energy and latency of a query as one workload axis varies.

``operating_curve`` calls :func:`ttcsim.predict.predict` once per point for
every (hardware, model, strategy) and returns a tidy DataFrame: one row per
point, unit-suffixed columns (:data:`CURVE_COLUMNS`).  Points that cannot run
(the model does not fit, the context overflows) are kept with ``status`` set
to the reason and NaN metrics, so a curve shows where a configuration stops.

Axes (``--vary AXIS=RANGE``)::

    output-tokens   output length of every sequence        -> output_length_tokens
    prompt-tokens   prompt length                          -> prompt_length_tokens
    context         prompt + longest output (the prompt    -> context_tokens
                    fills the context; output as given)
    concurrency     queries batched together               -> concurrency_queries
    samples         the strategy's count (vote<N>'s N,     -> samples
                    beam<W>'s W, refine<K>'s K, ...)

``RANGE`` is ``LO..HI`` (``points`` values, geometric when ``HI/LO >= 10``,
else evenly spaced, rounded to whole numbers) or an explicit list ``a,b,c``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

from ttcsim.errors import TtcsimError

#: Axis name -> column holding its value.
AXES = {
    "output-tokens": "output_length_tokens",
    "prompt-tokens": "prompt_length_tokens",
    "context": "context_tokens",
    "concurrency": "concurrency_queries",
    "samples": "samples",
}
#: Default number of points of a ``LO..HI`` range.
DEFAULT_POINTS = 12
#: Most points one axis may have.
MAX_POINTS = 500

#: Metric columns of a curve (besides hw, model, strategy, vary, the axis value, status).
CURVE_METRICS = (
    "energy_j",
    "energy_prefill_j",
    "energy_decode_j",
    "energy_score_j",
    "latency_s",
    "ttft_s",
    "output_tokens",
    "useful_tokens",
    "j_per_output_token",
    "j_per_useful_token",
    "j_per_prompt_token",
    "output_tokens_per_j",
    "avg_power_w",
    "peak_power_w",
    "energy_j_low",
    "energy_j_high",
    "latency_s_low",
    "latency_s_high",
    "power_limit_w",
)
CURVE_COLUMNS = (
    "hw", "model", "strategy", "series", "vary", "x", "tp", "gpus", *CURVE_METRICS,
    "power_limited", "status",
)
#: Tensor-parallel degrees tried, smallest first, with ``tp="auto"``.
AUTO_TP = (1, 2, 4, 8, 16)


def parse_vary(text: str, points: int = DEFAULT_POINTS) -> tuple[str, list[int]]:
    """``AXIS=LO..HI`` or ``AXIS=a,b,c`` -> ``(axis, sorted unique whole values)``."""
    where = "--vary"
    axis, eq, spec = str(text).partition("=")
    axis = axis.strip().lower()
    if not eq or axis not in AXES:
        raise TtcsimError(
            f"expected AXIS=LO..HI or AXIS=a,b,c with AXIS one of {', '.join(AXES)}; got {text!r}",
            where,
        )
    if not isinstance(points, int) or not 2 <= points <= MAX_POINTS:
        raise TtcsimError(f"must be 2..{MAX_POINTS}, got {points}", "--points")
    spec = spec.strip()
    if ".." in spec:
        lo_text, _, hi_text = spec.partition("..")
        lo, hi = _whole(lo_text, where), _whole(hi_text, where)
        if hi <= lo:
            raise TtcsimError(f"range {spec!r} must go up (LO < HI)", where)
        if hi / lo >= 10:
            raw = np.geomspace(lo, hi, points)
        else:
            raw = np.linspace(lo, hi, points)
        values = sorted({int(round(v)) for v in raw})
    else:
        values = sorted({_whole(v, where) for v in spec.split(",") if v.strip()})
    if not values:
        raise TtcsimError(f"no values in {spec!r}", where)
    return axis, values


def _whole(text: str, where: str) -> int:
    try:
        value = float(text)
    except ValueError:
        raise TtcsimError(f"not a number: {text.strip()!r}", where) from None
    if not math.isfinite(value) or value != int(value) or value < 1:
        raise TtcsimError(f"values must be whole numbers >= 1, got {text.strip()!r}", where)
    return int(value)


def _max_output_tokens(output_tokens) -> int:
    from ttcsim.distributions import LengthList, parse_lengths

    lengths = parse_lengths(output_tokens, "--output-tokens")
    return int(max(lengths.values) if isinstance(lengths, LengthList) else lengths.upper_bound())


def _series_label(strategy, axis: str) -> str:
    """The strategy a curve follows: its spec, or ``vote<N>(...)`` when N is the axis."""
    if axis != "samples":
        return strategy.spec
    head = getattr(strategy, "outer", strategy)
    rest = strategy.spec[len(head.spec):]
    prefix = f"{head.name}{getattr(head, head.count_field)}"
    return f"{head.name}<N>{head.spec[len(prefix):]}{rest}"


def _point_kwargs(axis: str, value: int, strategy, base: dict) -> dict:
    """predict() arguments of one point."""
    kw = dict(base, strategy=strategy)
    if axis == "output-tokens":
        kw["output_tokens"] = value
    elif axis == "prompt-tokens":
        kw["prompt_tokens"] = value
    elif axis == "concurrency":
        kw["concurrency"] = value
    elif axis == "samples":
        kw["strategy"] = strategy.with_count(value)
    else:  # context: the prompt fills what the longest output leaves
        longest = _max_output_tokens(base["output_tokens"])
        if value <= longest:
            raise TtcsimError(
                f"context {value} leaves no room for a prompt (longest output {longest})",
                "--vary",
            )
        kw["prompt_tokens"] = value - longest
    return kw


def operating_curve(
    vary: str,
    hw: Iterable[str] | str = ("h100",),
    model: Iterable[str] | str = ("8b",),
    strategy: Sequence[str] | str = ("single",),
    points: int = DEFAULT_POINTS,
    prompt_tokens: int | str = 512,
    output_tokens="1024",
    concurrency: int = 1,
    **predict_kw,
):
    """Energy, latency and energy-per-token along one axis: a tidy DataFrame.

    Parameters
    ----------
    vary : ``AXIS=LO..HI`` or ``AXIS=a,b,c`` (see the module docstring)
    hw, model, strategy : one name or several; every combination is a curve
    points : values of a ``LO..HI`` range
    prompt_tokens, output_tokens, concurrency : the fixed workload (the
        varied axis overrides its own)
    predict_kw : further :func:`~ttcsim.predict.predict` arguments (dtype...);
        ``tp="auto"`` runs each point on the smallest tensor-parallel degree
        of :data:`AUTO_TP` that fits (the ``tp`` and ``gpus`` columns say which)

    Returns a DataFrame with :data:`CURVE_COLUMNS`: ``vary`` names the axis and
    ``x`` holds its value (also under the axis's own column, e.g.
    ``output_length_tokens``); ``series`` is the curve a row belongs to (the
    strategy, or its family such as ``vote<N>`` when the axis is ``samples``).
    """
    import pandas as pd

    from ttcsim.errors import DoesNotFitError
    from ttcsim.predict import predict
    from ttcsim.strategies import parse_strategy

    if predict_kw.get("engine") is not None:  # an unknown engine fails once, not per point
        from ttcsim.engines import get_engine

        predict_kw["engine"] = get_engine(predict_kw["engine"])
    tp = predict_kw.pop("tp", 1)
    auto = isinstance(tp, str) and tp.strip().lower() == "auto"
    if isinstance(tp, str) and not auto:
        try:
            tp = int(tp)
        except ValueError:
            raise TtcsimError(f"must be a whole number or auto, got {tp!r}", "--tp") from None
    tps = AUTO_TP if auto else (tp,)

    def run(h, mdl, kw):
        from ttcsim.deployment import tensor_parallel_problem

        for i, k in enumerate(tps):
            if auto and i < len(tps) - 1 and tensor_parallel_problem(mdl, k):
                continue  # auto: only degrees the model's heads can be split into
            try:
                return predict(hw=h, model=mdl, tp=k, **kw)
            except DoesNotFitError:
                if i == len(tps) - 1:
                    raise
        raise AssertionError("unreachable")

    from ttcsim.hardware import get_profile
    from ttcsim.models import get_model

    axis, values = parse_vary(vary, points)
    hws = [get_profile(h) for h in ([hw] if isinstance(hw, str) else list(hw))]
    models = [get_model(m) for m in ([model] if isinstance(model, str) else list(model))]
    strategies = [strategy] if isinstance(strategy, str) else list(strategy)
    if not hws or not models or not strategies:
        raise TtcsimError("need at least one hardware profile, model and strategy")
    parsed = [parse_strategy(s, predict_kw.get("reward_model")) for s in strategies]
    if axis == "samples":
        for s in parsed:
            if s.count_field is None:
                raise TtcsimError(f"{s.spec} has no sample count to vary", "--vary")
    base = dict(
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        concurrency=concurrency,
        percentiles=False,
        marginal=False,
        **predict_kw,
    )
    rows = []
    for h in hws:
        for mdl in models:
            for strat in parsed:
                for value in values:
                    row = {"hw": h.name, "model": mdl.name, "strategy": strat.spec,
                           "series": _series_label(strat, axis), "vary": axis, "x": value}
                    try:
                        kw = _point_kwargs(axis, value, strat, base)
                        row["strategy"] = getattr(kw["strategy"], "spec", kw["strategy"])
                        r = run(h, mdl, kw)
                    except TtcsimError as exc:
                        row.update({k: np.nan for k in CURVE_METRICS})
                        row.update(tp=np.nan, gpus=np.nan, power_limited=False, status=str(exc))
                    else:
                        row.update(tp=r.tp, gpus=r.gpus)
                        d = r.as_dict()
                        row.update({k: d[k] for k in CURVE_METRICS})
                        row.update(power_limited=r.power_limited, status="ok")
                    rows.append(row)
    frame = pd.DataFrame(rows, columns=list(CURVE_COLUMNS))
    frame[AXES[axis]] = frame["x"]
    for col in CURVE_METRICS:
        frame[col] = frame[col].astype(float)
    return frame
