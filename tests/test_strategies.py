"""Strategies: spec grammar, cost formulas against hand counts, invariants.

Hand counts build the expected cost from the primitive passes
(``forward_pass``, ``prefill_phase``, ``deterministic_decode``) the way the
class docstring's formula says, independently of the strategy's own code.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import LLAMA_8B, make_profile

from ttcsim.distributions import LengthList, parse_lengths
from ttcsim.errors import TtcsimError, UnknownNameError
from ttcsim.models import get_model
from ttcsim.predict import predict
from ttcsim.simulator import architecture as arch
from ttcsim.simulator.coefficients import pass_coefficients
from ttcsim.simulator.decode import deterministic_decode, segment_cost
from ttcsim.simulator.phases import (
    Draws,
    decode_matrix,
    kv_copy_phase,
    pass_series_cost,
    prefill_phase,
    speculation_tokens_per_pass,
)
from ttcsim.simulator.roofline import forward_pass
from ttcsim.strategies import (
    AdaptiveVote,
    Beam,
    Composite,
    Refine,
    Single,
    Vote,
    Workload,
    adaptive_vote_sample_pmf,
    parse_strategy,
    registry,
)

H100 = make_profile()
C = pass_coefficients(H100, LLAMA_8B)
C_1B = pass_coefficients(H100, get_model("llama-3.2-1b"))


def reward(name):
    return C if name is None else pass_coefficients(H100, get_model(name))


def phases(spec, lengths, prompt=512, q=1, cache=True):
    s = parse_strategy(spec)
    lens = parse_lengths(lengths) if isinstance(lengths, (str, int, list)) else lengths
    return s.phases(Workload(C, prompt, lens, q, cache, reward))


def energy(ph, q=1):
    return sum(p.energy_j for p in ph) / q


def latency(ph):
    return sum(p.query_time_s for p in ph)


def run(**kw):
    base = dict(hw=H100, model=LLAMA_8B, prompt_tokens=512, output_tokens=1024, marginal=False)
    base.update(kw)
    return predict(**base)


# --- grammar ---------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, canonical",
    [
        ("single", "single"),
        ("COT", "single"),
        ("vote5", "vote5"),
        ("bon16", "bon16"),
        ("prm-bon8", "prm-bon8"),
        ("prm-bon8:step=64", "prm-bon8:step=64"),
        ("beam4:step=64,depth=8", "beam4:step=64,depth=8"),
        ("beam:width=4,expand=2", "beam4:expand=2"),
        ("refine3:history=last,feedback=16", "refine3:feedback=16,history=last"),
        ("budget:max=4000", "budget:max=4000"),
        ("budget:min=500,max=4000", "budget:min=500,max=4000"),
        ("adaptive-vote:max=16,p=0.7", "adaptive-vote16"),
        ("adaptive-vote8:p=0.9,batch=2,votes=3", "adaptive-vote8:p=0.9,batch=2,votes=3"),
        ("spec:draft=llama-3.2-1b,k=4,accept=0.7", "spec:draft=llama-3.2-1b,k=4,accept=0.7"),
        ("vote4(refine2)", "vote4(refine2)"),
        ("bon4(budget:max=512)", "bon4(budget:max=512)"),
        ("vote4(single)", "vote4"),
    ],
)
def test_spec_grammar_round_trips(spec, canonical):
    s = parse_strategy(spec)
    assert s.spec == canonical
    assert parse_strategy(s.spec) == s


@pytest.mark.parametrize(
    "spec, message",
    [
        ("banana", "unknown strategy 'banana'; valid: single | cot, vote<N>"),
        ("vote", "vote needs a sample count, e.g. vote5"),
        ("beam", "beam needs a beam width"),
        ("single3", "single takes no count"),
        ("budget3:max=10", "budget takes no count"),
        ("vote0", "sample count must be 1..4096"),
        ("beam4:colour=red", "unknown option 'colour' for beam; valid: width, step, depth"),
        ("beam4:step=abc", "beam step='abc'"),
        ("beam4:step=0", "step must be >= 1"),
        ("beam4:width=3", "beam width is given twice"),
        ("beam4:step", "expected key=value"),
        ("refine2:history=some", "history='some': must be one of all, last"),
        ("budget", "budget needs min= and/or max="),
        ("budget:min=500,max=100", "max=100 is below min=500"),
        ("spec", "spec needs a draft model"),
        ("spec:draft=nonexistent-model", "draft model"),
        ("spec:draft=1b,accept=1.5", "accept must be in [0, 1]"),
        ("spec:draft=1b,k=99", "k must be 1..32"),
        ("adaptive-vote:p=2", "p must be in [0, 1]"),
        ("adaptive-vote4:batch=8", "batch must be 1..max"),
        ("vote4(adaptive-vote8)", "cannot run inside vote4; inner strategies:"),
        ("refine2(vote4)", "only vote<N>(...) and bon<N>(...) can wrap"),
        ("vote4(refine2", "compose as OUTER(INNER)"),
        ("vote4(vote2(refine2))", "cannot run inside"),
    ],
)
def test_bad_specs_raise_clear_errors(spec, message):
    with pytest.raises(TtcsimError, match=None) as err:
        parse_strategy(spec)
    assert message in str(err.value)
    assert str(err.value).startswith("--strategy")


def test_unknown_strategy_lists_every_registered_pattern():
    with pytest.raises(UnknownNameError) as err:
        parse_strategy("montecarlo-tree")
    for cls in registry().values():
        assert cls.pattern in str(err.value)


def test_every_strategy_documents_a_cost_formula():
    for cls in registry().values():
        assert "E =" in cls.formula() or "E=" in cls.formula(), cls.name


def test_reward_model_comes_from_spec_or_default():
    assert parse_strategy("bon4", reward_model="8b").reward_model == "8b"
    assert parse_strategy("bon4:rm=1b", reward_model="8b").reward_model == "1b"
    assert parse_strategy("beam2", reward_model="1b").reward_model == "1b"
    assert parse_strategy("vote4(refine2)") == Composite(Vote(4), Refine(2))


def test_with_count_varies_the_main_number():
    assert parse_strategy("beam4:step=64").with_count(8).spec == "beam8:step=64"
    assert parse_strategy("vote4(refine2)").with_count(8).spec == "vote8(refine2)"
    with pytest.raises(TtcsimError, match="no sample count"):
        parse_strategy("budget:max=10").with_count(3)


# --- primitives -------------------------------------------------------------


@pytest.mark.parametrize("compute_j", [None, 5e-11])  # 5e-11 J/FLOP forces the power limit
@pytest.mark.parametrize(
    "tokens, kv0, dkv, pairs0, dpairs, n",
    [
        (5, 1000, 1, 5000, 5, 300),  # a speculative verification pass, memory-bound
        (64, 32_000, 64, 170_000, 320, 200),
        (4096, 100, 4096, 1e9, 3e7, 50),  # prefill-like: compute-bound, grows past the cap
        (3, 0, 0, 6, 0, 7),
    ],
)
def test_pass_series_equals_a_loop_of_forward_passes(
    tokens, kv0, dkv, pairs0, dpairs, n, compute_j
):
    prof = make_profile(compute_energy_j_per_flop=compute_j) if compute_j else H100
    c = pass_coefficients(prof, LLAMA_8B)
    k = np.arange(n)
    loop = forward_pass(c, tokens, kv0 + k * dkv, pairs0 + k * dpairs)
    got = pass_series_cost(c, tokens, kv0, dkv, pairs0, dpairs, n)
    for g, ref in zip(got, (loop.time_s, loop.dynamic_energy_j, loop.energy_j), strict=True):
        assert float(g) == pytest.approx(float(ref.sum()), rel=1e-10)
    if compute_j and tokens == 4096:
        assert loop.throttled.any()


def test_pass_series_reduces_to_the_decode_segment():
    t, e_dyn, e = pass_series_cost(C, 8, 8 * 600, 8, 8 * 600, 8, 500)
    ref = segment_cost(C, 8, 600, 500)
    assert (t, e_dyn, e) == pytest.approx(tuple(float(x) for x in ref), rel=1e-12)


def test_decode_matrix_with_per_sequence_prompts_equals_a_step_loop():
    prompts = np.array([[100.0, 900.0, 400.0]])
    lengths = np.array([[50.0, 20.0, 35.0]])
    d = decode_matrix(C, prompts, lengths, group=1)
    t = e = 0.0
    finish = np.zeros(3)
    for s in range(1, 50):
        active = lengths[0] - 1 >= s
        ctx = float(((prompts[0] + s) * active).sum())
        cost = forward_pass(C, active.sum(), ctx, ctx)
        t += float(cost.time_s)
        e += float(cost.energy_j)
        finish[active] = t
    assert d.time_s[0] == pytest.approx(t, rel=1e-12)
    assert d.energy_j[0] == pytest.approx(e, rel=1e-12)
    assert d.group_finish_s[0] == pytest.approx(finish, rel=1e-12)


def test_speculation_tokens_per_pass():
    assert speculation_tokens_per_pass(4, 0.0) == 1.0
    assert speculation_tokens_per_pass(4, 1.0) == 5.0
    assert speculation_tokens_per_pass(4, 0.7) == pytest.approx(1 + 0.7 + 0.49 + 0.343 + 0.2401)


# --- hand counts ------------------------------------------------------------


def test_prm_bon_scores_every_step_by_hand():
    # two candidates of 300 and 130 tokens, steps of 128, prompt 100, prefix cache on
    ph = phases("prm-bon2:step=128", [300, 130], prompt=100)
    p = 100.0
    passes = [  # (new tokens per candidate, cached context)
        ([128, 128], p),
        ([128, 2], p + 128),
        ([44], p + 256),
    ]
    expect = float(prefill_phase(C, 1, p).energy_j)  # the RM's prompt, once per query
    for chunks, ctx in passes:
        new = np.array(chunks, dtype=float)
        expect += float(
            forward_pass(C, new.sum(), ctx * new.size, arch.causal_pairs(new, ctx).sum()).energy_j
        )
    score = sum(x.energy_j for x in ph if x.name == "score")
    assert score == pytest.approx(expect, rel=1e-12)
    # the policy side is vote2's
    vote = phases("vote2", [300, 130], prompt=100)
    assert energy(ph) == pytest.approx(energy(vote) + expect, rel=1e-12)


def test_prm_bon_with_one_step_and_no_cache_is_bon():
    for lens in ([700, 300, 1000], "lognormal:median=400,sigma=0.5,max=1500"):
        kw = dict(output_tokens=lens, prefix_cache=False, percentiles=False)
        bon, prm = run(strategy="bon3", **kw), run(strategy="prm-bon3:step=4096", **kw)
        if prm.expectation == "exact":
            assert prm.energy_j == pytest.approx(bon.energy_j, rel=1e-12)
        else:
            assert prm.energy_j == pytest.approx(bon.energy_j, abs=4 * prm.energy_j_stderr)


def test_prm_scoring_passes_grow_with_the_number_of_steps():
    # from 256-token steps down (1024-token steps: 4096-token passes spill their
    # activations from the L2, which costs about what three more weight reads do)
    e = [run(strategy=f"prm-bon4:step={t}").energy_score_j for t in (256, 64, 16)]
    assert all(a < b for a, b in zip(e, e[1:], strict=False))
    off = [run(strategy=f"prm-bon4:step={t}", prefix_cache=False).energy_score_j
           for t in (1024, 256, 64)]
    assert off[-1] > 5 * off[0]  # re-reading the prefix at every step: quadratic in steps


def test_beam_by_hand():
    # W=2 beams, M=2 candidates each, steps of 64 tokens, depth 3, prompt 500
    w_, m_, t_, p = 2, 2, 64, 500.0
    ph = phases("beam2:step=64,depth=3,expand=2", 10_000, prompt=p)
    n = w_ * m_
    decode = deterministic_decode(C, p, np.full(n, 3 * t_))
    verify = [
        forward_pass(C, n * t_, n * (p + (k - 1) * t_), n * arch.causal_pairs(t_, p + (k - 1) * t_))
        for k in (1, 2, 3)
    ]
    # copy-on-write of the partial KV block (500 mod 16 = 4 tokens): 3 forks of the
    # prompt, then W*(M-1) = 2 forks after each of the 2 selections (564, 628 mod 16 = 4)
    copied = 3 * 4 + 2 * 4 + 2 * 4
    expect = (
        float(prefill_phase(C, 1, p).energy_j) * 2  # policy and verifier prompt
        + decode.energy_j
        + sum(float(v.energy_j) for v in verify)
        + float(kv_copy_phase(C, copied).energy_j[0])
    )
    assert energy(ph) == pytest.approx(expect, rel=1e-12)
    assert sum(x.query_time_s for x in ph) == pytest.approx(
        2 * float(prefill_phase(C, 1, p).time_s) + decode.time_s
        + sum(float(v.time_s) for v in verify) + float(kv_copy_phase(C, copied).time_s[0]),
        rel=1e-12,
    )


def test_beam1_is_single_plus_one_verifier_pass_per_step():
    single = phases("single", 1024)
    beam = phases("beam1:step=64", 1024)
    verifier = sum(
        float(forward_pass(C, 64, 512 + (k - 1) * 64, arch.causal_pairs(64, 512 + (k - 1) * 64))
              .energy_j)
        for k in range(1, 17)
    ) + float(prefill_phase(C, 1, 512).energy_j)
    assert energy(beam) == pytest.approx(energy(single) + verifier, rel=1e-12)
    r_single, r_beam = run(strategy="single"), run(strategy="beam1:step=64")
    assert r_beam.energy_decode_j == pytest.approx(r_single.energy_decode_j, rel=1e-12)
    assert r_beam.energy_j == pytest.approx(r_single.energy_j + r_beam.energy_score_j, rel=1e-12)


def test_beam_depth_follows_the_output_length_and_caps():
    assert run(strategy="beam2:step=100", output_tokens=950).useful_tokens == 1000  # 10 steps
    assert run(strategy="beam2:step=100,depth=4", output_tokens=950).useful_tokens == 400
    r = run(strategy="beam4:step=64,depth=8")
    assert r.output_tokens == 16 * 512 and r.useful_tokens == 512


def test_beam_without_prefix_cache_rereads_the_prefix_each_step():
    on, off = run(strategy="beam4:step=64"), run(strategy="beam4:step=64", prefix_cache=False)
    assert off.energy_score_j > 3 * on.energy_score_j
    assert off.energy_decode_j == pytest.approx(on.energy_decode_j)  # the policy forks either way


def test_beam_kv_footprint_holds_the_tree_not_wm_copies():
    b = Beam(width=16, step_tokens=64)
    kv, seqs = b.kv_footprint(512, 8192, True)
    assert seqs == 256
    assert kv == 512 + 16 * 8192 + 256 * 64
    run(strategy="beam16:step=64", output_tokens=8192)  # fits; 256 full copies would not


def test_refine_by_hand():
    # prompt 50, answers 100 then 200, feedback 32
    ph = phases("refine2:feedback=32", [100, 200], prompt=50)
    expect = (
        float(prefill_phase(C, 1, 50).energy_j)
        + deterministic_decode(C, 50, [100]).energy_j
        + float(forward_pass(C, 32, 150, arch.causal_pairs(32, 150)).energy_j)
        + deterministic_decode(C, 182, [200]).energy_j
    )
    assert energy(ph) == pytest.approx(expect, rel=1e-12)
    # without prefix caching the whole conversation is prefilled again
    ph = phases("refine2:feedback=32", [100, 200], prompt=50, cache=False)
    expect_off = expect - float(forward_pass(C, 32, 150, arch.causal_pairs(32, 150)).energy_j)
    expect_off += float(prefill_phase(C, 1, 182).energy_j)
    assert energy(ph) == pytest.approx(expect_off, rel=1e-12)
    # history=last, 3 rounds: round 3 reads the prompt, answer 2 and the feedback only
    ph = phases("refine3:feedback=32,history=last", [100, 200, 300], prompt=50)
    expect3 = (
        expect
        + float(forward_pass(C, 232, 50, arch.causal_pairs(232, 50)).energy_j)
        + deterministic_decode(C, 282, [300]).energy_j
    )
    assert energy(ph) == pytest.approx(expect3, rel=1e-12)


@pytest.mark.parametrize(
    "lengths, q",
    [(1024, 1), (1024, 3), ([300, 700, 900], 3), ("gamma:mean=400,shape=2", 1),
     ("gamma:mean=400,shape=2", 3)],
)
def test_refine1_is_single(lengths, q):
    for cache in (True, False):
        a = run(strategy="refine1", output_tokens=lengths, concurrency=q, prefix_cache=cache)
        b = run(strategy="single", output_tokens=lengths, concurrency=q, prefix_cache=cache)
        assert a.energy_j == pytest.approx(b.energy_j, rel=1e-12)
        assert a.latency_s == pytest.approx(b.latency_s, rel=1e-12)


def test_refine_context_grows_round_after_round():
    ph = phases("refine4", 500)
    decodes = [p.energy_j for p in ph if p.name == "decode"]
    assert all(a < b for a, b in zip(decodes, decodes[1:], strict=False))
    assert Refine(rounds=4).max_context_tokens(512, 500) == 512 + 4 * 500 + 3 * 32


def test_budget_clips_lengths_exactly():
    ph = phases("budget:min=300,max=800", [100, 500, 2000], q=3)
    ref = phases("single", [300, 500, 800], q=3)
    assert energy(ph, 3) == pytest.approx(energy(ref, 3), rel=1e-12)
    dist = "lognormal:median=600,sigma=0.8,max=8000"
    budget = run(strategy="budget:max=1000", output_tokens=dist)
    assert budget.expectation == "exact"
    assert budget.output_tokens < run(strategy="single", output_tokens=dist).output_tokens
    assert budget.output_tokens <= 1000


def test_speculative_decoding_by_hand():
    k, a, p, length = 4, 0.7, 512, 300
    tau = (1 - a ** (k + 1)) / (1 - a)
    s = np.arange(1, length)  # decode steps after the prefill's token
    ctx = p + s
    target = forward_pass(C, k + 1, ctx, (k + 1) * ctx + k * (k + 1) / 2)
    draft = forward_pass(C_1B, 1, ctx + (k - 1) / 2, ctx + (k - 1) / 2)
    expect = (
        float(prefill_phase(C, 1, p).energy_j)
        + float(prefill_phase(C_1B, 1, p).energy_j)
        + float(target.energy_j.sum()) / tau
        + k * float(draft.energy_j.sum()) / tau
    )
    ph = phases("spec:draft=1b,k=4,accept=0.7", length, prompt=p)
    assert energy(ph) == pytest.approx(expect, rel=1e-10)
    assert [x.name for x in ph] == ["prefill", "prefill", "decode", "draft"]


def test_speculative_decoding_saves_energy_when_memory_bound_and_acceptance_helps():
    single = run(strategy="single")
    e = [run(strategy=f"spec:draft=1b,k=4,accept={a}").energy_j for a in (0.3, 0.6, 0.8, 0.95)]
    assert all(x > y for x, y in zip(e, e[1:], strict=False))
    assert e[-1] < single.energy_j
    r = run(strategy="spec:draft=1b,k=4,accept=0.8")
    assert r.energy_by_phase_j["draft"] > 0
    assert r.energy_decode_j == pytest.approx(
        r.energy_by_phase_j["decode"] + r.energy_by_phase_j["draft"]
    )


def test_adaptive_vote_sample_count_matches_simulated_voting():
    n_max, batch, p = 9, 2, 0.65
    s, pmf = adaptive_vote_sample_pmf(n_max, batch, p)
    rng = np.random.default_rng(3)
    agree = rng.uniform(size=(200_000, n_max)) < p
    counts = np.cumsum(agree, axis=1)
    m = n_max // 2 + 1
    drawn = np.full(agree.shape[0], n_max)
    for start in range(batch, n_max, batch):  # checks after each round, then the cap
        stop = (counts[:, start - 1] >= m) & (drawn == n_max)
        drawn[stop] = np.minimum(drawn[stop], start)
    sim = np.array([(drawn == v).mean() for v in s])
    assert pmf.sum() == pytest.approx(1.0)
    assert np.abs(sim - pmf).max() < 0.005
    assert AdaptiveVote(n_max, p, batch).expected_samples() == pytest.approx(drawn.mean(), rel=0.01)


def test_adaptive_vote_with_one_round_is_full_voting():
    for q in (1, 4):
        full = run(strategy="vote8", concurrency=q)
        one = run(strategy="adaptive-vote8:batch=8", concurrency=q)
        assert one.energy_j == pytest.approx(full.energy_j, rel=1e-12)
        assert one.latency_s == pytest.approx(full.latency_s, rel=1e-12)


@pytest.mark.parametrize("q", [1, 4, 16])
def test_adaptive_voting_costs_no_more_than_full_voting(q):
    kw = dict(concurrency=q, output_tokens=512)
    full = run(strategy="vote16", **kw)
    adaptive = run(strategy="adaptive-vote16:p=0.9,batch=4,votes=3", **kw)
    assert adaptive.output_tokens < full.output_tokens
    assert adaptive.energy_j < full.energy_j
    # the strict majority of 16 in rounds of one sample never generates more tokens, but on a
    # memory-bound GPU its small sequential batches cost more energy than one batch of 16
    strict = run(strategy="adaptive-vote16:p=0.7", **kw)
    assert strict.output_tokens < full.output_tokens
    if q == 1:
        assert strict.energy_j > full.energy_j


def test_adaptive_vote_exact_expectation_matches_monte_carlo():
    for lengths in (700, "gamma:mean=300,shape=2"):
        r = run(strategy="adaptive-vote6:p=0.6,batch=2", output_tokens=lengths, concurrency=3,
                draws=4000)
        assert r.expectation == "exact"
        energies = _draw_energies("adaptive-vote6:p=0.6,batch=2", lengths, 3, 4000, seed=11)
        se = energies.std() / np.sqrt(energies.size)
        assert abs(r.energy_j - energies.mean()) < 4 * se


def _draw_energies(spec, lengths, q, n, seed):
    s = parse_strategy(spec)
    rng = np.random.default_rng(seed)
    dist = parse_lengths(lengths)
    values = dist.sample(rng, (n, q * s.draws_per_query))
    u = rng.uniform(size=values.shape)
    ph = s.phases(Workload(C, 512, Draws(values, u), q, True, reward))
    return sum(np.broadcast_to(p.energy_j, (n,)) for p in ph) / q


@pytest.mark.parametrize(
    "spec",
    [
        "beam2:step=64",
        "beam2:step=64,depth=3",
        "budget:min=200,max=800",
        "spec:draft=1b,k=3,accept=0.6",
        "vote3(spec:draft=1b)",
        "bon3(budget:max=500)",
        "vote2(beam2:step=100)",
    ],
)
def test_exact_expectations_match_brute_force_monte_carlo(spec):
    dist = "lognormal:median=300,sigma=0.8,max=3000"
    for q, cache in ((3, True), (2, False)):
        s = parse_strategy(spec)
        exact = energy(s.phases(Workload(C, 256, parse_lengths(dist), q, cache, reward)), q)
        rng = np.random.default_rng(5)
        values = parse_lengths(dist).sample(rng, (3000, q * s.draws_per_query))
        mc = s.phases(Workload(C, 256, Draws(values), q, cache, reward))
        e = sum(np.broadcast_to(p.energy_j, (3000,)) for p in mc) / q
        assert abs(exact - e.mean()) < 4 * e.std() / np.sqrt(e.size)
        # each draw equals the deterministic cost of its own lengths
        for d in range(3):
            own = s.phases(Workload(C, 256, LengthList(tuple(int(x) for x in values[d])), q,
                                    cache, reward))
            assert energy(own, q) == pytest.approx(e[d], rel=1e-12)


# --- composition ------------------------------------------------------------


def test_composition_of_single_chains_is_plain_voting():
    assert parse_strategy("vote4(single)") == Vote(4)
    for cache in (True, False):
        vote = run(strategy="vote4", prefix_cache=cache, concurrency=2)
        chains = run(strategy="vote4(budget:max=100000)", prefix_cache=cache, concurrency=2)
        assert chains.energy_j == pytest.approx(vote.energy_j, rel=1e-12)
        bon = run(strategy="bon4", prefix_cache=cache)
        bon_chains = run(strategy="bon4(budget:max=100000)", prefix_cache=cache)
        assert bon_chains.energy_j == pytest.approx(bon.energy_j, rel=1e-12)


def test_vote_of_refine_by_hand():
    # 2 queries x 3 chains of refine2; chains share the prompt prefill (prefix cache)
    ph = phases("vote3(refine2:feedback=32)", 400, prompt=200, q=2)
    expect = (
        float(prefill_phase(C, 2, 200).energy_j)
        + deterministic_decode(C, 200, np.full(6, 400)).energy_j
        + float(forward_pass(C, 6 * 32, 6 * 600, 6 * arch.causal_pairs(32, 600)).energy_j)
        + deterministic_decode(C, 632, np.full(6, 400)).energy_j
    )
    assert energy(ph, 2) == pytest.approx(expect / 2, rel=1e-12)
    assert parse_strategy("vote1(refine2)").phases is not None
    one = run(strategy="vote1(refine2)")
    assert one.energy_j == pytest.approx(run(strategy="refine2").energy_j, rel=1e-12)


def test_parallel_chains_wait_for_the_slowest():
    lens = [200, 900, 300, 400, 100, 1200]  # 2 chains x 3 rounds... per query: 3 chains
    r = run(strategy="vote3(budget:max=100000)", output_tokens=lens, concurrency=2)
    v = run(strategy="vote3", output_tokens=lens, concurrency=2)
    assert r.latency_s == pytest.approx(v.latency_s, rel=1e-12)


# --- invariants -------------------------------------------------------------


@pytest.mark.parametrize(
    "family",
    [
        "vote{}",
        "bon{}",
        "prm-bon{}",
        "beam{}:step=64",
        "beam{}:step=64,expand=2",
        "refine{}",
        "adaptive-vote{}",
        "adaptive-vote{}:p=0.9,votes=1",
        "vote{}(refine2)",
        "bon{}(spec:draft=1b)",
    ],
)
def test_more_samples_never_cost_less(family):
    for lengths in (512, "lognormal:median=300,sigma=0.6,max=2000"):
        e = [run(strategy=family.format(n), output_tokens=lengths, percentiles=False).energy_j
             for n in (1, 2, 3, 4, 8)]
        assert all(a <= b * (1 + 1e-9) for a, b in zip(e, e[1:], strict=False)), e


@pytest.mark.parametrize(
    "spec",
    ["prm-bon4", "beam4:step=64,depth=8", "refine3", "budget:max=600", "adaptive-vote8",
     "spec:draft=1b", "vote4(refine2)", "bon2(beam2:step=128)"],
)
def test_new_strategies_respect_physical_bounds(spec):
    for kw in (dict(), dict(concurrency=8, output_tokens="gamma:mean=500,shape=1.5,max=4000")):
        r = run(strategy=spec, **kw)
        assert r.energy_j >= H100.parameters.idle_power_w * r.latency_s / r.concurrency * 0.999
        assert r.peak_power_w <= 700.0 * r.gpus + 1e-6
        assert r.energy_dynamic_j <= r.energy_j
        assert r.energy_j == pytest.approx(
            r.energy_prefill_j + r.energy_decode_j + r.energy_score_j, rel=1e-9
        )
        assert sum(r.energy_by_phase_j.values()) == pytest.approx(r.energy_j, rel=1e-9)
        assert r.useful_tokens <= r.output_tokens
        assert 0 < r.ttft_s <= r.latency_s


def test_stochastic_strategy_reports_percentiles_even_for_fixed_lengths():
    r = run(strategy="adaptive-vote8:p=0.6")
    assert r.energy_j_p50 is not None
    assert r.energy_j_p50 <= r.energy_j_p99
    assert r.expectation == "exact"


def test_monte_carlo_means_state_their_standard_error():
    kw = dict(strategy="refine3", output_tokens="lognormal:median=400,sigma=0.7,max=4000")
    r = run(**kw)
    assert r.expectation == "monte-carlo" and r.energy_j_stderr > 0
    assert run(**kw) == r  # seeded
    other = run(seed=1, **kw)
    assert other.energy_j != r.energy_j
    assert abs(other.energy_j - r.energy_j) < 5 * np.hypot(r.energy_j_stderr, other.energy_j_stderr)


def test_single_strategy_class_is_untouched():
    assert parse_strategy("single") == Single()
    assert Single().samples_per_query == 1
