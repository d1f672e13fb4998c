"""Tier 4: the CLI is a thin, friendly layer (CliRunner, exit codes, JSON keys)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from ttcsim.cli import main
from ttcsim.hardware import load_profile_file

REQUIRED_JSON = {
    "energy_j", "energy_prefill_j", "energy_decode_j", "energy_score_j", "energy_dynamic_j",
    "latency_s", "ttft_s", "output_tokens", "j_per_output_token", "avg_power_w", "peak_power_w",
    "gpus", "hw", "model", "strategy",
}  # fmt: skip


def invoke(*args):
    return CliRunner().invoke(main, list(args))


def test_predict_readme_command_prints_breakdown():
    r = invoke("predict", "--hw", "h100", "--model", "8b", "--strategy", "vote5")
    assert r.exit_code == 0, r.output
    assert "energy per query" in r.output and "prefill" in r.output and "decode" in r.output


def test_predict_json_has_required_keys_and_matches_api():
    import ttcsim

    r = invoke(
        "predict",
        "--hw",
        "h100",
        "--model",
        "8b",
        "--strategy",
        "bon4",
        "--json",
        "--usd-per-kwh",
        "0.1",
        "--carbon-g-per-kwh",
        "400",
        "--pue",
        "1.2",
    )
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert REQUIRED_JSON <= set(data)
    api = ttcsim.predict(
        hw="h100", model="8b", strategy="bon4", pue=1.2, usd_per_kwh=0.1, carbon_g_per_kwh=400
    )
    assert data["energy_j"] == api.energy_j
    assert data["energy_facility_j"] == pytest.approx(1.2 * api.energy_j)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--hw", "h900"], "valid: "),
        (["--model", "gpt-9"], "llama-3.1-8b"),
        (["--strategy", "magic3"], "vote<N>"),
        (["--output-tokens", "lognormal:median=800"], "missing sigma="),
        (["--output-tokens", "-4"], "--output-tokens"),
        (["--model", "405b"], "try --tp"),
        (["--model", "/nonexistent/config.json"], "cannot read config"),
    ],
)
def test_predict_bad_input_one_line_exit_2(args, needle):
    r = invoke("predict", *args)
    assert r.exit_code == 2
    assert needle in r.output
    assert "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_broken_yaml_profile_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\n  indent: [broken\n")
    r = invoke("predict", "--hw", str(bad))
    assert r.exit_code == 2 and "invalid YAML" in r.output


def test_hw_and_models_and_strategies_listings():
    r = invoke("hw", "list")
    assert r.exit_code == 0 and "h100-sxm-80gb" in r.output and "mi300x" in r.output
    r = invoke("hw", "show", "h200")
    assert r.exit_code == 0 and "hbm_bandwidth_bytes_per_s" in r.output
    r = invoke("models", "list")
    assert r.exit_code == 0 and "qwen3-30b-a3b" in r.output
    r = invoke("strategies")
    assert r.exit_code == 0 and "vote<N>" in r.output and "E = " in r.output


def _synthetic_runs(tmp_path):
    import ttcsim

    rows = []
    for i, (model, strat, p, out) in enumerate(
        [
            ("1b", "single", 512, 300),
            ("8b", "vote4", 256, 200),
            ("3b", "bon2", 1024, 100),
            ("8b", "single", 4096, 64),
        ]
    ):
        r = ttcsim.predict(
            hw="h100", model=model, strategy=strat, prompt_tokens=p, output_tokens=out
        )
        n = int(strat[-1]) if strat[-1].isdigit() else 1
        rows.append(
            json.dumps(
                dict(
                    id=f"s{i}",
                    hw="NVIDIA H100 80GB HBM3",
                    model=model,
                    strategy=strat,
                    prompt_tokens=p,
                    concurrent_queries=1,
                    output_tokens=[out] * n,
                    energy_j=r.energy_j * 1.1,
                    latency_s=r.batch_latency_s * 0.95,
                )
            )
        )
    path = tmp_path / "runs.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


def test_validate_json_and_table(tmp_path):
    runs = _synthetic_runs(tmp_path)
    r = invoke("validate", "--runs", str(runs), "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["hw"] == "h100-sxm-80gb"  # matched from the NVML name
    assert {"id", "energy_j", "energy_j_pred", "latency_s", "latency_s_pred"} <= set(
        data["runs"][0]
    )
    assert data["summary"]["energy_ape_pct"]["median"] == pytest.approx(100 / 11, rel=1e-6)
    r = invoke("validate", "--runs", str(runs))
    assert r.exit_code == 0 and "median" in r.output


def test_calibrate_fit_writes_valid_profile_and_refuses_overwrite(tmp_path):
    runs = _synthetic_runs(tmp_path)
    out = tmp_path / "fitted.yaml"
    r = invoke("calibrate", "fit", "--runs", str(runs), "--base", "h100", "--out", str(out))
    assert r.exit_code == 0, r.output
    prof = load_profile_file(out)
    assert prof.calibrated
    r = invoke("validate", "--runs", str(runs), "--hw", str(out), "--json")
    assert json.loads(r.output)["summary"]["energy_ape_pct"]["median"] < 2.0
    r = invoke("calibrate", "fit", "--runs", str(runs), "--base", "h100", "--out", str(out))
    assert r.exit_code == 2 and "--force" in r.output


def test_calibrate_run_without_gpu_is_a_clear_message(tmp_path, monkeypatch):
    import ttcsim.gpu as gpu

    monkeypatch.setattr(gpu, "gpu_status", lambda: (False, "no NVIDIA GPU: test"))
    r = invoke("calibrate", "run", "--out", str(tmp_path / "p.yaml"))
    assert r.exit_code == 2
    assert "GPU" in r.output and "Traceback" not in r.output


def test_percentiles_off_skips_the_draws():
    lognormal = "--output-tokens=lognormal:median=300,sigma=0.6,max=2048"
    on = invoke("predict", "--model=1b", "--strategy=vote4", lognormal, "--json")
    off = invoke("predict", "--model=1b", "--strategy=vote4", lognormal, "--json",
              "--percentiles", "off")
    assert on.exit_code == 0 and off.exit_code == 0, off.output
    a, b = json.loads(on.output), json.loads(off.output)
    assert a["energy_j_p90"] is not None and a["percentile_draws"] == 2000
    assert b["energy_j_p90"] is None and b["percentile_draws"] is None
    assert a["energy_j"] == b["energy_j"]  # the exact mean does not use the draws
    table = invoke("predict", "--model=1b", lognormal, "--percentiles=off")
    assert "p50" not in table.output
    m = invoke("metrics", "--model=1b", "--strategy=single", "--strategy=vote4", lognormal,
               "--json", "--percentiles=off")
    assert m.exit_code == 0, m.output
    assert all(r["energy_j_p50"] is None for r in json.loads(m.output))
    bad = invoke("predict", "--percentiles=maybe")
    assert bad.exit_code == 2 and "--percentiles" in bad.output


def test_default_percentile_draws_shrink_for_heavy_batches():
    from ttcsim.predict import DEFAULT_DRAWS, PERCENTILE_WORK, predict

    lengths = "lognormal:median=300,sigma=0.6,max=2048"
    light = predict(model="1b", strategy="vote4", output_tokens=lengths)
    heavy = predict(model="1b", strategy="vote4", output_tokens=lengths, concurrency=64)
    assert light.percentile_draws == DEFAULT_DRAWS
    assert heavy.percentile_draws == PERCENTILE_WORK // (64 * 4)
    explicit = predict(model="1b", strategy="vote4", output_tokens=lengths, concurrency=64,
                       draws=300)
    assert explicit.percentile_draws == 300
