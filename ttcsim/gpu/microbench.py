"""Calibration microbenchmarks: timed, energy-metered kernel windows.

Each window runs one kernel (or a fixed sequence of kernels: one
*iteration*) back to back for at least ``window_s`` (1.5 s: 15 ticks of the
~100 ms energy counter), synchronised at both ends, with the NVML sampler
running throughout.  Per iteration::

    time_s   = window duration / iterations                 [s]
    energy_j = energy_between(trace, t_start, t_end) / iterations   [J]

``hbm_bytes`` and ``flops`` are what an iteration must move / compute:

* weight streaming: ``x[M,K] @ W_i^T`` over a rotating set of ``K x N`` bf16
  matrices totalling >= 2 GiB (>> 4x the 50 MB L2), so every weight comes
  from HBM: bytes = ``sum_i (K N + M K + M N) b``, FLOPs = ``sum_i 2 M N K``;
* GEMM: one ``M x 8192 x 8192`` matmul, same formulas, one matrix;
* decode attention: the decoder's own kernel over rotating per-layer KV
  caches totalling >= 2 GiB: bytes = K+V read ``2 B c H_kv d b`` per layer,
  FLOPs = ``4 B H_q c d`` per layer;
* decoder: one decode step of the reference decoder; bytes and FLOPs from
  :meth:`ReferenceDecoder.step_cost` at the mean context of the window.

Kernels are replayed as CUDA graphs (except the decoder, which graphs its
own steps) so launch overhead does not dilute small kernels.  Output:
``out_dir/trace.csv`` (the whole sampler trace, streamed) and
``out_dir/phases.jsonl`` (one line per window, written as it completes).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ttcsim.errors import TtcsimError
from ttcsim.gpu.decoder import (
    DTYPE_NAME,
    ReferenceDecoder,
    choose_num_splits,
    decode_attention_reference,
    decode_attention_triton,
    kv_cache_bytes,
    run_workload,
    triton_available,
    weight_bytes,
)
from ttcsim.gpu.nvml import NvmlDevice, TraceSampler

PAD_S = 0.3  # idle gap after each window: the counter ticks past t_end before we read it
WEIGHT_STREAM_M = (1, 8, 32, 128, 256)
GEMM_M = (512, 2048, 8192, 16384)
GEMM_KN = 8192
ATTENTION_SHAPES = ((1, 8192), (32, 512), (32, 4096), (8, 32768))  # (batch, context)
ATTN_HQ, ATTN_HKV, ATTN_D = 32, 8, 128  # llama-3.1-8b attention shapes
ROTATING_BYTES = 2 * 2**30  # >= 4x L2 on every current GPU
DECODER_MODEL = "llama-3.1-8b"
DECODER_PROMPT_TOKENS = 512
DECODER_BATCHES = (1, 64)
DECODER_WINDOW_S = 2.0


def _sync(torch: Any, device: Any) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _graphed(torch: Any, device: Any, fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` captured as a CUDA graph (eager ``fn`` off CUDA or if capture fails)."""
    if device.type != "cuda":
        return fn
    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        torch.cuda.synchronize(device)
    except Exception as exc:  # noqa: BLE001 - graphs are an optimisation only
        print(f"  (CUDA graph capture failed, running eagerly: {exc})", file=sys.stderr)
        torch.cuda.synchronize(device)
        return fn
    return graph.replay


class _Bench:
    """Runs windows against one sampler and appends each record to phases.jsonl."""

    def __init__(
        self,
        torch: Any,
        device: Any,
        sampler: TraceSampler,
        phases: Path,
        window_s: float,
        progress: bool,
        total: int,
    ) -> None:
        self.torch, self.device, self.sampler = torch, device, sampler
        self.phases, self.window_s, self.progress, self.total = phases, window_s, progress, total
        self.records: list[dict[str, Any]] = []

    def record(
        self, phase: str, kind: str, t0: float, t1: float, iterations: int, **fields: Any
    ) -> dict:
        time.sleep(PAD_S)
        energy = self.sampler.energy_between(t0, t1)
        cols = self.sampler.columns()
        inside = (cols["t_s"] >= t0) & (cols["t_s"] <= t1)
        clocks = cols["sm_clock_mhz"][inside]
        clocks = clocks[~np.isnan(clocks)]
        rec = {
            "phase": phase,
            "kind": kind,
            "t_start_s": t0,
            "t_end_s": t1,
            "time_s": (t1 - t0) / iterations,
            "iterations": iterations,
            "energy_j": energy / iterations,
            "hbm_bytes": float(fields.pop("hbm_bytes", 0.0)),
            "flops": float(fields.pop("flops", 0.0)),
            "dtype": DTYPE_NAME,
            "m": fields.pop("m", None),
            "n": fields.pop("n", None),
            "k": fields.pop("k", None),
            "batch": fields.pop("batch", None),
            "context_tokens": fields.pop("context_tokens", None),
            "avg_power_w": energy / (t1 - t0),
            "mean_sm_clock_mhz": float(clocks.mean()) if clocks.size else None,
        }
        if fields:
            raise TtcsimError(f"unexpected window fields {sorted(fields)}")
        self.records.append(rec)
        with self.phases.open("a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        if self.progress:
            print(
                f"[{len(self.records)}/{self.total}] {phase:<28} "
                f"{rec['time_s'] * 1e3:9.3f} ms/it x "
                f"{iterations:<6d} {rec['avg_power_w']:6.0f} W {rec['energy_j']:9.4f} J/it",
                file=sys.stderr,
                flush=True,
            )
        return rec

    def window(self, phase: str, kind: str, fn: Callable[[], Any], **fields: Any) -> dict:
        """Run ``fn`` back to back for >= window_s; record per-iteration time and energy."""
        torch, dev = self.torch, self.device
        fn()
        _sync(torch, dev)
        t = time.perf_counter()
        fn()
        _sync(torch, dev)
        chunk = max(1, math.ceil(0.5 * self.window_s / max(time.perf_counter() - t, 1e-7)))
        iterations = 0
        t0 = time.monotonic()
        while iterations == 0 or time.monotonic() - t0 < self.window_s:
            for _ in range(chunk):
                fn()
            iterations += chunk
            _sync(torch, dev)
        return self.record(phase, kind, t0, time.monotonic(), iterations, **fields)


def _fallback_decoder_spec() -> Any:
    from ttcsim.models import ModelSpec

    return ModelSpec(
        name="llama-3.2-1b-shapes",
        n_layers=16,
        hidden_size=2048,
        n_heads=32,
        n_kv_heads=8,
        head_dim=64,
        intermediate_size=8192,
        vocab_size=128256,
        tie_word_embeddings=True,
        source="fallback shapes (Llama-3.2-1B config.json)",
    )


def run_microbenchmarks(
    out_dir: str | Path,
    device_index: int = 0,
    budget_s: float = 150,
    progress: bool = True,
    *,
    torch_device: str | None = None,
    window_s: float = 1.5,
    tiny: bool = False,
) -> list[dict[str, Any]]:
    """Run the calibration windows; return their records (also in ``out_dir/phases.jsonl``).

    Windows, in order: idle (3 s, before any GPU allocation), weight streaming
    (M in 1..256), GEMM (M in 512..16384, K = N = 8192), decode attention
    ((batch, context) in (1, 8192), (32, 512), (32, 4096), (8, 32768)), decoder
    (batch 1 and 64), idle_after (3 s, context held and GPU warm).
    A window that would overrun ``budget_s`` [s] is skipped with a note.
    ``tiny`` shrinks every shape (for CPU tests with a fake NVML);
    ``torch_device`` overrides ``cuda:<device_index>``.
    """
    import torch

    from ttcsim.gpu.measure import _torch_device

    tdev = torch.device(_torch_device(device_index, torch_device))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    phases = out / "phases.jsonl"
    phases.write_text("", encoding="utf-8")
    dtype = torch.bfloat16
    db = 2  # bytes per bf16 element
    scale = 64 if tiny else 1
    kn = GEMM_KN // scale
    rot_bytes = ROTATING_BYTES // scale**2
    idle_s = 0.5 if tiny else 3.0
    attn_shapes = ((1, 128), (2, 64)) if tiny else ATTENTION_SHAPES
    gemm_m = (8, 32) if tiny else GEMM_M
    ws_m = (1, 4) if tiny else WEIGHT_STREAM_M
    total = 2 + len(ws_m) + len(gemm_m) + len(attn_shapes) + len(DECODER_BATCHES)
    start = time.monotonic()

    def left() -> float:
        return budget_s - (time.monotonic() - start)

    g = None

    def rnd(*shape: int) -> Any:
        nonlocal g
        if g is None:  # created after the first idle window: no CUDA context before it
            g = torch.Generator(device=tdev).manual_seed(0)
        return torch.empty(shape, device=tdev, dtype=dtype).normal_(0, 0.02, generator=g)

    cost = window_s + PAD_S + 0.5
    with NvmlDevice(device_index) as nvml:
        sampler = TraceSampler(nvml, csv_path=out / "trace.csv").start()
        bench = _Bench(torch, tdev, sampler, phases, window_s, progress, total)
        try:
            time.sleep(PAD_S)
            # idle, before this process allocates anything on the GPU
            t0 = time.monotonic()
            time.sleep(idle_s)
            bench.record("idle", "idle", t0, time.monotonic(), 1)

            # weight streaming
            n_mat = max(2, math.ceil(rot_bytes / (kn * kn * db)))
            weights = [rnd(kn, kn) for _ in range(n_mat)]
            for m in ws_m:
                if left() < cost:
                    _skip(progress, f"weight_stream_m{m}")
                    continue
                x, y = rnd(m, kn), torch.empty((m, kn), device=tdev, dtype=dtype)

                def stream(x: Any = x, y: Any = y, weights: list = weights) -> None:
                    for w in weights:  # x @ w^T, the layout of the decoder's F.linear
                        torch.matmul(x, w.t(), out=y)

                bench.window(
                    f"weight_stream_m{m}",
                    "weight_stream",
                    _graphed(torch, tdev, stream),
                    hbm_bytes=n_mat * (kn * kn + 2 * m * kn) * db,
                    flops=n_mat * 2.0 * m * kn * kn,
                    m=m,
                    n=kn,
                    k=kn,
                )
            del weights

            # GEMM
            w = rnd(kn, kn)
            for m in gemm_m:
                if left() < cost:
                    _skip(progress, f"gemm_m{m}")
                    continue
                x, y = rnd(m, kn), torch.empty((m, kn), device=tdev, dtype=dtype)

                def gemm(x: Any = x, y: Any = y, w: Any = w) -> None:
                    torch.matmul(x, w.t(), out=y)

                bench.window(
                    f"gemm_m{m}",
                    "gemm",
                    _graphed(torch, tdev, gemm),
                    hbm_bytes=(kn * kn + 2 * m * kn) * db,
                    flops=2.0 * m * kn * kn,
                    m=m,
                    n=kn,
                    k=kn,
                )
                del x, y
            del w

            # decode attention
            use_triton = tdev.type == "cuda" and triton_available()
            attn = decode_attention_triton if use_triton else decode_attention_reference
            hq, hkv, d = (ATTN_HQ, ATTN_HKV, ATTN_D) if not tiny else (8, 2, 32)
            for batch, ctx in attn_shapes:
                if left() < cost:
                    _skip(progress, f"attention_b{batch}_c{ctx}")
                    continue
                per_layer = 2 * batch * ctx * hkv * d * db
                layers = max(1, math.ceil(rot_bytes / per_layer))
                caches = [(rnd(batch, ctx, hkv, d), rnd(batch, ctx, hkv, d)) for _ in range(layers)]
                kg, vg = rnd(batch, 1, hkv, d), rnd(batch, 1, hkv, d)
                q = rnd(batch, hq, d)
                idx = torch.arange(batch, device=tdev)
                plen = torch.full((batch,), ctx - 1, device=tdev, dtype=torch.long)
                glen = torch.ones(batch, device=tdev, dtype=torch.long)
                n_sms = (
                    torch.cuda.get_device_properties(tdev).multi_processor_count
                    if tdev.type == "cuda"
                    else 132
                )
                splits = choose_num_splits(batch, hkv, ctx, n_sms)
                o = torch.empty_like(q)

                def attend(
                    caches: Any = caches,
                    kg: Any = kg,
                    vg: Any = vg,
                    q: Any = q,
                    idx: Any = idx,
                    plen: Any = plen,
                    glen: Any = glen,
                    splits: int = splits,
                    o: Any = o,
                ) -> None:
                    for kp, vp in caches:
                        o.copy_(attn(q, kp, vp, kg, vg, idx, idx, plen, glen, splits))

                bench.window(
                    f"attention_b{batch}_c{ctx}",
                    "attention_decode",
                    _graphed(torch, tdev, attend),
                    hbm_bytes=layers * per_layer,
                    flops=layers * 4.0 * batch * hq * ctx * d,
                    batch=batch,
                    context_tokens=ctx,
                )
                del caches, attend

            # decoder
            _decoder_windows(bench, torch, tdev, left, tiny, progress)

            # idle again: CUDA context held, GPU warm, clocks possibly still up
            _sync(torch, tdev)
            if left() >= idle_s + PAD_S:
                t0 = time.monotonic()
                time.sleep(idle_s)
                bench.record("idle_after", "idle", t0, time.monotonic(), 1)
            else:
                _skip(progress, "idle_after")
        finally:
            sampler.stop()
    if progress:
        print(
            f"microbenchmarks: {len(bench.records)} windows in "
            f"{time.monotonic() - start:.0f} s -> {out}",
            file=sys.stderr,
        )
    return bench.records


def _skip(progress: bool, phase: str) -> None:
    if progress:
        print(f"  skip {phase}: over the time budget", file=sys.stderr, flush=True)


def _decoder_windows(
    bench: _Bench, torch: Any, tdev: Any, left: Callable[[], float], tiny: bool, progress: bool
) -> None:
    """Decode windows of the reference decoder (batch 1 and 64, ~2 s each)."""
    from ttcsim.models import ModelSpec, get_model

    if left() < 25 and not tiny:
        _skip(progress, "decoder")
        return
    max_steps, p = (16, 32) if tiny else (1024, DECODER_PROMPT_TOKENS)
    b_max = max(DECODER_BATCHES)
    if tiny:
        spec = ModelSpec(
            name="tiny",
            n_layers=2,
            hidden_size=64,
            n_heads=4,
            n_kv_heads=2,
            head_dim=16,
            intermediate_size=128,
            vocab_size=256,
        )
    else:
        try:
            spec = get_model(DECODER_MODEL)
        except Exception:  # noqa: BLE001 - catalog missing or renamed: use the fallback
            spec = _fallback_decoder_spec()
        free = torch.cuda.mem_get_info(tdev)[0] if tdev.type == "cuda" else math.inf
        need = weight_bytes(spec) + kv_cache_bytes(spec, b_max, p + max_steps) * 1.1 + 4e9
        if need > free:
            spec = _fallback_decoder_spec()
    dec = ReferenceDecoder(spec, tdev)
    dec.ensure_capacity(b_max, p, b_max, max_steps)
    window_s = bench.window_s if tiny else DECODER_WINDOW_S
    for batch in DECODER_BATCHES:
        phase = f"decoder_{spec.name}_b{batch}"
        if left() < window_s + 3:
            _skip(progress, phase)
            continue
        kw = dict(prompt_tokens=p, samples_per_query=1, concurrent_queries=batch)
        probe = run_workload(dec, output_tokens=[17] * batch, **kw)  # warm-up: captures the graph
        probe = run_workload(dec, output_tokens=[17] * batch, **kw)
        step_s = probe.decode_time_s / 16
        steps = int(min(max_steps, max(16, math.ceil(window_s / max(step_s, 1e-6)))))
        t = run_workload(dec, output_tokens=[steps + 1] * batch, **kw)
        mean_ctx = p + (steps + 1) / 2
        hbm, flops = dec.step_cost(batch, mean_ctx)
        bench.record(
            phase,
            "decoder",
            t.decode_start_s,
            t.decode_end_s,
            steps,
            hbm_bytes=hbm,
            flops=flops,
            batch=batch,
            context_tokens=mean_ctx,
        )
    dec.release_cache()
