"""``ttcsim pareto``, ``ttcsim route`` and ``ttcsim depth``: accuracy-energy trade-offs.

Thin commands: parse options, call one function of :mod:`ttcsim.tradeoffs`,
format.  Only click is imported at module level.
"""

from __future__ import annotations

import functools
import json

import click


def _friendly(fn):
    """Defer to :func:`ttcsim.cli._friendly` (imported late: cli imports this module)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from ttcsim.cli import _friendly as friendly

        return friendly(fn)(*args, **kwargs)

    return wrapper


def _energy(j: float) -> str:
    from ttcsim.cli import _fmt_energy

    return _fmt_energy(j)


def _caps(text: str | None) -> list[int]:
    from ttcsim.errors import TtcsimError

    if not text:
        return []
    out = []
    for part in text.split(","):
        try:
            value = int(part)
        except ValueError:
            raise TtcsimError(f"not a whole number of tokens: {part!r}", "--caps") from None
        if value < 1:
            raise TtcsimError(f"caps must be >= 1 token, got {value}", "--caps")
        out.append(value)
    return sorted(set(out))


def _header(result, what: str) -> None:
    status = "calibrated" if result.calibrated_profile else "datasheet-default"
    click.echo(f"{what} -- table {result.table}, {result.hw} ({status} profile)")
    if result.example:
        from ttcsim.cli import note

        note(
            "example table transcribed from papers; lengths are assumptions "
            "(see docs/ACCURACY.md)"
        )


def _cap(value: int | None) -> str:
    return str(value) if value else "-"


_ENGINE_HELP = "Engine profile: reference (default), hf-transformers, vllm, or a YAML path."
_ACCURACY_HELP = (
    "Accuracy table: a bundled name (deepseek-r1-distill, self-consistency) or a YAML/CSV path."
)


@click.command("pareto")
@click.option("--accuracy", "accuracy", required=True, help=_ACCURACY_HELP)
@click.option(
    "--hw", default="h100", show_default=True, help="Hardware profile name, alias or YAML path."
)
@click.option(
    "--benchmark", default=None, help="Only this benchmark (default: each benchmark separately)."
)
@click.option(
    "--plot",
    "plot_path",
    default=None,
    type=click.Path(dir_okay=False),
    help="Write a PNG of the frontier.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@click.option("--engine", default=None, help=_ENGINE_HELP)
@_friendly
def pareto_cmd(
    accuracy: str, hw: str, benchmark: str | None, plot_path: str | None, as_json: bool,
    engine: str | None = None,
) -> None:
    """Accuracy-energy frontier of the options in an accuracy table."""
    from ttcsim.accuracy import load_accuracy_table
    from ttcsim.tradeoffs import pareto

    result = pareto(load_accuracy_table(accuracy), hw, benchmark, engine=engine)
    if plot_path:
        from ttcsim.plot_tradeoffs import plot_pareto

        plot_pareto(result, plot_path)
    if as_json:
        out = result.as_dict()
        out["plot"] = plot_path
        click.echo(json.dumps(out, indent=2))
        return
    _header(result, "accuracy-energy frontier")
    for bench in result.benchmarks:
        click.echo(
            f"\nbenchmark {bench.benchmark}: {len(bench.options)} options, "
            f"{sum(bench.on_frontier)} on the frontier (*)"
        )
        from ttcsim.console import render_table

        width = max(len(o.model) for o in bench.options)
        rows = sorted(
            zip(bench.options, bench.on_frontier, strict=True), key=lambda of: of[0].energy_j
        )
        click.echo(render_table(
            ["model", "strategy", "cap", "accuracy", "energy/query", "GPUs", ""],
            [[o.model, o.strategy, _cap(o.max_output_tokens), f"{o.accuracy_pct:.1f}%",
              _energy(o.energy_j), str(o.gpus), "*" if front else ""] for o, front in rows],
            align="<<>>>><", indent="  ",
        ))
        click.echo("  cheapest option for each accuracy level:")
        for level in bench.cheapest_by_level:
            click.echo(
                f"    >= {level.accuracy_at_least_pct:5.1f}%  {level.label:<{width + 14}} "
                f"{_energy(level.energy_j)}"
            )
    if plot_path:
        click.echo(f"\nwrote {plot_path}")


@click.command("route")
@click.option("--accuracy", "accuracy", required=True, help=_ACCURACY_HELP)
@click.option(
    "--hw", default="h100", show_default=True, help="Hardware profile name, alias or YAML path."
)
@click.option(
    "--mix", required=True, help="Share of each difficulty class, e.g. easy=0.6,hard=0.4."
)
@click.option(
    "--budget-j-per-query",
    "budget",
    type=float,
    default=None,
    help="Energy budget per query [J]: maximise accuracy.",
)
@click.option(
    "--target-accuracy",
    "target",
    type=float,
    default=None,
    help="Accuracy to reach [%]: minimise energy.",
)
@click.option("--benchmark", default=None, help="Only rows of this benchmark.")
@click.option(
    "--caps",
    default=None,
    help="Output-token caps to add for single-sample rows (truncation model), e.g. 4096,8192.",
)
@click.option(
    "--sweep",
    "sweep",
    type=int,
    default=0,
    show_default=True,
    help="Budgets in the accuracy-energy sweep (0: none; 24 with --plot).",
)
@click.option(
    "--plot",
    "plot_path",
    default=None,
    type=click.Path(dir_okay=False),
    help="Write a PNG of the router's curve vs fixed choices.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@click.option("--engine", default=None, help=_ENGINE_HELP)
@_friendly
def route_cmd(
    accuracy, hw, mix, budget, target, benchmark, caps, sweep, plot_path, as_json, engine=None
) -> None:
    """Energy-aware routing: one option per difficulty class, solved exactly."""
    from ttcsim.accuracy import load_accuracy_table
    from ttcsim.errors import TtcsimError
    from ttcsim.tradeoffs import route

    if (budget is None) == (target is None):
        raise TtcsimError("give exactly one of --budget-j-per-query or --target-accuracy")
    if sweep < 0 or sweep == 1 or sweep > 500:
        raise TtcsimError(f"must be 0 or 2..500, got {sweep}", "--sweep")
    points = sweep or (24 if plot_path else 0)
    result = route(
        load_accuracy_table(accuracy),
        hw,
        mix,
        budget_j=budget,
        target_pct=target,
        benchmark=benchmark,
        caps=_caps(caps),
        sweep_points=points,
        engine=engine,
    )
    if plot_path:
        from ttcsim.plot_tradeoffs import plot_route

        plot_route(result, plot_path)
    if as_json:
        out = result.as_dict()
        out["plot"] = plot_path
        click.echo(json.dumps(out, indent=2))
        return
    _header(result, "energy-aware routing")
    goal = (
        f"budget {_energy(result.budget_j_per_query)} per query"
        if result.budget_j_per_query is not None
        else f"target {result.target_accuracy_pct:g}% accuracy"
    )
    click.echo(
        f"  {result.objective}, {goal}; mix "
        + ", ".join(f"{k}={v:.2g}" for k, v in result.mix.items())
    )
    click.echo(f"  solver {result.solver}: {result.status}, optimality gap {result.mip_gap:g}")
    width = max(
        len(label)
        for label in [c.option.label for c in result.allocation]
        + [f.label for f in result.fixed_choices]
    )
    click.echo(
        f"  {'class':<10} {'share':>5}  {'option':<{width}} {'accuracy':>9} {'energy/query':>13}"
    )
    for c in result.allocation:
        o = c.option
        click.echo(
            f"  {c.difficulty:<10} {c.weight:5.2f}  {o.label:<{width}} {o.accuracy_pct:8.1f}% "
            f"{_energy(o.energy_j):>13}"
            + ("  (truncation model)" if o.accuracy_source != "table" else "")
        )
    click.echo(
        f"  expected: {result.expected_accuracy_pct:.2f}% at "
        f"{_energy(result.expected_energy_j)} per query"
    )
    if result.fixed_choices:
        click.echo("  one option for every class, for comparison:")
        for f in sorted(result.fixed_choices, key=lambda f: f.energy_j):
            click.echo(f"    {f.label:<{width}} {f.accuracy_pct:8.2f}% {_energy(f.energy_j):>13}")
    if sweep and result.sweep:
        click.echo("  budget sweep (router):")
        for p in result.sweep:
            click.echo(
                f"    budget {_energy(p.budget_j):>10}: {p.accuracy_pct:6.2f}% using "
                f"{_energy(p.energy_j):>10}  [{' | '.join(p.labels)}]"
            )
    if plot_path:
        click.echo(f"wrote {plot_path}")


@click.command("depth")
@click.option("--accuracy", "accuracy", required=True, help=_ACCURACY_HELP)
@click.option(
    "--hw", default="h100", show_default=True, help="Hardware profile name, alias or YAML path."
)
@click.option("--model", "model", required=True, help="Model whose rows give accuracy vs cap.")
@click.option("--strategy", default="single", show_default=True, help="Strategy of those rows.")
@click.option("--benchmark", default=None, help="Benchmark (needed when the rows span several).")
@click.option(
    "--caps",
    default=None,
    help="Caps to evaluate [tokens], e.g. 1024,2048,4096 (default: log grid).",
)
@click.option(
    "--points",
    default=24,
    show_default=True,
    type=click.IntRange(2, 400),
    help="Caps in the default log grid.",
)
@click.option(
    "--plot",
    "plot_path",
    default=None,
    type=click.Path(dir_okay=False),
    help="Write a PNG of the curve.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--engine", default=None, help=_ENGINE_HELP)
@_friendly
def depth_cmd(
    accuracy, hw, model, strategy, benchmark, caps, points, plot_path, as_json, engine=None
) -> None:
    """Reasoning depth: the output-token cap with the best accuracy per joule."""
    from ttcsim.accuracy import load_accuracy_table
    from ttcsim.tradeoffs import depth

    result = depth(
        load_accuracy_table(accuracy),
        hw,
        model,
        strategy,
        benchmark,
        caps=_caps(caps) or None,
        points=points,
        engine=engine,
    )
    if plot_path:
        from ttcsim.plot_tradeoffs import plot_depth

        plot_depth(result, plot_path)
    if as_json:
        out = result.as_dict()
        out["plot"] = plot_path
        click.echo(json.dumps(out, indent=2))
        return
    _header(result, "reasoning depth")
    click.echo(
        f"  {result.model} {result.strategy} on {result.benchmark}, "
        f"{result.points[-1].gpus} GPU(s) at every cap; accuracy vs cap from the {result.curve}"
    )
    if result.fit_accuracy_max_pct is not None:
        click.echo(
            f"  fit a(c) = {result.fit_accuracy_max_pct:.2f}% * (1 - exp(-c / "
            f"{result.fit_scale_tokens:.0f})), rms residual {result.fit_rms_pct:.2f}%"
        )
    click.echo(f"  {'cap':>7} {'finished':>8} {'accuracy':>9} {'energy/query':>13} {'%/kJ':>8}")
    for p in result.points:
        mark = "  <- best" if p.cap_tokens == result.best.cap_tokens else ""
        click.echo(
            f"  {p.cap_tokens:>7} {p.completion_probability * 100:7.1f}% "
            f"{p.accuracy_pct:8.2f}% {_energy(p.energy_j):>13} {p.accuracy_pct_per_kj:8.3f}{mark}"
        )
    b, u = result.best, result.uncapped
    click.echo(
        f"  best cap {b.cap_tokens} tokens: {b.accuracy_pct:.2f}% at {_energy(b.energy_j)} "
        f"({b.accuracy_pct_per_kj:.3f} %/kJ) vs {u.accuracy_pct:.2f}% at "
        f"{_energy(u.energy_j)} uncapped"
    )
    if plot_path:
        click.echo(f"wrote {plot_path}")


COMMANDS = [pareto_cmd, route_cmd, depth_cmd]
