"""``ttcsim plan``: the fewest GPUs that serve a load under latency targets, and their costs.

Thin command: parse options, call :func:`ttcsim.plan.plan`, format.  Only click
is imported at module level.
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


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.0f}"


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


_COLUMNS = (
    # header, width, formatter
    ("option", 18, lambda o: f"{o.hw} tp{o.tp}"),
    ("cap W", 5, lambda o: _num(o.power_limit_w, ".0f")),
    ("GPUs", 5, lambda o: _num(o.gpus, "d")),
    ("GPU range", 9, lambda o: "-" if o.gpus_low is None else f"{o.gpus_low}-{o.gpus_high}"),
    ("repl", 5, lambda o: _num(o.replicas, "d")),
    ("batch", 6, lambda o: _num(o.batch, ".0f")),
    ("util", 5, lambda o: _num(o.utilization, ".2f")),
    ("avg kW", 7, lambda o: _num(o.avg_power_kw, ".2f")),
    ("peak kW", 8, lambda o: _num(o.peak_power_kw, ".2f")),
    ("kWh/day", 8, lambda o: _num(o.kwh_per_day, ".1f")),
    ("kWh range", 13, lambda o: "-" if o.kwh_per_day_low is None
     else f"{o.kwh_per_day_low:.0f}-{o.kwh_per_day_high:.0f}"),
    ("J/query", 8, lambda o: _num(o.j_per_query, ".0f")),
    ("Wh/q", 6, lambda o: _num(o.wh_per_query, ".3f")),
    ("$/day", 7, lambda o: _num(o.usd_per_day, ".0f")),
    ("$/Mtok", 7, lambda o: _num(o.usd_per_million_output_tokens, ".3f")),
    ("tCO2/yr", 8, lambda o: _num(o.co2_tonnes_per_year, ".2f")),
    ("TTFT90", 7, lambda o: _ms(o.ttft_p90_s)),
    (
        "TPOT90",
        7,
        lambda o: _ms(o.tpot_p90_s) if o.tpot_p90_s is None else f"{o.tpot_p90_s * 1e3:.1f}",
    ),
    ("E2E90", 6, lambda o: _num(o.e2e_p90_s, ".1f")),
)


def _slo_text(p) -> str:
    parts = []
    if p.slo_ttft_p90_s is not None:
        parts.append(f"TTFT {p.slo_ttft_p90_s * 1e3:g} ms")
    if p.slo_tpot_p90_s is not None:
        parts.append(f"TPOT {p.slo_tpot_p90_s * 1e3:g} ms")
    if p.slo_e2e_p90_s is not None:
        parts.append(f"E2E {p.slo_e2e_p90_s:g} s")
    return "p90 " + ", ".join(parts) if parts else "none (throughput only)"


def _print_plan(p) -> None:
    from ttcsim.console import render_table, wrap_text

    def echo_wrapped(text: str, indent: str = "") -> None:
        click.echo(wrap_text(text, indent))

    echo_wrapped(
        f"plan: {p.model}, {p.strategy}, {p.qps:g} queries/s ({p.arrivals}), prompt "
        f"{p.prompt_tokens_spec}, output {p.output_tokens_spec} per sample"
    )
    echo_wrapped(
        f"SLO {_slo_text(p)}; max batch {p.max_batch} sequences, {p.chunk_tokens} tokens per "
        f"pass; ${p.usd_per_gpu_hour:g}/GPU-h, ${p.usd_per_kwh:g}/kWh, "
        f"{p.carbon_g_per_kwh:g} gCO2/kWh, PUE {p.pue:g}",
        "  ",
    )
    met = [o for o in p.options if o.slo_met]
    if met:
        rows = [
            [f(o) for _, _, f in _COLUMNS]
            + [("$" if o.cheapest else "") + ("E" if o.lowest_energy else "")
               + ("P" if o.best_power_limit else "")]
            for o in met
        ]
        headers = [h for h, _, _ in _COLUMNS] + [""]
        click.echo(render_table(headers, rows, align="<" + ">" * (len(_COLUMNS) - 1) + "<",
                                indent="  "))
    what_by_cause = {
        "memory": "does not fit",
        "setup": "cannot run",
        "slo": "cannot meet the SLO",
        "power": "cannot meet the SLO",
    }
    for o in p.options:
        if not o.slo_met:
            what = what_by_cause.get(o.cause, "cannot meet the SLO" if o.fits else "does not fit")
            echo_wrapped(f"{o.hw} tp{o.tp}: {what}: {o.reason}", "  ")
    click.echo(
        "  ($ = cheapest, E = lowest energy, P = lowest-energy power cap of its hardware and tp;\n"
        "   kW, kWh and J at the GPUs, costs and CO2 with PUE; ranges: the profiles' error bands)"
    )
    r = p.recommended
    if r is None:
        echo_wrapped(f"infeasible ({p.cause}): {p.reason}")
    else:
        echo_wrapped(
            f"recommended: {r.gpus}x {r.hw} ({r.replicas} "
            f"{'replica' if r.replicas == 1 else 'replicas'} of tp{r.tp}, "
            f"batch {r.batch:.0f}, utilisation {r.utilization:.0%}): "
            f"${r.usd_per_day:,.0f}/day, {r.kwh_per_day:,.1f} kWh/day, "
            f"{r.j_per_query:,.0f} J ({r.wh_per_query:.3f} Wh) per query, "
            f"{r.co2_tonnes_per_year:.2f} t CO2/year"
        )
    from ttcsim.cli import quiet

    notes = list(p.notes)
    status = {o.hw: o.profile_status for o in p.options if o.profile_status}
    uncalibrated = [name for name, cal in p.calibrated_profiles.items() if not cal]
    for kind in ("transferred", "datasheet-default"):
        names = [n for n in uncalibrated if status.get(n, "datasheet-default") == kind]
        if names:
            notes.append(f"{kind} (not calibrated) profiles: {', '.join(names)}")
    for text in notes if not quiet() else ():
        echo_wrapped(f"note: {text}", "  ")


@click.command("plan")
@click.option(
    "--hw",
    default="h100",
    show_default=True,
    help="Hardware profiles, comma-separated (h100,h200,a100).",
)
@click.option(
    "--model",
    "model",
    default="8b",
    show_default=True,
    help="Catalog model, alias or config.json path.",
)
@click.option(
    "--strategy",
    default="single",
    show_default=True,
    help="single, vote<N>, bon<N> or prm-bon<N>.",
)
@click.option(
    "--qps",
    type=float,
    default=None,
    help="Fleet load [queries/s] (required without --trace; with it, rescales the trace).",
)
@click.option(
    "--prompt-tokens",
    default="512",
    show_default=True,
    help="Prompt length: N or a distribution.",
)
@click.option(
    "--output-tokens",
    default="1024",
    show_default=True,
    help="Output length per sample: N, a list (one per sample) or a distribution.",
)
@click.option(
    "--slo-ttft-p90-ms",
    type=float,
    default=None,
    help="Target p90 time to first token [ms].",
)
@click.option(
    "--slo-tpot-p90-ms",
    type=float,
    default=None,
    help="Target p90 time per output token [ms].",
)
@click.option(
    "--slo-e2e-p90-s",
    type=float,
    default=None,
    help="Target p90 end-to-end latency [s].",
)
@click.option(
    "--tp",
    default="1,2,4,8",
    show_default=True,
    help="Tensor-parallel degrees to consider.",
)
@click.option(
    "--max-batch",
    default=256,
    show_default=True,
    type=int,
    help="Running sequences per replica at most (vLLM max_num_seqs).",
)
@click.option(
    "--chunk-tokens",
    default=8192,
    show_default=True,
    type=int,
    help="Tokens per forward pass, decode + prefill chunk (vLLM max_num_batched_tokens).",
)
@click.option(
    "--usd-per-gpu-hour",
    default=2.5,
    show_default=True,
    type=float,
    help="GPU rental or amortisation [USD/GPU-hour].",
)
@click.option(
    "--usd-per-kwh",
    default=0.12,
    show_default=True,
    type=float,
    help="Electricity price [USD/kWh].",
)
@click.option(
    "--carbon-g-per-kwh",
    default=400.0,
    show_default=True,
    type=float,
    help="Grid carbon intensity [gCO2/kWh].",
)
@click.option(
    "--pue",
    default=1.2,
    show_default=True,
    type=float,
    help="Facility power usage effectiveness.",
)
@click.option(
    "--dtype",
    "weight_dtype",
    default="bf16",
    show_default=True,
    help="Weight dtype: bf16, fp16, fp8, int4.",
)
@click.option(
    "--kv-dtype",
    default=None,
    help="KV-cache dtype (default bf16; fp8 with fp8 weights).",
)
@click.option(
    "--prefix-cache/--no-prefix-cache",
    default=True,
    show_default=True,
    help="A query's samples share its prompt's prefill.",
)
@click.option(
    "--reward-model",
    default=None,
    help="Reward model for bon<N> (default: the policy model).",
)
@click.option(
    "--trace",
    "trace",
    default=None,
    type=click.Path(dir_okay=False),
    help="CSV of arrival_s[,prompt_tokens,output_tokens] instead of Poisson arrivals.",
)
@click.option(
    "--queries",
    default=300,
    show_default=True,
    type=int,
    help="Measured queries per simulated load.",
)
@click.option(
    "--seed",
    default=0,
    show_default=True,
    type=click.IntRange(0, 2**63 - 1),
    help="Seed of lengths and arrivals.",
)
@click.option(
    "--power-limit-w",
    default=None,
    type=float,
    help="What-if board power limit per GPU [W] for every option, down to the board's minimum.",
)
@click.option(
    "--search-power-limit",
    is_flag=True,
    help="Also try power caps of 100 % down to 40 % of each board's limit; per hardware and "
    "tp, P marks the cap with the lowest energy meeting the SLO.",
)
@click.option(
    "--engine",
    default=None,
    help="Engine profile (host time, kernels, memory; plan's own continuous-batching "
    "scheduler runs the passes): reference (default), hf-transformers, vllm, or a YAML path.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option(
    "--plot",
    "plot_path",
    default=None,
    type=click.Path(dir_okay=False),
    help="Write a PNG of energy per query and cost against QPS.",
)
@_friendly
def plan_cmd(
    as_json: bool,
    plot_path: str | None,
    slo_ttft_p90_ms: float | None,
    slo_tpot_p90_ms: float | None,
    slo_e2e_p90_s: float | None,
    usd_per_gpu_hour: float,
    usd_per_kwh: float,
    carbon_g_per_kwh: float,
    pue: float,
    **kw,
) -> None:
    """Size a deployment: fewest GPUs per hardware and TP meeting every SLO, and their costs."""
    from ttcsim.errors import TtcsimError
    from ttcsim.plan import Prices, Slo, plan

    if kw["qps"] is None and kw["trace"] is None:
        raise TtcsimError("give --qps (or --trace)", "--qps")
    slo = Slo(
        ttft_p90_s=None if slo_ttft_p90_ms is None else slo_ttft_p90_ms / 1e3,
        tpot_p90_s=None if slo_tpot_p90_ms is None else slo_tpot_p90_ms / 1e3,
        e2e_p90_s=slo_e2e_p90_s,
    )
    prices = Prices(usd_per_gpu_hour, usd_per_kwh, carbon_g_per_kwh, pue)
    result = plan(slo=slo, prices=prices, curves=plot_path is not None, **kw)
    if plot_path:
        from ttcsim.plot_plan import plot_plan

        plot_plan(result, plot_path)
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2))
    else:
        _print_plan(result)
        if plot_path:
            click.echo(f"  plot: {plot_path}")
    if not result.feasible:  # a result, but scripts must be able to tell (docs/ERRORS.md)
        from ttcsim.cli import EXIT_INFEASIBLE

        first = result.reason.split("; ")[0]
        click.echo(f"error: infeasible ({result.cause}): {first}", err=True)
        raise SystemExit(EXIT_INFEASIBLE)


COMMANDS = [plan_cmd]
