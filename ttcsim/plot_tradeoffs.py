"""PNG plots of the accuracy-energy trade-offs (matplotlib, Agg backend).

The only module that imports matplotlib for :mod:`ttcsim.tradeoffs`.  Each
function takes a result object and a path, writes the PNG atomically and
returns the path.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import ticker  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from ttcsim.io import atomic_write_bytes  # noqa: E402
from ttcsim.tradeoffs import DepthResult, ParetoResult, RouteResult  # noqa: E402

_MARKERS = {"single": "o", "vote": "s", "bon": "^"}


def _save(fig, path: str | Path) -> Path:
    """Render to PNG and replace ``path`` atomically."""
    path = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=130, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def _short_names(names: list[str]) -> dict[str, str]:
    """Drop the dash-separated prefix every name shares (``deepseek-r1-distill-``)."""
    unique = sorted(set(names))
    if len(unique) < 2:
        return {n: n for n in unique}
    prefix = os.path.commonprefix(unique)
    prefix = prefix[: prefix.rfind("-") + 1] if "-" in prefix else ""
    return {n: n[len(prefix) :] or n for n in unique}


def _family(strategy: str) -> str:
    return strategy.rstrip("0123456789")


def _short_label(label: str, short: dict[str, str]) -> str:
    model, _, rest = label.partition(" ")
    return f"{short.get(model, model)} {rest}".strip()


def _energy_axis_kj(ax, label: str) -> None:
    """Log x axis in kJ with 1-2-5 ticks written as plain numbers."""
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"{x:g}"))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlabel(label)


#: Label offsets tried in turn [points], with their horizontal alignment.
_OFFSETS = [
    (6, -4, "left"),
    (6, 7, "left"),
    (-6, -4, "right"),
    (-6, 7, "right"),
    (6, -15, "left"),
    (-6, -15, "right"),
    (6, 18, "left"),
    (-6, 18, "right"),
]


def _place_labels(ax, xs, ys, texts, fontsize: float = 7.5) -> None:
    """Annotate points, trying a few offsets so labels overlap neither each other nor markers."""
    ax.autoscale_view()
    scale = ax.figure.dpi / 72.0
    pts = ax.transData.transform(np.column_stack([xs, ys]))
    markers = [(x - 5 * scale, y - 5 * scale, x + 5 * scale, y + 5 * scale) for x, y in pts]
    placed: list[tuple[float, float, float, float]] = []

    def clash(box, own: int) -> bool:
        boxes = placed + [m for i, m in enumerate(markers) if i != own]
        return any(
            box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in boxes
        )

    for i in np.argsort(pts[:, 0]):
        (x, y), text = pts[i], texts[i]
        width = len(text) * fontsize * 0.56 * scale
        height = fontsize * 1.15 * scale
        choice, box = _OFFSETS[0], None
        for dx, dy, ha in _OFFSETS:
            x0 = x + dx * scale - (width if ha == "right" else 0.0)
            y0 = y + dy * scale - height / 2
            candidate = (x0, y0, x0 + width, y0 + height)
            if not clash(candidate, int(i)):
                choice, box = (dx, dy, ha), candidate
                break
        dx, dy, ha = choice
        if box is None:
            x0 = x + dx * scale - (width if ha == "right" else 0.0)
            box = (x0, y + dy * scale - height / 2, x0 + width, y + dy * scale + height / 2)
        placed.append(box)
        ax.annotate(
            text,
            (xs[i], ys[i]),
            textcoords="offset points",
            xytext=(dx, dy),
            ha=ha,
            va="center",
            fontsize=fontsize,
            color="0.15",
        )


def _title_note(result) -> str:
    note = "example table; lengths assumed" if result.example else "user table"
    status = "calibrated" if result.calibrated_profile else "datasheet-default"
    return f"{result.hw} ({status} profile), {note}"


def plot_pareto(result: ParetoResult, path: str | Path) -> Path:
    """All options, the frontier, and model-scaling vs test-time-scaling paths."""
    n = len(result.benchmarks)
    fig, axes = plt.subplots(1, n, figsize=(6.4 * n + 3.2, 5.8), squeeze=False)
    models = sorted({o.model for b in result.benchmarks for o in b.options})
    short = _short_names(models)
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(models)}
    labels_todo = []
    for ax, bench in zip(axes[0], result.benchmarks, strict=True):
        kj = {o.label: o.energy_j / 1e3 for o in bench.options}
        for path_ in bench.paths:
            xs = [kj[label] for label in path_.labels]
            if path_.kind == "model scaling":
                ax.plot(xs, path_.accuracy_pct, ls="--", lw=1.0, color="0.6", zorder=1)
                continue
            colour = colours.get(path_.fixed.split(" ")[0], "k")
            for k in range(len(xs) - 1):
                ax.annotate(
                    "",
                    xy=(xs[k + 1], path_.accuracy_pct[k + 1]),
                    xytext=(xs[k], path_.accuracy_pct[k]),
                    arrowprops=dict(arrowstyle="-|>", lw=1.5, color=colour, shrinkA=6, shrinkB=6),
                    zorder=2,
                )
        front = sorted(
            (o for o, f in zip(bench.options, bench.on_frontier, strict=True) if f),
            key=lambda o: o.energy_j,
        )
        ax.plot(
            [kj[o.label] for o in front],
            [o.accuracy_pct for o in front],
            drawstyle="steps-post",
            color="black",
            lw=2.0,
            alpha=0.75,
            zorder=3,
        )
        for o, on_front in zip(bench.options, bench.on_frontier, strict=True):
            ax.scatter(
                kj[o.label],
                o.accuracy_pct,
                s=80 if on_front else 50,
                marker=_MARKERS.get(_family(o.strategy), "D"),
                color=colours[o.model],
                edgecolor="black" if on_front else "none",
                linewidth=1.3,
                zorder=4,
            )
        _energy_axis_kj(ax, "energy per query [kJ] (log scale)")
        ax.set_ylabel("accuracy [%]")
        ax.set_title(f"{bench.benchmark}", fontsize=11)
        ax.grid(True, which="major", alpha=0.35)
        ax.grid(True, which="minor", alpha=0.12)
        ax.margins(x=0.15, y=0.1)
        labels_todo.append(
            (
                ax,
                [kj[o.label] for o in bench.options],
                [o.accuracy_pct for o in bench.options],
                [_short_label(o.label, short) for o in bench.options],
            )
        )
    handles = [
        Line2D(
            [], [], color="black", lw=2.0, label="Pareto frontier:\nbest accuracy for the energy"
        ),
        Line2D([], [], color="0.6", ls="--", label="model scaling:\nsame strategy, bigger model"),
        Line2D(
            [],
            [],
            color="0.3",
            marker=">",
            ls="-",
            ms=6,
            label="test-time scaling:\nsame model, more samples",
        ),
    ]
    families = sorted({_family(o.strategy) for b in result.benchmarks for o in b.options})
    handles += [
        Line2D(
            [],
            [],
            ls="",
            marker=_MARKERS.get(f, "D"),
            color="0.45",
            label=f"strategy {f}<N>" if f != "single" else "strategy single",
        )
        for f in families
    ]
    handles += [Line2D([], [], ls="", marker="o", color=colours[m], label=short[m]) for m in models]
    handles.append(
        Line2D(
            [],
            [],
            ls="",
            marker="o",
            color="white",
            markeredgecolor="black",
            label="black edge: on the frontier",
        )
    )
    fig.suptitle(
        f"{result.table}: accuracy vs energy per query\n{_title_note(result)}", fontsize=11
    )
    fig.tight_layout(rect=(0.0, 0.0, 1.0 - 2.6 / fig.get_figwidth(), 1.0))
    fig.legend(
        handles=handles,
        loc="center left",
        fontsize=8.5,
        frameon=False,
        bbox_to_anchor=(1.0 - 2.55 / fig.get_figwidth(), 0.5),
    )
    for ax, xs, ys, texts in labels_todo:
        _place_labels(ax, xs, ys, texts)
    return _save(fig, path)


def plot_route(result: RouteResult, path: str | Path) -> Path:
    """The router's exact accuracy-energy curve against every fixed single choice."""
    fig, ax = plt.subplots(figsize=(9.0, 5.8))
    models = sorted(
        {f.label.split(" ")[0] for f in result.fixed_choices}
        | {c.option.model for c in result.allocation}
    )
    short = _short_names(models)
    if result.curve:
        xs = [p.energy_j / 1e3 for p in result.curve]
        ys = [p.accuracy_pct for p in result.curve]
        right = max([xs[-1] * 1.3] + [f.energy_j / 1e3 * 1.3 for f in result.fixed_choices])
        ax.plot(
            xs + [right],
            ys + [ys[-1]],
            drawstyle="steps-post",
            color="tab:blue",
            lw=2.2,
            label="router: best accuracy within budget (exact)",
        )
        ax.scatter(xs, ys, color="tab:blue", s=22, zorder=3, label="router: efficient allocations")
    if result.sweep:
        ax.scatter(
            [p.budget_j / 1e3 for p in result.sweep],
            [p.accuracy_pct for p in result.sweep],
            marker="|",
            color="0.35",
            s=90,
            zorder=3,
            label="budget sweep (solved)",
        )
    if result.fixed_choices:
        ax.scatter(
            [f.energy_j / 1e3 for f in result.fixed_choices],
            [f.accuracy_pct for f in result.fixed_choices],
            marker="D",
            color="tab:orange",
            s=50,
            zorder=4,
            label="one fixed option for every class",
        )
    ax.scatter(
        result.expected_energy_j / 1e3,
        result.expected_accuracy_pct,
        marker="*",
        s=260,
        color="tab:red",
        edgecolor="black",
        zorder=5,
        label=f"chosen allocation: {result.expected_accuracy_pct:.1f}% at "
        f"{result.expected_energy_j / 1e3:.3g} kJ",
    )
    if result.budget_j_per_query is not None:
        ax.axvline(
            result.budget_j_per_query / 1e3,
            color="tab:red",
            ls=":",
            lw=1.2,
            label=f"budget {result.budget_j_per_query / 1e3:.3g} kJ per query",
        )
    if result.target_accuracy_pct is not None:
        ax.axhline(
            result.target_accuracy_pct,
            color="tab:red",
            ls=":",
            lw=1.2,
            label=f"target {result.target_accuracy_pct:g}%",
        )
    _energy_axis_kj(ax, "expected energy per query [kJ] (log scale)")
    ax.set_ylabel("expected accuracy [%]")
    mix = ", ".join(f"{k} {v:.0%}" for k, v in result.mix.items())
    ax.set_title(
        f"{result.table}: energy-aware routing, mix {mix}\n{_title_note(result)}", fontsize=10
    )
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", alpha=0.12)
    ax.margins(x=0.08, y=0.08)
    ax.legend(loc="lower right", fontsize=8.5)
    fig.tight_layout()
    if result.fixed_choices:
        _place_labels(
            ax,
            [f.energy_j / 1e3 for f in result.fixed_choices],
            [f.accuracy_pct for f in result.fixed_choices],
            [_short_label(f.label, short) for f in result.fixed_choices],
        )
    return _save(fig, path)


def plot_depth(result: DepthResult, path: str | Path) -> Path:
    """Accuracy and energy vs output-token cap, and accuracy per joule with the best cap."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12.5, 4.8))
    caps = [p.cap_tokens for p in result.points]
    left.plot(
        caps,
        [p.accuracy_pct for p in result.points],
        color="tab:blue",
        marker="o",
        ms=3,
        label=f"accuracy ({result.curve})",
    )
    if result.table_points:
        left.scatter(
            [c for c, _ in result.table_points],
            [a for _, a in result.table_points],
            color="black",
            zorder=4,
            label="table rows",
        )
    left.set_xscale("log")
    left.set_xlabel("output-token cap [tokens] (log scale)")
    left.set_ylabel("accuracy [%]", color="tab:blue")
    twin = left.twinx()
    twin.plot(
        caps,
        [p.energy_j / 1e3 for p in result.points],
        color="tab:orange",
        marker="s",
        ms=3,
        label="energy per query",
    )
    twin.set_ylabel("energy per query [kJ]", color="tab:orange")
    lines = left.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    left.legend(lines[0] + more[0], lines[1] + more[1], loc="upper left", fontsize=8.5)
    left.grid(True, which="both", alpha=0.3)
    left.set_title("accuracy and energy vs cap", fontsize=10)
    right.plot(
        caps,
        [p.accuracy_pct_per_kj for p in result.points],
        color="tab:green",
        marker="o",
        ms=3,
        label="accuracy per energy",
    )
    b = result.best
    right.scatter(
        [b.cap_tokens],
        [b.accuracy_pct_per_kj],
        marker="*",
        s=240,
        color="tab:red",
        edgecolor="black",
        zorder=5,
        label=f"best cap {b.cap_tokens} tokens ({b.accuracy_pct:.1f}%)",
    )
    right.set_xscale("log")
    right.set_xlabel("output-token cap [tokens] (log scale)")
    right.set_ylabel("accuracy per energy [% per kJ]")
    right.grid(True, which="both", alpha=0.3)
    right.legend(loc="lower right", fontsize=8.5)
    right.set_title("accuracy per joule vs cap", fontsize=10)
    fig.suptitle(
        f"{result.model} {result.strategy} on {result.benchmark} -- {_title_note(result)}",
        fontsize=10.5,
    )
    fig.tight_layout()
    return _save(fig, path)
