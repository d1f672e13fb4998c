"""``predict --plot``: one query's power timeline, and its energy distribution.

:func:`power_timeline` lays the phases of one query's batch end to end
(prefill, decode, scoring, ...), each with its time, energy and average and
peak power per GPU.  :func:`plot_prediction` draws it, the phases shaded, with
the board's power limit and idle power; when the output lengths are random a
second panel shows the histogram of energy per query over Monte-Carlo draws,
with p50 and p90 marked.  matplotlib (Agg) is imported inside the functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: Phases shorter than this share of the query get a zoomed panel of their own.
ZOOM_SHARE = 0.03
#: Arguments of :func:`ttcsim.predict.predict` that fix the query (the rest are ignored).
_QUERY_ARGS = (
    "hw", "model", "strategy", "prompt_tokens", "output_tokens", "concurrency", "tp",
    "weight_dtype", "kv_dtype", "prefix_cache", "reward_model", "engine",
)  # fmt: skip


@dataclass(frozen=True)
class PhaseSpan:
    """One phase on the timeline (per GPU; times from the query's arrival)."""

    name: str
    start_s: float
    duration_s: float
    energy_j: float  #: all GPUs, the whole batch
    avg_power_w: float  #: per GPU
    peak_power_w: float  #: per GPU
    throttled: bool
    #: decode power pass by pass where the phase is a plain batched decode (else empty)
    curve_time_s: tuple = ()
    curve_power_w: tuple = ()


@dataclass(frozen=True)
class Timeline:
    """Phases of one query (a representative one when lengths are random)."""

    hw: str
    model: str
    strategy: str
    gpus: int
    power_limit_w: float  #: per GPU
    idle_power_w: float  #: per GPU
    spans: list[PhaseSpan]
    lengths_note: str  #: which lengths the timeline shows
    random_lengths: bool


def power_timeline(**predict_kw) -> Timeline:
    """The phases of one query, end to end, with power per GPU.

    Takes :func:`ttcsim.predict.predict`'s keyword arguments.  Random output
    lengths are shown at their mean (rounded), a random prompt at its mean;
    the energy distribution over lengths is :func:`plot_prediction`'s second
    panel.
    """
    from ttcsim.distributions import LengthList
    from ttcsim.predict import _prepare

    kw = {k: predict_kw[k] for k in _QUERY_ARGS if k in predict_kw}
    defaults = dict(hw="h100", model="8b", strategy="single", prompt_tokens=512,
                    output_tokens=1024, concurrency=1, tp=1, weight_dtype="bf16",
                    kv_dtype=None, prefix_cache=True, reward_model=None, engine=None)
    s = _prepare(**{**defaults, **kw})
    lengths = s.lengths
    note = f"output {lengths} tokens per sample"
    if s.random_lengths:
        mean = max(1, int(round(float(lengths.mean()))))
        note = f"output {mean} tokens per sample (the mean of {lengths})"
        lengths = LengthList((mean,))
    prompt = max(1, int(round(float(s.prompt.mean()))))
    phases = s.run(prompt, lengths)
    gpus = s.c.n_gpus
    spans, t = [], 0.0
    for i, p in enumerate(phases):
        duration = float(np.mean(p.time_s))
        energy = float(np.mean(p.energy_j))
        if duration <= 0 and energy <= 0:  # an empty phase (no work) is not drawn
            continue
        avg = energy / duration / gpus if duration > 0 else 0.0
        curve = ((), ())
        if i == 1 and p.name == "decode" and s.strategy.name in _PLAIN_DECODE:
            curve = _decode_curve(s, prompt, lengths, duration)
        spans.append(PhaseSpan(p.name, t, duration, energy, avg,
                               max(float(p.peak_power_w) / gpus, avg), bool(p.throttled),
                               *curve))
        t += duration
    return Timeline(
        hw=s.profile.name, model=s.spec.name, strategy=s.strategy.spec, gpus=gpus,
        power_limit_w=float(s.c.power_limit_w), idle_power_w=float(s.c.idle_power_w),
        spans=spans, lengths_note=note, random_lengths=s.random_lengths,
    )


#: Strategies whose decode phase is one batch of sequences decoded together.
_PLAIN_DECODE = ("single", "vote", "bon")
#: Points of a decode curve at most (passes are averaged in groups beyond that).
_CURVE_POINTS = 400


def _decode_curve(s, prompt: int, lengths, duration_s: float) -> tuple[tuple, tuple]:
    """Per-GPU power of each decode pass, from :func:`forward_pass` (empty if inconsistent).

    Pass ``k`` runs every sequence longer than ``k`` tokens, each over
    ``prompt + k`` cached tokens (with prefix caching the shared prompt is
    fetched from HBM once per query).  Used only if the passes' times add up
    to the phase's time within 2 %, so the curve is the phase's own cost.
    """
    from ttcsim.simulator.roofline import forward_pass

    q, n = s.concurrency, s.strategy.samples_per_query
    if hasattr(lengths, "values"):
        values = np.asarray(lengths.values, dtype=float)
    elif hasattr(lengths, "tokens"):  # Fixed
        values = np.asarray([lengths.tokens], dtype=float)
    else:
        return (), ()
    per_seq = np.resize(np.broadcast_to(values, (n,)) if values.size in (1, n) else values, q * n)
    longest = int(per_seq.max())
    k = np.arange(longest, dtype=float)
    running = (per_seq[None, :] > k[:, None]).sum(axis=1).astype(float)
    ctx = running * (prompt + k)
    queries = np.minimum(float(q), running)
    kv_hbm = ctx - (running - queries) * prompt if s.prefix_cache and n > 1 else ctx
    cost = forward_pass(s.c, running, ctx, ctx, sequences=running, kv_hbm_tokens=kv_hbm)
    t, e = np.asarray(cost.time_s, float), np.asarray(cost.energy_j, float)
    if not np.isclose(t.sum(), duration_s, rtol=0.02):
        return (), ()
    group = max(1, int(np.ceil(t.size / _CURVE_POINTS)))
    edges = np.arange(0, t.size, group)
    t_g, e_g = np.add.reduceat(t, edges), np.add.reduceat(e, edges)
    ends = np.cumsum(t_g) * duration_s / t.sum()
    return tuple(ends), tuple(e_g / t_g / s.c.n_gpus)


def _draw_timeline(ax, tl: Timeline, colors: dict, t_max: float | None = None) -> None:
    """Phases shaded, average power as steps, peak as a dashed tick, limit and idle lines."""
    for sp in tl.spans:
        if sp.duration_s <= 0:
            continue
        end = sp.start_s + sp.duration_s
        ax.axvspan(sp.start_s, end, color=colors[sp.name], alpha=0.18, lw=0)
        if sp.curve_time_s:
            times = np.concatenate([[0.0], np.asarray(sp.curve_time_s)]) + sp.start_s
            power = np.asarray(sp.curve_power_w)
            ax.stairs(power, times, color=colors[sp.name], lw=1.2, baseline=None)
            ax.hlines(sp.avg_power_w, sp.start_s, end, color=colors[sp.name], lw=2.4, alpha=0.5)
        else:
            ax.hlines(sp.avg_power_w, sp.start_s, end, color=colors[sp.name], lw=2.4)
        if sp.peak_power_w > sp.avg_power_w * 1.01:
            ax.hlines(sp.peak_power_w, sp.start_s, end, color=colors[sp.name], lw=1.0, ls="--")
    ax.axhline(tl.power_limit_w, color="#c0392b", lw=1.3, ls="-.")
    ax.axhline(tl.idle_power_w, color="0.45", lw=1.0, ls=":")
    total = t_max if t_max is not None else tl.spans[-1].start_s + tl.spans[-1].duration_s
    ax.set_xlim(0.0, total)
    ax.set_ylim(0.0, tl.power_limit_w * 1.15)
    ax.grid(True, alpha=0.3)


def _time_unit(seconds: float) -> tuple[float, str]:
    return (1e3, "ms") if seconds < 1.0 else (1.0, "s")


def plot_prediction(path: str | Path, draws: int = 2000, seed: int = 0, **predict_kw) -> Path:
    """PNG: the power timeline of one query; with random lengths, its energy histogram too."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter

    from ttcsim.plotting import _pyplot, _save

    plt = _pyplot()
    tl = power_timeline(**predict_kw)
    names = list(dict.fromkeys(sp.name for sp in tl.spans))
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {n: palette[i % len(palette)] for i, n in enumerate(names)}
    total = tl.spans[-1].start_s + tl.spans[-1].duration_s
    lead = []  # the short phases the query starts with (its prefill): zoomed
    for sp in tl.spans:
        if sp.duration_s >= ZOOM_SHARE * total:
            break
        lead.append(sp)
    zoom_end = None
    if lead and lead[-1].start_s + lead[-1].duration_s < ZOOM_SHARE * total:
        zoom_end = 1.6 * (lead[-1].start_s + lead[-1].duration_s)
    rows = 2 if tl.random_lengths else 1
    fig = plt.figure(figsize=(10.0, 4.4 * rows))
    grid = fig.add_gridspec(rows, 4 if zoom_end else 1)
    main = fig.add_subplot(grid[0, 1:] if zoom_end else grid[0, 0])
    _draw_timeline(main, tl, colors)
    scale, unit = _time_unit(total)
    main.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v * scale:g}"))
    main.set_xlabel(f"time since the query arrived [{unit}]")
    if zoom_end:
        zoom = fig.add_subplot(grid[0, 0], sharey=main)
        _draw_timeline(zoom, tl, colors, t_max=zoom_end)
        zs, zu = _time_unit(zoom_end)
        zoom.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v * zs:g}"))
        zoom.set_xlabel(f"first {zoom_end * zs:.3g} {zu}")
        zoom.set_ylabel(f"power per GPU [W]  ({tl.gpus} GPU{'s' if tl.gpus > 1 else ''})")
        zoom.tick_params(axis="x", labelsize=8)
        zoom.set_title("zoom", fontsize=9)
        main.tick_params(labelleft=False)
    else:
        main.set_ylabel(f"power per GPU [W]  ({tl.gpus} GPU{'s' if tl.gpus > 1 else ''})")
    handles = [
        Patch(color=colors[n], alpha=0.45, label=f"{n}"
              + ("  (power-limited)" if any(sp.throttled for sp in tl.spans if sp.name == n)
                 else ""))
        for n in names
    ]
    handles.append(Line2D([], [], color="k", lw=2.4, label="average power of the phase"))
    if any(sp.curve_time_s for sp in tl.spans):
        handles.append(Line2D([], [], color="k", lw=1.2, label="decode, pass by pass"))
    if any(sp.peak_power_w > sp.avg_power_w * 1.01 for sp in tl.spans):
        handles.append(Line2D([], [], color="k", lw=1.0, ls="--", label="peak power of the phase"))
    handles += [
        Line2D([], [], color="#c0392b", lw=1.3, ls="-.",
               label=f"power limit {tl.power_limit_w:.0f} W"),
        Line2D([], [], color="0.45", lw=1.0, ls=":", label=f"idle {tl.idle_power_w:.0f} W"),
    ]
    main.legend(handles=handles, fontsize=8, loc="upper center", ncol=3,
                bbox_to_anchor=(0.5, -0.16), frameon=False)
    energy = sum(sp.energy_j for sp in tl.spans)
    fig.suptitle(f"{tl.model} on {tl.gpus}x {tl.hw}, {tl.strategy}: {energy:,.0f} J in "
                 f"{total * scale:.3g} {unit} per batch\n{tl.lengths_note}", fontsize=10)
    if tl.random_lengths:
        _draw_histogram(fig.add_subplot(grid[1, :]), draws, seed, predict_kw)
    fig.tight_layout()
    return _save(plt, fig, Path(path))


def _draw_histogram(ax, draws: int, seed: int, predict_kw: dict) -> None:
    """Energy per query over Monte-Carlo draws of the lengths, p50 and p90 marked."""
    from ttcsim.metrics import energy_samples
    from ttcsim.plotting import _log_if_wide

    kw = {k: predict_kw[k] for k in _QUERY_ARGS if k in predict_kw and k != "strategy"}
    strategy = predict_kw.get("strategy", "single")
    e = energy_samples([strategy], seed=seed, draws=draws, **kw)["energy_j"].to_numpy(float)
    log = _log_if_wide(e) == "log"
    lo, hi = float(e.min()), float(e.max())
    if hi <= lo:
        lo, hi = lo * 0.95, hi * 1.05 + 1e-9
    bins = np.geomspace(lo, hi, 45) if log else np.linspace(lo, hi, 45)
    ax.hist(e, bins=bins, weights=np.full(e.size, 100.0 / e.size), color="#5b8db8", alpha=0.8)
    p50, p90 = np.percentile(e, [50, 90])
    for q, label, ls in ((p50, "p50", "-"), (p90, "p90", "--")):
        ax.axvline(q, color="k", lw=1.3, ls=ls, label=f"{label} {q:,.0f} J")
    ax.axvline(e.mean(), color="#c0392b", lw=1.1, ls=":", label=f"mean {e.mean():,.0f} J")
    if log:
        from matplotlib.ticker import FuncFormatter, LogLocator

        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    from matplotlib.ticker import FuncFormatter

    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.set_xlabel("energy per query [J]")
    ax.set_ylabel("share of draws [%]")
    ax.set_title(f"energy per query over {e.size:,} random draws of the lengths", fontsize=9,
                 loc="left")
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(True, alpha=0.3)
