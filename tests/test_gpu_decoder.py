"""Reference decoder, measure_run and microbenchmarks on CPU torch with a fake NVML."""

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
from ttcsim.models import ModelSpec  # noqa: E402

TINY_MOE = ModelSpec(
    name="tiny-moe",
    n_layers=2,
    hidden_size=64,
    n_heads=4,
    n_kv_heads=1,
    head_dim=16,
    intermediate_size=128,
    vocab_size=97,
    n_experts=6,
    n_active_experts=2,
    moe_intermediate_size=32,
    n_shared_experts=1,
    tie_word_embeddings=True,
)


def _dec(spec=TINY, **kw):
    return D.ReferenceDecoder(spec, "cpu", dtype=torch.float32, **kw)


def _caches(b=5, hq=4, hkv=2, d=16, tp=40, tg=25, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(s, generator=g)

    return dict(
        q=r(b, hq, d),
        kp=r(3, tp, hkv, d),
        vp=r(3, tp, hkv, d),
        kg=r(b, tg, hkv, d),
        vg=r(b, tg, hkv, d),
        pslot=torch.tensor([0, 0, 1, 2, 2])[:b],
        seq=torch.tensor([4, 1, 2, 3, 0])[:b],
        plen=torch.tensor([1, 40, 17, 33, 8])[:b],
        glen=torch.tensor([1, 25, 1, 9, 12])[:b],
    )


def _dense_attention(c):
    """Per-sequence loop: softmax(q k^T / sqrt(d)) v over prompt ++ generated positions."""
    out = []
    for i in range(c["q"].shape[0]):
        p, s, lp, lg = (int(c[k][i]) for k in ("pslot", "seq", "plen", "glen"))
        k = torch.cat([c["kp"][p, :lp], c["kg"][s, :lg]])  # [T, Hkv, d]
        v = torch.cat([c["vp"][p, :lp], c["vg"][s, :lg]])
        group = c["q"].shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)  # [T, Hq, d]
        w = torch.softmax(torch.einsum("hd,thd->ht", c["q"][i], k) / math.sqrt(k.shape[-1]), -1)
        out.append(torch.einsum("ht,thd->hd", w, v))
    return torch.stack(out)


def test_reference_attention_equals_dense():
    c = _caches()
    got = D.decode_attention_reference(**c)
    torch.testing.assert_close(got, _dense_attention(c), rtol=1e-5, atol=1e-5)


def test_triton_kernel_in_interpreter():
    pytest.importorskip("triton")
    # TRITON_INTERPRET must be set before triton is imported: run in a subprocess
    script = textwrap.dedent(
        """
        import math, torch
        from ttcsim.gpu.decoder import decode_attention_triton, decode_attention_reference
        g = torch.Generator().manual_seed(0)
        for dtype in (torch.float32, torch.float16):
            for hq, hkv, d in ((4, 2, 16), (6, 2, 24)):
                r = lambda *s: torch.randn(s, generator=g).to(dtype)
                c = dict(q=r(5, hq, d), kp=r(3, 90, hkv, d), vp=r(3, 90, hkv, d),
                         kg=r(5, 70, hkv, d),
                         vg=r(5, 70, hkv, d), pslot=torch.tensor([0, 0, 1, 2, 2]),
                         seq=torch.tensor([4, 1, 2, 3, 0]), plen=torch.tensor([1, 90, 64, 65, 3]),
                         glen=torch.tensor([1, 70, 1, 63, 5]))
                want = decode_attention_reference(**c).float()
                for splits in (1, 3):
                    got = decode_attention_triton(**c, num_splits=splits).float()
                    err = (got - want).abs().max().item()
                    tol = 1e-4 if dtype == torch.float32 else 3e-2
                    assert err < tol, (dtype, hq, d, splits, err)
        print("ok")
        """
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    if res.returncode and "InterpreterError" in res.stderr and _triton_version() < (3, 9):
        pytest.skip(
            "this Triton's interpreter cannot run the kernel; decoder_self_check covers it on GPU"
        )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "ok" in res.stdout


def _triton_version():
    from importlib.metadata import version

    return tuple(int(x) for x in version("triton").split(".")[:2])


@pytest.mark.parametrize("spec", [TINY, TINY_MOE], ids=["dense", "moe"])
def test_shrinking_batch_gives_exact_token_counts(spec):
    dec = _dec(spec)
    outs = [5, 1, 9, 2, 7, 3]
    t = D.run_workload(
        dec, prompt_tokens=11, output_tokens=outs, samples_per_query=3, concurrent_queries=2
    )
    counts = (dec.out_tokens[: len(outs)] >= 0).sum(1).tolist()
    assert counts == outs
    assert t.decode_steps == max(outs) - 1
    assert t.generated_tokens == sum(outs)
    # the same decoder again (caches reused, counts reset)
    D.run_workload(
        dec, prompt_tokens=11, output_tokens=[2] * 6, samples_per_query=3, concurrent_queries=2
    )
    assert (dec.out_tokens[:6] >= 0).sum(1).tolist() == [2] * 6


def _first_step_logits(dec, sharing, n_q=2, n_s=3, p=13):
    D.run_workload(
        dec,
        prompt_tokens=p,
        output_tokens=[2] * (n_q * n_s),
        samples_per_query=n_s,
        concurrent_queries=n_q,
        prefix_sharing=sharing,
    )
    return dec.last_logits.clone()


def test_prefix_sharing_gives_same_logits_as_separate_prefills():
    shared = _first_step_logits(_dec(seed=5), True)
    separate = _first_step_logits(_dec(seed=5), False)
    torch.testing.assert_close(shared, separate, rtol=1e-4, atol=1e-5)


def test_decode_step_equals_full_prefill():
    dec = _dec(seed=2)
    n_q, n_s, p = 2, 2, 9
    prompts = dec.random_tokens(n_q, p)
    dec.ensure_capacity(n_q, p, n_q * n_s, 4)
    first = dec.prefill(prompts, torch.arange(n_q)).argmax(-1)
    pslot = [0, 0, 1, 1]
    firsts = first[pslot]
    # two decode steps; compare the second step's logits with a full prefill of prompt + 2 tokens
    dec.decode(firsts, pslot, p, [2, 2, 2, 2])
    gen = dec.out_tokens[:4, :2]
    full = torch.cat([prompts[pslot], gen], 1)
    torch.testing.assert_close(dec.last_logits, dec.prefill(full), rtol=1e-4, atol=1e-5)
    assert torch.equal(gen[:, 0], firsts)


def test_reward_scoring_and_timings():
    dec, rew = _dec(), _dec(score_only=True)
    outs = [3, 4, 1, 6]
    t = D.run_workload(
        dec,
        prompt_tokens=7,
        output_tokens=outs,
        samples_per_query=4,
        concurrent_queries=1,
        reward_spec=rew,
    )
    assert t.scored_tokens == 4 * (7 + 6)
    assert t.prefill_tokens == 7
    for name in ("prefill", "decode", "score"):
        assert getattr(t, f"{name}_time_s") >= 0
        assert getattr(t, f"{name}_end_s") >= getattr(t, f"{name}_start_s")
    assert t.prefill_end_s <= t.decode_start_s <= t.decode_end_s <= t.score_start_s
    assert t.total_time_s == pytest.approx(
        t.prefill_time_s + t.decode_time_s + t.score_time_s, abs=1e-3
    )
    assert t.score_time_s > 0
    assert (t.start_s, t.end_s) == (t.prefill_start_s, t.score_end_s)
    assert [p.phase for p in t.passes] == ["prefill"] + ["decode"] * 3 + ["score"]
    assert t.count("decode") == t.decode_steps == 5


def test_run_workload_validates():
    dec = _dec()
    with pytest.raises(TtcsimError, match="output_tokens"):
        D.run_workload(
            dec, prompt_tokens=4, output_tokens=[2, 2], samples_per_query=3, concurrent_queries=1
        )
    with pytest.raises(TtcsimError, match="exceeds"):
        D.run_workload(
            dec, prompt_tokens=4090, output_tokens=[10], samples_per_query=1, concurrent_queries=1
        )


def test_capacity_grows_and_drops_graph_states():
    dec = _dec()
    D.run_workload(
        dec, prompt_tokens=5, output_tokens=[3, 3], samples_per_query=2, concurrent_queries=1
    )
    assert dec._states
    dec.ensure_capacity(1, 5, 2, 2)  # smaller: no-op
    assert dec._states
    dec.ensure_capacity(4, 50, 8, 20)
    assert not dec._states and dec.kp.shape[1:3] == (4, 50)


@pytest.mark.parametrize("spec", [TINY, TINY_MOE], ids=["dense", "moe"])
def test_weight_bytes_match_allocation(spec):
    dec = D.ReferenceDecoder(spec, "cpu")
    tensors = [dec.embed, dec.norm_f] + [
        t for lw in dec.layers for t in lw.values() if t is not None
    ]
    if not spec.tie_word_embeddings:
        tensors.append(dec.head)
    assert D.weight_bytes(spec) == sum(t.numel() * t.element_size() for t in tensors)


def test_step_cost_by_hand():
    h, L, d = 64, 2, 16
    attn = h * (4 + 2 * 2) * d + 4 * d * h
    per_token = L * (attn + 3 * h * 128) + 97 * h
    want_flops = 3 * (2 * per_token + 4 * L * 4 * d * 100)
    assert D.decode_step_flops(TINY, 3, 100) == want_flops
    want_bytes = (per_token + 2 * L * 3 * 100 * 2 * d) * 2
    assert D.decode_step_hbm_bytes(TINY, 3, 100) == want_bytes
    # MoE: one token touches k experts, many tokens approach all of them
    one = D.decode_step_hbm_bytes(TINY_MOE, 1, 0)
    many = D.decode_step_hbm_bytes(TINY_MOE, 1000, 0)
    expert = 3 * 64 * 32 * 2
    assert many - one == pytest.approx(2 * (6 - 2) * expert, rel=1e-6)  # 2 layers


def test_choose_num_splits():
    assert D.choose_num_splits(64, 8, 4096) == 1
    assert D.choose_num_splits(1, 8, 32768) == 32
    assert D.choose_num_splits(1, 8, 300) == 2


# ---------------------------------------------------------------- measure / microbench


@pytest.fixture
def fake_nvml(monkeypatch):
    fake = make_fake_pynvml(power_w=100.0)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    return fake


def test_measure_run_record(fake_nvml):
    from ttcsim.gpu.measure import RECORD_KEYS, measure_run

    rec = measure_run(
        TINY,
        "vote3",
        8,
        [2, 3, 4, 5, 6, 7],
        2,
        min_window_s=0.3,
        idle_power_w=55.0,
        torch_device="cpu",
        run_id="r1",
    )
    assert tuple(rec) == RECORD_KEYS
    assert rec["id"] == "r1" and rec["hw"] == "nvidia h100 80gb hbm3" and rec["dtype"] == "bf16"
    assert rec["repeats"] >= 1 and rec["output_tokens"] == [2, 3, 4, 5, 6, 7]
    assert rec["prefill_energy_j"] is None and rec["decode_energy_j"] is None
    window = rec["latency_s"] * rec["repeats"]
    assert window >= 0.3 * 0.8  # the window also holds host gaps between repeats
    # fake board draws 100 W: energy per repeat ~ 100 W x latency (tick edges cost <= 2 x 20 ms)
    assert rec["energy_j"] == pytest.approx(
        100 * rec["latency_s"], abs=100 * 0.05 / rec["repeats"] + 1
    )
    json.dumps(rec)


def test_measure_run_bon_and_errors(fake_nvml):
    from ttcsim.gpu.measure import measure_run

    rec = measure_run(
        TINY,
        "bon2",
        8,
        3,
        1,
        reward_model=TINY,
        min_window_s=0.2,
        idle_power_w=50.0,
        torch_device="cpu",
    )
    assert rec["reward_model"] == "tiny" and rec["score_latency_s"] > 0
    with pytest.raises(TtcsimError, match="needs a reward model"):
        measure_run(TINY, "bon2", 8, 3, 1, idle_power_w=50.0, torch_device="cpu")
    with pytest.raises(TtcsimError, match="unknown strategy"):
        measure_run(TINY, "prm-bon4", 8, 3, 1, idle_power_w=50.0, torch_device="cpu")
    with pytest.raises(TtcsimError, match="unknown strategy"):
        measure_run(TINY, "beam", 8, 3, 1, idle_power_w=50.0, torch_device="cpu")


def test_measure_idle_power(fake_nvml):
    from ttcsim.gpu.measure import measure_idle_power

    assert measure_idle_power(0, duration_s=0.6) == pytest.approx(100.0, rel=0.1)


def test_measure_many_appends_lines(fake_nvml, tmp_path, capsys):
    from ttcsim.gpu.measure import measure_many

    runs = [
        {
            "model": TINY,
            "strategy": "single",
            "prompt_tokens": 6,
            "output_tokens": 3,
            "concurrent_queries": 2,
            "min_window_s": 0.2,
            "id": "a",
        },
        {
            "model": TINY,
            "strategy": "vote2",
            "prompt_tokens": 12,
            "output_tokens": [2, 3, 4, 5],
            "concurrent_queries": 2,
            "min_window_s": 0.2,
            "id": "b",
            "prefix_sharing": False,
        },
    ]
    out = tmp_path / "runs.jsonl"
    recs = measure_many(runs, out, idle_power_w=60.0, torch_device="cpu")
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert {r["id"] for r in lines} == {"a", "b"} == {r["id"] for r in recs}
    assert "[2/2]" in capsys.readouterr().err
    with pytest.raises(TtcsimError, match="unknown keys"):
        measure_many([{**runs[0], "batch": 3}], out, torch_device="cpu")


def test_microbenchmarks_tiny(fake_nvml, tmp_path, monkeypatch):
    from ttcsim.gpu import microbench

    monkeypatch.setattr(microbench, "PAD_S", 0.25)
    recs = microbench.run_microbenchmarks(tmp_path, torch_device="cpu", window_s=0.2, tiny=True)
    kinds = [r["kind"] for r in recs]
    assert kinds == ["idle"] + ["weight_stream"] * 2 + ["gemm"] * 2 + ["attention_decode"] * 2 + [
        "decoder"
    ] * 2 + ["idle"]
    lines = (tmp_path / "phases.jsonl").read_text().splitlines()
    assert [json.loads(x)["phase"] for x in lines] == [r["phase"] for r in recs]
    assert (
        (tmp_path / "trace.csv")
        .read_text()
        .startswith("t_s,energy_j,power_w,sm_clock_mhz,temperature_c\n")
    )
    for r in recs:
        assert r["avg_power_w"] == pytest.approx(100.0, rel=0.35), r
        assert r["energy_j"] == pytest.approx(r["avg_power_w"] * r["time_s"])
        assert r["dtype"] == "bf16" and r["iterations"] >= 1
    dec = recs[-2]
    assert dec["batch"] == 64 and dec["hbm_bytes"] > 0 and dec["flops"] > 0
    assert recs[-1]["phase"] == "idle_after" and recs[-1]["hbm_bytes"] == 0
