"""Command-line interface: a thin layer over the Python API.

Commands parse options, call one API function and format its result.  Every
:class:`~ttcsim.errors.TtcsimError` becomes a one-line ``error: ...`` on
stderr with exit code 2; any other exception is a bug in ttcsim and becomes
``error: internal error: ...`` with exit code 1 (the traceback with
``--verbose``).  Exit codes are listed in docs/ERRORS.md.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import math
import sys
import traceback
import warnings
from pathlib import Path

import click

from ttcsim.errors import TtcsimError


def _one_line(text: str) -> str:
    """Whitespace, newlines included, collapsed: an error is always one line."""
    return " ".join(str(text).split())


#: Exit codes (docs/ERRORS.md): bad input, and a bug in ttcsim.
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 1
#: ``plan`` ran, but no option meets the targets (memory, SLO or power).
EXIT_INFEASIBLE = 3


def _root_flag(name: str) -> bool:
    """A global flag (``--quiet``, ``--verbose``) of the running command line."""
    ctx = click.get_current_context(silent=True)
    return bool(ctx is not None and ctx.find_root().params.get(name))


def quiet() -> bool:
    """Whether ``ttcsim --quiet`` was given (no progress bars, notes or hints)."""
    return _root_flag("quiet")


def verbose() -> bool:
    """Whether ``ttcsim --verbose`` was given (tracebacks and extra detail)."""
    return _root_flag("verbose")


def note(text: str, err: bool = False, indent: str = "  ") -> None:
    """Print ``note: text`` unless ``--quiet``."""
    if not quiet():
        click.echo(f"{indent}note: {text}", err=err)


def _report_error(exc: TtcsimError) -> None:
    if verbose():
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    click.echo(f"error: {_one_line(exc)}", err=True)


def _friendly(fn):
    """Turn ttcsim errors into one-line messages with exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except TtcsimError as exc:
            _report_error(exc)
            sys.exit(EXIT_BAD_INPUT)

    return wrapper


class _OneLineUsageError(click.ClickException):
    """A click usage error shown as ``error: WHERE: message`` (exit code 2)."""

    exit_code = 2

    def show(self, file=None) -> None:  # noqa: D102
        click.echo(f"error: {self.message}", err=True)


@contextlib.contextmanager
def _one_line_usage_errors():
    """Re-raise click's usage errors (bad option values, unknown options) as one line."""
    try:
        yield
    except click.UsageError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # a bare group: its help is the answer
            raise
        param = getattr(exc, "param", None)
        if isinstance(exc, click.BadParameter) and param is not None and not isinstance(
            exc, click.MissingParameter
        ):
            opts = [o for o in getattr(param, "opts", []) if o.startswith("--")]
            where = opts[0] if opts and isinstance(param, click.Option) else param.human_readable_name
            text = f"{where}: {_one_line(exc.message)}"
        else:
            text = _one_line(exc.format_message())
        if exc.ctx is not None:
            text += f" (see '{exc.ctx.command_path} --help')"
        raise _OneLineUsageError(text) from None


def _refuse_repeated_options(group: click.Group, ctx: click.Context, args: list[str]) -> None:
    """A single-valued option given twice with different values is an error.

    Click would silently keep the last value (``predict --strategy vote5
    --strategy bon4`` priced bon4 alone).

    ``args`` are the words after the group's own options: a subcommand (or a
    group and its subcommand) and its arguments.  Options declared
    ``multiple=True`` may repeat.
    """
    words = list(args)
    cmd: click.Command | None = group
    while isinstance(cmd, click.Group) and words:
        name = next((w for w in words if not w.startswith("-")), None)
        if name is None:
            return
        words = words[words.index(name) + 1 :]
        cmd = cmd.get_command(ctx, name)
    if cmd is None:
        return
    by_opt: dict[str, click.Option] = {}
    for param in cmd.params:
        if isinstance(param, click.Option):
            for opt in (*param.opts, *param.secondary_opts):
                by_opt[opt] = param
    seen: dict[str, list[str]] = {}
    i = 0
    while i < len(words):
        word = words[i]
        i += 1
        if word == "--":
            break
        opt, eq, value = word.partition("=")
        param = by_opt.get(opt)
        if param is None:
            continue
        takes_value = not param.is_flag and not param.count
        if takes_value and not eq:
            value = words[i] if i < len(words) else ""
            i += 1
        if param.multiple or param.count:
            continue
        shown = param.opts[0] if param.opts else opt
        seen.setdefault(shown, []).append(value if takes_value else opt)
        if len(set(seen[shown])) > 1:  # the same value twice is harmless
            given = ", ".join(seen[shown])
            hint = ""
            if cmd.name == "predict" and shown == "--strategy":
                hint = "; to compare strategies use `ttcsim metrics --strategy A --strategy B`"
            raise _OneLineUsageError(
                f"{shown}: given {len(seen[shown])} different values ({given}); it takes "
                f"one{hint}"
            )


class _Main(click.Group):
    """The root group: click's own usage errors also become one ``error:`` line.

    Every other exception from a command ends the same way: a
    :class:`~ttcsim.errors.TtcsimError` (bad input) with exit code 2, anything
    else (a bug) with ``error: internal error: ...`` and exit code 1.
    """

    def make_context(self, info_name, args, parent=None, **extra):  # noqa: D102
        with _one_line_usage_errors():
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx):  # noqa: D102
        with _one_line_usage_errors():
            with warnings.catch_warnings():  # click 8.2+ deprecates protected_args (9.0: in args)
                warnings.simplefilter("ignore", DeprecationWarning)
                words = [*getattr(ctx, "protected_args", ()), *ctx.args]
            _refuse_repeated_options(self, ctx, words)
            try:
                return super().invoke(ctx)
            except (click.exceptions.Exit, click.ClickException, click.Abort, KeyboardInterrupt):
                raise
            except TtcsimError as exc:
                _report_error(exc)
                ctx.exit(EXIT_BAD_INPUT)
            except OSError as exc:
                if exc.errno == errno.EPIPE:  # output piped into `head`: click's own handling
                    raise
                _internal_error(ctx, exc)
            except Exception as exc:  # noqa: BLE001 - the last line of defence
                _internal_error(ctx, exc)


def _internal_error(ctx: click.Context, exc: BaseException) -> None:
    """``error: internal error: ...`` (traceback with ``--verbose``) and exit code 1."""
    if ctx.params.get("verbose"):
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
        hint = "please report it with the traceback above"
    else:
        hint = "rerun with --verbose for the traceback and please report it"
    click.echo(
        f"error: internal error: {type(exc).__name__}: {_one_line(exc)[:300]} "
        f"(a bug in ttcsim; {hint})",
        err=True,
    )
    ctx.exit(EXIT_INTERNAL)


def _fmt_energy(j: float) -> str:
    if j >= 3.6e6:
        return f"{j / 3.6e6:.3f} kWh"
    if j >= 1e4:
        return f"{j / 1e3:.2f} kJ"
    return f"{j:.1f} J"


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ttcsim")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars, notes or hints; results and errors only.")
@click.option("-v", "--verbose", is_flag=True, help="Tracebacks on errors, and extra detail.")
def main(quiet: bool, verbose: bool) -> None:
    """ttcsim: what an LLM query costs in energy, before you run it.

    Shell completion: put eval "$(_TTCSIM_COMPLETE=bash_source ttcsim)" in ~/.bashrc
    (zsh_source in ~/.zshrc; fish: _TTCSIM_COMPLETE=fish_source ttcsim | source).
    """


@main.command()
@click.option("--hw", default="h100", show_default=True, help="Hardware profile name, alias or YAML path.")
@click.option("--model", "model", default="8b", show_default=True, help="Catalog model, alias or config.json path.")
@click.option("--strategy", default="single", show_default=True, help="Strategy spec: single|cot, vote<N>, bon<N>, prm-bon<N>, beam<W>:step=..., refine<K>, budget:max=..., adaptive-vote<N>, spec:draft=..., vote<N>(refine<K>) (see `ttcsim strategies`).")
@click.option("--prompt-tokens", default="512", show_default=True, help="Prompt length: N, a list, or a distribution (same grammar as --output-tokens).")
@click.option("--output-tokens", default="1024", show_default=True, help="Output length per sample: N, a list a,b,c or a distribution like lognormal:median=800,sigma=0.7,max=8192.")
@click.option("--concurrency", default=1, show_default=True, type=int, help="Identical queries batched together.")
@click.option("--tp", default=1, show_default=True, type=int, help="Tensor-parallel GPUs.")
@click.option("--dtype", "weight_dtype", default="bf16", show_default=True, help="Weight dtype: bf16, fp16, fp8, int4.")
@click.option("--kv-dtype", default=None, help="KV-cache dtype (default bf16; fp8 with fp8 weights).")
@click.option("--reward-model", default=None, help="Reward model for bon<N> (default: the policy model).")
@click.option("--prefix-cache/--no-prefix-cache", default=True, show_default=True, help="Parallel samples share the prompt's prefill.")
@click.option("--pue", default=1.0, show_default=True, type=float, help="Facility power usage effectiveness.")
@click.option("--carbon-g-per-kwh", default=None, type=float, help="Grid carbon intensity [gCO2/kWh].")
@click.option("--usd-per-kwh", default=None, type=float, help="Electricity price [USD/kWh].")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the Monte-Carlo percentiles.")
@click.option("--power-limit-w", default=None, type=float, help="What-if board power limit per GPU [W], down to the board's minimum (default: the datasheet limit).")
@click.option("--engine", default=None, help="Engine profile: reference (default), hf-transformers, vllm, or a YAML path (see `ttcsim engines list`).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--plot", "plot_path", default=None, type=click.Path(dir_okay=False), help="Write a PNG: the query's power timeline (phases, power limit); with random lengths also the histogram of energy per query (p50, p90).")
@_friendly
def predict(as_json: bool, plot_path: str | None, **kw) -> None:
    """Predict joules, latency and power of one query."""
    from ttcsim.predict import predict as run_predict

    r = run_predict(**kw)
    if plot_path:
        from ttcsim.plot_power import plot_prediction

        plot_prediction(plot_path, **kw)
    if as_json:
        click.echo(json.dumps(r.as_dict(), indent=2))
        return
    head = f"{r.model} on {r.gpus}x {r.hw}  strategy {r.strategy}  prompt {r.prompt_tokens}  output {r.output_tokens_spec}"
    if r.engine != "reference":
        head += f"  engine {r.engine}"
    if r.concurrency > 1:
        head += f"  concurrency {r.concurrency}"
    rows = [
        ("energy per query", f"{_fmt_energy(r.energy_j)}  {_band_text(r.band_energy_ape, r.energy_j_low, r.energy_j_high, _fmt_energy)}"),
        ("  prefill", _fmt_energy(r.energy_prefill_j)),
        ("  decode", _fmt_energy(r.energy_decode_j)),
    ]
    if r.energy_score_j:
        rows.append(("  reward scoring", _fmt_energy(r.energy_score_j)))
    rows += [
        ("  above idle (marginal)", _fmt_energy(r.energy_dynamic_j)),
        ("latency", f"{r.latency_s:.3f} s  {_band_text(r.band_latency_ape, r.latency_s_low, r.latency_s_high, lambda v: f'{v:.3f} s')}  (time to first token {r.ttft_s * 1e3:.1f} ms)"),
        ("output tokens", f"{r.output_tokens:.0f}  ({r.j_per_output_token:.3f} J/token)"),
        ("power", f"avg {r.avg_power_w:.0f} W, peak {r.peak_power_w:.0f} W"
         + (f"  (power-limited in {', '.join(r.power_limited_phases)})"
            if r.power_limited_phases else "")),
    ]
    if r.energy_j_p50 is not None:
        rows.append(("energy p50 / p90 / p99", " / ".join(
            _fmt_energy(v) for v in (r.energy_j_p50, r.energy_j_p90, r.energy_j_p99))))
        rows.append(("latency p50 / p90", f"{r.latency_s_p50:.2f} / {r.latency_s_p90:.2f} s"))
    if r.pue != 1.0:
        rows.append((f"facility energy (PUE {r.pue:g})", _fmt_energy(r.energy_facility_j)))
    if r.co2_g is not None:
        rows.append(("CO2", f"{r.co2_g:.3f} g"))
    if r.usd is not None:
        rows.append(("cost", f"${r.usd:.6f}"))
    from ttcsim.console import wrap_text

    click.echo(wrap_text(head))
    click.echo(_table(rows))
    if not r.calibrated_profile:
        what = "parameters transferred from a calibrated GPU" if r.profile_status == "transferred" else "datasheet-default parameters"
        note(f"{r.hw} uses {what} (not calibrated on it); band: {r.band_method}")


def _band_text(ape: float, low: float, high: float, fmt) -> str:
    """``±12 % (3.1 kJ - 4.2 kJ)``: the error band of a number."""
    from ttcsim.uncertainty import format_band

    return f"{format_band(ape)} ({fmt(low)} - {fmt(high)})"


@main.group()
def hw() -> None:
    """Hardware profiles."""


@hw.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON records instead of a table.")
@_friendly
def hw_list(as_json: bool) -> None:
    """List the shipped hardware profiles."""
    from ttcsim.console import render_table
    from ttcsim.hardware import get_profile, list_profiles
    from ttcsim.uncertainty import format_band, profile_band

    records = []
    for name in list_profiles():
        p = get_profile(name)
        d = p.datasheet
        info = p.provenance.parameters
        band = profile_band(p)
        records.append({
            "name": name,
            "aliases": list(p.aliases),
            "memory_capacity_bytes": d.memory_capacity_bytes,
            "hbm_bandwidth_bytes_per_s": d.hbm_bandwidth_bytes_per_s,
            "peak_flops_per_s": dict(d.peak_flops_per_s),
            "power_limit_w": d.power_limit_w,
            "min_power_limit_w": p.min_power_limit(),
            "parameters": info.status,
            "band_energy_ape": band.energy_ape,
            "band_latency_ape": band.latency_ape,
            "source": info.transfer.source_profile if info.transfer else (info.gpu_name or ""),
        })
    if as_json:
        click.echo(json.dumps(records, indent=2))
        return
    click.echo(render_table(
        ["name", "aliases", "HBM TB/s", "bf16 TFLOP/s", "limit W", "min W", "parameters",
         "E band", "t band", "source"],
        [[r["name"], ",".join(r["aliases"]), f"{r['hbm_bandwidth_bytes_per_s'] / 1e12:.2f}",
          f"{r['peak_flops_per_s']['bf16'] / 1e12:.0f}", f"{r['power_limit_w']:.0f}",
          f"{r['min_power_limit_w']:.0f}", r["parameters"], format_band(r["band_energy_ape"]),
          format_band(r["band_latency_ape"]), r["source"]] for r in records],
        align="<<>>>><>><",
    ))


@hw.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of YAML.")
@_friendly
def hw_show(name: str, as_json: bool) -> None:
    """Print one profile (name, alias or path) as YAML."""
    from ttcsim.hardware import get_profile

    profile = get_profile(name)
    if as_json:
        click.echo(json.dumps(profile.model_dump(mode="json"), indent=2))
        return
    click.echo(profile.to_yaml())


@main.group()
def models() -> None:
    """Model catalog."""


@models.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON records instead of a table.")
@_friendly
def models_list(as_json: bool) -> None:
    """List catalog models with their parameter counts."""
    from ttcsim.console import render_table
    from ttcsim.models import list_models
    from ttcsim.simulator.architecture import active_parameter_count, parameter_count

    records = [
        {
            "name": m.name,
            "aliases": list(m.aliases),
            "parameters": parameter_count(m),
            "active_parameters": active_parameter_count(m),
            "n_layers": m.n_layers,
            "n_heads": m.n_heads,
            "n_kv_heads": m.n_kv_heads,
        }
        for m in list_models()
    ]
    if as_json:
        click.echo(json.dumps(records, indent=2))
        return
    click.echo(render_table(
        ["name", "aliases", "params", "active", "layers", "heads", "kv heads"],
        [[r["name"], ",".join(r["aliases"]), f"{r['parameters'] / 1e9:.2f}B",
          f"{r['active_parameters'] / 1e9:.2f}B", str(r["n_layers"]), str(r["n_heads"]),
          str(r["n_kv_heads"])] for r in records],
        align="<<>>>>>",
    ))


@main.command("strategies")
@click.option("--json", "as_json", is_flag=True, help="Print JSON records instead of text.")
def strategies_cmd(as_json: bool) -> None:
    """List test-time-compute strategies with their cost formulas."""
    import textwrap

    from ttcsim.console import TABLE_WIDTH
    from ttcsim.strategies import registry

    records = [
        {"name": name, "pattern": cls.pattern, "summary": cls.summary, "formula": cls.formula()}
        for name, cls in registry().items()
    ]
    if as_json:
        click.echo(json.dumps(records, indent=2))
        return
    for r in records:
        click.echo(r["pattern"])
        for line in [r["summary"], *r["formula"].splitlines()]:
            click.echo(textwrap.fill(line, TABLE_WIDTH, initial_indent="    ",
                                     subsequent_indent="      ", break_on_hyphens=False))


def _resolve_hw_for_runs(hw_opt: str | None, runs):
    from ttcsim.hardware import get_profile, profile_name_for_gpu

    if hw_opt:
        return get_profile(hw_opt)
    names = {r.hw for r in runs}
    if len(names) != 1:
        raise TtcsimError(f"runs come from several GPUs {sorted(names)}; pass --hw", "--hw")
    name = names.pop()
    try:
        return get_profile(name)
    except TtcsimError:
        guess = profile_name_for_gpu(name)
        if guess is None:
            raise TtcsimError(f"no profile matches GPU {name!r}; pass --hw", "--hw") from None
        return get_profile(guess)


@main.command()
@click.option("--runs", "runs_path", required=True, type=click.Path(dir_okay=False), help="Run records (JSONL).")
@click.option("--hw", default=None, help="Profile name or YAML path (default: from the records' hw).")
@click.option("--engine", default=None, help="Engine profile to predict with (default: the one each record names; reference when none).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_friendly
def validate(runs_path: str, hw: str | None, engine: str | None, as_json: bool) -> None:
    """Compare predictions with measured run records."""
    from ttcsim.calibration.records import read_runs
    from ttcsim.calibration.validate import validate_runs
    from ttcsim.engines import get_engine

    runs = read_runs(runs_path)
    profile = _resolve_hw_for_runs(hw, runs)
    report = validate_runs(runs, profile, get_engine(engine) if engine else None)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    _print_validation(report)


def _print_validation(report: dict) -> None:
    status = report.get("profile_status", "calibrated" if report["calibrated_profile"] else "datasheet-default")
    engine = report.get("engine", "reference")
    engine = engine if isinstance(engine, str) else ",".join(engine)
    click.echo(f"profile {report['hw']} ({status}), engine {engine}, {len(report['runs'])} runs")
    from ttcsim.console import render_table

    rows = []
    for r in report["runs"]:
        if r["latency_s"] is not None:
            t = [f"{r['latency_s']:.3f}", f"{r['latency_s_pred']:.3f}", f"{r['latency_ape_pct']:.1f}%"]
        elif r.get("tpot_s") is not None:
            t = [f"{r['tpot_s']:.4f}", f"{r['tpot_s_pred']:.4f}", f"{r['tpot_ape_pct']:.1f}% (TPOT)"]
        else:
            t = ["-", "-", "-"]
        rows.append([r["id"], f"{r['energy_j']:.1f}", f"{r['energy_j_pred']:.1f}",
                     f"{r['energy_ape_pct']:.1f}%", *t])
    click.echo(render_table(["run", "E meas J", "E pred J", "err", "t meas s", "t pred s", "err"], rows))
    for key, label in (("energy_ape_pct", "energy"), ("latency_ape_pct", "latency"),
                       ("tpot_ape_pct", "TPOT")):
        s = report["summary"].get(key)
        if s and s["n"]:
            click.echo(f"{label} error: median {s['median']:.1f}%  p90 {s['p90']:.1f}%  max {s['max']:.1f}%")
    band, summary = report["band"], report["summary"]
    text = f"band: energy \u00b1{band['energy_ape'] * 100:.0f} % covers {summary['energy_band_coverage'] * 100:.0f} % of runs"
    if summary.get("latency_band_coverage") is not None:
        text += f", latency \u00b1{band['latency_ape'] * 100:.0f} % covers {summary['latency_band_coverage'] * 100:.0f} %"
    click.echo(text)


@main.group()
def calibrate() -> None:
    """Calibrate a hardware profile (on a GPU, or from your own measurements)."""


@calibrate.command("fit")
@click.option("--runs", "runs_path", type=click.Path(dir_okay=False), help="Run records (JSONL) to fit.")
@click.option("--trace", "trace_csv", type=click.Path(dir_okay=False), help="nvidia-smi power CSV.")
@click.option("--energy", "energy_jsonl", type=click.Path(dir_okay=False), help="Energy-counter samples (JSONL).")
@click.option("--log", "log_path", type=click.Path(dir_okay=False), help="Request log (JSONL) for --trace/--energy.")
@click.option("--base", default=None, help="Hardware profile to start from (name or YAML; default: from the records' hw).")
@click.option("--fit", "fit_kind", type=click.Choice(["hardware", "engine", "both"]), default="hardware", show_default=True, help="Which profile to fit: the GPU's, the engine's, or both.")
@click.option("--engine", default=None, help="Engine profile to start from (default: the one the records name; reference when none).")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="Profile YAML to write (the hardware profile with --fit both).")
@click.option("--engine-out", "engine_out", default=None, type=click.Path(dir_okay=False), help="Engine YAML to write with --fit both (default: OUT with .engine.yaml).")
@click.option("--params", default=None, help="Comma list of parameters to fit (engine ones dotted: host.step_s; default: a standard set).")
@click.option("--prior-weight", default=0.02, show_default=True, type=float, help="Pull towards the base profile.")
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
@_friendly
def calibrate_fit(runs_path, trace_csv, energy_jsonl, log_path, base, fit_kind, engine, out_path, engine_out, params, prior_weight, force) -> None:
    """Fit a hardware and/or engine profile from run records, or from a raw trace plus a request log."""
    from ttcsim.calibration.records import read_runs
    from ttcsim.calibration.traces import runs_from_trace
    from ttcsim.io import atomic_write_text

    if bool(runs_path) == bool(log_path):
        raise TtcsimError("give either --runs, or --log with --trace and/or --energy")
    if not (math.isfinite(prior_weight) and prior_weight >= 0):
        raise TtcsimError(f"must be a finite number >= 0, got {prior_weight}", "--prior-weight")
    if fit_kind == "both":
        engine_out = engine_out or str(Path(out_path).with_suffix("")) + ".engine.yaml"
    outs = [out_path] + ([engine_out] if fit_kind == "both" else [])
    for path in outs:
        if not force and Path(path).exists():
            raise TtcsimError("exists; pass --force to overwrite", path)
    if runs_path:
        runs = read_runs(runs_path)
    else:
        runs = runs_from_trace(log_path, trace_csv, energy_jsonl)
    names = [p.strip() for p in params.split(",")] if params else None
    hw_profile = _resolve_hw_for_runs(base, runs) if base is None else None
    if base is not None:
        from ttcsim.hardware import get_profile

        hw_profile = get_profile(base, where="--base")
    hw_out, eng_out, lines = _fit(runs, hw_profile, engine, fit_kind, names, prior_weight,
                                  runs_path or log_path)
    if fit_kind in ("hardware", "both"):
        atomic_write_text(out_path, hw_out.to_yaml(), overwrite=force)
    if fit_kind in ("engine", "both"):
        from ttcsim.engines import engine_to_yaml

        atomic_write_text(outs[-1], engine_to_yaml(eng_out), overwrite=force)
    click.echo(f"fitted {len(runs)} runs -> {', '.join(outs)}")
    for line in lines:
        click.echo(line)


def _fit(runs, hw_profile, engine, fit_kind, names, prior_weight, runs_label):
    """Run the fit; the hardware-only fit of reference-engine records keeps the original path."""
    from ttcsim.calibration.engine_fit import fit_profiles, runs_engine

    eng = runs_engine(runs, engine)
    lines = []
    if fit_kind == "hardware" and eng.is_reference and not any("." in n for n in names or []):
        from ttcsim.calibration.fit import fit_runs

        profile, report = fit_runs(runs, hw_profile, names, prior_weight)
        try:
            profile = profile.checked()
        except TtcsimError:
            profile = None  # the bounds-and-priors fit below never fails validation
        if profile is not None:
            for k, v in report.parameters_after.items():
                before = report.parameters_before[k]
                if before != v:
                    lines.append(f"  {k:<30} {before:12.4g} -> {v:12.4g}")
            lines.append("  residuals: " + ", ".join(
                f"{k} {v:.2f}" for k, v in report.residuals_pct.items()))
            return profile, eng, lines
    hw_out, eng_out, rep = fit_profiles(runs, hw_profile, eng, fit_kind, names, prior_weight,
                                        runs_label=str(runs_label))
    for k in rep.parameters_after:
        mark = " (held at prior)" if k in rep.held_at_prior else ""
        lines.append(f"  {k:<42} {rep.parameters_before[k]:12.4g} -> "
                     f"{rep.parameters_after[k]:12.4g}{mark}")
    lines.append(f"  condition number {rep.condition_number:.3g}")
    for a, b, r in rep.correlated_pairs:
        lines.append(f"  not identifiable apart: {a} ~ {b} (correlation {r:+.3f})")
    if rep.excluded_runs:
        lines.append(f"  left out (cannot be predicted): {', '.join(rep.excluded_runs)}")
    for note in rep.notes:
        lines.append(f"  note: {note}")
    lines.append("  residuals: " + ", ".join(f"{k} {v:.2f}" for k, v in rep.residuals_pct.items()))
    return hw_out, eng_out, lines


@calibrate.command("refit")
@click.argument("trace_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--base", required=True, help="Profile whose datasheet figures to use (name or YAML).")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="Profile YAML to write.")
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
@_friendly
def calibrate_refit(trace_dir: str, base: str, out_path: str, force: bool) -> None:
    """Fit a profile from a recorded `calibrate run` folder (no GPU; resumes an interrupted run)."""
    from ttcsim.calibration.session import refit_from_trace_dir
    from ttcsim.io import atomic_write_text

    if not force and Path(out_path).exists():
        raise TtcsimError("exists; pass --force to overwrite", out_path)
    profile, report = refit_from_trace_dir(trace_dir, base)
    atomic_write_text(out_path, profile.to_yaml())
    click.echo(f"wrote {out_path}")
    for k, v in report.residuals_pct.items():
        click.echo(f"  {k}: {v:.2f}")


@calibrate.command("run")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="Profile YAML to write.")
@click.option("--gpu", "gpu_index", default=0, show_default=True, type=int, help="GPU index.")
@click.option("--base", default=None, help="Profile to start from (default: matched to the GPU's name).")
@click.option("--budget-s", default=150.0, show_default=True, type=float, help="GPU time for microbenchmarks.")
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
@_friendly
def calibrate_run(out_path: str, gpu_index: int, base: str | None, budget_s: float, force: bool) -> None:
    """Measure this GPU with NVML and write a calibrated profile (needs an NVIDIA GPU)."""
    from ttcsim.calibration.session import calibrate_on_gpu

    profile, report, trace_dir = calibrate_on_gpu(out_path, gpu_index, base, budget_s, force)
    click.echo(f"wrote {out_path} (trace in {trace_dir})")
    for k, v in report.residuals_pct.items():
        click.echo(f"  {k}: {v:.2f}")


@main.command()
@click.option("--model", "model", required=True, help="Catalog model or config.json path.")
@click.option("--strategy", default="single", show_default=True, help="Strategy spec the reference decoder runs: single, vote<N>, bon<N> (and beam/refine where supported).")
@click.option("--prompt-tokens", default=512, show_default=True, type=int)
@click.option("--output-tokens", default="256", show_default=True, help="Length spec; distributions are sampled with --seed.")
@click.option("--concurrency", default=1, show_default=True, type=int)
@click.option("--reward-model", default=None, help="Reward model for bon<N>.")
@click.option("--no-prefix-cache", is_flag=True, help="Prefill the prompt once per sample.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--gpu", "gpu_index", default=0, show_default=True, type=int)
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="Run records JSONL (appended).")
@_friendly
def measure(**kw) -> None:
    """Run the reference decoder on this GPU and append a measured run record."""
    from ttcsim.calibration.session import measure_one

    record = measure_one(**kw)
    click.echo(f"{record['id']}: {record['energy_j']:.1f} J in {record['latency_s']:.3f} s -> {kw['out_path']}")


#: Feature modules whose ``COMMANDS`` list is added to the main group.  Each
#: imports only click at module level, so start-up stays fast.
_COMMAND_MODULES = (
    "ttcsim.commands.curves",
    "ttcsim.commands.plan",
    "ttcsim.commands.tradeoffs",
    "ttcsim.commands.sweep",
    "ttcsim.commands.engines",
    "ttcsim.commands.importers",
)


def _register_commands() -> None:
    import importlib

    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        for command in module.COMMANDS:
            main.add_command(command)


_register_commands()


if __name__ == "__main__":  # pragma: no cover
    main()
