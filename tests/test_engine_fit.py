"""calibrate fit --fit engine|hardware|both: recovery, robustness, identifiability, CLI."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from ttcsim.calibration.engine_fit import feasible_hardware_values, fit_profiles
from ttcsim.calibration.records import RunRecord, read_runs
from ttcsim.calibration.validate import compare_run
from ttcsim.cli import main
from ttcsim.engines import get_engine, load_engine_file
from ttcsim.hardware import get_profile, load_profile_file

H200 = get_profile("h200")
TRUTH = get_engine("hf").with_settings({
    "host": {"step_s": 0.02, "per_layer_s": 3e-4, "gap_power_fraction": 0.3},
    "kernels": {"attention_decode_efficiency_scale": 0.4},
})
SHAPES = [("1b", 256, [512]), ("3b", 1024, [256]), ("8b", 512, [128] * 16), ("8b", 4096, [64]),
          ("qwen2.5-14b", 256, [300] * 4), ("qwen2.5-32b", 512, [100] * 32),
          ("8b", 128, [512] * 64)]


def synthetic(truth=TRUTH, hw=H200, shapes=SHAPES):
    runs = []
    for model, p, outs in shapes:
        strat = "single" if len(outs) == 1 else f"vote{len(outs)}"
        r = RunRecord(id=f"{model}-{p}-{len(outs)}", hw=hw.name, model=model, prompt_tokens=p,
                      strategy=strat, output_tokens=outs, energy_j=1.0, latency_s=1.0,
                      engine="hf-transformers")
        c = compare_run(r, hw, truth)
        runs.append(r.model_copy(update={"energy_j": c.energy_j_pred,
                                         "latency_s": c.latency_s_pred}))
    return runs


def test_fit_engine_recovers_known_parameters():
    _, eng, rep = fit_profiles(synthetic(), H200, get_engine("hf"), "engine")
    assert eng.status == "calibrated"
    assert eng.host.step_s == pytest.approx(0.02, rel=0.05)
    assert eng.host.per_layer_s == pytest.approx(3e-4, rel=0.05)
    assert eng.host.gap_power_fraction == pytest.approx(0.3, rel=0.1)
    assert rep.residuals_pct["energy_max_pct"] < 1.0
    assert rep.residuals_pct["latency_max_pct"] < 1.0


def test_fit_reports_and_holds_a_non_identifiable_pair():
    """One model at batch 1: per-step and per-layer host time are the same column."""
    shapes = [("8b", p, [n]) for p, n in ((128, 64), (512, 256), (2048, 128), (256, 512))]
    runs = synthetic(shapes=shapes)
    _, eng, rep = fit_profiles(runs, H200, get_engine("hf"), "engine",
                               ["host.step_s", "host.per_layer_s"])
    assert rep.correlated_pairs and {rep.correlated_pairs[0][0], rep.correlated_pairs[0][1]} == {
        "host.step_s", "host.per_layer_s"}
    assert len(rep.held_at_prior) == 1
    held = rep.held_at_prior[0]
    assert rep.parameters_after[held] == rep.parameters_before[held]
    assert eng.provenance.calibration.held_at_prior == [held]


@pytest.mark.parametrize("scale", [1e-6, 1e6])
def test_fit_never_raises_on_adversarial_records(scale):
    runs = [r.model_copy(update={"energy_j": r.energy_j * scale}) for r in synthetic()[:3]]
    runs.append(RunRecord(id="too-big", hw="h200", model="405b", prompt_tokens=100,
                          output_tokens=[10], energy_j=5.0, latency_s=1.0))
    for kind in ("engine", "hardware", "both"):
        hw, eng, rep = fit_profiles(runs, H200, get_engine("hf"), kind)
        assert "too-big" in rep.excluded_runs
        hw.checked()  # loads
        eng.model_validate(eng.model_dump())
        p = hw.parameters
        assert p.idle_power_w + p.active_power_w + p.hbm_energy_j_per_byte * \
            hw.datasheet.hbm_bandwidth_bytes_per_s < hw.datasheet.power_limit_w


def test_fit_with_nothing_predictable_returns_the_base():
    runs = [RunRecord(id="x", hw="h200", model="405b", prompt_tokens=100, output_tokens=[10],
                      energy_j=5.0, latency_s=1.0)]
    hw, eng, rep = fit_profiles(runs, H200, get_engine("hf"), "both")
    assert hw is H200 and eng is get_engine("hf") and rep.notes


def test_feasible_hardware_values_clip_memory_then_active_power():
    v = feasible_hardware_values(H200, {"active_power_w": 600.0, "hbm_energy_j_per_byte": 1e-9})
    p = H200.parameters
    assert p.idle_power_w + v["active_power_w"] + v["hbm_energy_j_per_byte"] * \
        H200.datasheet.hbm_bandwidth_bytes_per_s <= H200.datasheet.power_limit_w - 1.0 + 1e-9


def test_engine_fitted_on_one_gpu_runs_with_another():
    _, eng, _ = fit_profiles(synthetic(), H200, get_engine("hf"), "engine")
    from ttcsim.predict import predict

    assert predict(hw="a100", model="8b", engine=eng, percentiles=False).energy_j > 0


def test_cli_fit_engine_and_both_write_loadable_profiles(tmp_path):
    runs = tmp_path / "runs.jsonl"
    runs.write_text("\n".join(json.dumps(r.model_dump()) for r in synthetic()) + "\n")
    assert len(read_runs(runs)) == len(SHAPES)
    out = tmp_path / "hf.yaml"
    r = CliRunner().invoke(main, ["calibrate", "fit", "--runs", str(runs), "--fit", "engine",
                                  "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "condition number" in r.output
    assert load_engine_file(out).status == "calibrated"
    hw_out = tmp_path / "h200-fit.yaml"
    r = CliRunner().invoke(main, ["calibrate", "fit", "--runs", str(runs), "--fit", "both",
                                  "--out", str(hw_out)])
    assert r.exit_code == 0, r.output
    assert load_profile_file(hw_out).calibrated
    assert load_engine_file(tmp_path / "h200-fit.engine.yaml").status == "calibrated"
    r = CliRunner().invoke(main, ["validate", "--runs", str(runs), "--engine", str(out),
                                  "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert report["engine"] == "hf-transformers"
    assert report["summary"]["energy_ape_pct"]["max"] < 2.0


def test_validate_steady_state_record_reports_per_request_energy_and_tpot(tmp_path):
    rec = {"id": "chat/A100/llama/bs64", "hw": "a100-sxm-40gb", "model": "8b",
           "prompt_tokens": "lognormal:median=150,sigma=0.8,max=3000", "output_tokens": "300",
           "energy_j": 30.0, "tpot_s": 0.05, "measure": "steady-state", "running_batch": 63.5,
           "engine": {"name": "vllm", "version": "0.5.4", "max_num_seqs": 64,
                      "gpu_memory_utilization": 0.95}}
    path = tmp_path / "ss.jsonl"
    path.write_text(json.dumps(rec) + "\n")
    r = CliRunner().invoke(main, ["validate", "--runs", str(path), "--json"])
    assert r.exit_code == 0, r.output
    row = json.loads(r.output)["runs"][0]
    assert row["id"] == rec["id"] and row["measure"] == "steady-state"
    assert row["energy_j"] == 30.0 and row["energy_j_pred"] > 0
    assert row["tpot_s"] == 0.05 and row["tpot_s_pred"] > 0
    assert row["latency_s"] is None
    r = CliRunner().invoke(main, ["validate", "--runs", str(path)])
    assert r.exit_code == 0 and "TPOT" in r.output


def test_record_engine_with_extra_settings_key_and_top_level_max_num_seqs():
    from ttcsim.calibration.validate import record_engine

    r = RunRecord(hw="h200", model="8b", prompt_tokens=100, output_tokens=[10], energy_j=5.0,
                  latency_s=1.0, engine={"name": "hf-transformers", "batching": "static-padded"},
                  engine_settings={"attn_implementation": "sdpa"})
    assert record_engine(r).name == "hf-transformers"
    r = RunRecord(hw="a100", model="8b", prompt_tokens=100, output_tokens=[10], energy_j=5.0,
                  latency_s=1.0, engine="vllm", max_num_seqs=32)
    assert record_engine(r).batching.max_num_seqs == 32
    assert record_engine(r, "reference").batching.policy == "continuous"  # settings kept
