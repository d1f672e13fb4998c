"""Accuracy tables, Pareto frontier, energy-aware router and reasoning depth.

Tiers: the frontier and the router against brute force (hypothesis), the
saturating fit on curves generated from known parameters, the loader's
``file:line`` errors, and CLI smoke tests with ``CliRunner``.
"""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from ttcsim.accuracy import bundled_tables, load_accuracy_table
from ttcsim.cli import main
from ttcsim.distributions import Fixed, LengthList, parse_lengths
from ttcsim.errors import TtcsimError
from ttcsim.predict import predict
from ttcsim.tradeoffs import (
    BUDGET_RTOL,
    allocation_frontier,
    cap_lengths,
    cheapest_at_least,
    completion_probability,
    depth,
    evaluate_row,
    fit_saturating,
    pareto,
    pareto_front,
    parse_mix,
    route,
    saturating_accuracy,
    solve_allocation,
)

TINY = """\
kind: accuracy-table
version: 1
name: tiny
title: test fixture
defaults:
  prompt_tokens: 128
  output_tokens: "lognormal:median=300,sigma=0.5,max=2048"
  source: test fixture
rows:
  - {model: qwen2.5-0.5b, strategy: single, benchmark: b1, difficulty: easy, accuracy_pct: 40}
  - {model: qwen2.5-1.5b, strategy: single, benchmark: b1, difficulty: easy, accuracy_pct: 55}
  - {model: qwen2.5-0.5b, strategy: vote8, benchmark: b1, difficulty: easy, accuracy_pct: 52}
  - {model: qwen2.5-0.5b, strategy: single, benchmark: b2, difficulty: hard, accuracy_pct: 10}
  - {model: qwen2.5-1.5b, strategy: single, benchmark: b2, difficulty: hard, accuracy_pct: 20}
  - {model: qwen2.5-1.5b, strategy: vote8, benchmark: b2, difficulty: hard, accuracy_pct: 30}
"""


@pytest.fixture()
def tiny_path(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


@pytest.fixture()
def tiny(tiny_path):
    return load_accuracy_table(tiny_path)


# ------------------------------------------------------------------ frontier


def brute_front(a, e):
    n = len(a)
    return np.array(
        [
            not any(
                a[j] >= a[i] and e[j] <= e[i] and (a[j] > a[i] or e[j] < e[i])
                for j in range(n)
                if j != i
            )
            for i in range(n)
        ],
        dtype=bool,
    )


points = st.lists(
    st.tuples(st.integers(0, 12), st.integers(1, 12)), min_size=1, max_size=25
)  # small integers force ties and duplicates


@given(points)
@settings(max_examples=300, deadline=None)
def test_frontier_equals_brute_force(pts):
    a = [float(p[0]) for p in pts]
    e = [float(p[1]) for p in pts]
    assert (pareto_front(a, e) == brute_front(a, e)).all()


@given(points, st.integers(0, 13))
@settings(max_examples=200, deadline=None)
def test_cheapest_at_least_equals_brute_force_and_lies_on_frontier(pts, level):
    a = [float(p[0]) for p in pts]
    e = [float(p[1]) for p in pts]
    i = cheapest_at_least(a, e, level)
    ok = [j for j in range(len(a)) if a[j] >= level]
    if not ok:
        assert i is None
        return
    assert e[i] == min(e[j] for j in ok)
    assert pareto_front(a, e)[i]


def test_frontier_hand_example():
    # (acc, energy): B dominates C, D ties A exactly (both kept), E is the most accurate
    a = [50, 60, 55, 50, 90]
    e = [10, 20, 25, 10, 100]
    assert pareto_front(a, e).tolist() == [True, True, False, True, True]


# ------------------------------------------------------------------- router


def brute_route(acc, en, w, budget=None, target=None):
    best = None
    for combo in itertools.product(*[range(len(a)) for a in acc]):
        a = sum(w[k] * acc[k][i] for k, i in enumerate(combo))
        e = sum(w[k] * en[k][i] for k, i in enumerate(combo))
        if budget is not None and e <= budget:
            key = (a, -e)
        elif target is not None and a >= target:
            key = (-e, a)
        else:
            continue
        if best is None or key > best[0]:
            best = (key, a, e)
    return best


@st.composite
def routing_problems(draw):
    k = draw(st.integers(1, 3))
    acc, en = [], []
    for _ in range(k):
        n = draw(st.integers(1, 4))
        acc.append([draw(st.integers(0, 100)) * 1.0 for _ in range(n)])
        en.append([draw(st.integers(1, 50)) * 10.0 for _ in range(n)])
    raw = [draw(st.integers(1, 5)) for _ in range(k)]
    w = [r / sum(raw) for r in raw]
    return acc, en, w


@given(routing_problems(), st.floats(0.0, 1.0))
@settings(max_examples=150, deadline=None)
def test_router_is_optimal_and_within_budget(problem, frac):
    acc, en, w = problem
    low = sum(wk * min(e) for wk, e in zip(w, en, strict=True))
    high = sum(wk * max(e) for wk, e in zip(w, en, strict=True))
    budget = low + frac * (high - low)
    sol = solve_allocation(acc, en, w, budget_j=budget)
    assert sol.energy_j <= budget * (1 + 1e-9)
    assert sol.status == "optimal" and sol.mip_gap == 0
    # the router accepts the budget to BUDGET_RTOL (HiGHS feasibility); brute force the same way
    _, a_best, e_best = brute_route(acc, en, w, budget=budget * (1 + BUDGET_RTOL))
    assert sol.accuracy_pct == pytest.approx(a_best, abs=1e-6)
    assert sol.energy_j == pytest.approx(e_best, rel=1e-6)  # cheapest among the most accurate


@given(routing_problems(), st.floats(0.0, 1.0))
@settings(max_examples=100, deadline=None)
def test_router_target_mode_is_cheapest(problem, frac):
    acc, en, w = problem
    top = sum(wk * max(a) for wk, a in zip(w, acc, strict=True))
    target = frac * top
    sol = solve_allocation(acc, en, w, target_pct=target)
    assert sol.accuracy_pct >= target - 1e-6
    _, _, e_best = brute_route(acc, en, w, target=target)
    assert sol.energy_j == pytest.approx(e_best, rel=1e-6)


@given(routing_problems(), st.lists(st.floats(0.0, 1.0), min_size=2, max_size=6))
@settings(max_examples=100, deadline=None)
def test_larger_budget_never_lowers_routed_accuracy(problem, fracs):
    acc, en, w = problem
    low = sum(wk * min(e) for wk, e in zip(w, en, strict=True))
    high = sum(wk * max(e) for wk, e in zip(w, en, strict=True))
    results = [
        solve_allocation(acc, en, w, budget_j=low + f * (high - low)).accuracy_pct
        for f in sorted(fracs)
    ]
    assert all(b >= a - 1e-9 for a, b in zip(results, results[1:], strict=False))


@given(routing_problems())
@settings(max_examples=80, deadline=None)
def test_allocation_frontier_equals_brute_force_frontier(problem):
    acc, en, w = problem
    combos = list(itertools.product(*[range(len(a)) for a in acc]))
    # rounded so that float summation order cannot split equal allocations
    a = [round(sum(w[k] * acc[k][i] for k, i in enumerate(c)), 9) for c in combos]
    e = [round(sum(w[k] * en[k][i] for k, i in enumerate(c)), 9) for c in combos]
    mask = pareto_front(a, e)
    expected = sorted({(round(e[i], 6), round(a[i], 6)) for i in np.flatnonzero(mask)})
    got = [
        (round(s.energy_j, 6), round(s.accuracy_pct, 6)) for s in allocation_frontier(acc, en, w)
    ]
    assert got == expected


def test_router_errors():
    with pytest.raises(TtcsimError, match="below the cheapest"):
        solve_allocation([[10, 20]], [[5, 9]], [1.0], budget_j=4)
    with pytest.raises(TtcsimError, match="above the best reachable"):
        solve_allocation([[10, 20]], [[5, 9]], [1.0], target_pct=21)
    with pytest.raises(TtcsimError, match="exactly one"):
        solve_allocation([[10]], [[5]], [1.0])


def test_parse_mix():
    assert parse_mix("easy=3,hard=1") == {"easy": 0.75, "hard": 0.25}
    for bad in ("easy", "easy=-1", "easy=x", "easy=1,easy=2"):
        with pytest.raises(TtcsimError, match="--mix"):
            parse_mix(bad)


# ------------------------------------------------------------------- lengths


def test_cap_lengths_and_completion_probability():
    assert cap_lengths(Fixed(900), 512) == Fixed(512)
    assert cap_lengths(LengthList((100, 700)), 512) == LengthList((100, 512))
    dist = parse_lengths("lognormal:median=800,sigma=0.7,max=8192")
    capped = cap_lengths(dist, 1000)
    assert capped.upper_bound() == 1000
    # E[min(L, c)] = sum_{s<c} P(L > s)
    s = np.arange(1, 1000)
    assert capped.mean() == pytest.approx(1 + dist.survival(s).sum(), rel=1e-12)
    assert completion_probability(dist, 1000) == pytest.approx(1 - dist.survival([1000.0])[0])
    assert completion_probability(dist, 8192) == pytest.approx(1.0)
    assert completion_probability(dist, math.inf) == 1.0


# ------------------------------------------------------------------ tables


def test_bundled_tables_load_and_cite():
    assert set(bundled_tables()) >= {"deepseek-r1-distill", "self-consistency"}
    for name in bundled_tables():
        table = load_accuracy_table(name)
        assert table.name == name and table.example and table.citations
        assert all(r.source for r in table.rows)
        assert all(":" in w for w in table.where)  # file:line of every row


def test_deepseek_table_matches_paper():
    t = load_accuracy_table("deepseek-r1-distill")
    got = {(r.model, r.strategy, r.benchmark): r.accuracy_pct for r in t.rows}
    assert got[("deepseek-r1-distill-qwen-7b", "vote64", "aime-2024")] == 83.3
    assert got[("deepseek-r1-distill-llama-70b", "single", "math-500")] == 94.5
    assert got[("deepseek-r1-distill-qwen-1.5b", "single", "aime-2024")] == 28.9
    assert len(t.rows) == 18


@pytest.mark.parametrize(
    "edit, line, match",
    [
        (("accuracy_pct: 55}", "accuracy_pct: 155}"), 11, "accuracy_pct"),
        (
            (
                "qwen2.5-1.5b, strategy: single, benchmark: b1",
                "nope-9b, strategy: single, benchmark: b1",
            ),
            11,
            "unknown model 'nope-9b'",
        ),
        (
            ("strategy: vote8, benchmark: b1", "strategy: poll8, benchmark: b1"),
            12,
            "unknown strategy",
        ),
        (('max=2048"', 'max=x"'), 7, "output_tokens"),
        (("rows:\n", "rows:\n  - [1, 2\n"), 11, "invalid YAML"),
        (("rows:\n", "name: again\nrows:\n"), 9, "duplicate key 'name'"),
    ],
)
def test_errors_name_file_and_line(tmp_path, edit, line, match):
    path = tmp_path / "bad.yaml"
    path.write_text(TINY.replace(*edit, 1))
    with pytest.raises(TtcsimError, match=match) as info:
        load_accuracy_table(path)
    assert f"bad.yaml:{line}" in str(info.value)


def test_csv_table_and_its_errors(tmp_path):
    good = (
        "# name: mine\n# citation: our eval\n"
        "model,strategy,benchmark,accuracy_pct,output_tokens,source\n"
        "8b,single,gsm8k,80,300,run 1\n"
        "8b,vote5,gsm8k,85,300,run 2\n"
    )
    path = tmp_path / "mine.csv"
    path.write_text(good)
    table = load_accuracy_table(path)
    assert table.name == "mine" and table.rows[0].model == "llama-3.1-8b"
    assert table.where == (f"{path}:4", f"{path}:5")
    path.write_text(good.replace("85,300", "85"))
    with pytest.raises(TtcsimError, match=r"mine.csv:5: expected 6"):
        load_accuracy_table(path)
    path.write_text(good.replace("85,300", "-3,300"))
    with pytest.raises(TtcsimError, match=r"mine.csv:5: accuracy_pct"):
        load_accuracy_table(path)


def test_unknown_table_name_lists_bundled():
    with pytest.raises(TtcsimError, match="deepseek-r1-distill"):
        load_accuracy_table("no-such-table")


# ------------------------------------------------------------ pareto, route


def test_row_energy_is_predict_energy(tiny):
    row = tiny.rows[2]
    option = evaluate_row(row, "h100", "x")
    direct = predict(
        "h100",
        row.model,
        row.strategy,
        prompt_tokens=128,
        output_tokens=row.output_tokens,
        percentiles=False,
    )
    assert option.energy_j == direct.energy_j
    capped = evaluate_row(tiny.rows[0], "h100", "x", cap=256)
    assert capped.accuracy_source == "truncation model"
    p = completion_probability(tiny.rows[0].lengths(), 256)
    assert capped.accuracy_pct == pytest.approx(40 * p)
    assert capped.energy_j < evaluate_row(tiny.rows[0], "h100", "x").energy_j


def test_pareto_on_table(tiny):
    result = pareto(tiny, "h100")
    assert [b.benchmark for b in result.benchmarks] == ["b1", "b2"]
    b1 = result.benchmarks[0]
    a = [o.accuracy_pct for o in b1.options]
    e = [o.energy_j for o in b1.options]
    assert b1.on_frontier == brute_front(a, e).tolist()
    kinds = {p.kind for p in b1.paths}
    assert kinds == {"model scaling", "test-time scaling"}
    with pytest.raises(TtcsimError, match="has no benchmark"):
        pareto(tiny, "h100", benchmark="b3")


def test_route_on_table_respects_budget_and_matches_enumeration(tiny):
    full = route(tiny, "h100", "easy=0.6,hard=0.4", budget_j=1e12, sweep_points=5)
    budget = (full.curve[0].energy_j + full.curve[-1].energy_j) / 2
    r = route(tiny, "h100", "easy=0.6,hard=0.4", budget_j=budget, caps=[256])
    assert r.expected_energy_j <= budget * (1 + 1e-9)
    assert r.options_per_class == {"easy": 5, "hard": 5}  # 3 rows + 2 capped single rows
    best = max(
        (p for p in full.curve if p.energy_j <= budget), key=lambda p: p.accuracy_pct
    ).accuracy_pct
    assert r.expected_accuracy_pct >= best - 1e-9  # caps only add options
    accs = [p.accuracy_pct for p in full.sweep]
    assert accs == sorted(accs)
    for p in full.sweep:  # the sweep's solves agree with the exact curve
        on_curve = max(q.accuracy_pct for q in full.curve if q.energy_j <= p.budget_j * (1 + 1e-9))
        assert p.accuracy_pct == pytest.approx(on_curve)


def test_route_unknown_class(tiny):
    with pytest.raises(TtcsimError, match="no rows for class 'medium'"):
        route(tiny, "h100", "easy=0.5,medium=0.5", budget_j=1e6)


# -------------------------------------------------------------------- depth


def test_fit_saturating_recovers_parameters():
    caps = np.array([512, 1024, 2048, 4096, 8192, 16384])
    acc = saturating_accuracy(caps, 71.3, 2600.0)
    a_max, tau, rms = fit_saturating(caps, acc)
    assert a_max == pytest.approx(71.3, rel=1e-6)
    assert tau == pytest.approx(2600.0, rel=1e-6)
    assert rms < 1e-6


def test_depth_truncation_model(tiny):
    d = depth(tiny, "h100", model="qwen2.5-1.5b", benchmark="b1", points=8)
    assert d.curve == "truncation model"
    accs = [p.accuracy_pct for p in d.points]
    assert accs == sorted(accs)
    assert d.uncapped.cap_tokens == 2048 and d.uncapped.accuracy_pct == pytest.approx(55.0)
    assert d.best.accuracy_pct_per_kj == max(p.accuracy_pct_per_kj for p in d.points)
    with pytest.raises(TtcsimError, match="single-sample"):
        depth(tiny, "h100", model="qwen2.5-0.5b", strategy="vote8", benchmark="b1")


def test_depth_fits_cap_rows(tmp_path):
    rows = "\n".join(
        f"  - {{model: qwen2.5-1.5b, benchmark: b1, accuracy_pct: "
        f"{float(saturating_accuracy(c, 60.0, 700.0)):.6f}, max_output_tokens: {c}}}"
        for c in (256, 512, 1024, 2048)
    )
    text = TINY.split("rows:")[0] + "rows:\n" + rows + "\n"
    path = tmp_path / "caps.yaml"
    path.write_text(text)
    d = depth(load_accuracy_table(path), "h100", model="qwen2.5-1.5b", caps=[300, 600])
    assert d.curve == "saturating fit"
    assert d.fit_accuracy_max_pct == pytest.approx(60.0, rel=1e-4)
    assert d.fit_scale_tokens == pytest.approx(700.0, rel=1e-4)
    assert [p.cap_tokens for p in d.points] == [256, 300, 512, 600, 1024, 2048]


# ---------------------------------------------------------------------- CLI


def test_cli_pareto_json_and_plot(tiny_path, tmp_path):
    png = tmp_path / "out" / "pareto.png"
    r = CliRunner().invoke(
        main, ["pareto", "--accuracy", str(tiny_path), "--hw", "h100", "--plot", str(png), "--json"]
    )
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert {"table", "hw", "benchmarks", "plot"} <= set(out)
    bench = out["benchmarks"][0]
    assert {"options", "on_frontier", "frontier", "cheapest_by_level", "paths"} <= set(bench)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_pareto_text(tiny_path):
    r = CliRunner().invoke(main, ["pareto", "--accuracy", str(tiny_path), "--benchmark", "b2"])
    assert r.exit_code == 0, r.output
    assert "cheapest option for each accuracy level" in r.output and "b1" not in r.output


def test_cli_route_json_sweep_and_plot(tiny_path, tmp_path):
    png = tmp_path / "route.png"
    r = CliRunner().invoke(
        main,
        [
            "route",
            "--accuracy",
            str(tiny_path),
            "--mix",
            "easy=0.6,hard=0.4",
            "--budget-j-per-query",
            "400",
            "--sweep",
            "6",
            "--plot",
            str(png),
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["status"] == "optimal" and out["mip_gap"] == 0
    assert out["expected_energy_j"] <= 400 * (1 + 1e-9)
    assert len(out["sweep"]) == 6 and out["curve"] and out["fixed_choices"]
    assert {c["difficulty"] for c in out["allocation"]} == {"easy", "hard"}
    assert png.stat().st_size > 10_000


def test_cli_route_target_text(tiny_path):
    r = CliRunner().invoke(
        main,
        [
            "route",
            "--accuracy",
            str(tiny_path),
            "--mix",
            "easy=1,hard=1",
            "--target-accuracy",
            "30",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "min energy for target" in r.output and "optimality gap 0" in r.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--mix", "easy=1"], "exactly one of"),
        (["--mix", "easy=1", "--budget-j-per-query", "1", "--target-accuracy", "5"], "exactly one"),
        (["--mix", "easy=1", "--budget-j-per-query", "0.001"], "below the cheapest"),
        (["--mix", "tricky=1", "--budget-j-per-query", "1000"], "no rows for class"),
        (["--mix", "easy=1", "--target-accuracy", "99"], "above the best reachable"),
    ],
)
def test_cli_route_errors_exit_2(tiny_path, args, message):
    r = CliRunner().invoke(main, ["route", "--accuracy", str(tiny_path), *args])
    assert r.exit_code == 2
    assert message in r.output


def test_cli_depth_json_and_plot(tiny_path, tmp_path):
    png = tmp_path / "depth.png"
    r = CliRunner().invoke(
        main,
        [
            "depth",
            "--accuracy",
            str(tiny_path),
            "--model",
            "qwen2.5-1.5b",
            "--benchmark",
            "b2",
            "--caps",
            "256,512,1024",
            "--plot",
            str(png),
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert {"best", "points", "curve", "uncapped", "plot"} <= set(out)
    assert [p["cap_tokens"] for p in out["points"]] == [256, 512, 1024, 2048]
    assert png.exists()


def test_cli_unknown_table_exit_2():
    r = CliRunner().invoke(main, ["pareto", "--accuracy", "nonexistent"])
    assert r.exit_code == 2 and "bundled:" in r.output
