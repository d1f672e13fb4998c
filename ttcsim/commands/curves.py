"""``ttcsim curve`` and ``ttcsim metrics``: operating curves and energy-per-token tables.

Thin commands: parse options, call one function of :mod:`ttcsim.curves` or
:mod:`ttcsim.metrics`, format.  Only click is imported at module level.
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


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _strategies(values: tuple[str, ...]) -> list[str]:
    """Repeated --strategy options; ``;`` also separates specs (commas belong to options)."""
    out = [s.strip() for v in values for s in v.split(";") if s.strip()]
    return out or ["single"]


def _workload_options(fn):
    """Options shared by ``curve`` and ``metrics`` (the predict workload)."""
    options = [
        click.option("--hw", default="h100", show_default=True,
                     help="Hardware profile(s), comma-separated (e.g. h100,h200,a100)."),
        click.option("--model", "model", default="8b", show_default=True,
                     help="Model(s), comma-separated (e.g. 8b,70b)."),
        click.option("--strategy", "strategies", multiple=True,
                     help="Strategy spec, repeatable (see `ttcsim strategies`); default single."),
        click.option("--prompt-tokens", default="512", show_default=True,
                     help="Prompt length: N, a list of equally likely lengths, or a distribution."),
        click.option("--output-tokens", default="1024", show_default=True,
                     help="Output length per sequence: N, a list, or a distribution."),
        click.option("--concurrency", default=1, show_default=True, type=int,
                     help="Queries batched together."),
        click.option("--tp", default="1", show_default=True,
                     help="Tensor-parallel GPUs (curve: or auto, the smallest that fits)."),
        click.option("--dtype", "weight_dtype", default="bf16", show_default=True,
                     help="Weight dtype: bf16, fp16, fp8, int4."),
        click.option("--kv-dtype", default=None, help="KV-cache dtype (default bf16)."),
        click.option("--reward-model", default=None,
                     help="Reward / verifier model for bon, prm-bon, beam (default: policy)."),
        click.option("--prefix-cache/--no-prefix-cache", default=True, show_default=True,
                     help="Share prompt prefills and KV between samples."),
        click.option("--power-limit-w", default=None, type=float,
                     help="What-if board power limit per GPU [W], down to the board's minimum."),
        click.option("--engine", default=None,
                     help="Engine profile: reference (default), hf-transformers, vllm, or a "
                          "YAML path (see `ttcsim engines list`)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@click.command("curve")
@_workload_options
@click.option("--vary", required=True,
              help="AXIS=LO..HI or AXIS=a,b,c; AXIS: output-tokens, prompt-tokens, context, "
                   "concurrency, samples.")
@click.option("--points", default=12, show_default=True, type=int,
              help="Points of a LO..HI range (geometric when HI/LO >= 10).")
@click.option("--out", "out_path", type=click.Path(dir_okay=False),
              help="Write the curve as CSV (tidy, unit-suffixed columns).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Write a PNG: energy per query and per output token against the axis.")
@click.option("--metric", "metrics", multiple=True,
              help="Column(s) to plot (default energy_j and j_per_output_token).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON records instead of a table.")
@_friendly
def curve(hw, model, strategies, vary, points, out_path, plot_path, metrics, as_json,
          **kw) -> None:
    """Operating curve: energy per query along one workload axis."""
    from ttcsim.curves import CURVE_METRICS, operating_curve
    from ttcsim.errors import TtcsimError

    for m in metrics:
        if m not in CURVE_METRICS:
            raise TtcsimError(f"unknown metric {m!r}; valid: {', '.join(CURVE_METRICS)}",
                              "--metric")
    frame = operating_curve(vary, hw=_names(hw), model=_names(model),
                            strategy=_strategies(strategies), points=points, **kw)
    if out_path:
        from ttcsim.io import atomic_write_text

        atomic_write_text(out_path, frame.to_csv(index=False))
        if not as_json:
            click.echo(f"wrote {len(frame)} points -> {out_path}")
    if plot_path:
        from ttcsim.plotting import plot_curve

        plot_curve(frame, plot_path, metrics=tuple(metrics) or ("energy_j", "j_per_output_token"))
        if not as_json:
            click.echo(f"plot -> {plot_path}")
    if as_json:
        click.echo(json.dumps(json.loads(frame.to_json(orient="records")), indent=2))
    elif not out_path:
        _print_curve(frame)
    bad = frame[frame["status"] != "ok"]
    if len(bad):
        from ttcsim.cli import note

        note(f"{len(bad)} point(s) could not run, e.g. {bad['status'].iloc[0]}", err=True,
             indent="")


def _print_curve(frame) -> None:
    from ttcsim.console import render_table

    axis = frame["vary"].iloc[0]
    rows = []
    notes = []
    for r in frame.itertuples():
        if r.status != "ok":
            rows.append([r.hw, r.model, r.strategy, str(r.x), "-", "-", "-", "-", "-"])
            notes.append(f"{r.hw} {r.model} {r.strategy} at {axis} {r.x}: {r.status}")
            continue
        rows.append([r.hw, r.model, r.strategy, str(r.x), f"{r.energy_j:.1f}",
                     _pm(r.energy_j, r.energy_j_high),
                     f"{r.j_per_output_token:.4f}", f"{r.latency_s:.2f}",
                     _pm(r.latency_s, r.latency_s_high)])
    click.echo(render_table(
        ["hw", "model", "strategy", axis, "J/query", "band", "J/out tok", "latency s", "band"],
        rows, align="<<<>>>>>>", keys=3,
    ))
    for text in notes:
        click.echo(f"  {text}")


def _int_option(text: str, where: str) -> int:
    from ttcsim.errors import TtcsimError

    try:
        return int(text)
    except ValueError:
        raise TtcsimError(f"must be a whole number, got {text!r}", where) from None


def _num(v, fmt: str) -> str:
    return "-" if v is None or v != v else format(v, fmt)


@click.command("metrics")
@_workload_options
@click.option("--seed", default=0, show_default=True, type=int, help="Monte-Carlo seed.")
@click.option("--draws", default=2000, show_default=True, type=int,
              help="Monte-Carlo draws for percentiles (and means without an exact form).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON records instead of a table.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), help="Also write CSV.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Write a histogram PNG of per-query energy over the draws.")
@_friendly
def metrics(hw, model, strategies, seed, draws, as_json, csv_path, plot_path, **kw) -> None:
    """Energy-per-token metrics of one or more strategies, side by side."""
    from ttcsim.metrics import energy_samples, metrics_table

    specs = _strategies(strategies)
    kw["tp"] = _int_option(kw["tp"], "--tp")
    frame = metrics_table(specs, hw=_names(hw), model=_names(model), seed=seed, draws=draws,
                          **kw)
    if csv_path:
        from ttcsim.io import atomic_write_text

        atomic_write_text(csv_path, frame.to_csv(index=False))
    if plot_path:
        from ttcsim.plotting import plot_energy_histogram

        if len(_names(hw)) > 1 or len(_names(model)) > 1:
            from ttcsim.errors import TtcsimError

            raise TtcsimError("the histogram takes one --hw and one --model", "--plot")
        samples = energy_samples(specs, hw=hw, model=model, seed=seed, draws=draws, **kw)
        plot_energy_histogram(samples, plot_path)
    if as_json:
        click.echo(json.dumps(json.loads(frame.to_json(orient="records")), indent=2))
        return
    _print_metrics(frame)
    if csv_path:
        click.echo(f"wrote {csv_path}")
    if plot_path:
        click.echo(f"histogram -> {plot_path}")


def _print_metrics(frame) -> None:
    from ttcsim.cli import note
    from ttcsim.console import render_table

    r0 = frame.iloc[0]
    click.echo(f"prompt {r0.prompt_tokens:.0f} tokens (mean); energies per query; J/tok = joules "
               "per token;\nmarginal = one more token per sequence")
    headers = ["hw", "model", "strategy", "J/query", "band", "+-se", "p90 J", "J/prompt", "J/out",
               "marg.", "J/useful", "out/J", "lat s"]
    rows = [
        [r.hw, r.model, r.strategy, f"{r.energy_j:.1f}", _pm(r.energy_j, r.energy_j_high),
         _num(r.energy_j_stderr, ".1f"),
         _num(r.energy_j_p90, ".1f"), _num(r.j_per_prompt_token, ".4f"),
         _num(r.j_per_output_token, ".4f"), _num(r.j_per_output_token_marginal, ".4f"),
         _num(r.j_per_useful_token, ".3f"), _num(r.output_tokens_per_j, ".2f"),
         f"{r.latency_s:.2f}"]
        for r in frame.itertuples()
    ]
    click.echo(render_table(headers, rows, align="<<<" + ">" * 10, keys=3))
    if (frame["expectation"] == "monte-carlo").any():
        click.echo("  +-se: standard error of a Monte-Carlo mean (0: exact expectation)")
    uncalibrated = frame.loc[~frame["calibrated_profile"].astype(bool)]
    for status in sorted(set(uncalibrated["profile_status"])):
        names = sorted(set(uncalibrated.loc[uncalibrated["profile_status"] == status, "hw"]))
        note(f"{', '.join(names)} uses {status} parameters (not calibrated)")


def _pm(value: float, high: float) -> str:
    """``±12%``: the band's APE recovered from ``high = value / (1 - ape)``."""
    return f"\u00b1{(1 - value / high) * 100:.0f}%" if high > 0 else "-"


COMMANDS = [curve, metrics]
