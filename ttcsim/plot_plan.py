"""Plot of a :class:`~ttcsim.plan.Plan`: energy per query and cost against fleet QPS.

The only module of the planner that imports matplotlib (Agg backend, no display).
Each option is one line; its steps are where one more replica is needed and the
new replica starts mostly idle.
"""

from __future__ import annotations

from pathlib import Path

from ttcsim.errors import TtcsimError
from ttcsim.plan import Plan

_LINESTYLES = {1: "-", 2: "--", 4: "-.", 8: ":"}


def plot_plan(plan: Plan, path: str | Path) -> Path:
    """Write a PNG: J per query (left) and $ per million output tokens (right) against QPS.

    Needs a plan computed with ``curves=True``.  The requested QPS is marked, and
    the recommended option drawn thicker.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not plan.curves:
        raise TtcsimError("no option meets the SLO at any load: nothing to plot", "--plot")
    path = Path(path)
    hws = sorted({c.hw for c in plan.curves})
    colours = {hw: plt.get_cmap("tab10")(i % 10) for i, hw in enumerate(hws)}
    rec = plan.recommended
    fig, (ax_e, ax_c) = plt.subplots(1, 2, figsize=(12, 4.8), constrained_layout=True)
    for c in plan.curves:
        best = rec is not None and (c.hw, c.tp) == (rec.hw, rec.tp)
        style = dict(
            color=colours[c.hw],
            linestyle=_LINESTYLES.get(c.tp, "-"),
            linewidth=2.6 if best else 1.3,
            label=f"{c.hw} tp{c.tp}" + (" (recommended)" if best else ""),
        )
        ax_e.plot(c.qps, c.j_per_query, **style)
        ax_c.plot(c.qps, c.usd_per_million_output_tokens, **style)
    for ax in (ax_e, ax_c):
        ax.axvline(plan.qps, color="0.4", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("fleet load [queries/s]")
        ax.grid(True, which="both", alpha=0.3)
    ax_e.set_ylabel("GPU energy per query [J]")
    ax_c.set_ylabel("cost [\\$ per million output tokens]")
    ax_e.annotate(
        f"{plan.qps:g} q/s ",
        (plan.qps, 0.98),
        xycoords=("data", "axes fraction"),
        rotation=90,
        fontsize=8,
        color="0.3",
        ha="right",
        va="top",
    )
    slo = []
    if plan.slo_ttft_p90_s is not None:
        slo.append(f"TTFT p90 {plan.slo_ttft_p90_s * 1e3:g} ms")
    if plan.slo_tpot_p90_s is not None:
        slo.append(f"TPOT p90 {plan.slo_tpot_p90_s * 1e3:g} ms")
    if plan.slo_e2e_p90_s is not None:
        slo.append(f"E2E p90 {plan.slo_e2e_p90_s:g} s")
    fig.suptitle(
        f"{plan.model}, {plan.strategy}: fewest GPUs meeting "
        + (", ".join(slo) if slo else "no SLO")
        + f" (\\${plan.usd_per_gpu_hour:g}/GPU-h, \\${plan.usd_per_kwh:g}/kWh, PUE {plan.pue:g})",
        fontsize=10,
    )
    ax_c.legend(fontsize=7, ncol=1, loc="upper right")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
