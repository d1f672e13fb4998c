"""CLI smoke tests: ``ttcsim curve``, ``ttcsim metrics``, ``ttcsim strategies``, predict JSON."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from click.testing import CliRunner

from ttcsim.cli import main
from ttcsim.curves import AXES, CURVE_COLUMNS, operating_curve, parse_vary
from ttcsim.errors import TtcsimError
from ttcsim.metrics import METRIC_COLUMNS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def invoke(*args):
    return CliRunner().invoke(main, list(args))


def png_size(path):
    import matplotlib.image as mpimg

    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    return mpimg.imread(path).shape


def test_curve_writes_csv_and_png_for_several_gpus_and_models(tmp_path):
    out, plot = tmp_path / "curve.csv", tmp_path / "curve.png"
    r = invoke("curve", "--hw", "h100,h200,a100", "--model", "8b,70b", "--strategy", "vote8",
               "--vary", "output-tokens=64..16384", "--points", "6", "--tp", "auto",
               "--out", str(out), "--plot", str(plot))
    assert r.exit_code == 0, r.output
    frame = pd.read_csv(out)
    assert list(frame.columns) == [*CURVE_COLUMNS, "output_length_tokens"]
    assert len(frame) == 3 * 2 * 6
    assert (frame["status"] == "ok").all()
    assert sorted(frame["x"].unique()) == parse_vary("output-tokens=64..16384", 6)[1]
    assert set(frame["hw"]) == {"h100-sxm-80gb", "h200-sxm-141gb", "a100-sxm-80gb"}
    seventy = frame[frame["model"] == "llama-3.1-70b"]
    assert (seventy["tp"] >= 2).any()  # 70B needs two H100s; auto picks the smallest that fits
    for _, part in frame.groupby(["hw", "model"]):
        e = part.sort_values("x")["energy_j"].to_numpy()
        assert (e[1:] > e[:-1]).all()
    h, w, _ = png_size(plot)
    assert w > 1000 and h > 400


@pytest.mark.parametrize(
    "vary, strategy, points",
    [
        ("prompt-tokens=128..32768", "single", 5),
        ("concurrency=1,2,4,8,16", "vote4", 5),
        ("samples=1..16", "vote1", 5),
        ("samples=1,2,4", "beam4:step=64,depth=4", 3),
        ("context=2048..65536", "single", 4),
    ],
)
def test_curve_axes(tmp_path, vary, strategy, points):
    out = tmp_path / "c.csv"
    r = invoke("curve", "--strategy", strategy, "--vary", vary, "--points", str(points),
               "--output-tokens", "512", "--out", str(out))
    assert r.exit_code == 0, r.output
    frame = pd.read_csv(out)
    axis = vary.split("=")[0]
    assert AXES[axis] in frame.columns and (frame["vary"] == axis).all()
    assert len(frame) == points
    assert (frame["status"] == "ok").all()
    if axis == "samples":
        assert frame["series"].nunique() == 1
        assert frame["strategy"].iloc[-1].startswith(("vote16", "beam4"))
        assert frame["series"].iloc[0] in ("vote<N>", "beam<N>:step=64,depth=4")
    if axis == "context":
        # the prompt fills the context the output leaves
        assert frame["x"].iloc[0] == 2048


def test_curve_marks_points_that_cannot_run(tmp_path):
    out = tmp_path / "c.csv"
    r = invoke("curve", "--model", "70b", "--vary", "output-tokens=64,128", "--out", str(out))
    assert r.exit_code == 0
    frame = pd.read_csv(out)
    assert frame["status"].str.contains("try --tp").all()
    assert frame["energy_j"].isna().all()
    assert "could not run" in r.output
    r = invoke("curve", "--vary", "context=100..1000", "--points", "2", "--output-tokens", "512")
    assert r.exit_code == 0
    assert "leaves no room for a prompt" in r.output and "1000" in r.output


def test_curve_several_strategies_on_one_plot_and_stdout(tmp_path):
    plot = tmp_path / "s.png"
    r = invoke("curve", "--strategy", "single", "--strategy", "vote8;beam4:step=64,depth=8",
               "--vary", "concurrency=1..64", "--points", "4", "--plot", str(plot),
               "--metric", "energy_j", "--metric", "latency_s")
    assert r.exit_code == 0, r.output
    assert "beam4:step=64,depth=8" in r.output and "J/query" in r.output
    assert plot.exists() and plot.stat().st_size > 10_000


@pytest.mark.parametrize(
    "args, message",
    [
        (["--vary", "speed=1..4"], "AXIS one of output-tokens"),
        (["--vary", "output-tokens=100..10"], "must go up"),
        (["--vary", "output-tokens=1..x"], "not a number"),
        (["--vary", "output-tokens=1..100", "--points", "1"], "must be 2.."),
        (["--vary", "samples=1..4", "--strategy", "single"], "no sample count"),
        (["--vary", "output-tokens=1..9", "--metric", "joy"], "unknown metric"),
        (["--vary", "output-tokens=1..9", "--strategy", "beam"], "needs a beam width"),
    ],
)
def test_curve_errors_are_one_line_with_exit_code_2(args, message):
    r = invoke("curve", *args)
    assert r.exit_code == 2
    assert message in r.output and r.output.startswith("error: ")


def test_operating_curve_api_returns_a_tidy_frame():
    frame = operating_curve("output-tokens=100,200", hw="h100", model="8b",
                            strategy=["single", "refine2"])
    assert len(frame) == 4
    assert frame.loc[frame["strategy"] == "refine2", "energy_j"].gt(
        frame.loc[frame["strategy"] == "single", "energy_j"].to_numpy()).all()
    with pytest.raises(TtcsimError):
        operating_curve("output-tokens=100,200", tp="two")


def test_metrics_table_json_csv_and_histogram(tmp_path):
    csv, plot = tmp_path / "m.csv", tmp_path / "hist.png"
    specs = ["single", "vote8", "beam4:step=64,depth=8", "refine2", "spec:draft=1b,k=4,accept=0.7"]
    args = ["metrics", "--output-tokens", "lognormal:median=600,sigma=0.7,max=6000",
            "--draws", "500", "--csv", str(csv), "--plot", str(plot)]
    for s in specs:
        args += ["--strategy", s]
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    for s in specs:
        assert s in r.output
    assert "J/useful" in r.output and "+-se" in r.output
    frame = pd.read_csv(csv)
    assert list(frame.columns) == list(METRIC_COLUMNS)
    assert len(frame) == len(specs)
    assert (frame["j_per_useful_token"] >= frame["j_per_output_token"] - 1e-12).all()
    h, w, _ = png_size(plot)
    assert h > 5 * 150  # one panel per strategy
    r = invoke("metrics", "--strategy", "vote4", "--prompt-tokens", "256,1024", "--json")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)
    assert rows[0]["prompt_tokens"] == 640 and rows[0]["j_per_prompt_token_marginal"] > 0


def test_metrics_errors():
    r = invoke("metrics", "--strategy", "vote4", "--hw", "h100,h200", "--plot", "x.png")
    assert r.exit_code == 2 and "one --hw" in r.output
    r = invoke("metrics", "--strategy", "spec:draft=nope")
    assert r.exit_code == 2 and "draft model" in r.output


def test_strategies_lists_every_pattern_with_its_formula():
    r = invoke("strategies")
    assert r.exit_code == 0
    for pattern in ("prm-bon<N>", "beam<W>", "refine<K>", "budget:min=T,max=T",
                    "adaptive-vote<N>", "spec:draft=MODEL", "vote<N>(S)"):
        assert pattern in r.output
    assert "tau = (1 - a^(k+1)) / (1 - a)" in r.output


def test_predict_json_shows_energy_per_token_metrics():
    r = invoke("predict", "--strategy", "beam4:step=64,depth=8", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    for key in ("j_per_prompt_token", "j_per_prompt_token_marginal", "j_per_output_token",
                "j_per_output_token_marginal", "j_per_useful_token", "output_tokens_per_j",
                "energy_by_phase_j", "j_per_token_by_phase", "energy_j_stderr", "expectation"):
        assert key in d
    assert d["energy_by_phase_j"]["score"] > 0
    assert d["useful_tokens"] == 512 and d["output_tokens"] == 16 * 512


def test_write_energy_histogram_takes_predict_arguments(tmp_path):
    from ttcsim.metrics import write_energy_histogram

    path = write_energy_histogram(
        tmp_path / "h.png", strategy="vote4", output_tokens="gamma:mean=400,shape=2",
        pue=1.2, usd_per_kwh=0.1, draws=300, seed=3,
    )
    assert path.read_bytes()[:8] == PNG_MAGIC
