"""Engine layer: hand-computed cases, invariants against the reference path, CLI."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from click.testing import CliRunner

from ttcsim.cli import main
from ttcsim.distributions import Empirical
from ttcsim.engines import engine_from_record, get_engine, list_engines
from ttcsim.engines.physics import continuous_schedule, kv_sizing_tokens, padded_lengths
from ttcsim.engines.schema import EngineProfile
from ttcsim.engines.steady import steady_state
from ttcsim.errors import DoesNotFitError, TtcsimError, UnknownNameError
from ttcsim.hardware import get_profile
from ttcsim.models import get_model
from ttcsim.predict import predict
from ttcsim.simulator.batching import continuous_decode, static_padded_expected
from ttcsim.simulator.coefficients import pass_coefficients
from ttcsim.simulator.decode import segment_cost, step_coefficients
from ttcsim.simulator.roofline import fixed_time_s, forward_pass, linear_time_s

H100, H200 = get_profile("h100"), get_profile("h200")
LLAMA8 = get_model("8b")


def engine(**blocks) -> EngineProfile:
    """A test engine: reference settings plus the given blocks."""
    return get_engine("reference").with_settings(blocks).model_copy(update={"name": "test"})


# --------------------------------------------------------------------------- profiles


def test_shipped_engines_load_with_a_source_for_every_set_value():
    assert {"reference", "hf-transformers", "vllm-0.5"} <= set(list_engines())
    assert get_engine("vllm").name == "vllm-0.5"
    for name in list_engines():
        e = get_engine(name)
        assert e.status in ("datasheet-default", "calibrated", "transferred")
        if name == "reference":
            assert e.is_reference
            continue
        for block in ("batching", "host", "kernels", "kv_cache"):
            for key, value in getattr(e, block).model_dump().items():
                default = type(getattr(e, block))().model_dump()[key] if block != "batching" \
                    else None
                if value != default:
                    assert f"{block}.{key}" in e.provenance.sources, f"{name}: {block}.{key}"


def test_unknown_engine_lists_known_ones():
    with pytest.raises(UnknownNameError) as exc:
        get_engine("tgi")
    assert "reference" in str(exc.value) and "vllm" in str(exc.value)
    assert "\n" not in str(exc.value)


def test_engine_carries_no_gpu_constants():
    """Nothing in an engine profile is a bandwidth, FLOP rate, power or memory size."""
    for name in list_engines():
        keys = json.dumps(get_engine(name).without_provenance())
        for gpu_word in ("_w\"", "bytes_per_s", "flops_per_s", "capacity"):
            assert gpu_word not in keys


def test_record_engine_object_overrides_settings():
    e = engine_from_record({"name": "vllm", "version": "0.5.4", "max_num_seqs": 64,
                            "gpu_memory_utilization": 0.95})
    assert e.batching.max_num_seqs == 64 and e.kv_cache.gpu_memory_utilization == 0.95
    assert e.version == "0.5.4" and e.host == get_engine("vllm").host
    with pytest.raises(TtcsimError, match="unknown engine setting"):
        engine_from_record({"name": "vllm", "max_seqs": 3})
    with pytest.raises(TtcsimError, match="max_num_seqs"):
        engine_from_record({"name": "vllm", "max_num_seqs": 0})


# --------------------------------------------------------------------------- reference


@pytest.mark.parametrize("kw", [
    dict(strategy="vote8"),
    dict(strategy="bon4", output_tokens="lognormal:median=300,sigma=0.6,max=3000"),
    dict(strategy="single", concurrency=32, prompt_tokens="100,2000"),
    dict(strategy="beam4:step=64,depth=4"),
])
def test_reference_engine_is_todays_model_bit_for_bit(kw):
    base = predict(hw="h100", model="8b", percentiles=False, **kw).as_dict()
    for e in (None, "reference", get_engine("ref")):
        assert predict(hw="h100", model="8b", percentiles=False, engine=e, **kw).as_dict() == base
    assert pass_coefficients(H100, LLAMA8, engine=get_engine("reference")) == \
        pass_coefficients(H100, LLAMA8)


# --------------------------------------------------------------------------- host time


def test_host_bound_step_is_a_time_weighted_power_mix():
    """t = t_gpu + t_host; E = n (P_static t_gpu + P_gap t_host + E_dyn)."""
    ref = pass_coefficients(H200, LLAMA8)
    eng = engine(host={"step_s": 0.02, "per_layer_s": 1e-4, "per_sequence_s": 1e-5,
                       "overlap": 0.25, "gap_power_fraction": 0.4})
    c = pass_coefficients(H200, LLAMA8, engine=eng)
    b, x = 4.0, 4.0 * 600
    gpu = forward_pass(ref, b, x, x)
    host = 0.75 * (0.02 + LLAMA8.n_layers * 1e-4 + b * 1e-5)
    p = H200.parameters
    gap_w = p.idle_power_w + 0.4 * p.active_power_w
    got = forward_pass(c, b, x, x)
    assert float(got.time_s) == pytest.approx(float(gpu.time_s) + host, rel=1e-12)
    want_e = float(gpu.energy_j) + gap_w * host
    assert float(got.energy_j) == pytest.approx(want_e, rel=1e-12)
    power = float(got.energy_j / got.time_s)
    assert gap_w < power < float(gpu.energy_j / gpu.time_s)  # host-bound: lower power
    # the closed form of a decode segment uses the same step model
    t0, a, e0, e1 = step_coefficients(c, b)
    assert float(t0 + a * x) == pytest.approx(float(got.time_s), rel=1e-12)
    e_step = c.n_gpus * (c.static_power_w * (t0 + a * x) + e0 + e1 * x)
    assert float(e_step) == pytest.approx(float(got.energy_j), rel=1e-12)


def test_prefill_host_time_adds_per_pass_and_per_token():
    eng = engine(host={"prefill_s": 0.01, "per_prefill_token_s": 1e-6})
    c, ref = pass_coefficients(H200, LLAMA8, engine=eng), pass_coefficients(H200, LLAMA8)
    t, pairs = 256.0, 256.0 * 257 / 2  # small enough to stay under the power limit
    got = forward_pass(c, t, 0.0, pairs, sequences=4, prefill=True)
    want = forward_pass(ref, t, 0.0, pairs, sequences=4, prefill=True)
    assert not want.throttled
    assert float(got.time_s - want.time_s) == pytest.approx(0.01 + 256e-6, rel=1e-9)
    # decode passes are untouched by prefill host time
    assert float(forward_pass(c, 4, 4000, 4000).time_s) == float(forward_pass(ref, 4, 4000,
                                                                                4000).time_s)


# --------------------------------------------------------------------------- kernels


def test_graph_bucket_pads_the_gemms_not_the_attention():
    eng = engine(kernels={"graph_batch_buckets": [1, 8, 16]})
    c, ref = pass_coefficients(H100, LLAMA8, engine=eng), pass_coefficients(H100, LLAMA8)
    b, x = 5.0, 5.0 * 1000
    got = float(forward_pass(c, b, x, x).time_s)
    attention = float(forward_pass(ref, b, x, x).time_s - linear_time_s(ref, b)
                      - fixed_time_s(ref, b))
    want = float(linear_time_s(ref, 8.0) + fixed_time_s(ref, 8.0)) + attention
    assert got == pytest.approx(want, rel=1e-12)
    # at a bucket size, or above the largest bucket, nothing changes
    for size in (8.0, 40.0):
        assert float(forward_pass(c, size, size * 900, size * 900).time_s) == pytest.approx(
            float(forward_pass(ref, size, size * 900, size * 900).time_s), rel=1e-15)
    t0, a, _, _ = step_coefficients(c, b)
    assert float(t0 + a * x) == pytest.approx(got, rel=1e-12)


def test_efficiency_scales_multiply_and_cap_at_one():
    eng = engine(kernels={"attention_decode_efficiency_scale": 0.5,
                          "weight_stream_efficiency_scale": 1.9})
    c, ref = pass_coefficients(H100, LLAMA8, engine=eng), pass_coefficients(H100, LLAMA8)
    assert c.attention_bandwidth_bytes_per_s == pytest.approx(
        0.5 * ref.attention_bandwidth_bytes_per_s)
    assert c.weight_bandwidth_bytes_per_s == pytest.approx(H100.datasheet.hbm_bandwidth_bytes_per_s)


def test_dynamic_cache_copy_grows_with_context():
    """HF DynamicCache: 2 bytes moved per KV byte in use per step, at weight bandwidth."""
    eng = engine(kv_cache={"append_copy_factor": 2.0})
    c, ref = pass_coefficients(H100, LLAMA8, engine=eng), pass_coefficients(H100, LLAMA8)
    for x in (1000.0, 8000.0):
        moved = 2.0 * x * ref.kv_bytes_per_token
        dt = float(forward_pass(c, 1, x, x).time_s - forward_pass(ref, 1, x, x).time_s)
        assert dt == pytest.approx(moved / ref.weight_bandwidth_bytes_per_s, rel=1e-9)
        de = float(forward_pass(c, 1, x, x).energy_j - forward_pass(ref, 1, x, x).energy_j)
        assert de == pytest.approx(moved * ref.energy_per_byte_j
                                   + ref.static_power_w * dt, rel=1e-9)


# --------------------------------------------------------------------------- batching


def _stepwise(c, prompt, lengths):
    """Brute force: price every decode step of a list schedule with forward_pass."""
    t = e = 0.0
    for s in range(1, int(max(lengths))):
        running = [i for i, L in enumerate(lengths) if L - 1 >= s]
        b = len(running)
        x = b * (prompt + s)
        cost = forward_pass(c, b, x, x)
        t, e = t + float(cost.time_s), e + float(cost.energy_j)
    return t, e


def test_static_padded_runs_every_row_to_the_longest():
    eng = engine(batching={"policy": "static-padded"}, prefix={"share_parallel_prefill": False,
                                                               "prefix_caching": False})
    lengths = [100, 300, 50, 200]
    got = predict(hw="h100", model="8b", strategy="vote4", output_tokens=lengths,
                  prompt_tokens=256, engine=eng, percentiles=False)
    c = pass_coefficients(H100, LLAMA8, engine=eng)
    t, e = _stepwise(c, 256, [300] * 4)  # batch 4 for 299 steps
    assert got.decode_latency_s == pytest.approx(t, rel=1e-9)
    assert got.energy_decode_j == pytest.approx(e, rel=1e-9)
    assert got.latency_s == pytest.approx(got.batch_latency_s, rel=1e-12)  # all wait
    assert got.output_tokens == sum(lengths)  # padding is not output
    assert got.tokens_by_phase["prefill"] == 4 * 256  # every row prefilled
    assert padded_lengths(np.array([[3, 0, 5]])).tolist() == [[5, 0, 5]]


def test_static_padded_expectation_is_the_expected_maximum():
    """Exact over all 2^3 outcomes of three lengths in {10, 40}."""
    c = pass_coefficients(H100, LLAMA8, engine=engine(batching={"policy": "static-padded"}))
    dist = Empirical((10.0, 40.0))
    cost, _ = static_padded_expected(c, 100.0, dist.survival_steps(), 3, 3)
    want_t = want_e = 0.0
    for combo in itertools.product((10, 40), repeat=3):
        t, e = _stepwise(c, 100, [max(combo)] * 3)
        want_t, want_e = want_t + t / 8, want_e + e / 8
    assert cost.time_s == pytest.approx(want_t, rel=1e-12)
    assert cost.energy_j == pytest.approx(want_e, rel=1e-12)


def test_continuous_with_free_slots_is_lockstep():
    lock = engine()
    cont = engine(batching={"policy": "continuous", "max_num_seqs": 64})
    kw = dict(hw="h100", model="8b", strategy="vote8", output_tokens="100,200,300,400",
              concurrency=2, percentiles=False)
    kw["output_tokens"] = ",".join(["100", "200", "300", "400"] * 4)
    assert predict(engine=cont, **kw).energy_j == pytest.approx(predict(engine=lock,
                                                                        **kw).energy_j)


def test_continuous_schedule_and_cost_match_a_step_by_step_simulation():
    c = pass_coefficients(H100, LLAMA8)
    rng = np.random.default_rng(3)
    lengths = rng.integers(2, 60, size=23).astype(float)
    slots = 5
    start, sat = continuous_schedule(lengths[None, :] - 1, slots)
    # brute force: at each step, run the (up to) `slots` admitted sequences
    active, queue, ages = [], list(range(lengths.size)), {}
    t = e = 0.0
    finish = {}
    step = 0
    while queue or active:
        while queue and len(active) < slots:
            i = queue.pop(0)
            if lengths[i] - 1 > 0:
                active.append(i)
                ages[i] = 0
            else:
                finish[i] = t
        if not active:
            continue
        step += 1
        for i in active:
            ages[i] += 1
        x = sum(100 + ages[i] for i in active)
        cost = forward_pass(c, len(active), x, x)
        t, e = t + float(cost.time_s), e + float(cost.energy_j)
        done = [i for i in active if ages[i] >= lengths[i] - 1]
        for i in done:
            finish[i] = t
        active = [i for i in active if i not in done]
    got_t, _, got_e, q_time, _ = continuous_decode(c, 100.0, lengths[None, :], slots)
    assert float(got_t[0]) == pytest.approx(t, rel=1e-9)
    assert float(got_e[0]) == pytest.approx(e, rel=2e-3)  # the saturated part is summed at
    # its mean context: exact at full clock, Simpson's rule where the step nears the limit
    assert float(q_time[0]) == pytest.approx(np.mean(list(finish.values())), rel=0.05)


def test_kv_sizing_paged_vs_static():
    assert kv_sizing_tokens([1, 2, 3, 4], "static") == 4
    assert kv_sizing_tokens([1, 2, 3, 4], "paged") == pytest.approx(6 / 4)


def test_paged_kv_fits_what_static_kv_refuses():
    lengths = [16000] + [200] * 255
    kw = dict(hw="h100", model="8b", output_tokens=lengths, concurrency=256, prompt_tokens=100,
              percentiles=False, marginal=False)
    with pytest.raises(DoesNotFitError):
        predict(**kw)
    paged = engine(kv_cache={"allocation": "paged"})
    assert predict(engine=paged, **kw).energy_j > 0


def test_continuous_batch_is_limited_by_the_kv_pool():
    """2000 sequences of 4k tokens on one H100: vLLM runs what its paged pool holds."""
    e = get_engine("vllm")
    got = predict(hw="h100", model="8b", output_tokens=4000, prompt_tokens=96, concurrency=2000,
                  engine=e, percentiles=False, marginal=False)
    assert got.energy_j > 0
    with pytest.raises(DoesNotFitError):
        predict(hw="h100", model="8b", output_tokens=4000, prompt_tokens=96, concurrency=2000,
                percentiles=False, marginal=False)


def test_steady_state_matches_its_formula_and_the_long_closed_batch():
    e = engine(batching={"policy": "continuous", "max_num_seqs": 32})
    s = steady_state("h100", "8b", e, prompt_tokens=100, output_tokens=201, running_batch=32)
    c = pass_coefficients(H100, LLAMA8, engine=e)
    x = 32 * (200 * 100 + (201**2 - 201) / 2) / 200
    step = forward_pass(c, 32.0, x, x)
    assert s.energy_decode_per_request_j == pytest.approx(200 / 32 * float(step.energy_j))
    assert s.prompts_per_prefill == 1.0
    # a long closed batch under continuous batching spends about as much per request in decode
    p = predict(hw="h100", model="8b", engine=e, prompt_tokens=100, output_tokens=201,
                concurrency=3200, percentiles=False, marginal=False)
    assert p.energy_decode_j == pytest.approx(s.energy_decode_per_request_j, rel=0.02)


def test_segment_cost_with_engine_terms_matches_stepwise():
    c = pass_coefficients(H200, LLAMA8, engine=get_engine("hf-transformers"))
    t, _, e = segment_cost(c, 3.0, 501.0, 40.0)
    want_t, want_e = 0.0, 0.0
    for k in range(40):
        x = 3.0 * (501 + k)
        cost = forward_pass(c, 3.0, x, x)
        want_t, want_e = want_t + float(cost.time_s), want_e + float(cost.energy_j)
    assert float(t) == pytest.approx(want_t, rel=1e-9)
    assert float(e) == pytest.approx(want_e, rel=1e-9)


def test_hf_prefills_every_sample_and_vllm_shares():
    hf = predict(hw="h200", strategy="vote8", engine="hf", percentiles=False)
    vl = predict(hw="h200", strategy="vote8", engine="vllm", percentiles=False)
    assert hf.tokens_by_phase["prefill"] == 8 * 512
    assert vl.tokens_by_phase["prefill"] == 512
    assert hf.prefix_cache is False and vl.prefix_cache is True


# --------------------------------------------------------------------------- CLI


def invoke(*args):
    return CliRunner().invoke(main, list(args))


def test_cli_engines_list_and_show():
    r = invoke("engines", "list")
    assert r.exit_code == 0 and "hf-transformers" in r.output and "vllm-0.5" in r.output
    rows = json.loads(invoke("engines", "list", "--json").output)
    assert {row["name"] for row in rows} >= {"reference", "vllm-0.5"}
    r = invoke("engines", "show", "vllm", "--json")
    assert json.loads(r.output)["batching"]["policy"] == "continuous"
    assert "static-padded" in invoke("engines", "show", "hf").output


def test_cli_unknown_engine_is_one_line_listing_the_known():
    for args in (("predict", "--engine", "tgi"), ("engines", "show", "tgi")):
        r = invoke(*args)
        assert r.exit_code == 2
        lines = [x for x in r.output.splitlines() if x.strip()]
        assert len(lines) == 1 and "unknown engine 'tgi'" in lines[0] and "vllm" in lines[0]


def test_cli_predict_engine_json():
    r = invoke("predict", "--hw", "h200", "--engine", "hf", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["engine"] == "hf-transformers"


def test_cli_engine_yaml_path(tmp_path):
    from ttcsim.engines import engine_to_yaml

    path = tmp_path / "mine.yaml"
    e = get_engine("hf").model_copy(update={"name": "mine"})
    path.write_text(engine_to_yaml(e))
    r = invoke("predict", "--engine", str(path), "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["engine"] == "mine"


# --------------------------------------------------------------------------- sweep, commands


def test_sweep_engine_axis_equals_predict(tmp_path):
    import warnings

    from ttcsim.engines import engine_to_yaml
    from ttcsim.sweep import SlowPathWarning, sweep

    lockstep = engine(host={"step_s": 0.004, "per_layer_s": 2e-5, "gap_power_fraction": 0.3},
                      kernels={"graph_batch_buckets": [1, 2, 4, 8, 16, 32, 64]})
    path = tmp_path / "lockstep.yaml"
    path.write_text(engine_to_yaml(lockstep))
    grid = {"hw": "h100", "model": "8b", "engine": ["reference", str(path), "hf"],
            "strategy": ["single", "vote4"], "concurrency": [1, 24],
            "output_tokens": [300, "lognormal:median=300,sigma=0.5,max=2000"]}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        df = sweep(grid)
    slow = [str(w.message) for w in caught if issubclass(w.category, SlowPathWarning)]
    assert any("hf-transformers" in m for m in slow)
    assert not any("test" in m for m in slow)  # a lock-step engine runs the kernels
    for _, r in df.iterrows():
        name = {"test": str(path)}.get(r.engine, r.engine)
        p = predict(hw="h100", model="8b", engine=name, strategy=r.strategy,
                    output_tokens=r.output_tokens_spec, concurrency=int(r.concurrency),
                    percentiles=False)
        assert (p.energy_j, p.latency_s) == (r.energy_j, r.latency_s)


@pytest.mark.parametrize("args", [
    ("metrics", "--strategy", "vote4", "--json"),
    ("curve", "--vary", "output-tokens=256,512"),
    ("pareto", "--accuracy", "self-consistency"),
])
def test_engine_option_on_commands(args):
    ref = invoke(*args)
    hf = invoke(*args, "--engine", "hf")
    assert ref.exit_code == 0 and hf.exit_code == 0, hf.output
    assert ref.output != hf.output
    bad = invoke(*args, "--engine", "tgi")
    assert bad.exit_code == 2 and "unknown engine" in bad.output


def test_top_level_api_has_engines():
    import ttcsim

    assert ttcsim.get_engine("vllm").name == "vllm-0.5"
    s = ttcsim.steady_state(hw="a100", model="8b", engine="vllm", running_batch=64)
    assert s.running_batch == 64 and s.tpot_s > 0 and s.energy_per_request_j > 0
