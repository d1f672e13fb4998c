"""Serving model and capacity planner: units, invariants, a published check, the CLI.

Tiers: (1) the serving model's pass costs against ``forward_pass`` summed pass by
pass, and one-query-at-a-time serving against ``predict``; (2) the planner's
consistency rules; (3) a published measurement with its tolerance; (4) CLI.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import LLAMA_8B, make_profile

from ttcsim import serving as sv
from ttcsim.cli import main
from ttcsim.plan import Prices, Slo, energy_per_query_low_load_j, plan
from ttcsim.predict import predict
from ttcsim.simulator.coefficients import pass_coefficients
from ttcsim.simulator.roofline import forward_pass

H100 = make_profile()
C1 = pass_coefficients(H100, LLAMA_8B, "bf16", "bf16", 1)
C2 = pass_coefficients(H100, LLAMA_8B, "bf16", "bf16", 2)
NO_EXTRA = sv.ReplicaLimits(np.array([1e6, 1e6]), np.zeros(2), np.zeros(2))
# Fast planner settings for the invariant tests (fewer measured queries).
FAST = dict(hw=H100, model=LLAMA_8B, tp="1", queries=100, prompt_tokens="256")


# --------------------------------------------------------------------------- tier 1


def brute_force_decode(c, batch, context_sum, n):
    """Sum of forward_pass over n decode passes whose contexts grow by batch per pass."""
    t = e = peak = 0.0
    for k in range(n):
        x = context_sum + k * batch
        p = forward_pass(c, batch, x, x)
        t += float(p.time_s)
        e += float(p.energy_j)
        peak = max(peak, float(p.energy_j / p.time_s))
    return t, e, peak


@pytest.mark.parametrize(
    "batch,ctx,n",
    [
        (1, 600, 1),
        (5, 5 * 513, 300),
        (64, 64 * 2000, 777),
        (256, 256 * 300, 1200),
        (512, 512 * 64, 400),
    ],
)
@pytest.mark.parametrize("flop_j", [None, 2.5e-12])
def test_decode_run_equals_forward_pass_summed(batch, ctx, n, flop_j):
    """Closed form (and quadrature over power-limited passes) == forward_pass pass by pass.

    Power-hungry tensor cores (``compute_energy_j_per_flop`` x4) put big-batch
    passes over the limit: some of a run (batch 256: its short-context start)
    or all of it (batch 512).
    """
    c = C1
    if flop_j:
        c = pass_coefficients(make_profile(compute_energy_j_per_flop=flop_j), LLAMA_8B)
    t, e, peak = sv.decode_run(c, batch, ctx, n)
    want_t, want_e, want_peak = brute_force_decode(c, batch, ctx, n)
    assert float(t[0]) == pytest.approx(want_t, rel=1e-7)  # quadrature: ~1e-8
    assert float(e[0]) == pytest.approx(want_e, rel=1e-7)
    assert float(peak[0]) == pytest.approx(want_peak, rel=1e-8)  # bisection: 2**-30


def test_stacked_coefficients_broadcast_like_each_option():
    option = np.array([1, 0, 1])
    stacked = sv.stack_coefficients([C1, C2], option)
    tokens, kv, pairs = (
        np.array([3.0, 700.0, 64.0]),
        np.array([1e3, 0.0, 9e4]),
        np.array([1e3, 2e5, 9e4]),
    )
    got = forward_pass(stacked, tokens, kv, pairs)
    for s, i in enumerate(option):
        want = forward_pass([C1, C2][i], tokens[s], kv[s], pairs[s])
        assert got.time_s[s] == pytest.approx(float(want.time_s), rel=1e-12)
        assert got.energy_j[s] == pytest.approx(float(want.energy_j), rel=1e-12)


@pytest.mark.parametrize("d0,d1,delta", [(0.01, 0.0, 0.35), (0.01, 1e-5, 2.0), (0.02, 3e-4, 0.021)])
def test_passes_until_is_the_smallest_count(d0, d1, delta):
    k = int(sv.passes_until(d0, d1, delta))
    total = lambda m: sum(d0 + d1 * j for j in range(m))  # noqa: E731
    assert total(k) >= delta - 1e-12
    assert k == 1 or total(k - 1) < delta


def spaced_stream(n, gap_s, prompt, lengths):
    """Deterministic arrivals every gap_s seconds, one length per sample."""
    arrival = (np.arange(n) + 1.0) * gap_s
    out = np.tile(np.asarray(lengths, dtype=float), (n, 1))
    return sv.QueryStream(arrival[None], np.full((1, n), float(prompt)), out[None])


@pytest.mark.parametrize(
    "strategy,lengths,tp",
    [("single", [700], 1), ("vote5", [300, 500, 500, 800, 1000], 1), ("vote3", [1, 40, 90], 2)],
)
def test_one_query_at_a_time_reproduces_predict(strategy, lengths, tp):
    """Queries that never overlap: the serving model is predict() plus idle power.

    Per query: E = E_predict + tp * P_idle * (gap - t_busy) exactly, TTFT and E2E
    equal predict's, TPOT = decode time / (longest length - 1).
    """
    gap = 100.0
    c = [C1, C2][tp - 1]
    stream = spaced_stream(60, gap, 512, lengths)
    st = sv.simulate([c], np.array([0]), stream, sv.Scheduler(), NO_EXTRA)
    p = predict(
        hw=H100,
        model=LLAMA_8B,
        strategy=strategy,
        prompt_tokens=512,
        output_tokens=",".join(map(str, lengths)),
        tp=tp,
    )
    want = energy_per_query_low_load_j(
        p.energy_j, p.batch_latency_s, H100.parameters.idle_power_w, tp, 1.0 / gap
    )
    assert float(st.energy_per_query_j[0]) == pytest.approx(want, rel=1e-9)
    assert st.ttft_s[0] == pytest.approx(p.ttft_s, rel=1e-9)
    assert st.e2e_s[0] == pytest.approx(p.latency_s, rel=1e-9)
    if max(lengths) > 1:
        assert st.tpot_s[0] == pytest.approx(p.decode_latency_s / (max(lengths) - 1), rel=1e-9)
    assert float(st.utilization[0]) == pytest.approx(p.batch_latency_s / gap, rel=1e-9)
    assert float(st.peak_power_w[0]) == pytest.approx(p.peak_power_w, rel=1e-9)


def test_scoring_phases_run_serially_after_the_query():
    """bon<N>: the reward pass's time and energy are added once per query, as in predict."""
    p = predict(hw=H100, model=LLAMA_8B, strategy="bon4", prompt_tokens=512, output_tokens="200")
    base = predict(
        hw=H100, model=LLAMA_8B, strategy="vote4", prompt_tokens=512, output_tokens="200"
    )
    extra_t, extra_e = p.score_latency_s, p.energy_score_j
    limits = sv.ReplicaLimits(np.array([1e6]), np.array([extra_t]), np.array([extra_e]))
    st = sv.simulate(
        [C1], np.array([0]), spaced_stream(40, 50.0, 512, [200] * 4), sv.Scheduler(), limits
    )
    want = energy_per_query_low_load_j(p.energy_j, p.batch_latency_s, 120.0, 1, 1 / 50.0)
    assert float(st.energy_per_query_j[0]) == pytest.approx(want, rel=1e-9)
    assert st.e2e_s[0] == pytest.approx(p.latency_s, rel=1e-9)
    assert st.tpot_s[0] == pytest.approx(base.decode_latency_s / 199, rel=1e-9)


def test_chunked_prefill_costs_the_same_pairs_and_more_weight_reads():
    """A prompt longer than the chunk is prefilled over several passes (causal pairs conserved)."""
    stream = spaced_stream(30, 100.0, 6000, [2])
    one = sv.simulate([C1], np.array([0]), stream, sv.Scheduler(chunk_tokens=8192), NO_EXTRA)
    three = sv.simulate([C1], np.array([0]), stream, sv.Scheduler(chunk_tokens=2048), NO_EXTRA)
    p = predict(hw=H100, model=LLAMA_8B, prompt_tokens=6000, output_tokens=2)
    assert one.ttft_s[0] == pytest.approx(p.ttft_s, rel=1e-9)
    # three chunks: 2048 + 2048 + 1904 tokens after 0, 2048, 4096 cached
    t = sum(
        float(forward_pass(C1, s, c0, s * c0 + s * (s + 1) / 2).time_s)
        for s, c0 in ((2048, 0), (2048, 2048), (1904, 4096))
    )
    assert three.ttft_s[0] == pytest.approx(t, rel=1e-9)
    assert np.all(three.ttft_s[0] > one.ttft_s[0])


def test_kv_capacity_and_max_batch_limit_admission():
    """Under overload the running batch settles at the tighter of the two limits."""
    rng = np.random.default_rng(3)
    n = 400
    ua = sv.unit_poisson_arrivals(rng, n)
    out = np.full((n, 2), 300.0)
    stream = sv.poisson_stream(np.array([200.0, 200.0]), np.full(n, 100.0), out, ua)
    # option 0: KV holds 20 queries (400 + 600 tokens each would be 1000 -> 20k tokens)
    limits = sv.ReplicaLimits(np.array([20 * 700.0, 1e6]), np.zeros(2), np.zeros(2))
    keep_going = dict(abandon_queue=10**9)
    st = sv.simulate(
        [C1, C1], np.array([0, 1]), stream, sv.Scheduler(max_batch=16), limits, **keep_going
    )
    assert st.busy_batch[0] == pytest.approx(16, abs=1.0)  # max_batch binds (8 queries x 2)
    assert st.backlog_growth[0] > 0.5  # overloaded
    tight = sv.ReplicaLimits(np.array([5 * 700.0, 1e6]), np.zeros(2), np.zeros(2))
    st = sv.simulate(
        [C1, C1], np.array([0, 1]), stream, sv.Scheduler(max_batch=16), tight, **keep_going
    )
    assert st.busy_batch[0] == pytest.approx(10, abs=1.0)  # KV binds: 5 queries x 2 sequences
    assert st.busy_batch[1] == pytest.approx(16, abs=1.0)
    # by default such an overload is abandoned early and reported as such
    st = sv.simulate([C1, C1], np.array([0, 1]), stream, sv.Scheduler(max_batch=16), tight)
    assert np.all(st.backlog_growth == 1.0) and np.all(np.isinf(st.e2e_s))
    assert np.all(np.isnan(st.avg_power_w))


def test_more_load_means_bigger_batch_and_longer_queue():
    rng = np.random.default_rng(1)
    n = 300
    ua = sv.unit_poisson_arrivals(rng, n)
    out = rng.gamma(2.0, 200.0, (n, 3)).round() + 1
    rates = np.array([0.05, 0.5, 2.0, 8.0])
    st = sv.simulate(
        [C1],
        np.zeros(4, int),
        sv.poisson_stream(rates, np.full(n, 256.0), out, ua),
        sv.Scheduler(),
        sv.ReplicaLimits(np.array([4e5]), np.zeros(1), np.zeros(1)),
    )
    assert np.all(np.diff(st.mean_batch) > 0)
    assert np.all(np.diff(st.utilization) >= -1e-12)
    assert np.all(np.diff(st.percentile("tpot_s", 90)) > 0)
    assert np.all(np.diff(st.energy_per_output_token_j) < 0)  # batching amortises weight reads


# --------------------------------------------------------------------------- tier 2


def test_low_load_plan_energy_is_predict_plus_idle():
    """Very low load: j_per_query = E_predict + gpus * P_idle * (R / qps - t_busy).

    Poisson gaps rarely overlap at 1e-4 q/s (busy ~7 s per query), so the tolerance is 0.2 %.
    """
    qps = 1e-4
    r = plan(strategy="vote5", qps=qps, output_tokens="400", **FAST)
    o = r.recommended
    assert o.replicas == 1 and o.gpus == 1
    p = predict(hw=H100, model=LLAMA_8B, strategy="vote5", prompt_tokens=256, output_tokens=400)
    want = energy_per_query_low_load_j(p.energy_j, p.batch_latency_s, 120.0, 1, qps)
    assert o.j_per_query == pytest.approx(want, rel=2e-3)
    assert o.wh_per_query == pytest.approx(o.j_per_query / 3600)
    assert o.avg_power_kw * 1e3 == pytest.approx(120.0, rel=0.01)  # almost always idle


def test_kwh_usd_and_co2_follow_from_power():
    prices = Prices(usd_per_gpu_hour=3.0, usd_per_kwh=0.2, carbon_g_per_kwh=300.0, pue=1.3)
    r = plan(
        strategy="vote3",
        qps=4.0,
        output_tokens="gamma:mean=400,shape=2,max=4096",
        prices=prices,
        **{**FAST, "tp": "1,2"},
    )
    for o in r.options:
        assert o.kwh_per_day == pytest.approx(o.avg_power_kw * 24, rel=1e-12)
        assert o.facility_kwh_per_day == pytest.approx(o.kwh_per_day * 1.3, rel=1e-12)
        assert o.usd_per_day == pytest.approx(o.gpus * 24 * 3.0 + o.facility_kwh_per_day * 0.2)
        assert o.co2_tonnes_per_year == pytest.approx(o.facility_kwh_per_day * 365 * 300 / 1e6)
        assert o.j_per_query == pytest.approx(o.avg_power_kw * 1e3 / 4.0, rel=1e-12)
        tokens_per_day = 4.0 * 86400 * r.output_tokens_per_query
        assert o.usd_per_million_output_tokens == pytest.approx(
            1e6 * o.usd_per_day / tokens_per_day
        )
        assert o.gpus == o.replicas * o.tp
        assert o.peak_power_kw >= o.avg_power_kw
    assert sum(o.cheapest for o in r.options) == 1
    assert sum(o.lowest_energy for o in r.options) == 1
    assert r.recommended.cheapest


def test_more_qps_never_needs_fewer_gpus():
    slo = Slo(ttft_p90_s=1.0, tpot_p90_s=0.03, e2e_p90_s=30.0)
    gpus = [
        plan(
            strategy="vote5",
            qps=q,
            output_tokens="lognormal:median=300,sigma=0.6,max=4096",
            slo=slo,
            **FAST,
        ).recommended.gpus
        for q in (0.3, 2.0, 6.0, 25.0)
    ]
    assert gpus == sorted(gpus)
    assert gpus[-1] > gpus[0]


def test_tighter_slo_never_needs_fewer_gpus():
    gpus = []
    for tpot_ms in (50, 8, 7.4, 7.2, 7.0):  # floor: one query alone, ~6.6 ms
        r = plan(
            strategy="vote5",
            qps=10.0,
            output_tokens="lognormal:median=300,sigma=0.6,max=4096",
            slo=Slo(tpot_p90_s=tpot_ms / 1e3),
            **FAST,
        )
        gpus.append(r.recommended.gpus)
        assert r.recommended.tpot_p90_s <= tpot_ms / 1e3
    assert gpus == sorted(gpus)
    assert gpus[-1] > gpus[0]


def test_impossible_slo_says_which_floor():
    """A TPOT target below one decode pass of the model cannot be met by any replica count."""
    one_pass = float(forward_pass(C1, 5, 5 * 257, 5 * 257).time_s)
    r = plan(
        strategy="vote5", qps=1.0, output_tokens="200", slo=Slo(tpot_p90_s=0.5 * one_pass), **FAST
    )
    assert not r.feasible and r.recommended is None
    assert "TPOT p90 floor" in r.reason and "exceeds" in r.reason
    o = r.options[0]
    assert o.fits and not o.slo_met
    assert o.floor_tpot_p90_s == pytest.approx(one_pass, rel=0.02)


def test_options_that_do_not_fit_say_so():
    r = plan(
        hw="a100-sxm-40gb",
        model="70b",
        strategy="single",
        qps=1.0,
        output_tokens="256",
        tp="1,2,3,4",
        queries=100,
    )
    reasons = {o.tp: o.reason for o in r.options}
    assert "do not fit" in reasons[1] and "do not fit" in reasons[2]
    assert "3 GPUs cannot split" in reasons[3]
    assert r.options[-1].fits and r.options[-1].slo_met


def test_trace_arrivals(tmp_path):
    """A recorded trace: its rate is the load; every replica sees a thinned copy."""
    rng = np.random.default_rng(5)
    arrivals = np.cumsum(rng.exponential(0.25, 400))
    path = tmp_path / "trace.csv"
    lines = ["arrival_s,prompt_tokens,output_tokens"]
    lines += [f"{a:.4f},{rng.integers(100, 400)},{rng.integers(50, 600)}" for a in arrivals]
    path.write_text("\n".join(lines) + "\n")
    r = plan(
        hw=H100,
        model=LLAMA_8B,
        strategy="vote3",
        trace=str(path),
        tp="1",
        slo=Slo(e2e_p90_s=20.0),
        queries=100,
    )
    assert r.qps == pytest.approx(399 / (arrivals[-1] - arrivals[0]))
    assert r.arrivals == "trace:trace.csv"
    assert r.feasible and r.recommended.e2e_p90_s <= 20.0


def test_plan_is_seeded():
    kw = dict(strategy="vote5", qps=5.0, output_tokens="gamma:mean=300,shape=2,max=4096", **FAST)
    assert plan(**kw).as_dict() == plan(**kw).as_dict()


def test_unsupported_strategy_is_refused():
    from ttcsim.errors import TtcsimError
    from ttcsim.strategies import strategy_names

    names = " ".join(strategy_names())
    if "refine" not in names:
        pytest.skip("no sequential strategy registered")
    with pytest.raises(TtcsimError, match="different shape"):
        plan(strategy="refine2", qps=1.0, **FAST)


# --------------------------------------------------------------------------- tier 3


def test_ml_energy_llama8b_h100_batch64_joules_per_token():
    """ML.ENERGY Leaderboard v3 (arXiv 2601.22076; blog "LLM Inference Energy: A
    Longitudinal Analysis", ml.energy, 2025): Llama-3.1-8B on one H100, vLLM 0.11.1,
    batch size 64 -> about 0.12 J per output token (text conversation, mean output
    717 tokens).

    We saturate one replica with ``max_batch=64``, prompt 256 and the same mean
    output length, with the shipped H100 profile.  Tolerance: a factor of 3 either
    way.  The profiles' physics is an idealised engine (perfectly overlapped
    kernels, a fixed host time per pass) where vLLM at batch 64 still loses GPU
    time to CPU-side scheduling (the same blog reports 0.20 -> 0.12 J from
    software changes alone); engine, kernels, prompt lengths and measurement
    window differ.  The datasheet-default profile gave 0.063 J (1.9x below); the
    profile calibrated on our H100 with the reference decoder (2026-11-26) gives
    0.099 J at ~560 W (18 % below).  The check guards the order of magnitude and
    the regime (weight-read-bound decode), not calibrated accuracy.
    """
    from ttcsim.hardware import get_profile
    from ttcsim.models import get_model

    c = pass_coefficients(get_profile("h100"), get_model("8b"))
    rng = np.random.default_rng(0)
    n = 1500
    out = rng.gamma(1.5, 717 / 1.5, (n, 1)).round().clip(1, 8192)
    ua = sv.unit_poisson_arrivals(rng, n)
    stream = sv.poisson_stream(np.array([15.0]), np.full(n, 256.0), out, ua)
    st = sv.simulate(
        [c],
        np.array([0]),
        stream,
        sv.Scheduler(max_batch=64),
        sv.ReplicaLimits(np.array([4e5]), np.zeros(1), np.zeros(1)),
        warmup_queries=300,
        tail_queries=300,
        abandon_queue=10**9,  # saturated on purpose
    )
    assert st.busy_batch[0] == pytest.approx(64, abs=1.5)
    j_per_token = float(st.energy_per_output_token_j[0])
    assert 0.12 / 3 <= j_per_token <= 0.12 * 3
    assert 300 <= st.avg_power_w[0] <= 700


# --------------------------------------------------------------------------- tier 4 (CLI)

CLI = [
    "plan",
    "--hw",
    "h100,a100",
    "--model",
    "8b",
    "--strategy",
    "vote5",
    "--qps",
    "4",
    "--prompt-tokens",
    "256",
    "--output-tokens",
    "gamma:mean=300,shape=2,max=4096",
    "--tp",
    "1,2",
    "--queries",
    "100",
]


def test_cli_table_marks_cheapest_and_recommends():
    res = CliRunner().invoke(main, CLI + ["--slo-tpot-p90-ms", "40", "--slo-e2e-p90-s", "30"])
    assert res.exit_code == 0, res.output
    assert "recommended:" in res.output and "$" in res.output
    assert "h100-sxm-80gb tp1" in res.output and "a100-sxm-80gb tp2" in res.output
    assert "transferred (not calibrated) profiles: a100-sxm-80gb" in res.output


def test_cli_json_has_the_documented_fields():
    res = CliRunner().invoke(main, CLI + ["--json", "--slo-ttft-p90-ms", "2000"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    keys = {
        "gpus",
        "replicas",
        "tp",
        "batch",
        "utilization",
        "avg_power_kw",
        "peak_power_kw",
        "kwh_per_day",
        "j_per_query",
        "usd_per_day",
        "usd_per_million_output_tokens",
        "co2_tonnes_per_year",
        "slo_met",
    }
    assert data["feasible"] is True
    assert keys <= set(data["recommended"])
    for option in data["options"]:
        assert keys <= set(option)
    assert "curves" not in data


def test_cli_plot_writes_a_png(tmp_path):
    out = tmp_path / "plan.png"
    res = CliRunner().invoke(main, CLI + ["--plot", str(out)])
    assert res.exit_code == 0, res.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_infeasible_plan_explains():
    res = CliRunner().invoke(main, CLI + ["--slo-tpot-p90-ms", "0.5"])
    assert res.exit_code == 3, res.output  # a result, but not a feasible one (issue 16)
    assert "infeasible (slo): no option meets the SLO" in res.output
    assert "TPOT p90 floor" in res.output


@pytest.mark.parametrize(
    "args,message",
    [
        (["plan", "--hw", "h100"], "--qps"),
        (["plan", "--hw", "nope", "--qps", "1"], "unknown hardware"),
        (["plan", "--qps", "1", "--tp", "0"], "--tp"),
        (["plan", "--qps", "-2"], "--qps"),
        (["plan", "--qps", "1", "--pue", "0.5"], "--pue"),
        (["plan", "--qps", "1", "--max-batch", "512", "--chunk-tokens", "256"], "--chunk-tokens"),
    ],
)
def test_cli_errors_are_one_line_exit_2(args, message):
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2
    assert message in res.output


def test_scheduler_and_stream_validation():
    with pytest.raises(ValueError):
        sv.poisson_stream(np.array([0.0]), np.ones(3), np.ones((3, 1)), np.arange(1.0, 4.0))
    assert sv.query_fits(5, 100.0, sv.Scheduler(max_batch=4), 1e6).startswith("a query's 5")
    assert "KV cache holds" in sv.query_fits(1, 2e6, sv.Scheduler(), 1e6)
    assert sv.query_fits(1, 10.0, sv.Scheduler(), 1e6) is None
    assert dataclasses.is_dataclass(sv.Scheduler())
