"""Error bands (ttcsim.uncertainty), transferred profiles and power-limit what-ifs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from click.testing import CliRunner

from ttcsim.cli import main
from ttcsim.errors import TtcsimError
from ttcsim.hardware import CalibrationInfo, ErrorBand, get_profile, list_profiles
from ttcsim.predict import predict
from ttcsim.uncertainty import DATASHEET_DEFAULT_BAND, interval, profile_band


@pytest.mark.parametrize("hw", ["h100", "a100", "l4", "mi300x"])
def test_band_fields_exist_and_bracket_the_value(hw):
    r = predict(hw=hw, output_tokens=256, percentiles=False)
    assert r.energy_j_low < r.energy_j < r.energy_j_high
    assert r.latency_s_low < r.latency_s < r.latency_s_high
    # the band is every measured value within its APE of the prediction
    assert r.energy_j_high == pytest.approx(r.energy_j / (1 - r.band_energy_ape))
    assert r.energy_j_low == pytest.approx(r.energy_j / (1 + r.band_energy_ape))


def test_band_width_follows_the_status():
    cal = profile_band(get_profile("h100"))
    same = profile_band(get_profile("h100-pcie-80gb"))
    cross = profile_band(get_profile("a100"))
    vendor = profile_band(get_profile("mi300x"))
    assert cal.energy_ape < same.energy_ape < cross.energy_ape < vendor.energy_ape
    assert vendor.energy_ape <= DATASHEET_DEFAULT_BAND
    # a datasheet-default profile (no stored band) gets the wide default
    p = get_profile("h100")
    default = p.with_parameters(
        p.parameters, CalibrationInfo(status="datasheet-default", method="test")
    )
    assert profile_band(default).energy_ape == DATASHEET_DEFAULT_BAND
    r = predict(hw=default, output_tokens=64, percentiles=False)
    assert r.energy_j_high == pytest.approx(r.energy_j * 2.0)  # 50 % band: up to 2x


def test_every_shipped_profile_has_a_status_and_a_band():
    for name in list_profiles():
        info = get_profile(name).provenance.parameters
        assert info.status in ("calibrated", "transferred")
        assert isinstance(info.band, ErrorBand) and len(info.band.method) > 10
        if info.status == "transferred":
            assert info.transfer.source_profile in list_profiles()
            assert all(len(t.rule) > 5 for t in info.transfer.parameters.values())


def test_interval_is_the_ape_band():
    lo, hi = interval(100.0, 0.2)
    assert (100 - lo) / lo == pytest.approx(0.2) and (hi - 100) / hi == pytest.approx(0.2)


def test_power_limit_lowers_power_and_raises_time_monotonically():
    caps = [700, 600, 500, 400, 350, 300, 250]
    rs = [predict(hw="h100", prompt_tokens=8192, output_tokens=128, power_limit_w=w,
                  percentiles=False) for w in caps]
    peaks = [r.peak_power_w for r in rs]
    times = [r.latency_s for r in rs]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(peaks, peaks[1:], strict=False))
    assert all(b >= a * (1 - 1e-12) for a, b in zip(times, times[1:], strict=False))
    assert times[-1] > times[0] and peaks[-1] < peaks[0]
    for r, w in zip(rs, caps, strict=True):
        assert r.peak_power_w <= w * (1 + 1e-9) and r.power_limit_w == w
    assert rs[1].hw == "h100-sxm-80gb-pl600w"


def test_power_limit_at_the_datasheet_limit_changes_nothing():
    a = predict(hw="h100", output_tokens=128, percentiles=False)
    b = predict(hw="h100", output_tokens=128, percentiles=False, power_limit_w=700)
    assert a.energy_j == b.energy_j and a.hw == b.hw


def test_power_limit_below_the_board_minimum_is_refused_in_one_line():
    with pytest.raises(TtcsimError, match="--power-limit-w: must be between the board's minimum"):
        predict(hw="h100", power_limit_w=150)
    with pytest.raises(TtcsimError, match="--power-limit-w"):
        predict(hw="h100", power_limit_w=800)
    res = CliRunner().invoke(main, ["predict", "--hw", "a100", "--power-limit-w", "50"])
    assert res.exit_code == 2
    assert res.output.count("\n") == 1 and res.output.startswith("error: --power-limit-w")


def test_board_minimum_is_raised_above_the_static_power():
    p = get_profile("h100")
    static = p.parameters.idle_power_w + p.parameters.active_power_w
    assert p.datasheet.min_power_limit_w == 200
    assert p.min_power_limit() == math.ceil(1.1 * static) > 200
    assert get_profile("l4").min_power_limit() == 40


def test_cli_predict_prints_bands_and_json_has_them():
    res = CliRunner().invoke(main, ["predict", "--hw", "a100", "--output-tokens", "64"])
    assert res.exit_code == 0, res.output
    assert "\u00b1" in res.output and "transferred" in res.output
    res = CliRunner().invoke(main, ["predict", "--json", "--power-limit-w", "400"])
    import json

    d = json.loads(res.output)
    assert d["energy_j_low"] < d["energy_j"] < d["energy_j_high"]
    assert d["latency_s_low"] < d["latency_s"] < d["latency_s_high"] and d["power_limit_w"] == 400


def test_hw_list_shows_status_and_band():
    res = CliRunner().invoke(main, ["hw", "list"])
    assert res.exit_code == 0
    line = next(x for x in res.output.splitlines() if x.startswith("a100-sxm-80gb"))
    assert "transferred" in line and "\u00b1" in line
    res = CliRunner().invoke(main, ["hw", "list", "--json"])
    import json

    rec = next(r for r in json.loads(res.output) if r["name"] == "a100-sxm-80gb")
    assert rec["source"] == "h100-sxm-80gb" and rec["parameters"] == "transferred"
    assert 0 < rec["band_energy_ape"] < 0.5 and rec["min_power_limit_w"] >= 100


def test_validate_json_gives_each_run_its_band():
    import json

    res = CliRunner().invoke(main, ["validate", "--runs", "validation/h100-c/runs.jsonl",
                                    "--hw", "h100", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    for r in d["runs"]:
        assert r["energy_j_pred_low"] < r["energy_j_pred"] < r["energy_j_pred_high"]
        assert r["energy_in_band"] == (r["energy_j_pred_low"] <= r["energy_j"]
                                       <= r["energy_j_pred_high"])
    assert 0 <= d["summary"]["energy_band_coverage"] <= 1


def test_sweep_power_limit_axis_equals_predict():
    from ttcsim.sweep import sweep

    df = sweep({"hw": ["h100"], "power_limit_w": ["default", 350], "output_tokens": [128],
                "prompt_tokens": [4096]})
    assert list(df["power_limit_w"]) == [700.0, 350.0]
    r = predict(hw="h100", output_tokens=128, prompt_tokens=4096, power_limit_w=350,
                percentiles=False)
    row = df.iloc[1]
    assert row["hw"] == r.hw and row["energy_j"] == r.energy_j
    assert row["energy_j_low"] == r.energy_j_low and row["latency_s_high"] == r.latency_s_high


def test_plan_cap_search_picks_a_cap_that_meets_the_slo():
    from ttcsim.plan import Slo, plan

    p = plan(hw="h100", qps=1.0, tp="1", output_tokens="256", queries=60,
             slo=Slo(tpot_p90_s=0.03), search_power_limit=True)
    best = [o for o in p.options if o.best_power_limit]
    assert len(best) == 1
    b = best[0]
    assert b.slo_met and b.tpot_p90_s <= 0.03
    met = [o for o in p.options if o.slo_met]
    assert b.kwh_per_day == min(o.kwh_per_day for o in met)
    assert len({o.power_limit_w for o in p.options}) >= 4
    assert b.gpus_low <= b.gpus <= b.gpus_high
    assert b.kwh_per_day_low < b.kwh_per_day < b.kwh_per_day_high
    assert np.isfinite(b.power_limit_w)
