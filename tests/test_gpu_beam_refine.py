"""beam<W> and refine<K> on the reference decoder (CPU torch, fake NVML).

Expected counts are worked out by hand from the analytical model's
description (:class:`ttcsim.strategies.Beam`, :class:`ttcsim.strategies.Refine`)
and compared with the decoder's pass log.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")

from conftest import TINY  # noqa: E402

from ttcsim.errors import TtcsimError  # noqa: E402
from ttcsim.gpu import decoder as D  # noqa: E402
from ttcsim.gpu.fakes import make_fake_pynvml  # noqa: E402

BLOCK = 16


def _dec(seed=1, **kw):
    return D.ReferenceDecoder(TINY, "cpu", dtype=torch.float32, seed=seed, **kw)


def _passes(t, phase, model=None, step=None):
    return [
        p
        for p in t.passes
        if p.phase == phase
        and (model is None or p.model == model)
        and (step is None or p.step == step)
    ]


# ---------------------------------------------------------------- paged attention


def _paged_case(seed=0, b=4, hq=4, hkv=2, d=16, slots=3, cap=48):
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(s, generator=g)

    n_blocks = slots * cap // BLOCK
    # sequences 0 and 1 share their first two blocks; 2 and 3 share one
    tables = [[5, 2, 7], [5, 2, 0], [1, 8, 3], [1, 4, 6]]
    return dict(
        q=r(b, hq, d),
        kp=r(2, 20, hkv, d),
        vp=r(2, 20, hkv, d),
        kg=r(slots, cap, hkv, d),
        vg=r(slots, cap, hkv, d),
        pslot=torch.tensor([0, 0, 1, 1]),
        seq=torch.tensor([0, 1, 2, 3]),
        plen=torch.tensor([0, 0, 20, 3]),
        glen=torch.tensor([40, 33, 17, 48]),
        block_table=torch.tensor([t + [0] * (n_blocks - len(t)) for t in tables]),
    )


def _paged_dense(c):
    """Per-sequence loop over prompt ++ the rows its block list names."""
    out = []
    hkv, d = c["kg"].shape[2:]
    flat_k, flat_v = c["kg"].reshape(-1, hkv, d), c["vg"].reshape(-1, hkv, d)
    for i in range(c["q"].shape[0]):
        p, lp, lg = (int(c[k][i]) for k in ("pslot", "plen", "glen"))
        rows = [int(c["block_table"][i, g // BLOCK]) * BLOCK + g % BLOCK for g in range(lg)]
        k = torch.cat([c["kp"][p, :lp], flat_k[rows]])
        v = torch.cat([c["vp"][p, :lp], flat_v[rows]])
        group = c["q"].shape[1] // hkv
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        w = torch.softmax(torch.einsum("hd,thd->ht", c["q"][i], k) / math.sqrt(d), -1)
        out.append(torch.einsum("ht,thd->hd", w, v))
    return torch.stack(out)


def test_paged_reference_attention_equals_dense():
    c = _paged_case()
    got = D.decode_attention_reference(**c)
    torch.testing.assert_close(got, _paged_dense(c), rtol=1e-5, atol=1e-5)


def test_paged_triton_kernel_in_interpreter():
    pytest.importorskip("triton")
    script = textwrap.dedent(
        """
        import sys, torch
        sys.path.insert(0, TESTS)
        from test_gpu_beam_refine import _paged_case
        from ttcsim.gpu.decoder import decode_attention_triton, decode_attention_reference
        for dtype in (torch.float32, torch.float16):
            c = {k: (v.to(dtype) if v.is_floating_point() else v)
                 for k, v in _paged_case(seed=3).items()}
            want = decode_attention_reference(**c).float()
            for splits in (1, 3):
                got = decode_attention_triton(**c, num_splits=splits).float()
                err = (got - want).abs().max().item()
                assert err < (1e-4 if dtype == torch.float32 else 3e-2), (dtype, splits, err)
        print("ok")
        """
    ).replace("TESTS", repr(os.path.dirname(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    if res.returncode and "InterpreterError" in res.stderr:
        pytest.skip("this Triton's interpreter cannot run the kernel; decoder_self_check covers it")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "ok" in res.stdout


def test_block_pool_shares_full_blocks_and_copies_the_partial_one():
    pool = D._BlockPool(n_blocks=8, width=4)
    pool.grow(0, 37)  # 3 blocks, the last holds 5 positions
    assert len(pool.tables[0]) == 3
    rows = pool.fork(0, 1, 37)
    assert pool.tables[1][:2] == pool.tables[0][:2] and pool.tables[1][2] != pool.tables[0][2]
    src, dst = pool.tables[0][2], pool.tables[1][2]
    assert rows == [(src * BLOCK + i, dst * BLOCK + i) for i in range(5)]
    assert pool.fork(0, 2, 32) == []  # block-aligned: nothing to copy
    assert len(pool.free) == 8 - 4
    pool.release(0)
    assert len(pool.free) == 8 - 4 + 1  # only the parent's private partial block is freed
    pool.release(1)
    pool.release(2)
    assert sorted(pool.free) == list(range(8))


def test_extend_equals_a_dense_prefill_with_ragged_prefixes():
    """New tokens after cached prefixes of different lengths (prompt + generated)."""
    dec = _dec(seed=3)
    dec.ensure_capacity(2, 12, 2, 20)
    prompts = [dec.random_tokens(1, 12), dec.random_tokens(1, 7)]
    first = torch.cat(
        [dec.prefill(pr, torch.tensor([i])).argmax(-1) for i, pr in enumerate(prompts)]
    )
    dec.out_tokens.fill_(-1)
    dec.decode_rows(first, seq=[0, 1], pslot=[0, 1], plen=[12, 7], glen0=[0, 0], steps=[4, 6])
    new = dec.random_tokens(2, 5)
    got = dec.extend(new, pslot=[0, 1], plen=[12, 7], glen0=[4, 6], seq=[0, 1])
    for i, g in enumerate((4, 6)):  # K/V of g generated tokens are cached
        hist = torch.cat([prompts[i][0], dec.out_tokens[i, :g], new[i]])[None]
        torch.testing.assert_close(got[i : i + 1], dec.prefill(hist), rtol=1e-4, atol=1e-5)
    # the new tokens' K/V were written: one decode step after them matches too
    nxt = got.argmax(-1)
    dec.decode_rows(nxt, seq=[0, 1], pslot=[0, 1], plen=[12, 7], glen0=[9, 11], steps=[1, 1])
    for i, g in enumerate((4, 6)):
        hist = torch.cat([prompts[i][0], dec.out_tokens[i, :g], new[i], nxt[i : i + 1]])[None]
        torch.testing.assert_close(
            dec.last_logits[i : i + 1], dec.prefill(hist), rtol=1e-4, atol=1e-5
        )


# ---------------------------------------------------------------- beam


BEAM = "beam2:step=8,expand=2"  # W = 2, M = 2: 4 candidates per query
P, T, W, M = 13, 8, 2, 2


@pytest.mark.parametrize("sharing", [True, False], ids=["prefix-cache", "no-cache"])
def test_beam_counts_by_hand(sharing):
    dec = _dec()
    outs = [20, 33]  # depths ceil(20/8) = 3 and ceil(33/8) = 5
    depths = [3, 5]
    t = D.run_workload(
        dec,
        strategy=BEAM,
        prompt_tokens=P,
        output_tokens=outs,
        concurrent_queries=2,
        prefix_sharing=sharing,
    )
    wm = W * M
    active = [sum(d >= k for d in depths) for k in range(1, 6)]  # queries at step k
    assert active == [2, 2, 2, 1, 1]
    # decode: T - 1 steps at k = 1, T after, at batch W M x active queries
    dec_passes = [(p.step, p.sequences, p.passes) for p in _passes(t, "decode")]
    assert dec_passes == [(k, wm * a, T - 1 if k == 1 else T) for k, a in enumerate(active, 1)]
    assert t.decode_steps == 5 * T - 1
    assert t.generated_tokens == wm * T * sum(depths)
    # every candidate reads its whole context P + s at its s-th decode step, s = 1 .. D T - 1
    want_kv = sum(wm * sum(P + s for s in range(1, d * T)) for d in depths)
    assert t.count("decode", attr="cached_tokens") == want_kv
    # one verifier pass per step over every active candidate
    score = _passes(t, "score", "verifier")
    steps = [p for p in score if p.step >= 1]
    assert [p.sequences for p in steps] == [wm * a for a in active]
    if sharing:  # T new tokens after P + (k-1) T cached, and one prompt prefill per query
        assert [(p.new_tokens, p.cached_tokens) for p in steps] == [
            (wm * a * T, wm * a * (P + (k - 1) * T)) for k, a in enumerate(active, 1)
        ]
        assert [(p.step, p.new_tokens) for p in score if p.step == 0] == [(0, 2 * P)]
    else:  # P + k T from scratch
        assert [(p.new_tokens, p.cached_tokens) for p in steps] == [
            (wm * a * (P + k * T), 0) for k, a in enumerate(active, 1)
        ]
        assert not [p for p in score if p.step == 0]
    assert t.scored_tokens == sum(p.new_tokens for p in score)
    # forks: W M - 1 per query at k = 1, W (M - 1) per active query after
    forks = [(p.step, p.sequences) for p in _passes(t, "copy", "policy")]
    assert (
        forks == [(1, 2 * (wm - 1))] + [(k, W * (M - 1) * a) for k, a in enumerate(active, 1)][1:]
    )
    policy_rows = [p.new_tokens for p in _passes(t, "copy", "policy")]
    assert (
        policy_rows
        == [2 * (wm - 1) * (P % BLOCK)]
        + [W * (M - 1) * a * ((P + (k - 1) * T - 1) % BLOCK) for k, a in enumerate(active, 1)][1:]
    )
    verifier_rows = [p.new_tokens for p in _passes(t, "copy", "verifier")]
    if sharing:  # the analytical model's count: (P + (k-1) T) mod 16 per fork
        assert (
            verifier_rows
            == [2 * (wm - 1) * (P % BLOCK)]
            + [W * (M - 1) * a * ((P + (k - 1) * T) % BLOCK) for k, a in enumerate(active, 1)][1:]
        )
    else:
        assert verifier_rows == []
    assert [p.new_tokens for p in _passes(t, "prefill")] == [2 * P]


def test_beam_candidates_equal_a_dense_prefill_of_their_history():
    """Shared blocks, copied partial blocks and forked token rows: each candidate's own text."""
    dec = _dec(seed=4)
    p, depth = 21, 4  # P not block-aligned: every fork copies a partial block
    D.run_workload(
        dec, strategy="beam2:step=6,expand=3", prompt_tokens=p, output_tokens=[6 * depth],
        concurrent_queries=1,
    )  # fmt: skip
    n = 6
    hist = dec.out_tokens[:n, : p + 6 * depth - 1]
    assert (hist >= 0).all()
    assert len({tuple(r) for r in hist.tolist()}) > 1  # the candidates differ
    torch.testing.assert_close(dec.last_logits, dec.prefill(hist), rtol=1e-4, atol=1e-5)


def test_beam_verifier_cache_gives_the_same_search_as_no_cache():
    """Scores from the cached prefix equal scores from scratch: the same beams survive."""
    got = {}
    for sharing in (True, False):
        dec = _dec(seed=6)
        dec.reseed(11)
        D.run_workload(
            dec, strategy="beam3:step=5,expand=2", prompt_tokens=19, output_tokens=[25, 14],
            concurrent_queries=2, prefix_sharing=sharing,
        )  # fmt: skip
        got[sharing] = dec.out_tokens[:12, : 19 + 25].clone()
    assert torch.equal(got[True], got[False])


def test_beam1_equals_single():
    dec = _dec(seed=2)
    dec.reseed(5)
    b = D.run_workload(dec, strategy="beam1:step=8", prompt_tokens=P, output_tokens=[24],
                       concurrent_queries=1)  # fmt: skip
    beam_tokens, beam_logits = dec.out_tokens[0, P : P + 24].clone(), dec.last_logits.clone()
    dec.reseed(5)
    s = D.run_workload(dec, strategy="single", prompt_tokens=P, output_tokens=[24],
                       concurrent_queries=1)  # fmt: skip
    assert torch.equal(beam_tokens, dec.out_tokens[0, :24])
    torch.testing.assert_close(beam_logits, dec.last_logits, rtol=1e-4, atol=1e-5)
    assert b.decode_steps == s.decode_steps == 23
    assert b.count("decode", attr="cached_tokens") == s.count("decode", attr="cached_tokens")
    assert b.count("copy", attr="new_tokens") == 0 and len(_passes(b, "score")) == 1 + 3


def test_beam_depth_option_and_reward_model():
    dec, rew = _dec(), _dec(seed=9, score_only=True)
    t = D.run_workload(dec, strategy="beam2:step=4,depth=2", prompt_tokens=10,
                       output_tokens=[40], concurrent_queries=1, reward_spec=rew)  # fmt: skip
    assert t.decode_steps == 2 * 4 - 1  # depth 2, not ceil(40/4) = 10
    assert {p.model for p in _passes(t, "score")} == {"verifier"}
    assert rew.kg is not None and dec.verifier_clone().kg is None  # the reward model verified
    # interleaved phases: times add up, stamps span the run, verify ends it
    assert t.total_time_s == pytest.approx(
        t.prefill_time_s + t.decode_time_s + t.score_time_s, abs=1e-3
    )
    assert t.start_s == t.prefill_start_s < t.decode_start_s < t.score_end_s == t.end_s


def test_beam_validates():
    dec = _dec()
    with pytest.raises(TtcsimError, match="one length >= 1 per query"):
        D.run_workload(dec, strategy=BEAM, prompt_tokens=5, output_tokens=[8] * 4,
                       concurrent_queries=1)  # fmt: skip
    with pytest.raises(TtcsimError, match="exceeds"):
        D.run_workload(dec, strategy=BEAM, prompt_tokens=4000, output_tokens=[200],
                       concurrent_queries=1)  # fmt: skip
    with pytest.raises(TtcsimError, match="runs single"):
        D.run_workload(dec, strategy="budget:max=8", prompt_tokens=5, output_tokens=[8],
                       concurrent_queries=1)  # fmt: skip


# ---------------------------------------------------------------- refine


F = 4
LENGTHS = [[5, 7, 3], [4, 6, 2]]  # two queries, three rounds


def _contexts(history):
    """C_r by hand: P + answers so far + feedback (all), or P + last answer + F (last)."""
    p = 10
    out = []
    for ls in LENGTHS:
        if history == "all":
            out.append([p, p + ls[0] + F, p + ls[0] + ls[1] + 2 * F])
        else:
            out.append([p, p + ls[0] + F, p + ls[1] + F])
    return out


@pytest.mark.parametrize("history", ["all", "last"])
@pytest.mark.parametrize("sharing", [True, False], ids=["prefix-cache", "no-cache"])
def test_refine_rounds_and_contexts(history, sharing):
    dec = _dec()
    p = 10
    t = D.run_workload(
        dec,
        strategy=f"refine3:feedback={F},history={history}",
        prompt_tokens=p,
        output_tokens=[x for ls in LENGTHS for x in ls],
        concurrent_queries=2,
        prefix_sharing=sharing,
    )
    ctx = _contexts(history)
    assert D.refine_contexts(D._strategy(f"refine3:feedback={F},history={history}"), p,
                             LENGTHS[0]) == ctx[0]  # fmt: skip
    assert sorted({p.step for p in t.passes}) == [1, 2, 3]
    for r in (1, 2, 3):
        pre = _passes(t, "prefill", step=r)
        new = sum(x.new_tokens for x in pre)
        cached = sum(x.cached_tokens for x in pre)
        if r == 1:
            want = (2 * p, 0)
        elif not sharing:
            want = (sum(c[r - 1] for c in ctx), 0)
        elif history == "all" or r == 2:  # F new tokens over C_r - F cached
            want = (2 * F, sum(c[r - 1] - F for c in ctx))
        else:  # last, r >= 3: previous answer + F over the cached prompt
            want = (sum(ls[r - 2] + F for ls in LENGTHS), 2 * p)
        assert (new, cached) == want, r
        dec_r = _passes(t, "decode", step=r)
        assert sum(x.passes for x in dec_r) == max(ls[r - 1] for ls in LENGTHS) - 1
        # round r decodes L_r - 1 steps over contexts C_r + 1 .. C_r + L_r - 1
        want_kv = sum(
            sum(c[r - 1] + j for j in range(1, ls[r - 1]))
            for c, ls in zip(ctx, LENGTHS, strict=True)
        )
        assert sum(x.cached_tokens for x in dec_r) == want_kv, r
    assert t.generated_tokens == sum(map(sum, LENGTHS))
    assert t.prefill_tokens == t.count("prefill", attr="new_tokens")
    assert t.score_time_s == 0 and t.scored_tokens == 0
    assert t.score_start_s == t.score_end_s == t.end_s == t.decode_end_s
    if sharing and history == "all":  # the generation slot holds answers and feedback in order
        used = (dec.out_tokens[:2] >= 0).sum(1).tolist()
        assert used == [sum(ls) + 2 * F for ls in LENGTHS]


def test_refine1_is_single():
    dec = _dec()
    r = D.run_workload(dec, strategy="refine1", prompt_tokens=9, output_tokens=[6, 3],
                       concurrent_queries=2)  # fmt: skip
    s = D.run_workload(dec, strategy="single", prompt_tokens=9, output_tokens=[6, 3],
                       concurrent_queries=2)  # fmt: skip
    assert r.passes == s.passes


def test_refine_validates():
    dec = _dec()
    with pytest.raises(TtcsimError, match="3 lengths >= 1 per query"):
        D.run_workload(dec, strategy="refine3", prompt_tokens=5, output_tokens=[4, 4],
                       concurrent_queries=1)  # fmt: skip
    with pytest.raises(TtcsimError, match="takes no reward model"):
        D.run_workload(dec, strategy="refine2", prompt_tokens=5, output_tokens=[4, 4],
                       concurrent_queries=1, reward_spec=TINY)  # fmt: skip


# ---------------------------------------------------------------- records


@pytest.fixture
def fake_nvml(monkeypatch):
    fake = make_fake_pynvml(power_w=100.0)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    return fake


@pytest.mark.parametrize(
    "given, canonical, outs, want_outs, sharing",
    [
        ("beam:width=2,step=8,expand=2", "beam2:step=8,expand=2", 20, [20, 20], True),
        ("beam2:step=8,depth=2", "beam2:step=8,depth=2", [9, 30], [9, 30], False),
        ("refine2:feedback=8", "refine2:feedback=8", [5, 3], [5, 3, 5, 3], True),
        ("refine3:history=last", "refine3:history=last", [4, 5, 6, 7, 8, 9], None, False),
    ],
)
def test_measure_run_record_predicts_the_same_workload(
    fake_nvml, given, canonical, outs, want_outs, sharing
):
    from ttcsim.calibration.records import RunRecord
    from ttcsim.calibration.validate import predict_record
    from ttcsim.gpu.measure import RECORD_KEYS, measure_run
    from ttcsim.hardware import get_profile
    from ttcsim.strategies import parse_strategy

    rec = measure_run(TINY, given, 12, outs, 2, prefix_sharing=sharing, min_window_s=0.2,
                      idle_power_w=50.0, torch_device="cpu")  # fmt: skip
    assert tuple(rec) == RECORD_KEYS
    assert rec["strategy"] == canonical == parse_strategy(canonical).spec
    assert rec["output_tokens"] == (want_outs or outs)
    assert rec["reward_model"] is None and rec["prefix_sharing"] is sharing
    json.dumps(rec)
    # a catalog model of the same shape of workload: the record must predict cleanly
    run = RunRecord.model_validate({**rec, "model": "llama-3.2-1b"})
    pred = predict_record(run, get_profile("h100"))
    assert pred.energy_j > 0 and pred.strategy == canonical


def test_measure_beam_with_reward_model_and_errors(fake_nvml):
    from ttcsim.gpu.measure import measure_run

    rec = measure_run(TINY, "beam2:step=4", 6, [8], 1, reward_model=TINY, min_window_s=0.1,
                      idle_power_w=50.0, torch_device="cpu")  # fmt: skip
    assert rec["strategy"] == "beam2:step=4,rm=tiny" and rec["reward_model"] == "tiny"
    assert rec["score_latency_s"] > 0
    with pytest.raises(TtcsimError, match="takes no reward model"):
        measure_run(TINY, "refine2", 6, 3, 1, reward_model=TINY, idle_power_w=50.0,
                    torch_device="cpu")  # fmt: skip
    with pytest.raises(TtcsimError, match="output_tokens"):
        measure_run(TINY, "beam2:step=4", 6, [8, 8, 8], 2, idle_power_w=50.0,
                    torch_device="cpu")  # fmt: skip
    with pytest.raises(TtcsimError, match="contradicts"):
        measure_run(TINY, "beam2:rm=llama-3.2-1b", 6, [8], 1, reward_model=TINY,
                    idle_power_w=50.0, torch_device="cpu")  # fmt: skip


def test_measure_many_runs_beam_and_refine(fake_nvml, tmp_path):
    from ttcsim.gpu.measure import _cache_need_bytes, measure_many

    runs = [
        dict(id="b", model=TINY, strategy="beam2:step=8", prompt_tokens=12,
             output_tokens=[16, 24], concurrent_queries=2, min_window_s=0.1),
        dict(id="r", model=TINY, strategy="refine2", prompt_tokens=30, output_tokens=[6, 9],
             concurrent_queries=1, prefix_sharing=False, min_window_s=0.1),
    ]  # fmt: skip
    recs = measure_many(runs, tmp_path / "runs.jsonl", idle_power_w=60.0, torch_device="cpu")
    assert [r["id"] for r in recs] == ["b", "r"]  # larger cache first
    assert [r["strategy"] for r in recs] == ["beam2:step=8", "refine2"]
    # the memory estimate covers what the beam run allocates (policy pool + verifier clone)
    dec = _dec()
    D.run_workload(dec, strategy="beam2:step=8", prompt_tokens=12, output_tokens=[16, 24],
                   concurrent_queries=2)  # fmt: skip
    need = _cache_need_bytes(TINY, runs[0])
    assert need == pytest.approx(dec.cache_bytes / 2, rel=0.02)  # float32 here, bf16 estimate
