"""Calibration fits recover known parameters from synthetic measurements."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_profile

from ttcsim.calibration.fit import fit_runs, fit_windows
from ttcsim.calibration.records import RunRecord
from ttcsim.calibration.validate import compare_run

TRUE = dict(
    idle_power_w=72.0,
    active_power_w=110.0,
    hbm_energy_j_per_byte=7.0e-11,
    compute_energy_j_per_flop=4.5e-13,
    weight_stream_efficiency=0.88,
    attention_decode_efficiency=0.55,
    gemm_efficiency=0.72,
    attention_prefill_efficiency=0.45,
    layer_overhead_s=9e-6,
    step_overhead_s=3e-4,
)

SHAPES = [
    ("llama-3.2-1b", "single", 512, 1, [300]),
    ("llama-3.1-8b", "single", 2048, 1, [200]),
    ("llama-3.1-8b", "vote8", 512, 1, [120, 150, 180, 200, 220, 260, 300, 400]),
    ("llama-3.1-8b", "single", 256, 64, [128] * 64),
    ("qwen2.5-7b", "bon4", 1024, 1, [100, 200, 300, 400]),
    ("llama-3.2-3b", "vote16", 8000, 1, [64] * 16),
    ("qwen3-14b", "single", 4096, 8, [256] * 8),
    ("llama-3.2-1b", "vote4", 128, 32, [200] * 128),
    ("qwen2.5-1.5b", "single", 16000, 1, [32]),
]


def synth_runs(profile):
    runs = []
    for i, (model, strat, p, q, lens) in enumerate(SHAPES):
        proto = RunRecord(
            id=f"r{i}",
            hw=profile.name,
            model=model,
            prompt_tokens=p,
            concurrent_queries=q,
            strategy=strat,
            output_tokens=lens,
            energy_j=1.0,
            latency_s=1.0,
        )
        cmp = compare_run(proto, profile)
        runs.append(
            proto.model_copy(
                update={
                    "energy_j": cmp.energy_j_pred,
                    "latency_s": cmp.latency_s_pred,
                    "idle_power_w": 72.0,
                }
            )
        )
    return runs


def test_fit_runs_recovers_synthetic_truth():
    truth = make_profile(**TRUE)
    runs = synth_runs(truth)
    base = make_profile()  # datasheet defaults, far from the truth
    fit_on, held_out = runs[:6], runs[6:]
    fitted, report = fit_runs(fit_on, base, ALL_RUN_PARAMS)
    assert fitted.calibrated
    assert fitted.parameters.idle_power_w == 72.0
    for run in held_out + fit_on:
        c = compare_run(run, fitted)
        # r8 (16k-token prompt on 1.5B) extrapolates prefill attention beyond the fit set
        assert c.energy_ape < (8.0 if run.id == "r8" else 2.0), run.id
        assert c.latency_ape < (8.0 if run.id == "r8" else 2.0), run.id
    assert fitted.parameters.weight_stream_efficiency == pytest.approx(0.88, rel=0.05)
    assert report.residuals_pct["energy_median_pct"] < 0.5


ALL_RUN_PARAMS = [
    "active_power_w",
    "hbm_energy_j_per_byte",
    "compute_energy_j_per_flop",
    "weight_stream_efficiency",
    "attention_decode_efficiency",
    "attention_prefill_efficiency",
    "layer_overhead_s",
    "step_overhead_s",
]


def test_default_fit_moves_only_the_run_determined_parameters():
    from ttcsim.calibration.fit import DEFAULT_RUN_FIT

    truth = make_profile(**(TRUE | {"prefill_overhead_s": 8e-3}))
    runs = synth_runs(truth)
    base = make_profile(**{k: v for k, v in TRUE.items() if k not in DEFAULT_RUN_FIT})
    fitted, _ = fit_runs(runs[:6], base, prior_weight=0.0)  # exact inverse: no prior
    before, after = base.parameters.model_dump(), fitted.parameters.model_dump()
    moved = {k for k in before if before[k] != after[k]}
    assert moved <= set(DEFAULT_RUN_FIT) | {"idle_power_w"}
    assert fitted.parameters.prefill_overhead_s == pytest.approx(8e-3, rel=0.05)
    for run in runs:
        assert compare_run(run, fitted).energy_ape < 1.0, run.id


def test_fit_runs_rejects_unknown_parameter():
    from ttcsim.errors import TtcsimError

    with pytest.raises(TtcsimError, match="cannot fit"):
        fit_runs(synth_runs(make_profile())[:2], make_profile(), ["bogus"])


def _window(kind, t, bytes_, flops, p, limit=700.0, **shape):
    static = p["idle_power_w"] + p["active_power_w"]
    e_dyn = p["hbm_energy_j_per_byte"] * bytes_ + p["compute_energy_j_per_flop"] * flops
    t = max(t, e_dyn / (limit - static))
    return dict(
        kind=kind,
        phase=kind,
        time_s=t,
        energy_j=static * t + e_dyn,
        hbm_bytes=bytes_,
        flops=flops,
        **shape,
    )


ATT_HALF, ATT_CALL_S = 12.0, 4e-6


def synth_windows(p, bw=3.35e12, peak=989e12):
    wins = [
        dict(
            kind="idle",
            phase="idle",
            time_s=3.0,
            energy_j=3.0 * p["idle_power_w"],
            hbm_bytes=0.0,
            flops=0.0,
        )
    ]
    k = n = 8192
    w_bytes = 2.0 * k * n * 16
    for m in (1, 8, 32, 128, 256):
        flops = 2.0 * m * k * n * 16
        t = max(
            w_bytes / (bw * p["weight_stream_efficiency"]), flops / (peak * p["gemm_efficiency"])
        )
        wins.append(_window("weight_stream", t, w_bytes, flops, p, m=m))
    for m in (512, 2048, 8192, 16384):
        flops = 2.0 * m * k * n
        bytes_ = 2.0 * (m * k + k * n + m * n)
        wins.append(_window("gemm", flops / (peak * p["gemm_efficiency"]), bytes_, flops, p, m=m))
    for b, ctx in ((1, 8192), (32, 512), (32, 4096), (8, 32768)):
        bytes_ = b * ctx * 2 * 32 * 8 * 128 * 2.0
        flops = b * ctx * 4 * 32 * 32 * 128.0
        u = 8.0 * b  # (sequence, KV head) pairs; 32 calls (layers) per window
        eff = p["attention_decode_efficiency"] * u / (u + ATT_HALF)
        wins.append(
            _window(
                "attention_decode",
                32 * ATT_CALL_S + bytes_ / (bw * eff),
                bytes_,
                flops,
                p,
                batch=b,
                context_tokens=ctx,
            )
        )
    return wins


def test_fit_windows_recovers_synthetic_truth():
    wins = synth_windows(TRUE)
    fitted, report = fit_windows(wins, make_profile(), gpu_name="synthetic", date="2026-01-01")
    p = fitted.parameters
    assert p.idle_power_w == pytest.approx(72.0)
    assert p.weight_stream_efficiency == pytest.approx(0.88, rel=1e-6)
    assert p.gemm_efficiency == pytest.approx(0.72, rel=1e-6)
    assert p.attention_decode_efficiency == pytest.approx(0.55, rel=1e-3)
    assert p.attention_half_parallelism == pytest.approx(ATT_HALF, rel=1e-2)
    assert p.active_power_w == pytest.approx(110.0, rel=1e-3)
    assert p.hbm_energy_j_per_byte == pytest.approx(7.0e-11, rel=1e-3)
    assert p.compute_energy_j_per_flop == pytest.approx(4.5e-13, rel=1e-3)
    assert report.residuals_pct["window_energy_max_pct"] < 1e-3
    assert fitted.provenance.parameters.gpu_name == "synthetic"


def test_fit_windows_with_noise_stays_close():
    rng = np.random.default_rng(3)
    wins = synth_windows(TRUE)
    for w in wins:
        w["energy_j"] *= 1 + rng.normal(0, 0.01)
    fitted, _ = fit_windows(wins, make_profile())
    assert fitted.parameters.hbm_energy_j_per_byte == pytest.approx(7.0e-11, rel=0.1)
    assert fitted.parameters.compute_energy_j_per_flop == pytest.approx(4.5e-13, rel=0.1)
