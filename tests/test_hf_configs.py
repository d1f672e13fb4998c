"""Model architectures from real Hugging Face configs, the catalog, and hub-id names.

Tier 1: KV bytes and sliding-window savings computed by hand; name resolution.
Tier 3: parameter counts against the published counts (each model page's
safetensors total, or the paper where that is what is published), within 0.5 %.
"""

from __future__ import annotations

import pytest

from ttcsim.errors import UnknownNameError
from ttcsim.models import get_model
from ttcsim.simulator import architecture as arch

# (catalog name, published total parameters, published active or None, source)
CATALOG_PUBLISHED = [
    ("gemma-2-2b", 2_614_341_888, None, "google/gemma-2-2b-it page: 2.61B (safetensors total)"),
    ("gemma-2-9b", 9_241_705_984, None, "google/gemma-2-9b-it page: 9.24B (safetensors total)"),
    ("gemma-2-27b", 27_227_128_320, None, "google/gemma-2-27b-it page: 27.2B (safetensors)"),
    ("llama-3.1-8b", 8_030_261_248, None, "meta-llama/Llama-3.1-8B-Instruct page: 8.03B"),
    ("llama-3.1-70b", 70_553_706_496, None, "meta-llama/Llama-3.1-70B-Instruct page: 70.6B"),
    ("phi-3-mini-4k", 3_821_079_552, None, "microsoft/Phi-3-mini-4k-instruct page: 3.82B"),
    ("phi-3-small-8k", 7_392_272_384, None, "microsoft/Phi-3-small-8k-instruct page: 7.39B"),
    ("phi-3-medium-4k", 13_960_238_080, None, "microsoft/Phi-3-medium-4k-instruct page: 14B"),
    ("mistral-7b-v0.1", 7_241_732_096, None, "mistralai/Mistral-7B-v0.1 page: 7.24B"),
    ("mistral-7b-v0.3", 7_248_023_552, None, "mistralai/Mistral-7B-Instruct-v0.3 page: 7.25B"),
    ("mistral-nemo-2407", 12_247_782_400, None, "mistralai/Mistral-Nemo-Instruct-2407: 12.2B"),
    ("mistral-large-2407", 122_610_069_504, None, "mistralai/Mistral-Large-Instruct-2407: 123B"),
    ("mixtral-8x7b", 46_702_792_704, 12.9e9, "Mixtral-8x7B page: 46.7B; paper: 12.9B active"),
    ("mixtral-8x22b", 140_630_071_296, 39e9, "Mixtral-8x22B page: 141B; 39B active (Mistral AI)"),
    ("starcoder2-3b", 3_030_371_328, None, "bigcode/starcoder2-3b page: 3.03B"),
    ("starcoder2-7b", 7_173_923_840, None, "bigcode/starcoder2-7b page: 7.17B"),
    ("starcoder2-15b", 15_957_889_024, None, "bigcode/starcoder2-15b page: 16B"),
    ("codellama-7b", 6_738_546_688, None, "codellama/CodeLlama-7b-hf page: 6.74B"),
    ("codellama-13b", 13_016_028_160, None, "codellama/CodeLlama-13b-hf page: 13B"),
    ("codellama-34b", 33_743_970_304, None, "codellama/CodeLlama-34b-hf page: 33.7B"),
    ("codellama-70b", 69.0e9, None, "codellama/CodeLlama-70b-hf page: 69B"),
    ("codegemma-2b", 2_506_172_416, None, "google/codegemma-1.1-2b page: 2.51B"),
    ("codegemma-7b", 8_537_680_896, None, "google/codegemma-7b page: 8.54B"),
    ("deepseek-v2-lite", 15.7e9, 2.4e9, "DeepSeek-V2-Lite card: 15.7B total, 2.4B activated"),
    ("deepseek-v2", 236e9, 21e9, "DeepSeek-V2 (arXiv 2405.04434): 236B total, 21B activated"),
    ("deepseek-v3", 671e9, 37e9, "DeepSeek-V3 (arXiv 2412.19437): 671B total, 37B activated"),
]


def _active_without_input_embedding(spec):
    """Active parameters as DeepSeek counts them: the input embedding is a lookup."""
    return arch.active_parameter_count(spec) - spec.vocab_size * spec.hidden_size


@pytest.mark.parametrize(
    "name,total,active,source", CATALOG_PUBLISHED, ids=[p[0] for p in CATALOG_PUBLISHED]
)
def test_catalog_parameter_count_matches_the_published_count(name, total, active, source):
    spec = get_model(name)
    assert arch.parameter_count(spec) == pytest.approx(total, rel=0.005), source
    if active is not None:
        ours = (
            _active_without_input_embedding(spec)
            if spec.is_mla
            else arch.active_parameter_count(spec)
        )
        # published active counts are rounded to 2-3 digits
        assert ours == pytest.approx(active, rel=0.03), source


ML_ENERGY_IDS = {
    "google/gemma-2-2b-it": "gemma-2-2b",
    "google/gemma-2-9b-it": "gemma-2-9b",
    "google/gemma-2-27b-it": "gemma-2-27b",
    "meta-llama/Meta-Llama-3.1-8B-Instruct": "llama-3.1-8b",
    "meta-llama/Meta-Llama-3.1-70B-Instruct": "llama-3.1-70b",
    "microsoft/Phi-3-mini-4k-instruct": "phi-3-mini-4k",
    "microsoft/Phi-3-small-8k-instruct": "phi-3-small-8k",
    "microsoft/Phi-3-medium-4k-instruct": "phi-3-medium-4k",
    "mistralai/Mistral-7B-Instruct-v0.3": "mistral-7b-v0.3",
    "mistralai/Mistral-Nemo-Instruct-2407": "mistral-nemo-2407",
    "mistralai/Mistral-Large-Instruct-2407": "mistral-large-2407",
    "mistralai/Mixtral-8x7B-Instruct-v0.1": "mixtral-8x7b",
    "mistralai/Mixtral-8x22B-Instruct-v0.1": "mixtral-8x22b",
    "bigcode/starcoder2-3b": "starcoder2-3b",
    "bigcode/starcoder2-7b": "starcoder2-7b",
    "bigcode/starcoder2-15b": "starcoder2-15b",
    "codellama/CodeLlama-7b-hf": "codellama-7b",
    "codellama/CodeLlama-13b-hf": "codellama-13b",
    "codellama/CodeLlama-34b-hf": "codellama-34b",
    "codellama/CodeLlama-70b-hf": "codellama-70b",
    "google/codegemma-1.1-2b": "codegemma-2b",
    "google/codegemma-7b": "codegemma-7b",
}
OTHER_IDS = {
    "meta-llama/Llama-3.1-8B-Instruct": "llama-3.1-8b",
    "meta-llama/Llama-3.1-8B": "llama-3.1-8b",
    "Qwen/Qwen2.5-7B-Instruct": "qwen2.5-7b",
    "qwen2.5-7b-instruct": "qwen2.5-7b",
    "QWEN/QWEN3-8B": "qwen3-8b",
    "Llama-3.2-1B-Instruct": "llama-3.2-1b",
    "mistralai/Mistral-7B-Instruct-v0.1": "mistral-7b-v0.1",
    "deepseek-ai/DeepSeek-V3": "deepseek-v3",
    "deepseek-ai/DeepSeek-V2-Lite-Chat": "deepseek-v2-lite",
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B": "deepseek-r1-distill-qwen-7b",
    "google/gemma-2-9b": "gemma-2-9b",
    "8b": "llama-3.1-8b",
}


@pytest.mark.parametrize("hub_id,name", sorted({**ML_ENERGY_IDS, **OTHER_IDS}.items()))
def test_hub_ids_and_variants_resolve_without_files(hub_id, name):
    assert get_model(hub_id).name == name
    assert get_model(hub_id.lower()).name == name
    assert get_model(hub_id.upper()).name == name


def test_an_unknown_name_is_one_line_with_close_matches():
    with pytest.raises(UnknownNameError) as err:
        get_model("meta-llama/Llama-3-8B-Instruct")  # Llama 3.0 is not in the catalog
    message = str(err.value)
    assert "\n" not in message
    assert "did you mean" in message and "llama-3.1-8b" in err.value.suggestions
    assert "--model" in message


def test_a_missing_config_path_is_a_file_error_not_a_name_error(tmp_path):
    with pytest.raises(Exception) as err:
        get_model(str(tmp_path / "absent" / "config.json"))
    assert not isinstance(err.value, UnknownNameError)


# --- real config.json files (tests/data/hf_configs/<org>/<repo>/config.json) ----------

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from conftest import make_profile  # noqa: E402

from ttcsim.distributions import parse_lengths  # noqa: E402
from ttcsim.models import load_hf_config, spec_from_hf_config  # noqa: E402
from ttcsim.predict import memory_needed_bytes  # noqa: E402
from ttcsim.simulator.coefficients import pass_coefficients  # noqa: E402
from ttcsim.simulator.decode import deterministic_decode  # noqa: E402
from ttcsim.simulator.expectation import expected_decode, reference_decode_totals  # noqa: E402
from ttcsim.simulator.phases import prefill_phase  # noqa: E402
from ttcsim.simulator.roofline import forward_pass  # noqa: E402

CONFIGS = Path(__file__).parent / "data" / "hf_configs"

# repo, published total, published active (None: dense), where published,
# KV elements per token (hand: 2*L*n_kv*d, MLA L*(r_kv + d_r)), (window, sliding layers)
REAL_CONFIGS = [
    ("meta-llama/Llama-3.1-8B-Instruct", 8_030_261_248, None, "page: 8.03B",
     2 * 32 * 8 * 128, (None, 0)),
    ("meta-llama/Llama-3.1-70B-Instruct", 70_553_706_496, None, "page: 70.6B",
     2 * 80 * 8 * 128, (None, 0)),
    ("meta-llama/Llama-3.2-1B-Instruct", 1_235_814_400, None, "page: 1.24B",
     2 * 16 * 8 * 64, (None, 0)),
    ("Qwen/Qwen2.5-7B-Instruct", 7_615_616_512, None, "page: 7.62B",
     2 * 28 * 4 * 128, (None, 0)),
    ("Qwen/Qwen2.5-32B-Instruct", 32_763_876_352, None, "page: 32.8B",
     2 * 64 * 8 * 128, (None, 0)),
    ("mistralai/Mistral-7B-v0.1", 7_241_732_096, None, "page: 7.24B",
     2 * 32 * 8 * 128, (4096, 32)),
    ("mistralai/Mixtral-8x7B-Instruct-v0.1", 46_702_792_704, 12.9e9, "page: 46.7B; paper 12.9B",
     2 * 32 * 8 * 128, (None, 0)),
    ("google/gemma-2-9b-it", 9_241_705_984, None, "page: 9.24B",
     2 * 42 * 8 * 256, (4096, 21)),
    ("google/gemma-3-1b-it", 999_885_952, None, "page: 1B (999,885,952)",
     2 * 26 * 1 * 256, (512, 22)),
    ("microsoft/Phi-3-mini-4k-instruct", 3_821_079_552, None, "page: 3.82B",
     2 * 32 * 32 * 96, (2047, 32)),
    ("deepseek-ai/DeepSeek-V2-Lite-Chat", 15.7e9, 2.4e9, "card: 15.7B total, 2.4B active",
     27 * (512 + 64), (None, 0)),
    ("deepseek-ai/DeepSeek-V3", 671e9, 37e9, "arXiv 2412.19437: 671B, 37B active",
     61 * (512 + 64), (None, 0)),
    ("bigcode/starcoder2-7b", 7_173_923_840, None, "page: 7.17B",
     2 * 32 * 4 * 128, (4096, 32)),
]


def _config(repo: str) -> dict:
    return json.loads((CONFIGS / repo / "config.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize(
    "repo,total,active,source,kv_elements,window",
    REAL_CONFIGS,
    ids=[r[0].split("/")[1] for r in REAL_CONFIGS],
)
def test_real_config_gives_the_published_model(repo, total, active, source, kv_elements, window):
    spec = load_hf_config(CONFIGS / repo / "config.json")
    assert arch.parameter_count(spec) == pytest.approx(total, rel=0.005), source
    if active is not None:
        ours = (
            _active_without_input_embedding(spec)
            if spec.is_mla
            else arch.active_parameter_count(spec)
        )
        assert ours == pytest.approx(active, rel=0.03), source
    assert arch.kv_elements_per_token(spec) == kv_elements
    assert (spec.sliding_window_tokens, spec.n_sliding_layers) == window
    assert spec.name == repo.split("/")[1]  # the folder; no _name_or_path in these files


def test_at_least_twelve_real_configs_are_checked():
    files = sorted(CONFIGS.glob("*/*/config.json"))
    assert len(files) >= 12
    assert {f"{p.parent.parent.name}/{p.parent.name}" for p in files} == {
        r[0] for r in REAL_CONFIGS
    }


def test_gemma2_ties_embeddings_by_default():
    """No tie_word_embeddings key in gemma-2-9b-it: tied (9.24B), not 10.16B."""
    cfg = _config("google/gemma-2-9b-it")
    assert "tie_word_embeddings" not in cfg
    spec = spec_from_hf_config(cfg)
    assert spec.tie_word_embeddings
    untied = arch.parameter_count(spec.model_copy(update={"tie_word_embeddings": False}))
    assert untied == pytest.approx(10.16e9, rel=1e-3)  # what the old default gave


def test_catalog_entries_match_their_configs():
    pairs = [
        ("google/gemma-2-9b-it", "gemma-2-9b"),
        ("mistralai/Mistral-7B-v0.1", "mistral-7b-v0.1"),
        ("microsoft/Phi-3-mini-4k-instruct", "phi-3-mini-4k"),
        ("bigcode/starcoder2-7b", "starcoder2-7b"),
        ("deepseek-ai/DeepSeek-V3", "deepseek-v3"),
        ("deepseek-ai/DeepSeek-V2-Lite-Chat", "deepseek-v2-lite"),
    ]
    for repo, name in pairs:
        ours = load_hf_config(CONFIGS / repo / "config.json")
        catalog = get_model(name)
        skip = {"name", "aliases", "source", "family"}
        for field in set(type(catalog).model_fields) - skip:
            assert getattr(ours, field) == getattr(catalog, field), (repo, field)


def test_gemma3_layer_types_and_pattern_agree():
    """Gemma-3: every 6th layer global; ``layer_types`` (newer files) says the same."""
    cfg = _config("google/gemma-3-1b-it")
    types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(26)]
    listed = {k: v for k, v in cfg.items() if k != "sliding_window_pattern"}
    spec = spec_from_hf_config({**listed, "layer_types": types})
    assert spec.n_sliding_layers == 22 == spec_from_hf_config(cfg).n_sliding_layers
    with pytest.raises(ValueError):
        spec_from_hf_config({**cfg, "layer_types": types[:-1]})


def test_qwen_sliding_window_needs_use_sliding_window():
    cfg = _config("Qwen/Qwen2.5-7B-Instruct")
    assert spec_from_hf_config(cfg).n_sliding_layers == 0  # use_sliding_window false
    on = spec_from_hf_config({**cfg, "use_sliding_window": True, "max_window_layers": 20,
                              "sliding_window": 4096})
    assert (on.sliding_window_tokens, on.n_sliding_layers) == (4096, 28 - 20)


def test_mla_kv_cache_is_the_latent():
    """DeepSeek-V3: 61 * (512 + 64) elements per token, 25x less than heads x head_dim x 2."""
    spec = load_hf_config(CONFIGS / "deepseek-ai/DeepSeek-V3" / "config.json")
    assert spec.is_mla and spec.head_dim == 192 and spec.n_dense_layers == 3
    assert arch.kv_elements_per_token(spec) == 61 * 576
    naive = 2 * 61 * 128 * (7168 // 128)  # what head counts and hidden/heads gave before
    assert naive / arch.kv_elements_per_token(spec) == pytest.approx(24.9, rel=0.01)
    c1 = pass_coefficients(make_profile(), spec, tp=1)
    c8 = pass_coefficients(make_profile(), spec, tp=8)
    assert c1.kv_bytes_per_token == 61 * 576 * 2 == c8.kv_bytes_per_token  # latent replicated
    assert c8.attention_flops_per_pair == c1.attention_flops_per_pair / 8
    assert c1.attention_flops_per_pair == 2 * 61 * 128 * (2 * 512 + 64)


def test_deepseek_moe_layout_by_hand():
    """V2-Lite: layer 0 dense (3*H*10944), 26 MoE layers of 64 routed + 2 shared experts."""
    spec = load_hf_config(CONFIGS / "deepseek-ai/DeepSeek-V2-Lite-Chat" / "config.json")
    h, e = 2048, 3 * 2048 * 1408
    attn = h * 16 * 192 + h * 576 + 512 + 512 * 16 * 256 + 16 * 128 * h
    total = 27 * (attn + 2 * h) + 3 * h * 10944 + 26 * (h * 64 + 66 * e) + 2 * 102400 * h + h
    assert arch.parameter_count(spec) == total
    assert arch.active_parameter_count(spec) == total - 26 * (64 - 6) * e


# --- names ------------------------------------------------------------------------------


def test_name_comes_from_name_or_path():
    spec = load_hf_config(CONFIGS / "microsoft/Phi-3-mini-4k-instruct" / "config.json")
    assert spec.name == "Phi-3-mini-4k-instruct"


def test_hf_cache_folder_gives_the_repo_not_the_commit_sha(tmp_path):
    sha = "0e9e39f249a16976918f6564b8830bc894c89659"
    snap = tmp_path / "models--meta-llama--Llama-3.1-8B-Instruct" / "snapshots" / sha
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(
        json.dumps(_config("meta-llama/Llama-3.1-8B-Instruct")), encoding="utf-8"
    )
    assert get_model(str(snap)).name == "meta-llama/Llama-3.1-8B-Instruct"
    bare = tmp_path / sha
    bare.mkdir()
    (bare / "config.json").write_text(json.dumps(_config("google/gemma-2-9b-it")))
    assert load_hf_config(bare / "config.json").name == "Gemma2ForCausalLM"


# --- sliding windows: KV size and attention cost by hand ---------------------------------


def _brute_pairs(new, cached, window, fraction):
    full = sum(cached + i for i in range(1, new + 1))
    slid = sum(min(cached + i, window) for i in range(1, new + 1))
    return (1 - fraction) * full + fraction * slid


@pytest.mark.parametrize("new,cached", [(1, 0), (5, 3), (10, 0), (7, 6), (3, 20), (12, 4)])
@pytest.mark.parametrize("window,fraction", [(8, 1.0), (8, 0.5), (100, 0.5)])
def test_windowed_pairs_and_reads_by_brute_force(new, cached, window, fraction):
    got = arch.windowed_causal_pairs(new, cached, window, fraction)
    assert float(got) == pytest.approx(_brute_pairs(new, cached, window, fraction), abs=1e-9)
    read = (1 - fraction) * cached + fraction * min(cached, window)
    assert float(arch.attended_tokens(cached, window, fraction)) == pytest.approx(read)
    assert arch.windowed_causal_pairs(new, cached, window, 0.0) == arch.causal_pairs(new, cached)


GEMMA2 = get_model("gemma-2-9b")  # 21 of 42 layers slide over 4096 tokens
MISTRAL = get_model("mistral-7b-v0.1")  # every layer slides over 4096 tokens
PROFILE = make_profile()


def _no_window(spec):
    return spec.model_copy(update={"sliding_window_tokens": None, "n_sliding_layers": 0})


def test_prefill_past_the_window_by_hand():
    c = pass_coefficients(PROFILE, GEMMA2)
    assert (c.attention_window_tokens, c.windowed_fraction) == (4096.0, 0.5)
    s, cached = 3000, 2000  # queries see 2001..5000 keys; sliding layers at most 4096
    pairs = sum(cached + i for i in range(1, s + 1))
    lost = sum(max(cached + i - 4096, 0) for i in range(1, s + 1))
    got = prefill_phase(c, 2, s, cached)
    hand = forward_pass(c, 2 * s, 2 * cached, 2 * (pairs - 0.5 * lost), sequences=2, prefill=True)
    assert got.energy_j == pytest.approx(float(hand.energy_j), rel=1e-12)
    assert got.time_s == pytest.approx(float(hand.time_s), rel=1e-12)
    full = prefill_phase(pass_coefficients(PROFILE, _no_window(GEMMA2)), 2, s, cached)
    assert got.energy_j < full.energy_j


@pytest.mark.parametrize("spec", [GEMMA2, MISTRAL], ids=["gemma-2-9b", "mistral-7b-v0.1"])
def test_decode_across_the_window_equals_the_step_by_step_sum(spec):
    """Context 3900 -> 4400: reads per sequence are min(C, 4096) in the sliding layers."""
    c = pass_coefficients(PROFILE, spec)
    phi = c.windowed_fraction
    prompt, lengths = 3900.0, [500, 300, 120]
    got = deterministic_decode(c, prompt, lengths)
    t = e = 0.0
    for step in range(1, max(lengths)):
        b = sum(1 for n in lengths if n - 1 >= step)
        ctx = prompt + step
        x = b * (ctx - phi * max(ctx - 4096, 0))
        cost = forward_pass(c, b, x, x)
        assert not cost.throttled
        t, e = t + float(cost.time_s), e + float(cost.energy_j)
    assert got.time_s == pytest.approx(t, rel=1e-9)
    assert got.energy_j == pytest.approx(e, rel=1e-9)
    full = deterministic_decode(pass_coefficients(PROFILE, _no_window(spec)), prompt, lengths)
    assert got.energy_j < full.energy_j


def test_a_window_longer_than_every_context_changes_nothing():
    c = pass_coefficients(PROFILE, GEMMA2)
    c_full = pass_coefficients(PROFILE, _no_window(GEMMA2))
    a = deterministic_decode(c, 500.0, [300, 200])
    b = deterministic_decode(c_full, 500.0, [300, 200])
    assert (a.time_s, a.energy_j) == (b.time_s, b.energy_j)
    assert prefill_phase(c, 4, 1000).energy_j == prefill_phase(c_full, 4, 1000).energy_j


@pytest.mark.parametrize("shared", [False, True])
def test_expected_decode_across_the_window_matches_the_full_grid(shared):
    c = pass_coefficients(PROFILE, GEMMA2)
    survival = parse_lengths("lognormal:median=600,sigma=0.6,max=3000").survival_steps()
    prompt, n, samples = 3800.0, 8, 4
    ref = reference_decode_totals(c, prompt, survival, n, samples, shared)
    assert not ref.power_limited
    cost, q_time = expected_decode(c, prompt, survival, n, samples, shared)
    # the window's kink is integrated on the Gauss nodes: well under 0.1 %
    assert cost.time_s == pytest.approx(ref.time_s, rel=1e-3)
    assert cost.energy_j == pytest.approx(ref.energy_j, rel=1e-3)
    assert q_time == pytest.approx(ref.query_time_s, rel=1e-3)
    full = reference_decode_totals(
        pass_coefficients(PROFILE, _no_window(GEMMA2)), prompt, survival, n, samples, shared
    )
    assert ref.time_s < full.time_s  # and the window makes a difference the test can see
    assert abs(cost.time_s - ref.time_s) < 0.2 * (full.time_s - ref.time_s)


def test_kv_memory_with_a_window_by_hand():
    """8 sequences of 6000 + 2000 tokens; Gemma-2's sliding half keeps 4096 each."""
    c = pass_coefficients(PROFILE, GEMMA2)
    per_token = 2 * 42 * 8 * 256 * 2  # bytes, all layers
    need = memory_needed_bytes(PROFILE, GEMMA2, c, 6000, 2000, 8, 1, False)
    c0 = pass_coefficients(PROFILE, _no_window(GEMMA2))
    need0 = memory_needed_bytes(PROFILE, _no_window(GEMMA2), c0, 6000, 2000, 8, 1, False)
    assert need0 - need == pytest.approx(8 * (8000 - 4096) * per_token / 2, rel=1e-12)
    assert np.isfinite(need)


def test_static_padded_and_steady_state_read_the_window():
    """Engine paths: long contexts cost less with Gemma-2's sliding half than without it."""
    from ttcsim.engines.steady import steady_state
    from ttcsim.simulator.batching import static_padded_expected

    c = pass_coefficients(PROFILE, GEMMA2)
    c0 = pass_coefficients(PROFILE, _no_window(GEMMA2))
    survival = parse_lengths("gamma:mean=800,shape=2").survival_steps()
    windowed, _ = static_padded_expected(c, 4000.0, survival, 4, 4)
    full, _ = static_padded_expected(c0, 4000.0, survival, 4, 4)
    assert windowed.energy_j < full.energy_j
    short, _ = static_padded_expected(c, 100.0, survival[:50], 4, 4)
    short0, _ = static_padded_expected(c0, 100.0, survival[:50], 4, 4)
    assert short.energy_j == short0.energy_j  # never past the window: identical
    kw = dict(prompt_tokens=6000, output_tokens=2000, running_batch=8)
    windowed = steady_state("h100", GEMMA2, "vllm", **kw)
    full = steady_state("h100", _no_window(GEMMA2), "vllm", **kw)
    assert windowed.energy_decode_per_request_j < full.energy_decode_per_request_j


def test_cli_predict_takes_a_hub_id():
    from click.testing import CliRunner

    from ttcsim.cli import main

    result = CliRunner().invoke(
        main, ["predict", "--model", "google/gemma-2-9b-it", "--prompt-tokens", "5000",
               "--output-tokens", "500"]
    )
    assert result.exit_code == 0, result.output
    assert "gemma-2-9b" in result.output
    bad = CliRunner().invoke(main, ["predict", "--model", "google/gemma-7-9b-it"])
    assert bad.exit_code == 2 and "did you mean" in bad.output
