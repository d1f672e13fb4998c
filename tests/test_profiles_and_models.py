"""Shipped data: hardware profiles and the model catalog load, resolve and validate.

Tier 1 checks the registries (names, aliases, errors) and the validation of a
profile file; tier 3 checks the transcribed figures against published ones:
the datasheet table in shared/ANCHORS.md and the parameter counts on the
models' cards.
"""

from __future__ import annotations

import copy
import json
import math
from importlib import resources
from pathlib import Path

import pytest
import yaml

from ttcsim.errors import TtcsimError, UnknownNameError
from ttcsim.hardware import get_profile, list_profiles, load_profile_file
from ttcsim.models import ModelSpec, get_model, list_models, load_hf_config, spec_from_hf_config
from ttcsim.simulator.defaults import default_parameters

PROFILE_DIR = Path(str(resources.files("ttcsim.hardware_profiles")))

EXPECTED_PROFILES = [
    "a100-sxm-40gb",
    "a100-sxm-80gb",
    "a100-pcie-80gb",
    "h100-sxm-80gb",
    "h100-pcie-80gb",
    "h100-nvl-94gb",
    "h200-sxm-141gb",
    "l4",
    "l40s",
    "b200",
    "mi300x",
]
PROFILE_ALIASES = {"a100": "a100-sxm-80gb", "h100": "h100-sxm-80gb", "h200": "h200-sxm-141gb"}

EXPECTED_MODELS = [
    "llama-3.2-1b",
    "llama-3.2-3b",
    "llama-3.1-8b",
    "llama-3.1-70b",
    "llama-3.1-405b",
    "qwen2.5-0.5b",
    "qwen2.5-1.5b",
    "qwen2.5-3b",
    "qwen2.5-7b",
    "qwen2.5-14b",
    "qwen2.5-32b",
    "qwen2.5-72b",
    "qwen3-0.6b",
    "qwen3-1.7b",
    "qwen3-4b",
    "qwen3-8b",
    "qwen3-14b",
    "qwen3-32b",
    "qwen3-30b-a3b",
    "qwen3-235b-a22b",
    "deepseek-r1-distill-qwen-1.5b",
    "deepseek-r1-distill-qwen-7b",
    "deepseek-r1-distill-qwen-14b",
    "deepseek-r1-distill-qwen-32b",
    "deepseek-r1-distill-llama-8b",
    "deepseek-r1-distill-llama-70b",
    "mixtral-8x7b",
]
MODEL_ALIASES = {
    "1b": "llama-3.2-1b",
    "3b": "llama-3.2-3b",
    "8b": "llama-3.1-8b",
    "70b": "llama-3.1-70b",
    "405b": "llama-3.1-405b",
}

ARCHITECTURE_FIELDS = [
    "family",
    "n_layers",
    "hidden_size",
    "n_heads",
    "n_kv_heads",
    "head_dim",
    "intermediate_size",
    "vocab_size",
    "tie_word_embeddings",
    "attention_bias",
    "n_experts",
    "n_active_experts",
    "moe_intermediate_size",
    "n_shared_experts",
    "max_context_tokens",
]

# Copies of the published config.json files (meta-llama/Llama-3.1-8B,
# Qwen/Qwen2.5-7B-Instruct, Qwen/Qwen3-30B-A3B on the Hugging Face Hub).
LLAMA_31_8B_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0",
    "use_cache": True,
    "vocab_size": 128256,
}
QWEN25_7B_INSTRUCT_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "max_position_embeddings": 32768,
    "max_window_layers": 28,
    "model_type": "qwen2",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 131072,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.43.1",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 152064,
}
QWEN3_30B_A3B_CONFIG = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "decoder_sparse_step": 1,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 6144,
    "max_position_embeddings": 40960,
    "max_window_layers": 48,
    "mlp_only_layers": [],
    "model_type": "qwen3_moe",
    "moe_intermediate_size": 768,
    "norm_topk_prob": True,
    "num_attention_heads": 32,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 48,
    "num_key_value_heads": 4,
    "output_router_logits": False,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.001,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}

# shared/ANCHORS.md datasheet table (dense, no sparsity): memory [GB, binary],
# HBM bandwidth [TB/s], BF16 and FP8 peaks [TFLOP/s] (None: no FP8), power limit [W].
ANCHOR_DATASHEETS = {
    "a100-sxm-40gb": (40, 1.555, 312, None, 400),
    "a100-sxm-80gb": (80, 2.039, 312, None, 400),
    "a100-pcie-80gb": (80, 1.935, 312, None, 300),
    "h100-sxm-80gb": (80, 3.35, 989, 1979, 700),
    "h100-pcie-80gb": (80, 2.0, 756, 1513, 350),
    "h100-nvl-94gb": (94, 3.9, 835, 1671, 400),
    "h200-sxm-141gb": (141, 4.8, 989, 1979, 700),
    "l40s": (48, 0.864, 362, 733, 350),
    "l4": (24, 0.3, 121, 242, 72),
    "b200": (180, 7.7, 2250, 4500, 1000),
    "mi300x": (192, 5.3, 1307, 2615, 750),
}


# --- hardware profiles ---------------------------------------------------------


def test_every_expected_profile_ships():
    assert set(EXPECTED_PROFILES) <= set(list_profiles())


@pytest.mark.parametrize("name", list_profiles())
def test_shipped_profile_loads_and_file_name_is_its_name(name):
    path = PROFILE_DIR / f"{name}.yaml"
    profile = load_profile_file(path)
    assert profile.name == path.stem == name
    assert get_profile(name) == profile


@pytest.mark.parametrize("alias,target", sorted(PROFILE_ALIASES.items()))
def test_profile_aliases_resolve(alias, target):
    assert get_profile(alias).name == target
    assert get_profile(alias.upper()).name == target


def test_profile_aliases_are_unique_and_not_profile_names():
    aliases = [a for n in list_profiles() for a in get_profile(n).aliases]
    assert len(aliases) == len(set(aliases))
    assert not set(aliases) & set(list_profiles())


def test_unknown_profile_lists_valid_names():
    with pytest.raises(UnknownNameError) as err:
        get_profile("h900")
    assert "h100-sxm-80gb" in err.value.valid
    assert "h100" in err.value.valid
    assert "h100-sxm-80gb" in str(err.value)


@pytest.mark.parametrize("name", list_profiles())
def test_profile_sources_cover_exactly_the_datasheet(name):
    profile = get_profile(name)
    ds = profile.datasheet
    keys = {
        "memory_capacity_bytes",
        "hbm_bandwidth_bytes_per_s",
        "power_limit_w",
        "interconnect_bandwidth_bytes_per_s",
    } | {f"peak_flops_per_s.{d}" for d in ds.peak_flops_per_s}
    if ds.min_power_limit_w is not None:
        keys.add("min_power_limit_w")
    sources = profile.provenance.datasheet_sources
    assert set(sources) == keys
    assert all(len(text) > 10 for text in sources.values())


@pytest.mark.parametrize("name", list_profiles())
def test_datasheet_default_parameters_follow_the_rule(name):
    """Shipped defaults equal default_parameters(datasheet, idle) to 4 significant digits."""
    profile = get_profile(name)
    if profile.provenance.parameters.status != "datasheet-default":
        pytest.skip(profile.provenance.parameters.status)
    info = profile.provenance.parameters
    assert info.method.startswith("ttcsim.simulator.defaults rule; idle power from ")
    expected = default_parameters(profile.datasheet, profile.parameters.idle_power_w)
    for field, value in expected.model_dump().items():
        shipped = getattr(profile.parameters, field)
        assert math.isclose(shipped, value, rel_tol=1e-3), (
            f"{name}.{field}: shipped {shipped} != rule {value}; "
            "rerun tools/make_default_profiles.py"
        )


@pytest.mark.parametrize("name", list_profiles())
def test_idle_power_is_a_plausible_fraction_of_the_limit(name):
    profile = get_profile(name)
    ratio = profile.parameters.idle_power_w / profile.datasheet.power_limit_w
    assert 0.05 <= ratio <= 0.3


@pytest.mark.parametrize("name", sorted(ANCHOR_DATASHEETS))
def test_datasheet_matches_the_anchor_table(name):
    memory_gb, bandwidth_tbs, bf16_tflops, fp8_tflops, limit_w = ANCHOR_DATASHEETS[name]
    ds = get_profile(name).datasheet
    assert ds.memory_capacity_bytes == memory_gb * 2**30
    assert ds.hbm_bandwidth_bytes_per_s == pytest.approx(bandwidth_tbs * 1e12, rel=1e-3)
    assert ds.peak_flops_per_s["bf16"] == pytest.approx(bf16_tflops * 1e12, rel=5e-3)
    if fp8_tflops is None:
        assert "fp8" not in ds.peak_flops_per_s
    else:
        assert ds.peak_flops_per_s["fp8"] == pytest.approx(fp8_tflops * 1e12, rel=5e-3)
    assert ds.power_limit_w == limit_w
    # dense tensor-core peaks keep their usual ratios
    assert ds.peak_flops_per_s["fp16"] == ds.peak_flops_per_s["bf16"]
    assert ds.peak_flops_per_s["tf32"] == pytest.approx(ds.peak_flops_per_s["bf16"] / 2, rel=0.03)
    assert ds.peak_flops_per_s["fp32"] < ds.peak_flops_per_s["tf32"]


def _profile_dict() -> dict:
    return yaml.safe_load((PROFILE_DIR / "h100-sxm-80gb.yaml").read_text(encoding="utf-8"))


def _write(tmp_path: Path, data: dict, name: str = "custom-gpu.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def test_copied_profile_loads_from_a_user_path(tmp_path):
    path = _write(tmp_path, _profile_dict())
    assert load_profile_file(path).name == "h100-sxm-80gb"
    assert get_profile(str(path)).name == "h100-sxm-80gb"


def _negative_bandwidth(d):
    d["datasheet"]["hbm_bandwidth_bytes_per_s"] = -3.35e12


def _idle_at_limit(d):
    d["parameters"]["idle_power_w"] = d["datasheet"]["power_limit_w"]


def _idle_above_limit(d):
    d["parameters"]["idle_power_w"] = d["datasheet"]["power_limit_w"] + 100.0


def _unknown_key(d):
    d["datasheet"]["turbo_boost"] = True


def _missing_source(d):
    del d["provenance"]["datasheet_sources"]["peak_flops_per_s.fp8"]


def _unknown_dtype(d):
    d["datasheet"]["peak_flops_per_s"]["fp4"] = 4e15


def _efficiency_above_one(d):
    d["parameters"]["gemm_efficiency"] = 1.2


@pytest.mark.parametrize(
    "mutate,mentions",
    [
        (_negative_bandwidth, "hbm_bandwidth_bytes_per_s"),
        (_idle_at_limit, "idle_power_w"),
        (_idle_above_limit, "idle_power_w"),
        (_unknown_key, "turbo_boost"),
        (_missing_source, "peak_flops_per_s.fp8"),
        (_unknown_dtype, "fp4"),
        (_efficiency_above_one, "gemm_efficiency"),
    ],
)
def test_bad_profile_values_are_rejected(tmp_path, mutate, mentions):
    data = copy.deepcopy(_profile_dict())
    mutate(data)
    path = _write(tmp_path, data)
    with pytest.raises(TtcsimError) as err:
        load_profile_file(path)
    assert str(path) in str(err.value)
    assert mentions in str(err.value)


def test_invalid_profile_yaml_is_a_ttcsim_error(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\ndatasheet: [unclosed\n", encoding="utf-8")
    with pytest.raises(TtcsimError):
        load_profile_file(path)


# --- model catalog -------------------------------------------------------------


def test_catalog_holds_the_expected_models():
    names = [m.name for m in list_models()]
    assert len(names) == len(set(names))
    assert set(EXPECTED_MODELS) <= set(names)


@pytest.mark.parametrize("name", EXPECTED_MODELS)
def test_catalog_model_loads_with_a_source(name):
    spec = get_model(name)
    assert isinstance(spec, ModelSpec)
    assert spec.name == name
    assert "config.json" in spec.source


@pytest.mark.parametrize("alias,target", sorted(MODEL_ALIASES.items()))
def test_model_aliases_resolve(alias, target):
    assert get_model(alias).name == target
    assert get_model(alias.upper()).name == target


def test_unknown_model_lists_valid_names():
    with pytest.raises(UnknownNameError) as err:
        get_model("llama-9b")
    assert "llama-3.1-8b" in err.value.valid
    assert "8b" in err.value.valid
    assert "qwen3-30b-a3b" in str(err.value)


@pytest.mark.parametrize(
    "name",
    [n for n in EXPECTED_MODELS if n.startswith(("qwen2.5", "deepseek-r1-distill-qwen"))],
)
def test_qwen2_architecture_has_qkv_bias(name):
    spec = get_model(name)
    assert spec.attention_bias
    assert spec.family == "qwen2"


@pytest.mark.parametrize("name", [n for n in EXPECTED_MODELS if n.startswith("qwen3")])
def test_qwen3_head_dim_is_128(name):
    assert get_model(name).head_dim == 128


def test_qwen3_head_dim_is_independent_of_hidden_over_heads():
    spec = get_model("qwen3-0.6b")
    assert spec.n_heads * spec.head_dim == 2048 != spec.hidden_size == 1024


@pytest.mark.parametrize(
    "name,tied",
    [
        ("llama-3.2-1b", True),
        ("llama-3.2-3b", True),
        ("llama-3.1-8b", False),
        ("qwen2.5-0.5b", True),
        ("qwen2.5-1.5b", True),
        ("qwen2.5-3b", True),
        ("qwen2.5-7b", False),
        ("qwen3-0.6b", True),
        ("qwen3-1.7b", True),
        ("qwen3-4b", True),
        ("qwen3-8b", False),
        ("deepseek-r1-distill-qwen-1.5b", False),
        ("mixtral-8x7b", False),
    ],
)
def test_tied_embeddings_follow_the_configs(name, tied):
    assert get_model(name).tie_word_embeddings is tied


@pytest.mark.parametrize(
    "name,experts,active,expert_width",
    [
        ("qwen3-30b-a3b", 128, 8, 768),
        ("qwen3-235b-a22b", 128, 8, 1536),
        ("mixtral-8x7b", 8, 2, 14336),
    ],
)
def test_moe_fields(name, experts, active, expert_width):
    spec = get_model(name)
    assert spec.is_moe
    assert (spec.n_experts, spec.n_active_experts) == (experts, active)
    assert spec.expert_intermediate_size == expert_width


@pytest.mark.parametrize(
    "config,catalog_name",
    [
        (LLAMA_31_8B_CONFIG, "llama-3.1-8b"),
        (QWEN25_7B_INSTRUCT_CONFIG, "qwen2.5-7b"),
        (QWEN3_30B_A3B_CONFIG, "qwen3-30b-a3b"),
    ],
)
def test_hf_config_reproduces_the_catalog_entry(config, catalog_name):
    from_config = spec_from_hf_config(config, name=catalog_name)
    catalog = get_model(catalog_name)
    for field in ARCHITECTURE_FIELDS:
        assert getattr(from_config, field) == getattr(catalog, field), field


def test_load_hf_config_reads_a_file_and_a_directory(tmp_path):
    model_dir = tmp_path / "Llama-3.1-8B"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(LLAMA_31_8B_CONFIG), encoding="utf-8")
    catalog = get_model("llama-3.1-8b")
    for spec in (load_hf_config(model_dir / "config.json"), get_model(str(model_dir))):
        assert spec.name == "Llama-3.1-8B"
        for field in ARCHITECTURE_FIELDS:
            assert getattr(spec, field) == getattr(catalog, field), field


@pytest.mark.parametrize(
    "text",
    [
        '{"hidden_size": 4096, "num_hidden_layers": ',  # truncated JSON
        "[1, 2, 3]",  # not an object
        json.dumps({k: v for k, v in LLAMA_31_8B_CONFIG.items() if k != "hidden_size"}),
        json.dumps({**LLAMA_31_8B_CONFIG, "num_key_value_heads": 5}),  # 32 % 5 != 0
    ],
)
def test_malformed_hf_config_is_a_ttcsim_error(tmp_path, text):
    path = tmp_path / "config.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(TtcsimError) as err:
        load_hf_config(path)
    assert str(path) in str(err.value)


def test_missing_hf_config_is_a_ttcsim_error(tmp_path):
    with pytest.raises(TtcsimError):
        load_hf_config(tmp_path / "absent" / "config.json")


# --- parameter counts against the model cards (tier 3) --------------------------

# (catalog name, published total, published active or None, where it is published)
PUBLISHED_PARAMETERS = [
    ("llama-3.1-8b", 8.03e9, None, "meta-llama/Llama-3.1-8B model page: 8.03B params"),
    ("llama-3.1-70b", 70.6e9, None, "meta-llama/Llama-3.1-70B model page: 70.6B params"),
    ("llama-3.2-1b", 1.24e9, None, "meta-llama/Llama-3.2-1B model page: 1.24B params"),
    ("qwen2.5-7b", 7.62e9, None, "Qwen/Qwen2.5-7B-Instruct model card: 7.61B (page: 7.62B)"),
    (
        "qwen3-30b-a3b",
        30.5e9,
        3.3e9,
        "Qwen/Qwen3-30B-A3B model card: 30.5B in total and 3.3B activated",
    ),
    (
        "mixtral-8x7b",
        46.7e9,
        12.9e9,
        "Mistral AI, 'Mixtral of experts' (Dec 2023): 46.7B total, 12.9B per token",
    ),
    (
        "qwen3-235b-a22b",
        235e9,
        22e9,
        "Qwen/Qwen3-235B-A22B model card: 235B in total and 22B activated",
    ),
]


@pytest.mark.parametrize(
    "name,total,active,source", PUBLISHED_PARAMETERS, ids=[p[0] for p in PUBLISHED_PARAMETERS]
)
def test_parameter_count_matches_the_model_card(name, total, active, source):
    architecture = pytest.importorskip("ttcsim.simulator.architecture")
    spec = get_model(name)
    assert architecture.parameter_count(spec) == pytest.approx(total, rel=0.02), source
    expected_active = total if active is None else active
    active_count = architecture.active_parameter_count(spec)
    assert active_count == pytest.approx(expected_active, rel=0.02), source


def test_datasheet_profiles_are_what_the_generator_writes(capsys):
    """tools/make_default_profiles.py --check: uncalibrated YAMLs are up to date."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "make_default_profiles.py"
    spec = importlib.util.spec_from_file_location("make_default_profiles", path)
    module = importlib.util.module_from_spec(spec)
    import sys

    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    assert module.main(["--check"]) == 0, capsys.readouterr().out
    assert "kept" in capsys.readouterr().out  # the calibrated H100 is not regenerated


@pytest.mark.parametrize("name", list_profiles())
def test_transferred_parameters_follow_the_transfer_rule(name):
    """Shipped transferred profiles equal ttcsim.transfer's rule applied to their source."""
    from ttcsim.transfer import FAMILIES, transfer_parameters

    profile = get_profile(name)
    info = profile.provenance.parameters
    if info.status != "transferred":
        pytest.skip(info.status)
    source = get_profile(info.transfer.source_profile)
    assert source.calibrated
    idle = profile.parameters.idle_power_w
    published = "published" in info.transfer.parameters["idle_power_w"].rule
    expected, record = transfer_parameters(
        source, FAMILIES[source.name], profile.datasheet, FAMILIES[name],
        idle if published else None,
    )
    assert record.distance == info.transfer.distance
    for field, value in expected.model_dump().items():
        assert math.isclose(getattr(profile.parameters, field), value, rel_tol=1e-3), field
    assert info.band is not None and info.band.energy_ape > 0


def test_transfer_rule_hand_computed_h100_to_a100():
    """One parameter by hand: A100 HBM energy per byte from the calibrated H100.

    e_A100 = e_H100 * (0.5 * HBM2e/HBM3 + 0.5 * N7/4N) = e * (0.5 * 1.10 + 0.5 / 0.70);
    layer overhead = t_H100 * 1980 / 1410 MHz; idle = published 63 W.
    """
    from ttcsim.transfer import FAMILIES, transfer_parameters

    h100 = get_profile("h100")
    a100 = get_profile("a100-sxm-80gb")
    params, record = transfer_parameters(
        h100, FAMILIES["h100-sxm-80gb"], a100.datasheet, FAMILIES["a100-sxm-80gb"], 63.0
    )
    e = h100.parameters.hbm_energy_j_per_byte
    assert params.hbm_energy_j_per_byte == pytest.approx(e * (0.55 + 0.5 / 0.70), rel=1e-12)
    assert params.layer_overhead_s == pytest.approx(
        h100.parameters.layer_overhead_s * 1980 / 1410, rel=1e-12)
    assert params.compute_energy_j_per_flop == pytest.approx(
        h100.parameters.compute_energy_j_per_flop / 0.70, rel=1e-12)
    assert params.active_power_w == pytest.approx(h100.parameters.active_power_w * 400 / 700)
    assert params.idle_power_w == 63.0
    assert params.gemm_efficiency == h100.parameters.gemm_efficiency
    assert record.distance == "cross-generation"
    assert record.parameters["hbm_energy_j_per_byte"].source_value == e
