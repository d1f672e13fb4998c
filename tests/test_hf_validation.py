"""HF transformers generate on the H200 (validation/h200-hf): the shipped
``hf-transformers`` profile against committed runs, and the fit on the frozen split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ttcsim.calibration.records import read_runs
from ttcsim.calibration.validate import compare_run, predicted_tpot_s
from ttcsim.engines import get_engine
from ttcsim.hardware import get_profile

DATA = Path(__file__).resolve().parents[1] / "validation" / "h200-hf"
#: Held-out runs and the shipped profile's errors on them [%] (bench/hf_validation.py --runs):
#: energy, latency.  The tolerance is 3 points around each: a change of the
#: profile or the physics that moves them fails here.
REPLAY = {
    "3b-single-p2048-o128": (1.1, 6.3),
    "8b-single-p2048-o128": (6.5, 1.0),
    "32b-vote4-p1024-o64": (11.2, 20.9),
    "1b-single-q256-p256-o64": (17.1, 20.7),
}


def _fit_ids() -> list[str]:
    return [s.strip() for s in (DATA / "fit_runs.txt").read_text().splitlines()
            if s.strip() and not s.startswith("#")]


def test_fit_split_is_frozen_and_disjoint():
    ids = _fit_ids()
    assert len(ids) == 6
    fit = [json.loads(s)["id"] for s in (DATA / "fit_runs.jsonl").read_text().splitlines()]
    held = [json.loads(s)["id"] for s in (DATA / "held_out.jsonl").read_text().splitlines()]
    assert sorted(fit) == sorted(ids)
    assert not set(fit) & set(held) and len(fit) + len(held) == 28


@pytest.mark.parametrize("run_id", sorted(REPLAY))
def test_shipped_profile_replays_held_out_runs(run_id):
    run = next(r for r in read_runs(DATA / "runs.jsonl") if r.label == run_id)
    c = compare_run(run, get_profile("h200"), "hf-transformers")
    e_err, t_err = REPLAY[run_id]
    assert c.energy_ape == pytest.approx(e_err, abs=3.0)
    assert c.latency_ape == pytest.approx(t_err, abs=3.0)


def test_static_padded_tpot_is_time_per_decode_step():
    """HF's TPOT: (batch latency - TTFT) / (max length - 1), every row runs max(L) steps."""
    run = next(r for r in read_runs(DATA / "runs.jsonl") if r.label == "8b-single-q32-logn")
    from ttcsim.calibration.validate import predict_record

    p = predict_record(run, get_profile("h200"), "hf-transformers")
    want = (p.batch_latency_s - p.ttft_s) / (max(run.output_tokens) - 1)
    assert predicted_tpot_s(p, run, "hf-transformers") == pytest.approx(want)


def test_calibrate_fit_on_the_frozen_split_reproduces_the_shipped_profile(tmp_path):
    from click.testing import CliRunner

    from ttcsim.cli import main
    from ttcsim.engines import load_engine_file

    out = tmp_path / "hf.yaml"
    res = CliRunner().invoke(main, [
        "calibrate", "fit", "--runs", str(DATA / "fit_runs.jsonl"), "--fit", "engine",
        "--base", "h200", "--engine", str(DATA / "hf-transformers-prior.yaml"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    fitted, shipped = load_engine_file(out), get_engine("hf-transformers")
    assert shipped.provenance.status == "calibrated"
    for key in ("step_s", "per_layer_s", "gap_power_fraction", "per_sequence_s", "prefill_s"):
        assert getattr(fitted.host, key) == pytest.approx(getattr(shipped.host, key), rel=0.02)
    assert shipped.host.per_sequence_s == 0.0  # not identified: kept at the default
