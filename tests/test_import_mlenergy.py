"""The ML.ENERGY importer: tree layouts, record fields, skips, the CLI.

Data: seven ML.ENERGY Leaderboard v2 result files (ml-energy/benchmark,
commit b10121d5, Apache-2.0) in ``tests/data/mlenergy`` with the upstream layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from ttcsim.calibration.records import read_runs
from ttcsim.cli import main
from ttcsim.errors import TtcsimError
from ttcsim.importers import mlenergy as ml

ROOT = Path(__file__).parent / "data" / "mlenergy"
TREE = ROOT / "data" / "llm_text_generation"
LLAMA8_BS64 = "chat/A100-SXM4-40GB/meta-llama/Meta-Llama-3.1-8B-Instruct/bs64+tp1+pp1"


def _by_id(result):
    return {r["id"]: r for r in result.records}


@pytest.mark.parametrize("path", [ROOT, ROOT / "data", TREE])
def test_every_layout_finds_the_same_tree(path):
    assert ml.find_tree(path) == TREE
    result = ml.import_tree(path)
    assert LLAMA8_BS64 in _by_id(result)


def test_not_a_tree_is_a_one_line_error(tmp_path):
    with pytest.raises(TtcsimError, match="no ML.ENERGY result tree"):
        ml.find_tree(tmp_path)
    with pytest.raises(TtcsimError, match="not a folder"):
        ml.find_tree(tmp_path / "missing")


def test_record_fields_come_from_the_file_and_the_benchmark_settings():
    r = _by_id(ml.import_tree(ROOT))[LLAMA8_BS64]
    src = json.loads((TREE / f"{LLAMA8_BS64}.json").read_text())
    assert r["hw"] == "a100-sxm-40gb"
    assert r["model"] == "llama-3.1-8b"
    assert (r["tp"], r["max_num_seqs"]) == (1, 64)
    assert r["engine"]["name"] == "vllm" and r["engine"]["max_num_seqs"] == 64
    assert r["engine"]["gpu_memory_utilization"] == 0.95
    assert r["engine"]["chunked_prefill"] is False and r["engine"]["prefix_caching"] is False
    assert r["measure"] == "steady-state"
    assert r["energy_j"] == src["Energy/req (J)"]
    assert r["tpot_reported_s"] == src["Avg TPOT (s)"]
    assert r["output_tokens_mean"] == src["Avg Output Tokens"]
    assert r["running_batch"] == src["Avg BS (reqs)"]
    assert r["max_output_tokens"] == 1024
    # steady TPOT = B L / ((L - 1) tput), by hand for this file
    b, n, x = src["Avg BS (reqs)"], src["Avg Output Tokens"], src["Token tput (tok/s)"]
    assert r["tpot_s"] == pytest.approx(b * n / ((n - 1) * x), rel=1e-12)
    assert r["tpot_s"] == pytest.approx(src["Avg TPOT (s)"], rel=0.03)  # few finish per step


def test_output_spec_has_the_measured_mean_and_the_cap():
    from ttcsim.distributions import as_distribution, parse_lengths

    for mean, cap in ((481.347, 1024), (63.4, 512), (1000.0, 1024)):
        spec = ml.output_length_spec(mean, cap)
        d = as_distribution(parse_lengths(spec, "x"))
        assert d.mean() == pytest.approx(mean, abs=0.05)
        assert d.upper_bound() <= cap and f"max={cap}" in spec


def test_prompt_lengths_are_characters_over_the_stated_ratio():
    chars = ml.read_prompt_chars()["chat"]
    assert len(chars) == 500 and len(ml.read_prompt_chars()["code"]) == 164
    r4 = _by_id(ml.import_tree(ROOT))[LLAMA8_BS64]
    r2 = _by_id(ml.import_tree(ROOT, {"chat": 2.0}))[LLAMA8_BS64]
    tokens4 = [int(x) for x in r4["prompt_tokens"].split(",")]
    # user text + 112-character system prompt over 4 chars/token, + 12 template tokens
    assert tokens4 == [max(1, round((c + 112) / 4.0) + 12) for c in chars]
    assert r4["prompt_tokens_mean"] == pytest.approx(sum(tokens4) / 500)
    assert r2["prompt_tokens_mean"] - 12 == pytest.approx(
        2 * (r4["prompt_tokens_mean"] - 12), rel=0.01)
    assert r4["chars_per_token"] == 4.0 and r2["chars_per_token"] == 2.0


def test_code_task_uses_its_own_ratio_and_cap():
    code = [r for r in ml.import_tree(ROOT).records if r["task"] == "code"]
    assert {r["model"] for r in code} == {"starcoder2-3b", "codellama-7b"}
    assert all(r["chars_per_token"] == 2.5 and r["max_output_tokens"] == 512 for r in code)
    tokens = [int(x) for x in code[0]["prompt_tokens"].split(",")]
    assert tokens == [max(1, round(c / 2.5) + 1) for c in ml.read_prompt_chars()["code"]]


def test_pipeline_parallel_results_are_skipped_with_a_reason():
    result = ml.import_tree(ROOT)
    skipped = dict(result.skipped)
    pp2 = "chat/A100-SXM4-40GB/mistralai/Mixtral-8x22B-Instruct-v0.1/bs128+tp8+pp2"
    assert "pipeline parallelism" in skipped[pp2]
    assert pp2 not in _by_id(result)


def test_unknown_gpu_and_broken_files_are_skipped(tmp_path):
    good = json.loads((TREE / f"{LLAMA8_BS64}.json").read_text())
    d = tmp_path / "chat" / "Some GPU" / "org" / "m"
    d.mkdir(parents=True)
    (d / "bs64+tp1+pp1.json").write_text(json.dumps({**good, "GPU": "Acme X1"}))
    (d / "bs32+tp1+pp1.json").write_text("{not json")
    (d / "bs16+tp1+pp1.json").write_text(json.dumps({**good, "Energy/req (J)": -1}))
    (d / "notes.json").write_text("{}")  # not a result name: ignored
    result = ml.import_tree(tmp_path)
    reasons = dict(result.skipped)
    assert not result.records
    assert "no hardware profile for GPU 'Acme X1'" in reasons["chat/Some GPU/org/m/bs64+tp1+pp1"]
    assert "not a result file" in reasons["chat/Some GPU/org/m/bs32+tp1+pp1"]
    assert "Energy/req (J) must be a positive number" in reasons["chat/Some GPU/org/m/bs16+tp1+pp1"]
    assert len(reasons) == 3


def test_gpu_names_map_to_profiles():
    assert ml.gpu_profile("NVIDIA A100-SXM4-40GB") == "a100-sxm-40gb"
    assert ml.gpu_profile("H100 80GB HBM3") == "h100-sxm-80gb"
    assert ml.gpu_profile("NVIDIA H200") == "h200-sxm-141gb"
    assert ml.gpu_profile("Voodoo 3") is None


def test_cli_writes_records_that_read_back(tmp_path):
    out = tmp_path / "runs.jsonl"
    res = CliRunner().invoke(main, ["import", "mlenergy", str(ROOT), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "skipped" in res.output and "pp=2" in res.output
    runs = read_runs(out)
    assert LLAMA8_BS64 in {r.id for r in runs}
    again = CliRunner().invoke(main, ["import", "mlenergy", str(ROOT), "--out", str(out)])
    assert again.exit_code == 2 and "--force" in again.output
    bad = CliRunner().invoke(main, ["import", "mlenergy", str(ROOT), "--out", str(out),
                                    "--force", "--chars-per-token-code", "-1"])
    assert bad.exit_code == 2 and "--chars-per-token-code" in bad.output
