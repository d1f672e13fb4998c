"""Measure Hugging Face transformers ``generate`` on one GPU, in one device call.

Device command (from the repository root; ``.whl/`` holds the pydantic wheels,
see bench/device_campaign.py)::

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=/tmp/site:$PWD \
      && python3 bench/hf_campaign.py --out $OUT --budget-s 450

(run it with ``carry: [".whl"]`` and ``timeout_s: 600``).  Local check without
a GPU: ``python bench/hf_campaign.py --out /tmp/hf --dry-run`` (tiny models on
the CPU, fake NVML).

What it does (issue 14, "Measure HF transformers yourselves"): builds each
model of :data:`CAMPAIGN` with random weights from its real architecture
(:func:`ttcsim.gpu.hf_generate.build_model`), warms ``generate`` up once per
model (which also measures its step time, used to re-estimate the remaining
runs), and measures every run with :func:`ttcsim.gpu.hf_generate.measure_hf_run`
while one NVML sampler records the whole campaign.  Idle power is measured
for 3 s at the start (CUDA context held, nothing running) and 2 s at the end.

Time budget: ``--budget-s`` counts from the script's start.  Before each run
its time is estimated (:func:`estimate_run_s`); a ``core`` run is skipped when
it no longer fits, an ``extra`` run also when it would eat into the time the
remaining core runs need.  Models come in :data:`MODEL_ORDER`.

Files under ``--out`` (5): ``runs.jsonl`` (one run record per run, ttcsim's
schema plus engine, tpot_s, ttft_s, per-repeat values, step-time profile),
``trace.csv`` (NVML: t_s monotonic, energy_j counter, power_w, sm_clock_mhz,
temperature_c, every 20 ms), ``smi.csv`` (``nvidia-smi --query-gpu ... -lms
100``), ``log.txt`` (this script's output), ``env.json`` (versions, GPU,
idle power, clock offsets, plan with estimates, skipped runs, warm-ups).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ttcsim.gpu.hf_generate import HfRun  # noqa: E402

LOGN = "lognormal:median=96,sigma=0.6,max=256"

#: Model groups in the order they are loaded (each once).
MODEL_ORDER = (
    "llama-3.1-8b",
    "llama-3.2-1b",
    "qwen2.5-32b",
    "qwen2.5-14b",
    "llama-3.2-3b",
    "qwen2.5-7b",
)

#: (id, model, strategy, prompt tokens, output spec, concurrent queries, repeats, tier, options)
#: repeats 0: until the window lasts 1 s (one call here: every run lasts > 2 s).
CAMPAIGN: list[tuple] = [
    ("8b-single-p512-o512", "llama-3.1-8b", "single", 512, "512", 1, 0, "core", {}),
    ("8b-single-p8192-o128", "llama-3.1-8b", "single", 8192, "128", 1, 0, "core", {}),
    ("8b-vote32-p512-o128", "llama-3.1-8b", "vote32", 512, "128", 1, 0, "core", {}),
    ("8b-vote128-p256-o64", "llama-3.1-8b", "vote128", 256, "64", 1, 0, "core", {}),
    ("8b-single-q256-p256-o64", "llama-3.1-8b", "single", 256, "64", 256, 0, "core", {}),
    ("8b-single-q32-logn", "llama-3.1-8b", "single", 512, LOGN, 32, 0, "core", {}),
    ("8b-single-p512-o48-rep4", "llama-3.1-8b", "single", 512, "48", 1, 4, "core", {}),
    ("8b-vote8-p1024-logn", "llama-3.1-8b", "vote8", 1024, LOGN, 1, 0, "core", {}),
    ("8b-single-p2048-o128", "llama-3.1-8b", "single", 2048, "128", 1, 0, "core", {}),
    ("1b-single-p512-o256", "llama-3.2-1b", "single", 512, "256", 1, 0, "core", {}),
    ("1b-vote16-p512-o128", "llama-3.2-1b", "vote16", 512, "128", 1, 0, "core", {}),
    ("1b-single-q256-p256-o64", "llama-3.2-1b", "single", 256, "64", 256, 0, "core", {}),
    ("1b-single-q64-logn", "llama-3.2-1b", "single", 512, LOGN, 64, 0, "core", {}),
    ("1b-single-p512-o48-rep4", "llama-3.2-1b", "single", 512, "48", 1, 4, "core", {}),
    ("1b-single-p4096-o128", "llama-3.2-1b", "single", 4096, "128", 1, 0, "core", {}),
    ("1b-vote64-p256-o64", "llama-3.2-1b", "vote64", 256, "64", 1, 0, "core", {}),
    ("32b-single-p512-o128", "qwen2.5-32b", "single", 512, "128", 1, 0, "core", {}),
    ("32b-vote4-p1024-o64", "qwen2.5-32b", "vote4", 1024, "64", 1, 0, "core", {}),
    ("32b-single-q32-p256-o64", "qwen2.5-32b", "single", 256, "64", 32, 0, "core", {}),
    ("14b-single-p1024-o128", "qwen2.5-14b", "single", 1024, "128", 1, 0, "core", {}),
    ("14b-vote8-p512-o64", "qwen2.5-14b", "vote8", 512, "64", 1, 0, "core", {}),
    ("14b-single-q64-p512-o64", "qwen2.5-14b", "single", 512, "64", 64, 0, "core", {}),
    ("14b-single-p512-o32-rep4", "qwen2.5-14b", "single", 512, "32", 1, 4, "core", {}),
    ("3b-single-p2048-o128", "llama-3.2-3b", "single", 2048, "128", 1, 0, "core", {}),
    ("3b-vote8-p512-logn", "llama-3.2-3b", "vote8", 512, LOGN, 1, 0, "core", {}),
    ("3b-single-q128-p256-o64", "llama-3.2-3b", "single", 256, "64", 128, 0, "core", {}),
    ("3b-vote64-p512-o64", "llama-3.2-3b", "vote64", 512, "64", 1, 0, "core", {}),
    ("7b-single-p1024-o128", "qwen2.5-7b", "single", 1024, "128", 1, 0, "core", {}),
    ("7b-vote16-p512-o64", "qwen2.5-7b", "vote16", 512, "64", 1, 0, "core", {}),
    ("7b-single-q64-p512-o64", "qwen2.5-7b", "single", 512, "64", 64, 0, "core", {}),
    # extras, in order of value: second HF configurations, long outputs, long prompts
    ("8b-single-p512-o256-eager", "llama-3.1-8b", "single", 512, "256", 1, 0, "extra",
     {"attn_implementation": "eager"}),
    ("8b-single-p512-o256-static", "llama-3.1-8b", "single", 512, "256", 1, 0, "extra",
     {"cache_implementation": "static"}),
    ("1b-single-p1024-o1024", "llama-3.2-1b", "single", 1024, "1024", 1, 0, "extra", {}),
    ("32b-single-p8192-o64", "qwen2.5-32b", "single", 8192, "64", 1, 0, "extra", {}),
    ("7b-single-p8192-o128", "qwen2.5-7b", "single", 8192, "128", 1, 0, "extra", {}),
    ("8b-vote4-q8-p2048-o128", "llama-3.1-8b", "vote4", 2048, "128", 8, 0, "extra", {}),
    ("8b-single-p512-o256-rep", "llama-3.1-8b", "single", 512, "256", 1, 0, "extra", {}),
]

HOST_STEP_S = 0.065  # prior per decode step [s] before a model's warm-up measures it (issue 14)
GPU_BYTES_PER_S = 3.0e12  # crude achieved HBM bandwidth for the estimate [B/s]
GPU_FLOP_PER_S = 3.0e14  # crude achieved bf16 rate for the estimate [FLOP/s]
SETTLE_S = 0.2  # sleep before and after each measured window [s]
END_RESERVE_S = 6.0  # final idle window and file writing [s]
WARMUP = dict(prompt_tokens=64, outputs=24)


def _lengths(spec: str, n: int, rng: np.random.Generator) -> tuple[int, ...]:
    from ttcsim.distributions import parse_lengths

    dist = parse_lengths(spec)
    if dist.is_fixed:
        return (int(dist.tokens),) * n
    return tuple(max(2, int(v)) for v in dist.sample(rng, n))


def build_plan(seed: int = 0) -> list[HfRun]:
    """:data:`CAMPAIGN` as :class:`HfRun` objects (lognormal lengths drawn with ``seed``)."""
    rng = np.random.default_rng(seed)
    runs = []
    for rid, model, strat, prompt, out, q, reps, tier, opts in CAMPAIGN:
        n = q * (int(strat[4:]) if strat.startswith("vote") else 1)
        runs.append(
            HfRun(
                id=rid,
                model=model,
                strategy=strat,
                prompt_tokens=prompt,
                outputs=_lengths(out, n, rng),
                concurrent_queries=q,
                repeats=reps,
                tier=tier,
                note=out if not out.isdigit() else "",
                **opts,
            ).check()
        )
    return runs


def shrink(run: HfRun) -> HfRun:
    """A CPU-sized copy of ``run`` for ``--dry-run``: <= 3 queries x 3 samples, short lengths."""
    n = run.samples_per_query
    q2, n2 = min(run.concurrent_queries, 3), min(n, 3)
    outs = [run.outputs[j * n + s] for j in range(q2) for s in range(n2)]
    top = max(outs)
    outs = tuple(max(2, round(o * 6 / top)) for o in outs)
    return HfRun(
        id=run.id,
        model=run.model,
        strategy="single" if n2 == 1 else f"vote{n2}",
        prompt_tokens=min(run.prompt_tokens, 16),
        outputs=outs,
        concurrent_queries=q2,
        repeats=min(run.repeats, 2),
        min_window_s=0.05,
        attn_implementation=run.attn_implementation,
        cache_implementation=run.cache_implementation,
        tier=run.tier,
        note=run.note,
    ).check()


def tiny_spec(spec: Any) -> Any:
    """A 2-layer, 64-wide copy of a catalog spec (same family) for ``--dry-run``."""
    return spec.model_copy(
        update=dict(
            n_layers=2, hidden_size=64, n_heads=4, n_kv_heads=2, head_dim=16,
            intermediate_size=128, vocab_size=512, max_context_tokens=4096,
        )
    )


def priorities(plan: list[HfRun], per_model: int = 2) -> dict[str, int]:
    """Priority of each run (1 first): the first ``per_model`` core runs of every model
    (so every architecture is measured), then the other core runs, then the extras."""
    seen: dict[str, int] = {}
    out = {}
    for r in plan:
        if r.tier != "core":
            out[r.id] = 3
            continue
        seen[r.model] = seen.get(r.model, 0) + 1
        out[r.id] = 1 if seen[r.model] <= per_model else 2
    return out


def estimate_run_s(run: HfRun, spec: Any, host_step_s: float) -> float:
    """Estimated wall time of ``run`` [s]: ``k (t_prefill + (S - 1) t_step) + 2 t_settle``.

    ``t_step = max(host_step_s, (W + KV) / B_hbm + 2 P rows / F)`` with ``W``
    weight bytes, ``KV`` the cache at mid-output, ``P`` parameters (= W / 2);
    ``t_prefill = host_step_s + 2 P rows p / F``.  ``k`` is the run's repeats
    or 1 (every run of the plan lasts over its 1 s window).
    """
    from ttcsim.gpu.decoder import kv_cache_bytes, weight_bytes

    w = weight_bytes(spec)
    params = w / 2.0
    steps = run.decode_steps
    kv = kv_cache_bytes(spec, run.rows, run.prompt_tokens + steps // 2)
    step = max(host_step_s, (w + kv) / GPU_BYTES_PER_S + 2 * params * run.rows / GPU_FLOP_PER_S)
    prefill = host_step_s + 2 * params * run.rows * run.prompt_tokens / GPU_FLOP_PER_S
    k = max(1, run.repeats)
    return k * (prefill + (steps - 1) * step) + 2 * SETTLE_S


def estimate_load_s(spec: Any) -> float:
    """Estimated time to build a random-weight model on the GPU and warm it up [s]."""
    from ttcsim.gpu.decoder import weight_bytes

    return 4.0 + weight_bytes(spec) / 10e9 + 2 * WARMUP["outputs"] * HOST_STEP_S


class Tee:
    """Write to the terminal and a log file at once."""

    def __init__(self, stream: Any, path: Path) -> None:
        self.stream, self.file = stream, path.open("a", encoding="utf-8")

    def write(self, text: str) -> int:
        self.file.write(text)
        self.file.flush()
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()
        self.file.flush()


SMI_FIELDS = (
    "timestamp", "power.draw", "power.draw.instant", "clocks.sm", "clocks.mem",
    "utilization.gpu", "utilization.memory", "temperature.gpu", "memory.used", "pstate",
)


def start_smi(path: Path, index: int = 0) -> subprocess.Popen | None:
    """Start an ``nvidia-smi`` query loop (100 ms) into ``path``; None where it cannot run."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    full = list(SMI_FIELDS)
    for fields in (full, [f for f in full if f != "power.draw.instant"]):  # old drivers
        try:
            probe = subprocess.run(
                [exe, f"--query-gpu={','.join(fields)}", "--format=csv", "-i", str(index)],
                capture_output=True, text=True, timeout=20,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        if probe.returncode == 0:
            break
    else:
        return None
    f = path.open("w", encoding="utf-8")
    return subprocess.Popen(
        [exe, f"--query-gpu={','.join(fields)}", "--format=csv", "-lms", "100", "-i", str(index)],
        stdout=f, stderr=subprocess.DEVNULL,
    )


def idle_window(sampler: Any, duration_s: float) -> float:
    """Mean board power over a quiet window [W]: counter energy / duration."""
    time.sleep(0.3)
    t0 = time.monotonic()
    time.sleep(duration_s)
    t1 = time.monotonic()
    time.sleep(0.3)
    return sampler.energy_between(t0, t1) / (t1 - t0)


def _versions() -> dict[str, str]:
    import torch
    import transformers

    return {
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "cuda_version": str(torch.version.cuda),
        "python_version": sys.version.split()[0],
    }


def print_table(plan: list[HfRun], est: dict[str, float], load: dict[str, float]) -> None:
    """The plan with its estimated times."""
    prio = priorities(sorted(plan, key=lambda r: MODEL_ORDER.index(r.model)))
    print(f"{'id':30s} tier  prio  rows prompt steps  k  est_s")
    for r in plan:
        print(
            f"{r.id:30s} {r.tier:5s} {prio[r.id]:4d} {r.rows:5d} {r.prompt_tokens:6d} "
            f"{r.decode_steps:5d} {max(1, r.repeats):2d} {est[r.id]:6.1f}"
        )
    core = sum(est[r.id] for r in plan if r.tier == "core")
    extra = sum(est[r.id] for r in plan if r.tier != "core")
    print(f"model loads + warm-ups {sum(load.values()):.0f} s, core runs {core:.0f} s, "
          f"extra runs {extra:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run the campaign (see the module docstring); returns the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget-s", type=float, default=450.0, help="wall time from start [s]")
    ap.add_argument("--only", default="", help="comma list of run ids")
    ap.add_argument("--dry-run", action="store_true", help="tiny models on the CPU, fake NVML")
    ap.add_argument("--plan-only", action="store_true", help="print the estimates and stop")
    ap.add_argument("--no-smi", action="store_true")
    ap.add_argument("--idle-s", type=float, default=3.0)
    args = ap.parse_args(argv)
    t_start = time.monotonic()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    old_out, old_err = sys.stdout, sys.stderr
    sys.stdout = Tee(old_out, out / "log.txt")
    sys.stderr = sys.stdout
    try:
        return _campaign(args, out, t_start)
    finally:
        sys.stdout, sys.stderr = old_out, old_err


def _campaign(args: argparse.Namespace, out: Path, t_start: float) -> int:
    from ttcsim.models import get_model

    plan = build_plan()
    if args.only:
        keep = set(args.only.split(","))
        plan = [r for r in plan if r.id in keep]
    if args.dry_run:
        plan = [shrink(r) for r in plan]
    specs = {m: get_model(m) for m in MODEL_ORDER}
    if args.dry_run:
        specs = {m: tiny_spec(s) for m, s in specs.items()}
    host_step = {m: HOST_STEP_S for m in MODEL_ORDER}
    est = {r.id: estimate_run_s(r, specs[r.model], host_step[r.model]) for r in plan}
    load = {m: estimate_load_s(specs[m]) for m in MODEL_ORDER if any(r.model == m for r in plan)}
    print_table(plan, est, load)
    if args.plan_only:
        return 0

    if args.dry_run:
        from ttcsim.gpu.fakes import make_fake_pynvml

        sys.modules["pynvml"] = make_fake_pynvml(150.0, name="NVIDIA H200 (fake)")
        device = "cpu"
    else:
        from ttcsim.gpu import require_gpu

        require_gpu()
        device = "cuda:0"
    import torch

    from ttcsim.gpu.hf_generate import build_model, generate_once, measure_hf_run, set_attention
    from ttcsim.gpu.nvml import NvmlDevice, TraceSampler

    versions = _versions()
    cuda = device.startswith("cuda")
    if cuda:
        torch.zeros(1, device=device)  # CUDA context before idle, held throughout
    env: dict[str, Any] = {"versions": versions, "device": device, "dry_run": args.dry_run,
                           "budget_s": args.budget_s, "skipped": [], "failed": [],
                           "warmups": {}, "model_load_s": {}}
    env["plan"] = [
        {"id": r.id, "model": r.model, "strategy": r.strategy, "prompt_tokens": r.prompt_tokens,
         "concurrent_queries": r.concurrent_queries, "rows": r.rows,
         "decode_steps": r.decode_steps, "repeats": r.repeats, "tier": r.tier,
         "estimate_s": round(est[r.id], 2)}
        for r in plan
    ]
    runs_path = out / "runs.jsonl"
    runs_path.write_text("", encoding="utf-8")
    smi = None if (args.no_smi or not cuda) else start_smi(out / "smi.csv")
    n_done = 0
    with NvmlDevice(0) as nvml:
        sampler = TraceSampler(nvml, csv_path=out / "trace.csv").start()
        env.update(gpu_name=nvml.name, driver_version=nvml.driver_version,
                   power_limit_w=nvml.power_limit_w,
                   clock={"unix_s": time.time(), "monotonic_s": time.monotonic(),
                          "perf_counter_s": time.perf_counter(), "tz": time.strftime("%Z")})
        try:
            idle = idle_window(sampler, args.idle_s)
            env["idle_power_w_start"] = idle
            print(f"idle {idle:.1f} W on {nvml.name} (driver {nvml.driver_version}); "
                  f"{versions}", flush=True)

            def left_s() -> float:
                return args.budget_s - (time.monotonic() - t_start) - END_RESERVE_S

            def reserve_s(i: int, loaded: set[str]) -> float:
                """Time the later runs of higher priority than ``order[i]`` still need [s]."""
                rank = prio[order[i].id]
                rest = [r for r in order[i + 1 :] if prio[r.id] < rank]
                models = {r.model for r in rest} - loaded
                return sum(est[r.id] for r in rest) + sum(load[m] for m in models)

            order = sorted(plan, key=lambda r: MODEL_ORDER.index(r.model))
            prio = priorities(order)
            loaded: set[str] = set()
            model = None
            current = None
            for i, run in enumerate(order):
                if run.model != current:
                    if model is not None:
                        del model
                        model = None
                        gc.collect()
                        if cuda:
                            torch.cuda.empty_cache()
                    current = run.model
                    group = [r for r in order if r.model == current]
                    need = load[current] + min(est[r.id] for r in group)
                    if need > left_s():
                        print(f"skip model {current}: {need:.0f} s > {left_s():.0f} s left")
                    else:
                        try:
                            model = _load(current, specs[current], device, env, host_step,
                                          build_model, generate_once, torch, cuda)
                        except Exception as exc:  # noqa: BLE001 - the other models may work
                            traceback.print_exc()
                            env["failed"].append({"id": f"load-{current}",
                                                  "why": str(exc).splitlines()[0][:300]})
                            model = None
                            gc.collect()
                            if cuda:
                                torch.cuda.empty_cache()
                        loaded.add(current)
                        for m in MODEL_ORDER:  # unloaded models: assume this step time
                            if m not in loaded:
                                host_step[m] = host_step[current]
                        est.update({r.id: estimate_run_s(r, specs[r.model], host_step[r.model])
                                    for r in order})
                if model is None:
                    env["skipped"].append({"id": run.id, "why": f"model {run.model} not loaded"})
                    continue
                reserve = reserve_s(i, loaded)
                if est[run.id] + reserve > left_s():
                    why = (f"budget: est {est[run.id]:.0f} s + reserve {reserve:.0f} s > "
                           f"{left_s():.0f} s left")
                    print(f"skip {run.id}: {why}", flush=True)
                    env["skipped"].append({"id": run.id, "why": why})
                    continue
                try:
                    if run.attn_implementation != "sdpa":
                        set_attention(model, run.attn_implementation)
                    if cuda:
                        torch.cuda.reset_peak_memory_stats(device)
                    t0 = time.monotonic()
                    rec = measure_hf_run(
                        model, run, sampler, device=device, idle_power_w=idle,
                        versions=versions, hw=nvml.name.lower(), gpu_name=nvml.name,
                        driver_version=nvml.driver_version, settle_s=SETTLE_S,
                    )
                    rec["wall_s"] = time.monotonic() - t0
                    rec["estimate_s"] = est[run.id]
                    rec["peak_memory_bytes"] = (
                        int(torch.cuda.max_memory_allocated(device)) if cuda else None
                    )
                except Exception as exc:  # noqa: BLE001 - report and go on: device time is precious
                    oom = "out of memory" in str(exc).lower()
                    traceback.print_exc()
                    env["failed"].append({"id": run.id, "why": str(exc).splitlines()[0][:300],
                                          "oom": oom})
                    if cuda:
                        gc.collect()
                        torch.cuda.empty_cache()
                    continue
                finally:
                    if run.attn_implementation != "sdpa":
                        set_attention(model, "sdpa")
                with runs_path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(rec) + "\n")
                n_done += 1
                e, lat = rec["energy_j"], rec["latency_s"]
                tpot = rec["tpot_s"] * 1e3 if rec["tpot_s"] else math.nan
                print(
                    f"[{time.monotonic() - t_start:6.1f}s] {run.id}: {e:.1f} J, {lat:.2f} s "
                    f"(est {est[run.id]:.1f}), {e / lat:.0f} W avg, ttft "
                    f"{rec['ttft_s'] * 1e3:.0f} ms, tpot {tpot:.1f} ms, k={rec['repeats']}",
                    flush=True,
                )
            if model is not None:
                del model
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
            env["idle_power_w_end"] = idle_window(sampler, min(2.0, args.idle_s))
        finally:
            sampler.stop()
            if smi is not None:
                smi.terminate()
                smi.wait(timeout=5)
            env["runs_done"] = n_done
            env["wall_s"] = time.monotonic() - t_start
            (out / "env.json").write_text(json.dumps(env, indent=1, default=str) + "\n")
    print(f"done: {n_done} runs, {len(env['skipped'])} skipped, {len(env['failed'])} failed, "
          f"{time.monotonic() - t_start:.0f} s", flush=True)
    return 0


def _load(name: str, spec: Any, device: str, env: dict, host_step: dict, build_model: Any,
          generate_once: Any, torch: Any, cuda: bool) -> Any:
    """Build ``name`` on the device, warm ``generate`` up, and measure its step time."""
    t0 = time.monotonic()
    model = build_model(spec, device)
    if cuda:
        torch.cuda.synchronize(device)
    env["model_load_s"][name] = time.monotonic() - t0
    warm = HfRun(id=f"warmup-{name}", model=name, strategy="single",
                 prompt_tokens=WARMUP["prompt_tokens"], outputs=(WARMUP["outputs"],))
    generate_once(model, warm, device)  # first call: cuBLAS, allocator, kernels
    res = generate_once(model, warm, device, seed=1)
    steps = np.diff(res["stamps_s"])
    step_s = float(np.median(steps)) if steps.size else HOST_STEP_S
    host_step[name] = step_s
    env["warmups"][name] = {"step_s_median": step_s, "ttft_s": res["ttft_s"],
                            "latency_s": res["latency_s"], "steps": WARMUP["outputs"]}
    print(f"{name}: built in {env['model_load_s'][name]:.1f} s, warm step "
          f"{step_s * 1e3:.1f} ms, ttft {res['ttft_s'] * 1e3:.0f} ms", flush=True)
    return model


if __name__ == "__main__":
    sys.exit(main())
