"""Calibrate one GPU and measure the validation runs, in one device call.

Usage (on the GPU machine)::

    python bench/device_campaign.py --out $OUT [--skip-calibration] [--only ID,...]

Writes to ``--out``: ``selfcheck.json`` (reference decoder vs dense
attention), ``profile.yaml`` + ``trace.csv`` + ``phases.jsonl`` (``ttcsim
calibrate run``), ``runs.jsonl`` (run records of :data:`CAMPAIGN`), ``log.txt``.
Output lengths drawn from distributions are sampled here with a fixed seed and
stored per sequence in the records.

The lent GPU image has PyTorch, Triton and nvidia-ml-py but not pydantic: put
its wheels (pydantic, pydantic-core for the image's Python, annotated-types,
typing-inspection, typing-extensions) in an ignored ``.whl/`` folder, carry it,
and start the command with ``python3 -m pip install -q --no-index --no-deps
--target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD``.
``--set all`` runs the whole campaign (about 6 minutes on an H100 with the
calibration); ``--set extra`` only the 32B, beam and refine runs; ``--set gaps``
the long-KV, wide-vote and large-batch runs of issue 15 (sets combine with commas).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LOGN = "lognormal:median=300,sigma=0.6,max=1024"
LOGN_SHORT = "lognormal:median=150,sigma=0.5,max=512"

#: (id, model, strategy, prompt_tokens, output spec, concurrent queries)
CAMPAIGN = [
    ("1b-single-p512", "llama-3.2-1b", "single", 512, "512", 1),
    ("1b-vote8-logn", "llama-3.2-1b", "vote8", 512, LOGN, 1),
    ("1b-single-q256", "llama-3.2-1b", "single", 128, "256", 256),
    ("1b-vote64", "llama-3.2-1b", "vote64", 256, "256", 1),
    ("3b-single-p2048", "llama-3.2-3b", "single", 2048, "512", 1),
    ("3b-vote4-logn", "llama-3.2-3b", "vote4", 1024, LOGN, 1),
    ("3b-bon4", "llama-3.2-3b", "bon4", 512, "256", 1),
    ("3b-single-p8192", "llama-3.2-3b", "single", 8192, "128", 1),
    ("8b-single-p512", "llama-3.1-8b", "single", 512, "512", 1),
    ("8b-vote5-logn", "llama-3.1-8b", "vote5", 512, LOGN, 1),
    ("8b-vote16", "llama-3.1-8b", "vote16", 1024, "256", 1),
    ("8b-single-q64", "llama-3.1-8b", "single", 256, "256", 64),
    ("8b-vote128", "llama-3.1-8b", "vote128", 256, "128", 1),
    ("8b-bon8", "llama-3.1-8b", "bon8", 512, "256", 1),
    ("8b-single-p8192", "llama-3.1-8b", "single", 8192, "256", 1),
    ("8b-vote4-q8-logn", "llama-3.1-8b", "vote4", 4096, LOGN_SHORT, 8),
    ("14b-single", "qwen2.5-14b", "single", 1024, "256", 1),
    ("14b-vote8", "qwen2.5-14b", "vote8", 512, "256", 1),
    ("14b-single-q32", "qwen2.5-14b", "single", 256, "128", 32),
    ("32b-single", "qwen2.5-32b", "single", 512, "128", 1),
    ("32b-vote4", "qwen2.5-32b", "vote4", 1024, "128", 1),
    ("32b-single-q8", "qwen2.5-32b", "single", 2048, "64", 8),
    # repeats: the run-to-run noise floor
    ("1b-single-q256-rep", "llama-3.2-1b", "single", 128, "256", 256),
    ("8b-single-p512-rep", "llama-3.1-8b", "single", 512, "512", 1),
    ("8b-vote128-rep", "llama-3.1-8b", "vote128", 256, "128", 1),
    ("14b-vote8-rep", "qwen2.5-14b", "vote8", 512, "256", 1),
]


#: Issue 4 item 5: beam search and sequential revision on the reference decoder.
#: (id, model, strategy, prompt, output spec, queries, prefix sharing); beam takes
#: one length per query, refine one per round.
BEAM_REFINE = [
    ("1b-beam4-s64-q2", "llama-3.2-1b", "beam4:step=64", 512, "768,1024", 2, True),
    ("1b-beam4-s64-nocache", "llama-3.2-1b", "beam4:step=64", 512, "1024", 1, False),
    ("3b-beam2-x4", "llama-3.2-3b", "beam2:expand=4", 1024, "768", 1, True),
    ("8b-beam4-s64-q2", "llama-3.1-8b", "beam4:step=64", 512, "384,256", 2, True),
    ("8b-beam3-s32-d12", "llama-3.1-8b", "beam3:step=32,depth=12", 1024, "1000", 1, True),
    ("1b-refine3", "llama-3.2-1b", "refine3", 512, "384,384,384", 1, True),
    ("3b-refine2-q4-nocache", "llama-3.2-3b", "refine2:feedback=64", 2048, "256,256", 4, False),
    ("8b-refine3-last-q4", "llama-3.1-8b", "refine3:history=last", 512, "160,192,128", 4, True),
]

#: Issue 15: the three misses of the fitted model, measured afresh: long KV caches
#: (8k prompts, 2k-4k outputs), very wide votes, large serving batches.
GAPS = [
    ("8b-single-p8192-o4096", "llama-3.1-8b", "single", 8192, "4096", 1),
    ("3b-single-p8192-o4096", "llama-3.2-3b", "single", 8192, "4096", 1),
    ("8b-vote8-p8192-o2048", "llama-3.1-8b", "vote8", 8192, "2048", 1),
    ("1b-single-p4096-o4096", "llama-3.2-1b", "single", 4096, "4096", 1),
    ("1b-vote128", "llama-3.2-1b", "vote128", 256, "256", 1),
    ("3b-vote128", "llama-3.2-3b", "vote128", 512, "256", 1),
    ("8b-vote256", "llama-3.1-8b", "vote256", 256, "128", 1),
    ("14b-vote128", "qwen2.5-14b", "vote128", 256, "128", 1),
    ("3b-single-q128", "llama-3.2-3b", "single", 256, "256", 128),
    ("8b-single-q256", "llama-3.1-8b", "single", 256, "256", 256),
    ("14b-single-q64", "qwen2.5-14b", "single", 512, "256", 64),
    ("8b-single-q128-logn", "llama-3.1-8b", "single", 512, LOGN, 128),
    ("8b-single-q256-rep", "llama-3.1-8b", "single", 256, "256", 256),
    ("8b-single-p8192-o4096-rep", "llama-3.1-8b", "single", 8192, "4096", 1),
]

BIG_IDS = ("32b-single", "32b-vote4", "32b-single-q8")


def campaign_specs(only: set[str] | None = None, seed: int = 0) -> list[dict]:
    """The campaign as measure_many() specs, lengths sampled with ``seed``."""
    from ttcsim.distributions import LengthList, parse_lengths
    from ttcsim.strategies import parse_strategy

    rng = np.random.default_rng(seed)
    specs = []
    entries = [(*e, True) for e in CAMPAIGN + GAPS] + BEAM_REFINE
    for run_id, model, strategy, prompt, out, q, sharing in entries:
        n = q * parse_strategy(strategy).draws_per_query
        lengths = parse_lengths(out)
        if isinstance(lengths, LengthList):
            values = list(lengths.values)
        elif lengths.is_fixed:
            values = [lengths.tokens] * n
        else:
            values = [int(v) for v in lengths.sample(rng, n)]
        if only and run_id not in only:
            continue
        spec = dict(
            id=run_id,
            model=model,
            strategy=strategy,
            prompt_tokens=prompt,
            output_tokens=values,
            concurrent_queries=q,
        )
        if strategy.startswith("bon"):
            spec["reward_model"] = model  # the policy model scores its own candidates
        if not sharing:
            spec["prefix_sharing"] = False
        specs.append(spec)
    return specs


@contextlib.contextmanager
def stage(name: str, t0: float):
    """Run one stage; print its traceback instead of aborting the later stages."""
    print(f"[{time.time() - t0:6.1f}s] {name} ...", flush=True)
    try:
        yield
    except Exception:  # noqa: BLE001 - report and go on: device time is precious
        traceback.print_exc()
        print(f"[{time.time() - t0:6.1f}s] {name} FAILED", flush=True)
    else:
        print(f"[{time.time() - t0:6.1f}s] {name} done", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--skip-calibration", action="store_true")
    ap.add_argument("--skip-selfcheck", action="store_true")
    ap.add_argument("--skip-campaign", action="store_true")
    ap.add_argument("--only", default="")
    ap.add_argument("--set", default="main", help="comma list of main, extra, gaps, all")
    ap.add_argument("--budget-s", type=float, default=150.0)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if not args.skip_selfcheck:
        with stage("self-check", t0):
            from ttcsim.gpu.decoder import decoder_self_check

            report = decoder_self_check()
            (out / "selfcheck.json").write_text(json.dumps(report, indent=1, default=str))
    if not args.skip_calibration:
        with stage("calibration", t0):
            from ttcsim.calibration.session import calibrate_on_gpu

            trace_dir = out / "profile-trace"
            try:
                profile, report, trace_dir = calibrate_on_gpu(
                    out / "profile.yaml", budget_s=args.budget_s, force=True
                )
                print(f"calibrated: {report.residuals_pct}", flush=True)
                print(profile.parameters, flush=True)
            finally:
                for name in ("trace.csv", "phases.jsonl", "calibration_runs.jsonl"):
                    if (trace_dir / name).exists():
                        shutil.copy(trace_dir / name, out / name)
    if not args.skip_campaign:
        with stage("campaign", t0):
            from ttcsim.gpu.measure import measure_many

            only = {s for s in args.only.split(",") if s} or None
            sets = {s for s in args.set.split(",") if s}
            if "all" in sets:
                sets = {"main", "extra", "gaps"}
            if only is None:
                only = set()
                if "main" in sets:
                    only |= {e[0] for e in CAMPAIGN}
                if "extra" in sets:
                    only |= {e[0] for e in BEAM_REFINE} | set(BIG_IDS)
                if "gaps" in sets:
                    only |= {e[0] for e in GAPS}
            specs = campaign_specs(only)
            # the largest model alone first, before other models fill the memory
            specs.sort(key=lambda sp: sp["id"] not in BIG_IDS)
            measure_many(specs, out / "runs.jsonl")


if __name__ == "__main__":
    main()
