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
