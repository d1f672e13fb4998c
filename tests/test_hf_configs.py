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
