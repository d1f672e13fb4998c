"""Length distributions, prompt-length expectations and per-query energy distributions.

Everything random is checked against a brute-force Monte Carlo: moments
against sample means, exact expectations against per-draw deterministic
predictions, percentiles against draws priced one by one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import LLAMA_8B, make_profile
from scipy import stats

from ttcsim.distributions import (
    Clipped,
    Empirical,
    Fixed,
    LengthList,
    Mixture,
    Shifted,
    as_distribution,
    clip_lengths,
    parse_lengths,
    quadrature_nodes,
    shift_lengths,
)
from ttcsim.errors import TtcsimError
from ttcsim.predict import predict, predict_draws

H100 = make_profile()

SPECS = [
    "lognormal:median=800,sigma=0.7,max=8192",
    "lognormal:mean=500,sigma=0.4",
    "gamma:mean=800,shape=2",
    "gamma:mean=300,shape=0.7,min=20,max=3000",
    "normal:mean=800,std=200",
    "truncnormal:mean=100,std=150,min=10,max=400",
    "mix:0.6*lognormal:median=300,sigma=0.5|0.4*gamma:mean=3000,shape=3",
]


def run(**kw):
    base = dict(hw=H100, model=LLAMA_8B, prompt_tokens=512, output_tokens=1024, marginal=False)
    base.update(kw)
    return predict(**base)


@pytest.mark.parametrize("spec", SPECS)
def test_moments_and_sampler_agree_with_brute_force(spec):
    d = parse_lengths(spec)
    x = d.sample(np.random.default_rng(0), 200_000)
    assert (x >= 1).all() and (x == np.round(x)).all()
    se = x.std() / np.sqrt(x.size)
    assert d.mean() == pytest.approx(x.mean(), abs=4 * se)
    assert d.second_moment() == pytest.approx((x**2).mean(), rel=0.02)
    # the sampler follows the survival function
    for s in np.quantile(x, [0.1, 0.5, 0.9, 0.99]):
        assert d.survival(np.array([s]))[0] == pytest.approx((x > s).mean(), abs=0.005)
    assert d.quantile(0.5) == pytest.approx(np.median(x), rel=0.02, abs=1)


def test_lognormal_matches_scipy_and_max_clips_the_tail():
    d = parse_lengths("lognormal:median=800,sigma=0.7,max=4000")
    ref = stats.lognorm(s=0.7, scale=800)
    s = np.array([1.0, 100.0, 800.0, 3999.0])
    assert d.survival(s) == pytest.approx(ref.sf(s) / ref.sf(0), rel=1e-12)
    assert d.survival(np.array([4000.0]))[0] == 0.0
    # P(L = max) holds the whole tail: a generation cap
    assert d.survival(np.array([3999.0]))[0] == pytest.approx(ref.sf(3999), rel=1e-12)
    mean_given = parse_lengths("lognormal:mean=1000,sigma=0.5")
    assert mean_given.mean() == pytest.approx(1000.5, rel=2e-3)  # ceil adds ~0.5


def test_min_truncates_a_normal():
    d = parse_lengths("normal:mean=100,std=150,min=10")
    ref = stats.norm(100, 150)
    # conditioned on X > 9: no mass below 10
    assert d.survival(np.array([9.0]))[0] == 1.0
    assert d.survival(np.array([200.0]))[0] == pytest.approx(ref.sf(200) / ref.sf(9), rel=1e-12)


def test_mixture_is_the_weighted_survival():
    m = parse_lengths("mix:3*lognormal:median=300,sigma=0.5|1*gamma:mean=3000,shape=3")
    assert isinstance(m, Mixture) and m.weights == pytest.approx((0.75, 0.25))
    a, b = parse_lengths("lognormal:median=300,sigma=0.5"), parse_lengths("gamma:mean=3000,shape=3")
    s = np.array([10.0, 500.0, 4000.0])
    assert m.survival(s) == pytest.approx(0.75 * a.survival(s) + 0.25 * b.survival(s))
    assert m.mean() == pytest.approx(0.75 * a.mean() + 0.25 * b.mean(), rel=1e-9)


def test_empirical_csv_rows_and_histogram(tmp_path):
    rows = tmp_path / "lengths.csv"
    rows.write_text("output_tokens,other\n100,x\n300,y\n300,z\n1000,w\n")
    d = parse_lengths(f"empirical:{rows}")
    assert d.mean() == pytest.approx((100 + 300 + 300 + 1000) / 4)
    assert d.survival(np.array([100.0, 299.0, 300.0]))[0] == pytest.approx(0.75)
    assert d.upper_bound() == 1000
    hist = tmp_path / "hist.csv"
    hist.write_text("tokens,count\n100,1\n300,2\n1000,1\n5000,0\n")
    h = parse_lengths(f"empirical:{hist},column=tokens,weight=count")
    assert h.mean() == pytest.approx(d.mean())
    s = np.array([150.0, 500.0])
    assert h.survival(s) == pytest.approx(d.survival(s))
    x = h.sample(np.random.default_rng(1), 100_000)
    assert set(np.unique(x)) == {100.0, 300.0, 1000.0}
    assert (x == 300).mean() == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize(
    "content, spec_tail, message",
    [
        (None, "", "no such file"),
        ("a\n", "", "has no rows"),
        ("a\n10\n", ",column=b", "has no column 'b'"),
        ("a\n10\nabc\n", "", "are not lengths in 1.."),
        ("a\n10\n0\n", "", "first: data row 2"),
        ("a,w\n10,1\n20,-1\n", ",weight=w", "must hold counts >= 0"),
        ("a\n10\n", ",colour=red", "unknown parameter"),
    ],
)
def test_empirical_csv_errors(tmp_path, content, spec_tail, message):
    path = tmp_path / "x.csv"
    if content is not None:
        path.write_text(content)
    with pytest.raises(TtcsimError, match=message):
        parse_lengths(f"empirical:{path}{spec_tail}")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("lognormal:median=800", "missing sigma="),
        ("lognormal:median=800,sigma=0.7,sigma=0.8", "sigma= given twice"),
        ("gamma:mean=800,shape=2,max=10,min=20", "max=10 is below min=20"),
        ("weibull:scale=3", "unknown distribution 'weibull'"),
        ("mix:lognormal:median=3,sigma=1", "needs WEIGHT*SPEC"),
        ("normal:mean=800,std=200,colour=red", "unknown parameter"),
        ("0", "whole numbers >= 1"),
    ],
)
def test_bad_distribution_specs(spec, message):
    with pytest.raises(TtcsimError, match=message.replace("*", r"\*")):
        parse_lengths(spec)


def test_clip_and_shift_transforms():
    base = parse_lengths("gamma:mean=500,shape=1.5")
    c = Clipped(base, 200, 900)
    s = np.array([0.0, 199.0, 200.0, 500.0, 899.0, 900.0])
    assert c.survival(s) == pytest.approx([1, 1, base.survival(200.0), base.survival(500.0),
                                            base.survival(899.0), 0])
    x = c.sample(np.random.default_rng(2), 100_000)
    assert x.min() == 200 and x.max() == 900
    assert c.mean() == pytest.approx(x.mean(), rel=0.01)
    sh = Shifted(base, 50)
    assert sh.mean() == pytest.approx(base.mean() + 50, rel=1e-6)
    assert shift_lengths(Fixed(10), 5) == Fixed(15)
    assert shift_lengths(LengthList((1, 2)), 3) == LengthList((4, 5))
    assert clip_lengths(LengthList((1, 500, 9000)), 10, 800) == LengthList((10, 500, 800))
    assert clip_lengths(Fixed(3000), 1, 800) == Fixed(800)
    assert Clipped(Fixed(3000), 1, 800).is_fixed and Clipped(Fixed(3000), 1, 800).tokens == 800


def test_quadrature_nodes_exact_support_and_strata():
    v, w = quadrature_nodes(as_distribution(LengthList((100, 200, 200, 400))))
    assert list(v) == [100, 200, 400] and w == pytest.approx([0.25, 0.5, 0.25])
    d = parse_lengths("lognormal:median=800,sigma=0.9,max=20000")
    v, w = quadrature_nodes(d, 64)
    assert 50 <= v.size <= 64 and w.sum() == pytest.approx(1.0)
    assert (v * w).sum() == pytest.approx(d.mean(), rel=1e-9)
    assert (np.diff(v) > 0).all()
    # a convex function of the length: the refined tail keeps the error small
    assert (v**2 * w).sum() == pytest.approx(d.second_moment(), rel=0.005)


def test_fixed_prompt_spec_is_the_integer_prompt():
    a = run(strategy="vote4", prompt_tokens=700)
    b = run(strategy="vote4", prompt_tokens="700")
    assert a == b
    assert a.prompt_tokens == 700 and a.prompt_tokens_mean == 700


def test_prompt_list_is_the_average_of_its_prompts():
    both = run(strategy="bon3", prompt_tokens="256,2048", output_tokens=300)
    one, two = (run(strategy="bon3", prompt_tokens=p, output_tokens=300) for p in (256, 2048))
    assert both.energy_j == pytest.approx((one.energy_j + two.energy_j) / 2, rel=1e-12)
    assert both.latency_s == pytest.approx((one.latency_s + two.latency_s) / 2, rel=1e-12)
    assert both.prompt_tokens_mean == 1152
    assert both.energy_j_p50 is not None  # the prompt makes the cost random


def test_prompt_distribution_expectation_matches_brute_force():
    spec = "lognormal:median=1500,sigma=0.8,max=30000"
    r = run(strategy="vote4", prompt_tokens=spec, output_tokens=400)
    prompts = parse_lengths(spec).sample(np.random.default_rng(4), 400)
    e = np.array([run(strategy="vote4", prompt_tokens=int(p), output_tokens=400,
                      percentiles=False).energy_j for p in prompts])
    assert abs(r.energy_j - e.mean()) < 4 * e.std() / np.sqrt(e.size)
    assert r.energy_j_p90 == pytest.approx(np.percentile(e, 90), rel=0.1)


@pytest.mark.parametrize(
    "strategy, lengths",
    [
        ("vote8", "lognormal:median=600,sigma=0.8,max=8000"),
        ("bon4", "mix:0.7*gamma:mean=300,shape=2|0.3*gamma:mean=3000,shape=2"),
        ("refine2", "gamma:mean=500,shape=2,max=4000"),
    ],
)
def test_energy_distribution_matches_per_draw_brute_force(strategy, lengths):
    """Mean (exact or Monte Carlo) and percentiles against draws priced one at a time."""
    r = run(strategy=strategy, output_tokens=lengths, draws=2000)
    # independent brute force: each draw a deterministic list through predict
    from ttcsim.strategies import parse_strategy

    per_query = parse_strategy(strategy).draws_per_query
    rng = np.random.default_rng(99)
    draws = parse_lengths(lengths).sample(rng, (300, per_query))
    e = np.array([
        run(strategy=strategy, output_tokens=[int(x) for x in row], percentiles=False).energy_j
        for row in draws
    ])
    se = np.hypot(e.std() / np.sqrt(e.size), r.energy_j_stderr)
    assert abs(r.energy_j - e.mean()) < 4 * se
    # distribution-free check of the quantiles: the order statistics of the brute
    # force around rank n*q bracket predict's percentile (+-3 binomial sd of the rank)
    ordered = np.sort(e)
    for q, value in ((0.5, r.energy_j_p50), (0.9, r.energy_j_p90)):
        half = 3 * np.sqrt(e.size * q * (1 - q))
        lo, hi = int(e.size * q - half), int(np.ceil(e.size * q + half))
        assert ordered[lo] <= value <= ordered[min(hi, e.size - 1)]
    # the draws behind the percentiles, re-priced one by one, give the same numbers
    energies, _, _ = predict_draws(hw=H100, model=LLAMA_8B, strategy=strategy,
                                   output_tokens=lengths, draws=2000)
    assert np.percentile(energies, 90) == pytest.approx(r.energy_j_p90, rel=1e-12)
    rng = np.random.default_rng(0)
    first = parse_lengths(lengths).sample(rng, (2000, per_query))[0]
    one = run(strategy=strategy, output_tokens=[int(x) for x in first], percentiles=False)
    assert energies[0] == pytest.approx(one.energy_j, rel=1e-9)


def test_empirical_output_lengths_through_predict(tmp_path):
    path = tmp_path / "obs.csv"
    path.write_text("len\n" + "\n".join(str(v) for v in (200, 400, 400, 800, 1600)) + "\n")
    r = run(strategy="vote4", output_tokens=f"empirical:{path}")
    assert r.output_tokens == pytest.approx(4 * 680)
    assert r.energy_j_p50 <= r.energy_j_p90 <= r.energy_j_p99
    assert isinstance(parse_lengths(f"empirical:{path}"), Empirical)


def test_continuous_laws_are_scipy_stats_bit_for_bit():
    """ContinuousLaw replaces scipy.stats (0.4 s to import) with the same special functions."""
    from scipy import stats

    from ttcsim.distributions import ContinuousLaw

    rng = np.random.default_rng(0)
    x = np.concatenate([[-5, 0, 1e-300, 0.5, 1, 2, 1e6, np.inf], rng.uniform(0, 20000, 2000),
                        np.arange(0, 3000.0)])
    q = np.concatenate([[0, 1e-300, 1e-16, 0.5, 1 - 1e-16, 1], rng.uniform(0, 1, 2000), [1e-9]])
    cases = [
        (ContinuousLaw("lognormal", 0.7, 800.0), stats.lognorm(s=0.7, scale=800.0)),
        (ContinuousLaw("lognormal", 2.3, 5.0), stats.lognorm(s=2.3, scale=5.0)),
        (ContinuousLaw("gamma", 1.5, 100.0), stats.gamma(a=1.5, scale=100.0)),
        (ContinuousLaw("gamma", 0.3, 1000.0), stats.gamma(a=0.3, scale=1000.0)),
        (ContinuousLaw("normal", 0.0, 200.0, loc=800.0), stats.norm(loc=800.0, scale=200.0)),
    ]
    for mine, ref in cases:
        for name, points in (("cdf", x), ("sf", x), ("ppf", q), ("isf", q)):
            got, want = getattr(mine, name)(points), getattr(ref, name)(points)
            assert np.array_equal(got, want, equal_nan=True), (mine, name)
            assert getattr(mine, name)(points[3]) == getattr(ref, name)(points[3])


def test_random_lengths_do_not_import_scipy_stats():
    import subprocess
    import sys

    code = ("import sys; from ttcsim import predict; "
            "predict(strategy='vote5', output_tokens='lognormal:median=800,sigma=0.7,max=8192', "
            "percentiles=False); print('scipy.stats' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "False"
