"""``ttcsim sweep``: every scenario of a grid, written as one tidy table.

Thin command: parse options, call :func:`ttcsim.sweep.write_sweep`, report.
Only click is imported at module level.
"""

from __future__ import annotations

import functools
import sys
import warnings

import click


def _friendly(fn):
    """Defer to :func:`ttcsim.cli._friendly` (imported late: cli imports this module)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from ttcsim.cli import _friendly as friendly

        return friendly(fn)(*args, **kwargs)

    return wrapper


@click.command("sweep")
@click.argument("grid_path", metavar="GRID.yaml", type=click.Path(dir_okay=False))
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False),
              help="Table to write: FILE.parquet (needs pyarrow) or FILE.csv.")
@click.option("--format", "fmt", default="auto", show_default=True,
              type=click.Choice(["auto", "csv", "parquet"]),
              help="auto: from the suffix, else Parquet when pyarrow is installed, else CSV.")
@click.option("--chunk-rows", default=None, type=int,
              help="Scenarios evaluated at a time (bounds memory) [default: 131072].")
@click.option("--progress/--no-progress", default=None,
              help="Progress bar on stderr [default: when stderr is a terminal].")
@click.option("--dry-run", is_flag=True, help="Validate the grid and print its size only.")
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
@click.option("--plot", "plot_path", default=None, type=click.Path(dir_okay=False),
              help="Also draw --y against --x, one line per --color value (PNG).")
@click.option("--x", "x_col", default="output_tokens_spec", show_default=True,
              help="Column on the x axis of --plot.")
@click.option("--y", "y_col", default="energy_j", show_default=True,
              help="Column on the y axis of --plot.")
@click.option("--color", "color_col", default="strategy", show_default=True,
              help="Column whose values get one line each in --plot.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@_friendly
def sweep_cmd(grid_path, out_path, fmt, chunk_rows, progress, dry_run, force, plot_path,
              x_col, y_col, color_col, as_json) -> None:
    """Evaluate every combination of a grid of scenarios (docs/SWEEP.md) into one table."""
    import json

    from ttcsim.cli import note, quiet
    from ttcsim.sweep import DEFAULT_CHUNK_ROWS, SlowPathWarning, load_grid, write_sweep

    grid = load_grid(grid_path)
    size = {"scenarios": grid.n_scenarios, "deployments": grid.n_groups,
            "scenarios_per_deployment": grid.rows_per_group}
    if dry_run and as_json:
        click.echo(json.dumps(size, indent=2))
        return
    if not quiet():
        click.echo(
            f"{grid.n_scenarios:,} scenarios in {grid.n_groups:,} deployments "
            f"({grid.rows_per_group:,} each)",
            err=True,
        )
    if dry_run:
        return
    if progress is None:
        progress = sys.stderr.isatty() and not quiet()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SlowPathWarning)
        report = write_sweep(grid, out_path, fmt, chunk_rows or DEFAULT_CHUNK_ROWS, progress,
                             overwrite=force)
    notes = [str(w.message) for w in caught]
    plot = None
    if plot_path:
        from ttcsim.sweep import plot_table

        plot = str(plot_table(report.path, plot_path, x_col, y_col, color_col))
    if as_json:
        click.echo(json.dumps({
            **size, "path": str(report.path), "format": report.format, "rows": report.rows,
            "fitting_rows": report.fitting_rows, "slow_rows": report.slow_rows,
            "seconds": report.seconds, "plot": plot, "notes": notes,
        }, indent=2))
        return
    for text in notes:
        note(text, err=True, indent="")
    click.echo(
        f"wrote {report.rows:,} rows ({report.fitting_rows:,} fit) to {report.path} "
        f"[{report.format}] in {report.seconds:.2f} s ({report.scenarios_per_s:,.0f} scenarios/s)"
    )
    if report.slow_rows:
        click.echo(f"  {report.slow_rows:,} scenarios took the slow path (predict() per scenario)")
    if plot:
        click.echo(f"plot -> {plot}")


COMMANDS = [sweep_cmd]
