"""PNG plots of operating curves and per-query energy distributions.

The only ttcsim module of curves and metrics that imports matplotlib, always
with the Agg backend (no display needed), and only inside the functions so
importing ttcsim stays fast.  Every plot labels its axes with units and has a
legend; axes are logarithmic where the data span a decade or more.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

#: Axis labels (with units) of curve columns.
LABELS = {
    "output-tokens": "output tokens per sequence [tokens]",
    "prompt-tokens": "prompt tokens [tokens]",
    "context": "context length, prompt + output [tokens]",
    "concurrency": "concurrent queries",
    "samples": "samples / width / rounds (strategy count)",
    "energy_j": "energy per query [J]",
    "j_per_output_token": "energy per output token [J/token]",
    "j_per_useful_token": "energy per useful token [J/token]",
    "latency_s": "latency per query [s]",
    "output_tokens_spec": "output tokens per sample [tokens]",
    "prompt_tokens": "prompt tokens [tokens]",
    "avg_power_w": "average power [W]",
    "output_tokens_per_j": "output tokens per joule [token/J]",
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _log_if_wide(values) -> str:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v) & (v > 0)]
    return "log" if v.size and v.max() / v.min() >= 10 else "linear"


def _plain_log_ticks(axis) -> None:
    """Log-axis ticks at 1, 2 and 5 per decade, written as plain numbers (2,000, 0.5)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def plot_curve(
    frame, path: str | Path, metrics=("energy_j", "j_per_output_token"), title: str | None = None
) -> Path:
    """One panel per metric against the varied axis; one line per (hw, model, strategy).

    ``frame`` is :func:`ttcsim.curves.operating_curve`'s DataFrame.  Points
    that could not run (``status != "ok"``) are left out of the lines.
    """
    plt = _pyplot()
    path = Path(path)
    ok = frame[frame["status"] == "ok"]
    axis = str(frame["vary"].iloc[0]) if len(frame) else "x"
    keys = ["hw", "model", "series"]
    varying = [k for k in keys if frame[k].nunique() > 1] or keys
    fig, axes = plt.subplots(1, len(metrics), figsize=(6.0 * len(metrics), 4.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for label_values, part in ok.groupby(varying, sort=False):
            label_values = label_values if isinstance(label_values, tuple) else (label_values,)
            part = part.sort_values("x")
            label = " / ".join(str(v) for v in label_values)
            tps = sorted({int(t) for t in part.get("tp", [1]) if t == t})
            if tps and tps != [1]:
                label += " (tp " + ",".join(str(t) for t in tps) + ")"
            ax.plot(part["x"], part[metric], marker="o", ms=3.5, lw=1.6, label=label)
        ax.set_xscale(_log_if_wide(ok["x"]))
        ax.set_yscale(_log_if_wide(ok[metric]))
        ax.set_xlabel(LABELS.get(axis, axis))
        ax.set_ylabel(LABELS.get(metric, metric))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, title=" / ".join(varying), title_fontsize=8)
    fixed = [f"{k} {frame[k].iloc[0]}" for k in keys if k not in varying and len(frame)]
    fig.suptitle(title or ("ttcsim operating curve" + (": " + ", ".join(fixed) if fixed else "")))
    fig.tight_layout()
    return _save(plt, fig, path)


def plot_sweep(frame, path: str | Path, x: str, y: str, color: str) -> Path:
    """``y`` against ``x`` from a sweep table, one line per value of ``color``.

    Scenarios that differ in other axes are summarised per ``x``: the line is
    their median, the band spans the middle half (25th to 75th percentile; a
    min-to-max band of a large grid covers decades and hides the lines).
    Lines come in the table's order (the grid's), the legend sits outside the
    axes, and long category labels wrap.  Rows that do not fit are left out.
    """
    import pandas as pd

    plt = _pyplot()
    path = Path(path)
    ok = frame[frame["fits"].astype(bool)] if "fits" in frame else frame
    labels = None
    if not pd.api.types.is_numeric_dtype(ok[x]):
        # labels such as output_tokens_spec mixing "1024" and "lognormal:...": one
        # evenly spaced position each, numbers first in order, then the others as met
        values = [str(v) for v in pd.unique(ok[x])]
        number = pd.to_numeric(pd.Series(values), errors="coerce").tolist()
        numeric = {v: n for v, n in zip(values, number, strict=True) if n == n}
        labels = sorted(numeric, key=numeric.get) + [v for v in values if v not in numeric]
        ok = ok.assign(**{x: ok[x].astype(str).map({v: i for i, v in enumerate(labels)})})
    import textwrap

    fig, ax = plt.subplots(figsize=(9.0, 5.0))
    for key, part in ok.groupby(color, sort=False):
        stats = part.groupby(x)[y].quantile([0.25, 0.5, 0.75]).unstack().sort_index()
        (line,) = ax.plot(stats.index, stats[0.5], marker="o", ms=4, lw=1.8, label=str(key))
        ax.fill_between(stats.index, stats[0.25], stats[0.75], color=line.get_color(),
                        alpha=0.12, lw=0)
    if labels is None:
        ax.set_xscale(_log_if_wide(ok[x]))
    else:
        wrapped = ["\n".join(textwrap.wrap(v.replace(",", ", "), 22, break_on_hyphens=False))
                   .replace(", ", ",") for v in labels]
        ax.set_xticks(range(len(labels)), wrapped, fontsize=8)
    ax.set_yscale(_log_if_wide(ok[y]))
    from matplotlib.ticker import NullFormatter

    ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels collide on log axes
    for axis, values in ((ax.xaxis, ok[x] if labels is None else None), (ax.yaxis, ok[y])):
        if values is not None and _log_if_wide(values) == "log":
            _plain_log_ticks(axis)
    ax.set_xlabel(LABELS.get(x, x))
    ax.set_ylabel(LABELS.get(y, y))
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", alpha=0.12)
    ax.legend(fontsize=8, title=color, title_fontsize=8, loc="upper left",
              bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_title(f"ttcsim sweep: {len(ok):,} scenarios that fit; line = median over the other "
                 "axes, band = middle half", fontsize=10)
    fig.tight_layout()
    return _save(plt, fig, path)


def plot_energy_histogram(samples, path: str | Path, title: str | None = None) -> Path:
    """Histogram of per-query energy over Monte-Carlo draws: one panel per strategy.

    ``samples`` is :func:`ttcsim.metrics.energy_samples`'s DataFrame.  Panels
    share the energy axis (logarithmic when the draws span a decade); bars
    are the fraction of draws per bin; the dashed line is the mean and the
    dotted lines are p50, p90 and p99.
    """
    plt = _pyplot()
    path = Path(path)
    groups = list(samples.groupby("strategy", sort=False))
    energy = samples["energy_j"].to_numpy(dtype=float)
    log = _log_if_wide(energy) == "log"
    lo, hi = float(energy.min()), float(energy.max())
    if hi <= lo:
        lo, hi = lo * 0.95, hi * 1.05 + 1e-9
    bins = np.geomspace(lo, hi, 50) if log else np.linspace(lo, hi, 50)
    fig, axes = plt.subplots(len(groups), 1, figsize=(8.0, 1.2 + 1.7 * len(groups)),
                             sharex=True, squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (ax, (name, part)) in enumerate(zip(axes[:, 0], groups, strict=True)):
        e = part["energy_j"].to_numpy(dtype=float)
        color = colors[i % len(colors)]
        ax.hist(e, bins=bins, weights=np.full(e.size, 1.0 / e.size), color=color, alpha=0.75)
        p50, p90, p99 = np.percentile(e, [50, 90, 99])
        ax.axvline(e.mean(), color="k", ls="--", lw=1.3, label=f"mean {e.mean():,.0f} J")
        for q, label in ((p50, "p50"), (p90, "p90"), (p99, "p99")):
            ax.axvline(q, color="k", ls=":", lw=1.0)
            ax.text(q, 0.97, f" {label}", transform=ax.get_xaxis_transform(), fontsize=7,
                    va="top")
        ax.set_ylabel("fraction\nof draws")
        ax.set_title(f"{name}: mean {e.mean():,.0f} J, p50 {p50:,.0f} / p90 {p90:,.0f} / "
                     f"p99 {p99:,.0f} J  ({e.size} draws)", fontsize=9, loc="left")
        ax.legend(fontsize=7, loc="upper right")
        ax.grid(True, alpha=0.3)
    bottom = axes[-1, 0]
    if log:
        bottom.set_xscale("log")
    bottom.set_xlabel("energy per query [J]")
    fig.suptitle(title or "per-query energy distribution (Monte Carlo)")
    fig.tight_layout(rect=(0.0, 0.0, 1.0, 1.0 - 0.45 / fig.get_figheight()))
    return _save(plt, fig, path)


def _save(plt, fig, path: Path) -> Path:
    """Render in the format of ``path``'s suffix (PNG without one); replace ``path`` atomically."""
    import io

    from ttcsim.errors import TtcsimError
    from ttcsim.io import atomic_write_bytes

    fmt = path.suffix.lstrip(".").lower() or "png"
    supported = fig.canvas.get_supported_filetypes()
    if fmt not in supported:
        plt.close(fig)
        raise TtcsimError(f"cannot write a .{fmt} image; formats: {', '.join(supported)}",
                          str(path))
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=120)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())
