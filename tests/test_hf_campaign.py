"""The HF transformers campaign (bench/hf_campaign.py): plan, length forcing, a dry run.

The plan tests need neither torch nor transformers; the rest run HF
``generate`` on tiny CPU models with a fake NVML (skipped where transformers
or torch is missing).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from ttcsim.calibration.records import read_runs
from ttcsim.gpu.hf_generate import HfRun
from ttcsim.models import get_model

ROOT = Path(__file__).resolve().parents[1]


def _campaign():
    spec = importlib.util.spec_from_file_location("hf_campaign", ROOT / "bench" / "hf_campaign.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_plan_covers_issue_14():
    hc = _campaign()
    plan = hc.build_plan()
    ids = [r.id for r in plan]
    assert len(ids) == len(set(ids)) >= 30
    assert {r.model for r in plan} == set(hc.MODEL_ORDER)
    assert sum(r.tier == "core" for r in plan) >= 30
    assert any(r.repeats >= 4 for r in plan)
    votes = [r.samples_per_query for r in plan if r.strategy.startswith("vote")]
    assert min(votes) == 4 and max(votes) == 128
    batches = [r.concurrent_queries for r in plan if r.strategy == "single"]
    assert min(b for b in batches if b > 1) == 32 and max(batches) == 256
    assert max(r.prompt_tokens for r in plan) == 8192
    assert any(len(set(r.outputs)) > 1 for r in plan)  # lognormal per-row lengths
    for r in plan:
        assert len(r.outputs) == r.rows and r.decode_steps == max(r.outputs)


def test_core_plan_fits_the_budget_at_the_prior_step_time():
    """Core runs + model loads at 65 ms/step must leave room in the 450 s default budget."""
    hc = _campaign()
    plan = hc.build_plan()
    specs = {m: get_model(m) for m in hc.MODEL_ORDER}
    core = sum(hc.estimate_run_s(r, specs[r.model], hc.HOST_STEP_S) for r in plan
               if r.tier == "core")
    loads = sum(hc.estimate_load_s(s) for s in specs.values())
    assert core + loads + hc.END_RESERVE_S < 400.0


def test_estimate_is_steps_times_step_time_when_host_bound():
    hc = _campaign()
    spec = get_model("llama-3.2-1b")
    run = HfRun(id="x", model="llama-3.2-1b", strategy="single", prompt_tokens=1, outputs=(101,))
    est = hc.estimate_run_s(run, spec, 0.06)
    assert est == pytest.approx(0.06 + 100 * 0.06 + 2 * hc.SETTLE_S, rel=1e-3)


def test_run_rows_and_lengths_checked():
    with pytest.raises(Exception, match="3 output lengths for 4 rows"):
        HfRun(id="x", model="m", strategy="vote2", prompt_tokens=8, outputs=(3, 4, 5),
              concurrent_queries=2).check()
    assert HfRun(id="x", model="m", strategy="vote2", prompt_tokens=8, outputs=(3, 4, 5, 6),
                 concurrent_queries=2).check().decode_steps == 6


def test_shrink_keeps_query_major_rows():
    hc = _campaign()
    run = HfRun(id="x", model="m", strategy="vote4", prompt_tokens=100,
                outputs=tuple(range(10, 50, 2))[:16], concurrent_queries=4)
    small = hc.shrink(run)
    assert small.strategy == "vote3" and small.concurrent_queries == 3
    assert len(small.outputs) == 9 and max(small.outputs) == 6


needs_hf = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("torch", "transformers")),
    reason="needs torch and transformers",
)


@needs_hf
def test_forced_lengths_processor():
    import torch

    from ttcsim.gpu.hf_generate import ForcedLengths

    proc = ForcedLengths(torch.tensor([2, 3]), prompt_tokens=4, eos_token_id=7, sync=lambda: None)
    scores = torch.zeros(2, 10)
    scores[:, 7] = 5.0  # EOS would win
    ids = torch.zeros(2, 4 + 1, dtype=torch.long)  # one token generated: next is the 2nd
    out = proc(ids, scores.clone())
    assert out[0].argmax().item() == 7  # row 0 ends at its 2nd token
    assert out[1, 7] == torch.finfo(out.dtype).min  # row 1 may not end yet
    assert out[1].argmax().item() != 7
    assert len(proc.stamps_s) == 1


@needs_hf
def test_dry_run_writes_valid_records(tmp_path, monkeypatch):
    from ttcsim.gpu.fakes import make_fake_pynvml

    monkeypatch.setitem(sys.modules, "pynvml", make_fake_pynvml(150.0))
    hc = _campaign()
    only = ",".join(["8b-single-p512-o48-rep4", "8b-vote8-p1024-logn",
                     "8b-single-p512-o256-static", "1b-vote16-p512-o128"])
    rc = hc.main(["--out", str(tmp_path), "--dry-run", "--only", only, "--idle-s", "0.4",
                  "--no-smi"])
    assert rc == 0
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["env.json", "log.txt", "runs.jsonl", "trace.csv"]
    runs = read_runs(tmp_path / "runs.jsonl")
    raw = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert [r.id for r in runs] == only.split(",")
    env = json.loads((tmp_path / "env.json").read_text())
    assert env["idle_power_w_start"] == pytest.approx(150.0, rel=0.05)
    assert env["runs_done"] == 4 and not env["failed"] and not env["skipped"]
    for rec in raw:
        assert rec["engine"]["name"] == "hf-transformers"
        assert rec["engine"]["batching"] == "static-padded"
        assert rec["prefix_sharing"] is False and rec["tp"] == 1
        assert len(rec["output_tokens"]) == rec["rows"]
        assert rec["decode_steps"] == max(rec["output_tokens"])
        assert 0 < rec["ttft_s"] < rec["latency_s"]
        assert rec["tpot_s"] == pytest.approx(
            (rec["latency_s"] - rec["ttft_s"]) / (rec["decode_steps"] - 1))
        assert len(rec["energy_j_repeats"]) == rec["repeats"]
        # constant 150 W fake board: counter energy over the window = 150 W x latency
        assert rec["energy_j"] == pytest.approx(150.0 * rec["latency_s"], rel=0.15)
    assert raw[0]["repeats"] == 2  # rep4 shrunk to 2 in the dry run
    assert len(set(raw[1]["output_tokens"])) > 1  # lognormal rows differ
    assert raw[2]["engine_settings"]["cache_implementation"] == "static"
    assert raw[3]["strategy"] == "vote3" and raw[3]["engine_settings"]["decoding"] == "sample"
