"""Issue 16: user-facing defects and conventions (regression tests, CLI via CliRunner)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import LLAMA_8B, make_profile

from ttcsim.cli import main


def invoke(*args, **kw):
    return CliRunner().invoke(main, [str(a) for a in args], **kw)


# --------------------------------------------------------------------------- defect 1


def test_clock_scale_takes_per_pass_limits_and_matches_solving_alone():
    """Per-pass static power, limit and gamma (GPUs stacked): each pass as if alone.

    Pass 2 is over the limit even at the lowest clock, so the live set shrinks
    to fewer passes than the coefficient arrays hold (the IndexError of issue 16).
    """
    from ttcsim.simulator.power import MIN_CLOCK_SCALE, solve_clock_scale

    def time_at(s, idx):
        return 1.0 + 2.0 / np.asarray(s)

    mem = np.array([100.0, 80.0, 5000.0])
    comp = np.array([300.0, 400.0, 300.0])
    static = np.array([50.0, 60.0, 50.0])
    limit = np.array([150.0, 200.0, 150.0])
    gamma = np.array([1.0, 1.5, 1.0])
    s = solve_clock_scale(time_at, mem, comp, static, limit, gamma)
    for i in range(3):
        alone = solve_clock_scale(time_at, mem[i:i + 1], comp[i:i + 1], static[i], limit[i],
                                  gamma[i])
        assert s[i] == alone[0]
    assert s[0] == pytest.approx(np.sqrt(2.0 / 3.0), rel=1e-11)
    assert s[2] == MIN_CLOCK_SCALE


def test_forward_pass_with_stacked_gpus_over_the_limit_equals_each_gpu():
    from ttcsim import serving as sv
    from ttcsim.simulator.coefficients import pass_coefficients
    from ttcsim.simulator.roofline import forward_pass

    hot = make_profile(compute_energy_j_per_flop=2.5e-12)
    cool = make_profile(compute_energy_j_per_flop=3.0e-12, idle_power_w=100.0)
    c = [pass_coefficients(p, LLAMA_8B, "bf16", "bf16", 1) for p in (hot, cool)]
    option = np.array([0, 1, 1, 0])
    tokens = np.array([8192.0, 8192.0, 1.0, 4096.0])  # one pass under the limit
    kv = np.array([0.0, 0.0, 500.0, 1000.0])
    cost = forward_pass(sv.stack_coefficients(c, option), tokens, kv, kv)
    assert cost.throttled[[0, 1, 3]].all() and not cost.throttled[2]
    for k, i in enumerate(option):
        one = forward_pass(c[i], tokens[k], kv[k], kv[k])
        assert cost.time_s[k] == pytest.approx(float(one.time_s), rel=1e-12)
        assert cost.energy_j[k] == pytest.approx(float(one.energy_j), rel=1e-12)


def test_plan_two_datasheet_gpus_runs_and_equals_each_alone():
    """README-style ``plan --hw h200,a100``: crashed with IndexError in solve_clock_scale."""
    args = ("plan", "--model", "8b", "--strategy", "vote5", "--qps", "5", "--tp", "1,2",
            "--queries", "60", "--json")
    r = invoke(*args, "--hw", "h200,a100")
    assert r.exit_code == 0, r.output
    both = {(o["hw"], o["tp"]): o for o in json.loads(r.output)["options"]}
    assert len(both) == 4
    for hw in ("h200", "a100"):
        alone = json.loads(invoke(*args, "--hw", hw).output)["options"]
        for o in alone:
            assert both[(o["hw"], o["tp"])]["j_per_query"] == pytest.approx(o["j_per_query"],
                                                                          rel=1e-9)


def test_internal_error_exits_1_with_one_line_and_traceback_under_verbose(monkeypatch):
    import importlib

    module = importlib.import_module("ttcsim.predict")

    def boom(**kw):
        raise IndexError("boolean index did not match")

    monkeypatch.setattr(module, "predict", boom)
    r = invoke("predict")
    assert r.exit_code == 1
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: internal error: IndexError")
    assert "--verbose" in lines[0] and "Traceback" not in r.output
    r = invoke("--verbose", "predict")
    assert r.exit_code == 1 and "Traceback" in r.output and "boom" in r.output


def test_bad_input_still_exits_2():
    r = invoke("predict", "--hw", "nope")
    assert r.exit_code == 2 and "unknown" in r.output and "Traceback" not in r.output


# --------------------------------------------------------------------------- defect 3


@pytest.mark.parametrize(
    "args,where,needle",
    [
        (("--model", "70b", "--tp", "3"), "--tp", "64 attention heads"),
        (("--model", "qwen2.5-7b", "--tp", "8"), "--tp", "28 attention heads"),
        (("--model", "qwen2.5-14b", "--tp", "5"), "--tp", "8 KV heads"),  # 40 heads split
        (("--hw", "a100", "--dtype", "fp8"), "--dtype", "no fp8 tensor cores"),
        (("--hw", "a100-pcie-80gb", "--dtype", "fp8"), "--dtype", "no fp8 tensor cores"),
    ],
)
def test_impossible_setups_are_refused_naming_the_option(args, where, needle):
    r = invoke("predict", *args)
    assert r.exit_code == 2, r.output
    assert r.output.count("\n") == 1 and r.output.startswith(f"error: {where}: ")
    assert needle in r.output


def test_kv_heads_fewer_than_tp_are_replicated():
    """qwen2.5-1.5b: 12 heads, 2 KV heads; tp 4 replicates each KV head on 2 GPUs."""
    from ttcsim.deployment import tensor_parallel_problem
    from ttcsim.models import get_model
    from ttcsim.simulator import architecture as arch
    from ttcsim.simulator.coefficients import pass_coefficients

    spec = get_model("qwen2.5-1.5b")
    assert (spec.n_heads, spec.n_kv_heads) == (12, 2)
    assert tensor_parallel_problem(spec, 4) is None
    assert "neither split them nor replicate" in tensor_parallel_problem(
        spec.model_copy(update={"n_heads": 12, "n_kv_heads": 4}), 6
    )
    c = pass_coefficients(make_profile(), spec, "bf16", "bf16", 4)
    # one KV head per GPU: half the model's KV bytes, not a quarter
    assert c.kv_bytes_per_token == arch.kv_elements_per_token(spec) * 2.0 / 2
    assert c.kv_heads_per_gpu == 1.0
    assert invoke("predict", "--model", "qwen2.5-1.5b", "--tp", "4").exit_code == 0


def test_plan_lists_unshardable_and_fp8_options_as_setup():
    from ttcsim.plan import plan

    r = plan(hw="h100,a100", model="8b", qps=1.0, output_tokens="128", tp="1,3",
             weight_dtype="fp8", queries=60)
    by = {(o.hw, o.tp): o for o in r.options}
    assert by[("a100-sxm-80gb", 1)].cause == "setup"
    assert "fp8 tensor cores" in by[("a100-sxm-80gb", 1)].reason
    assert by[("h100-sxm-80gb", 3)].cause == "setup"
    assert by[("h100-sxm-80gb", 1)].slo_met


def test_sweep_marks_impossible_deployments_invalid(tmp_path):
    import pandas as pd

    grid = tmp_path / "g.yaml"
    grid.write_text("hw: [h100, a100]\nmodel: [8b]\ntp: [1, 3]\ndtype: [bf16, fp8]\n"
                    "output_tokens: [64]\n")
    out = tmp_path / "g.csv"
    r = invoke("sweep", grid, "--out", out)
    assert r.exit_code == 0, r.output
    d = pd.read_csv(out)
    ok = (d["tp"] == 1) & ~((d["hw"] == "a100-sxm-80gb") & (d["weight_dtype"] == "fp8"))
    assert (d.loc[ok, "status"] == "ok").all()
    assert (d.loc[~ok, "status"] == "invalid").all() and d.loc[~ok, "energy_j"].isna().all()


# --------------------------------------------------------------------------- defect 4


def _plan_args(*extra):
    return ("plan", "--hw", "h100", "--qps", "1", "--queries", "60", "--output-tokens", "128",
            *extra)


@pytest.mark.parametrize(
    "extra,cause",
    [
        (("--model", "405b", "--tp", "1,2"), "memory"),
        (("--model", "8b", "--tp", "1", "--slo-ttft-p90-ms", "1"), "slo"),
        (("--model", "8b", "--tp", "3"), "setup"),
    ],
)
def test_infeasible_plan_says_why_and_exits_3(extra, cause):
    r = invoke(*_plan_args(*extra))
    assert r.exit_code == 3, r.output
    assert f"infeasible ({cause})" in r.output
    assert r.output.strip().splitlines()[-1].startswith(f"error: infeasible ({cause}): ")
    if cause == "memory":
        assert "SLO" not in r.output.splitlines()[-1]
    rj = invoke(*_plan_args(*extra), "--json")
    assert rj.exit_code == 3
    data = json.loads(rj.output[: rj.output.rindex("}") + 1])
    assert data["feasible"] is False and data["cause"] == cause


def test_infeasible_plan_names_the_power_limit_when_it_is_the_cause():
    """An SLO between the throttled and unthrottled prefill floor: the power limit is why."""
    from ttcsim.plan import Slo, plan

    base = plan(hw="h100", model="8b", qps=1.0, output_tokens="128", tp="1", queries=60)
    floor = base.options[0].floor_ttft_p90_s
    r = plan(hw="h100", model="8b", qps=1.0, output_tokens="128", tp="1", queries=60,
             slo=Slo(ttft_p90_s=0.99 * floor))
    assert r.cause == "power" and "power-limited prefill" in r.options[0].reason


# --------------------------------------------------------------------------- defect 5


def test_power_limited_names_its_phases_and_only_when_throttled():
    from ttcsim.predict import predict

    long = predict(hw="h100", model="8b", prompt_tokens=512)
    short = predict(hw="h100", model="8b", prompt_tokens=16)
    assert long.power_limited_phases == ["prefill"] and long.power_limited
    assert short.power_limited_phases == [] and not short.power_limited
    r = invoke("predict", "--prompt-tokens", "512")
    assert "(power-limited in prefill)" in r.output
    r = invoke("predict", "--prompt-tokens", "16")
    assert "power-limited" not in r.output


# --------------------------------------------------------------------------- defect 6


def test_repeated_strategy_on_predict_is_refused():
    r = invoke("predict", "--strategy", "vote5", "--strategy", "bon4")
    assert r.exit_code == 2
    assert r.output.startswith("error: --strategy: given 2 different values (vote5, bon4)")
    assert "ttcsim metrics" in r.output
    r = invoke("predict", "--hw=h100", "--hw", "a100")
    assert r.exit_code == 2 and "--hw" in r.output
    assert invoke("predict", "--strategy", "vote5", "--strategy", "vote5").exit_code == 0
    r = invoke("metrics", "--strategy", "vote5", "--strategy", "bon4", "--draws", "50")
    assert r.exit_code == 0 and "vote5" in r.output and "bon4" in r.output


# --------------------------------------------------------------------------- defect 8


def test_missing_gpu_extra_names_the_package_not_no_gpu(monkeypatch, tmp_path):
    import sys
    import types

    import ttcsim.gpu as gpu
    from ttcsim.errors import GpuUnavailableError

    monkeypatch.setitem(sys.modules, "torch", None)  # not installed
    monkeypatch.setitem(sys.modules, "pynvml", types.ModuleType("pynvml"))
    assert gpu.missing_gpu_packages() == ["torch"]
    ok, why = gpu.gpu_status()
    assert not ok and "missing: torch" in why and "pip install 'ttcsim[gpu]'" in why
    with pytest.raises(GpuUnavailableError) as info:
        gpu.require_gpu()
    assert "no NVIDIA GPU" not in str(info.value) and "ttcsim[gpu]" in str(info.value)
    r = invoke("calibrate", "run", "--out", tmp_path / "p.yaml")
    assert r.exit_code == 2 and r.output.count("\n") == 1
    assert "[gpu] extra is not installed (missing: torch)" in r.output
    monkeypatch.setitem(sys.modules, "pynvml", None)
    assert gpu.missing_gpu_packages() == ["torch", "nvidia-ml-py"]


def test_present_extra_without_a_device_is_still_no_gpu(monkeypatch):
    import ttcsim.gpu as gpu
    from ttcsim.errors import GpuUnavailableError

    monkeypatch.setattr(gpu, "gpu_status", lambda: (False, "torch 2.4 sees no CUDA device"))
    with pytest.raises(GpuUnavailableError, match="^no NVIDIA GPU: torch 2.4 sees no CUDA"):
        gpu.require_gpu()


# --------------------------------------------------------------------------- defect 7

LONG_HW = "my-lab-h100-sxm-80gb-calibrated-on-node-17-after-the-driver-upgrade-2026-12-04"


def test_render_table_fits_and_keeps_columns_aligned():
    from ttcsim.console import render_table

    headers = ["hw", "model", *(f"metric{i}" for i in range(14))]
    rows = [[LONG_HW, "llama-3.1-8b", *(f"{1234.5 * i:.1f}" for i in range(14))],
            ["h100", "a-model-with-a-very-long-name-from-a-config-json-file",
             *(f"{i:.1f}" for i in range(14))]]
    text = render_table(headers, rows, keys=2)
    lines = text.splitlines()
    assert max(map(len, lines)) <= 100
    blocks = text.split("\n\n")
    assert len(blocks) >= 2
    for block in blocks:
        head, *body = block.splitlines()
        assert head.startswith("hw")  # every block repeats the key columns
        ends = {m.end() for m in __import__("re").finditer(r"metric\d+", head)}
        for line in body:
            for m in __import__("re").finditer(r"(?<= )\d+\.\d(?= |$)", line):  # right-aligned
                assert m.end() in ends
    # wrapped key cells rebuild the full name, nothing cut
    first_col = [ln[:28].strip() for ln in blocks[0].splitlines()[1:5]]
    assert "".join(first_col) == LONG_HW


def test_render_table_narrow_tables_are_unchanged_in_layout():
    from ttcsim.console import render_table

    assert render_table(["a", "bb"], [["x", "1"], ["yyy", "22"]]) == "a    bb\nx     1\nyyy  22"


@pytest.fixture()
def long_profile(tmp_path):
    from ttcsim.hardware import _builtin_files

    text = _builtin_files()["h100-sxm-80gb"].read_text()
    path = tmp_path / f"{LONG_HW}.yaml"
    path.write_text("\n".join(f"name: {LONG_HW}" if ln.startswith("name:") else ln
                              for ln in text.splitlines()) + "\n")
    return path


@pytest.mark.parametrize(
    "args",
    [
        ("predict", "--hw", "{hw}", "--strategy", "vote8(refine3)"),
        ("metrics", "--hw", "{hw},h100", "--strategy", "vote8(refine3)", "--strategy",
         "adaptive-vote16:p=0.7,batch=4", "--draws", "50"),
        ("curve", "--hw", "{hw}", "--strategy", "vote8(refine3)", "--vary", "output-tokens=64,128"),
        ("plan", "--hw", "{hw},h100", "--qps", "2", "--tp", "1", "--queries", "60",
         "--output-tokens", "128"),
        ("hw", "list"),
        ("models", "list"),
        ("strategies",),
    ],
)
def test_tables_fit_100_columns_with_long_names(long_profile, args):
    r = invoke(*(a.replace("{hw}", str(long_profile)) for a in args))
    assert r.exit_code == 0, r.output
    assert max(len(line) for line in r.output.splitlines()) <= 100, r.output
    if "{hw}" in " ".join(args):
        assert LONG_HW[:20] in r.output


# --------------------------------------------------------------------------- conventions


def test_python_dash_m_ttcsim_runs_the_cli():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "ttcsim", "hw", "list", "--json"],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    assert any(p["name"] == "h100-sxm-80gb" for p in json.loads(r.stdout))
    r = subprocess.run([sys.executable, "-m", "ttcsim", "--help"], capture_output=True,
                       text=True, check=False)
    assert r.returncode == 0 and "Usage: ttcsim" in r.stdout


def test_py_typed_ships_and_license_matches_pyproject():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    assert (root / "ttcsim" / "py.typed").exists()
    try:
        import tomllib  # Python 3.11+
    except ModuleNotFoundError:  # Python 3.10: read the two lines that matter
        import re

        pyproject = (root / "pyproject.toml").read_text()
        assert re.search(r'^"ttcsim" = \[[^\]]*"py\.typed"', pyproject, re.M)
        assert re.search(r'^license = \{ text = "Apache-2\.0" \}', pyproject, re.M)
    else:
        meta = tomllib.loads((root / "pyproject.toml").read_text())
        assert "py.typed" in meta["tool"]["setuptools"]["package-data"]["ttcsim"]
        assert meta["project"]["license"]["text"] == "Apache-2.0"
    text = (root / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


@pytest.mark.parametrize(
    "args",
    [
        ("hw", "list"),
        ("hw", "show", "h200"),
        ("models", "list"),
        ("strategies",),
        ("curve", "--vary", "output-tokens=64,128"),
        ("metrics", "--strategy", "vote5", "--draws", "50"),
        ("plan", "--qps", "1", "--tp", "1", "--queries", "60", "--output-tokens", "128"),
        ("predict",),
        ("pareto", "--accuracy", "deepseek-r1-distill"),
    ],
)
def test_json_on_every_printing_command(args):
    r = CliRunner().invoke(main, [*args, "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data


def test_sweep_summary_json(tmp_path):
    grid = tmp_path / "g.yaml"
    grid.write_text("model: [8b]\noutput_tokens: [64, 128]\n")
    r = CliRunner().invoke(main, ["sweep", str(grid), "--out", str(tmp_path / "o.csv"),
                                  "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output[r.output.index("{"):])
    assert data["rows"] == 2 and data["fitting_rows"] == 2 and data["format"] == "csv"
    r = CliRunner().invoke(main, ["sweep", str(grid), "--out", "x.csv", "--dry-run", "--json"])
    assert json.loads(r.output) == {"scenarios": 2, "deployments": 1,
                                    "scenarios_per_deployment": 2}


def test_quiet_drops_notes_and_verbose_is_accepted():
    loud = invoke("predict", "--hw", "a100")
    assert "note: a100-sxm-80gb uses parameters transferred" in loud.output
    hushed = invoke("--quiet", "predict", "--hw", "a100")
    assert hushed.exit_code == 0 and "note:" not in hushed.output
    assert hushed.output.splitlines()[:3] == loud.output.splitlines()[:3]
    assert invoke("-v", "predict").exit_code == 0
    r = invoke("-q", "metrics", "--hw", "a100", "--draws", "50")
    assert r.exit_code == 0 and "note:" not in r.output


def test_help_does_not_import_heavy_modules():
    import subprocess
    import sys

    code = ("import sys; from ttcsim.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('pandas', 'matplotlib', 'scipy', 'numpy', 'pydantic')"
            " if m in sys.modules]\nprint(heavy)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"


# --------------------------------------------------------------------------- plots

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "kw",
    [
        dict(strategy="vote5", output_tokens="200,600,1024,300,800"),
        dict(model="70b", tp=2, concurrency=4, strategy="vote2", output_tokens="200,900"),
        dict(strategy="bon4", output_tokens=512),
        dict(strategy="beam4:step=64,depth=4"),
    ],
)
def test_power_timeline_adds_up_to_the_prediction(kw):
    from ttcsim.plot_power import power_timeline
    from ttcsim.predict import predict

    tl = power_timeline(**kw)
    r = predict(**kw, percentiles=False)
    energy = sum(sp.energy_j for sp in tl.spans)
    assert energy == pytest.approx(r.energy_j * r.concurrency, rel=1e-9)
    assert tl.spans[0].name == "prefill" and tl.spans[0].start_s == 0.0
    for a, b in zip(tl.spans, tl.spans[1:], strict=False):
        assert b.start_s == pytest.approx(a.start_s + a.duration_s)
    for sp in tl.spans:
        assert tl.idle_power_w <= sp.avg_power_w <= tl.power_limit_w * (1 + 1e-9)
        if sp.curve_time_s:  # the decode curve integrates to the phase's energy (2 %)
            t = np.diff(np.concatenate([[0.0], sp.curve_time_s]))
            e = float(np.sum(t * np.asarray(sp.curve_power_w))) * tl.gpus
            assert e == pytest.approx(sp.energy_j, rel=0.02)
    throttled = [sp.name for sp in tl.spans if sp.throttled]
    assert list(dict.fromkeys(throttled)) == r.power_limited_phases


def test_predict_plot_writes_timeline_and_histogram(tmp_path):
    fixed, random = tmp_path / "fixed.png", tmp_path / "random.png"
    r = invoke("predict", "--strategy", "vote5", "--plot", fixed)
    assert r.exit_code == 0, r.output
    r = invoke("predict", "--strategy", "vote5", "--output-tokens",
               "lognormal:median=800,sigma=0.7,max=8192", "--plot", random)
    assert r.exit_code == 0, r.output
    assert fixed.read_bytes()[:8] == PNG and random.read_bytes()[:8] == PNG
    from PIL import Image

    with Image.open(fixed) as a, Image.open(random) as b:
        assert b.size[1] > 1.5 * a.size[1]  # the histogram panel below the timeline


def test_sweep_default_plot_renders(tmp_path):
    grid = tmp_path / "g.yaml"
    grid.write_text("hw: [h100, a100]\nstrategy: [single, vote4]\n"
                    "output_tokens: [256, 1024, 'lognormal:median=600,sigma=0.7,max=4096']\n"
                    "prompt_tokens: [128, 2048]\n")
    out, png = tmp_path / "o.csv", tmp_path / "o.png"
    r = invoke("sweep", grid, "--out", out, "--plot", png)
    assert r.exit_code == 0, r.output
    assert png.read_bytes()[:8] == PNG


def test_yaml_uses_the_c_loader_and_keeps_line_numbers():
    import yaml

    from ttcsim import io
    from ttcsim.errors import TtcsimError

    if getattr(yaml, "__with_libyaml__", False):
        assert issubclass(io._UniqueKeyLoader, yaml.CSafeLoader)
    with pytest.raises(TtcsimError, match=r"^p\.yaml:4: invalid YAML .*duplicate key 'b'"):
        io.parse_yaml("a: 1\nb:\n  c: 2\nb: 3\n", "p.yaml")
    with pytest.raises(TtcsimError, match=r"^p\.yaml:3: invalid YAML"):
        io.parse_yaml("a: [1,\nb: 2\n", "p.yaml")
    assert io.parse_yaml("a: {b: [1, 2.5, x]}\n", "p.yaml") == {"a": {"b": [1, 2.5, "x"]}}
