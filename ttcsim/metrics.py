"""Energy-per-token metrics and per-query energy distributions.

Definitions (all per query, SI units; ``E`` the expected energy of one query):

* ``j_per_prompt_token = E_prefill / P``: prompt processing (every prefill of
  the prompt, feedback and draft-model prompt) per prompt token.
* ``j_per_output_token = E / L_out`` (average) with ``L_out`` every token the
  query generates (all samples, rounds, beams), and
  ``j_per_output_token_marginal = dE / dL_out``: the energy of one more output
  token per sequence at this operating point, by a forward difference
  ``(E(L + d) - E(L)) / (L_out(L + d) - L_out(L))`` with
  ``d = max(quantum, round(E[L] / 100))`` tokens added to every length.
* ``j_per_prompt_token_marginal = (E(P + d) - E(P)) / d``, ``d = max(1, round(P / 100))``.
* ``j_per_useful_token = E / L_useful``: ``L_useful`` the tokens of the answer the
  user gets (one sample of a vote, the best beam, the last refine round).
* ``output_tokens_per_j = L_out / E`` and ``useful_tokens_per_j = L_useful / E``.
* by phase: ``energy_by_phase_j`` (prefill, decode, draft, score) and
  ``j_per_token_by_phase``: prefill per prefilled token, decode and draft per
  output token, score per scored token.

Random workloads: the mean is exact where the strategy supports it; otherwise
it is a seeded Monte-Carlo mean of ``D`` draws with standard error
``s / sqrt(D)`` (``s`` the sample standard deviation), reported as
``energy_j_stderr``.  Percentiles always come from the draws.

:func:`metrics_table` compares strategies (or hardware, models) as a tidy
DataFrame; :func:`energy_samples` returns the per-draw energies behind the
percentiles (for histograms).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

#: Phase buckets a strategy's phases fall into (any other name counts as decode).
PHASES = ("prefill", "decode", "draft", "score")

#: Columns of :func:`metrics_table`, in order.
METRIC_COLUMNS = (
    "hw",
    "model",
    "strategy",
    "prompt_tokens",
    "output_tokens",
    "useful_tokens",
    "energy_j",
    "energy_j_stderr",
    "energy_j_p50",
    "energy_j_p90",
    "energy_j_p99",
    "energy_prefill_j",
    "energy_decode_j",
    "energy_draft_j",
    "energy_score_j",
    "j_per_prompt_token",
    "j_per_prompt_token_marginal",
    "j_per_output_token",
    "j_per_output_token_marginal",
    "j_per_useful_token",
    "output_tokens_per_j",
    "useful_tokens_per_j",
    "latency_s",
    "avg_power_w",
    "expectation",
    "calibrated_profile",
    "profile_status",
    "energy_j_low",
    "energy_j_high",
    "latency_s_low",
    "latency_s_high",
    "power_limit_w",
)


def phase_bucket(name: str) -> str:
    """The bucket of a phase name: one of :data:`PHASES` (unknown names count as decode)."""
    return name if name in PHASES else "decode"


def per_token(energy_j: float, tokens: float) -> float | None:
    """``energy_j / tokens`` [J/token]; None when there are no tokens."""
    return float(energy_j / tokens) if tokens > 0 else None


def tokens_per_joule(tokens: float, energy_j: float) -> float | None:
    """``tokens / energy_j`` [token/J]; None when the energy is 0."""
    return float(tokens / energy_j) if energy_j > 0 else None


def marginal(energy_base_j: float, energy_more_j: float, extra_tokens: float) -> float | None:
    """Forward difference ``(E(x + d) - E(x)) / d`` [J/token]; None when ``d`` is 0."""
    return float((energy_more_j - energy_base_j) / extra_tokens) if extra_tokens > 0 else None


def mean_and_stderr(values: np.ndarray) -> tuple[float, float]:
    """Monte-Carlo mean and its standard error ``s / sqrt(n)`` (``s`` with ``ddof=1``)."""
    v = np.asarray(values, dtype=float).ravel()
    if v.size < 2:
        return float(v.mean()), 0.0
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(v.size))


def prediction_row(prediction) -> dict:
    """One :func:`metrics_table` row from a :class:`~ttcsim.predict.Prediction`."""
    d = prediction.as_dict()
    row = {k: d.get(k) for k in METRIC_COLUMNS}
    row["prompt_tokens"] = d["prompt_tokens_mean"]
    row["energy_draft_j"] = d["energy_by_phase_j"].get("draft", 0.0)
    row["energy_decode_j"] = d["energy_by_phase_j"].get("decode", 0.0)
    return row


def metrics_table(
    strategies: Sequence[str],
    hw: Iterable[str] | str = ("h100",),
    model: Iterable[str] | str = ("8b",),
    **predict_kw,
):
    """Energy-per-token metrics for every (hw, model, strategy): a tidy DataFrame.

    One row per combination, columns :data:`METRIC_COLUMNS` (unit-suffixed).
    ``predict_kw`` go to :func:`ttcsim.predict.predict` unchanged.
    """
    import pandas as pd

    from ttcsim.predict import predict

    hws = [hw] if isinstance(hw, str) else list(hw)
    models = [model] if isinstance(model, str) else list(model)
    rows = []
    for h in hws:
        for m in models:
            for s in strategies:
                rows.append(prediction_row(predict(hw=h, model=m, strategy=s, **predict_kw)))
    return pd.DataFrame(rows, columns=list(METRIC_COLUMNS))


def energy_samples(strategies: Sequence[str], **predict_kw):
    """Per-query energy and latency of every Monte-Carlo draw, one block per strategy.

    A tidy DataFrame with columns ``strategy``, ``draw``, ``energy_j``,
    ``latency_s``; a deterministic workload gives a single row with its exact
    value.  ``predict_kw`` go to :func:`ttcsim.predict.predict_draws`.
    """
    import pandas as pd

    from ttcsim.predict import predict_draws

    frames = []
    for s in strategies:
        energy, latency, label = predict_draws(strategy=s, **predict_kw)
        frames.append(
            pd.DataFrame(
                {
                    "strategy": label,
                    "draw": np.arange(energy.size),
                    "energy_j": energy,
                    "latency_s": latency,
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


#: predict() arguments that do not change the draws (dropped by write_energy_histogram).
_NOT_DRAW_ARGS = ("pue", "carbon_g_per_kwh", "usd_per_kwh", "percentiles", "marginal")


def write_energy_histogram(path, strategy="single", **predict_kw):
    """Histogram PNG of one query's energy over the Monte-Carlo draws (``predict --plot``).

    Takes :func:`ttcsim.predict.predict`'s keyword arguments (those that do
    not affect the draws, such as ``pue``, are ignored); ``strategy`` may be
    one spec or a list.  Returns the path written.
    """
    from ttcsim.plotting import plot_energy_histogram

    kw = {k: v for k, v in predict_kw.items() if k not in _NOT_DRAW_ARGS}
    specs = [strategy] if isinstance(strategy, str) or not isinstance(strategy, list) else strategy
    return plot_energy_histogram(energy_samples(specs, **kw), path)
