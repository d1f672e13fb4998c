"""Measured energy of real workload runs (reference decoder + NVML energy counter).

A run serves ``concurrent_queries`` queries with one strategy (``single``,
``vote<N>``: N samples, ``bon<N>``: N samples scored by a reward model,
``beam<W>[:step=T,depth=D,expand=M,rm=MODEL]``: step-level beam search with
a verifier, ``refine<K>[:feedback=F,history=all|last]``: K revision rounds;
:func:`ttcsim.gpu.decoder.run_workload` says exactly what each runs) once
as a warm-up (CUDA-graph capture, Triton compilation, cuBLAS heuristics),
then ``k`` times back to back until the window lasts at least
``min_window_s``.  The energy counter is polled by a
:class:`~ttcsim.gpu.nvml.TraceSampler` from before the warm-up until 0.3 s
after the window, and::

    energy_j = sum_i energy_between(trace, t_start_i, t_end_i) / k

so the ~100 ms counter quantisation costs at most ~2 ticks / window.  (The
sum is taken over each repeat's own ``[start, end]`` span, which leaves out
the host gaps between repeats; with linear interpolation of the counter this
equals the window's energy minus those gaps.)  The
energy is the whole board's, idle power included; ``idle_power_w`` is
recorded beside it (measured over a quiet window, or passed in) so that the
fit can subtract it.  Runs are not cooled down in between: back-to-back runs
keep a similar (warm) thermal state.

Records carry the strategy as its canonical spec string
(:attr:`ttcsim.strategies.Strategy.spec`) and ``output_tokens`` as the
analytical model reads them (:attr:`~ttcsim.strategies.Strategy.draws_per_query`
per query: one per sample, one per query for beam, one per round for
refine), so that :func:`ttcsim.calibration.validate.predict_record` predicts
the same workload.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ttcsim.errors import TtcsimError
from ttcsim.gpu.decoder import (
    DTYPE_NAME,
    SUPPORTED_STRATEGIES,
    ReferenceDecoder,
    WorkloadTiming,
    beam_cache_tokens,
    kv_cache_bytes,
    refine_cache_tokens,
    run_workload,
    weight_bytes,
)
from ttcsim.gpu.nvml import NvmlDevice, TraceSampler

RECORD_KEYS = (
    "id",
    "hw",
    "model",
    "dtype",
    "prompt_tokens",
    "concurrent_queries",
    "strategy",
    "output_tokens",
    "reward_model",
    "prefix_sharing",
    "energy_j",
    "latency_s",
    "prefill_latency_s",
    "decode_latency_s",
    "score_latency_s",
    "prefill_energy_j",
    "decode_energy_j",
    "idle_power_w",
    "repeats",
    "gpu_name",
    "driver_version",
    "measured_at",
)
TRACE_PAD_S = 0.3  # poll this long before and after a window (> 2 counter ticks)
SPEC_KEYS = {
    "id",
    "model",
    "strategy",
    "prompt_tokens",
    "output_tokens",
    "concurrent_queries",
    "reward_model",
    "prefix_sharing",
    "min_window_s",
}


def resolve_strategy(strategy: Any, reward_model: str | None = None) -> Any:
    """Parse a strategy spec the reference decoder can run (:data:`SUPPORTED_STRATEGIES`).

    ``reward_model`` (a name) is the default reward model / verifier of
    ``bon``/``beam`` (a ``rm=`` in the spec wins).  Returns the
    :class:`~ttcsim.strategies.Strategy`.
    """
    from ttcsim.strategies import Beam, BestOfN, Refine, Single, Vote, parse_strategy

    try:
        strat = parse_strategy(strategy, reward_model=reward_model)
    except TtcsimError as exc:
        raise TtcsimError(f"unknown strategy {strategy!r}: {exc}", "strategy") from None
    if not isinstance(strat, (Single, Vote, BestOfN, Beam, Refine)):
        raise TtcsimError(
            f"unknown strategy {strategy!r} for the reference decoder; valid: "
            + ", ".join(SUPPORTED_STRATEGIES),
            "strategy",
        )
    return strat


def _verifier_name(strat: Any) -> str | None:
    """The reward model / verifier a strategy names (bon, beam), else None."""
    return getattr(strat, "reward_model", None)


def _outputs(output_tokens: int | Sequence[int], n_queries: int, per_query: int) -> list[int]:
    """Lengths as a full query-major list of ``n_queries x per_query`` ints >= 1.

    Accepts one int, or a list of 1, ``per_query`` (the same for every query)
    or ``n_queries x per_query`` lengths, as :func:`ttcsim.predict.predict` does.
    """
    n = n_queries * per_query
    outs = (
        [int(output_tokens)] if isinstance(output_tokens, int) else [int(o) for o in output_tokens]
    )
    if len(outs) == 1:
        outs = outs * n
    elif len(outs) == per_query:
        outs = outs * n_queries
    if len(outs) != n or not outs or min(outs) < 1:
        raise TtcsimError(
            f"output_tokens must be one int or {n} ints >= 1 (concurrent_queries x {per_query} "
            f"per query) or {per_query}; got {len(outs)}",
            "output_tokens",
        )
    return outs


def _torch_device(device_index: int, torch_device: str | None) -> str:
    if torch_device is not None:
        return torch_device
    from ttcsim.gpu import require_gpu

    require_gpu()
    return f"cuda:{device_index}"


def _as_nvml(device: NvmlDevice | int) -> tuple[NvmlDevice, bool]:
    """``(device, opened_here)``: open an index, pass a device object through."""
    if isinstance(device, int):
        return NvmlDevice(device), True
    return device, False


def measure_idle_power(device: NvmlDevice | int, duration_s: float = 3.0) -> float:
    """Mean board power over a quiet window of ``duration_s`` [W], from the energy counter.

    ``P_idle = E(window) / duration``; nothing should run on the GPU meanwhile
    (the caller's own work must be synchronised before).
    """
    dev, own = _as_nvml(device)
    try:
        sampler = TraceSampler(dev).start()
        try:
            time.sleep(TRACE_PAD_S)
            t0 = time.monotonic()
            time.sleep(duration_s)
            t1 = time.monotonic()
            time.sleep(TRACE_PAD_S)
        finally:
            sampler.stop()
        return sampler.energy_between(t0, t1) / (t1 - t0)
    finally:
        if own:
            dev.close()


def _measure(
    dec: ReferenceDecoder,
    rew: ReferenceDecoder | None,
    nvml: NvmlDevice,
    *,
    strategy: Any,
    prompt_tokens: int,
    output_tokens: int | Sequence[int],
    concurrent_queries: int,
    prefix_sharing: bool,
    min_window_s: float,
    idle_power_w: float,
    run_id: str | None,
    reward_name: str | None,
) -> dict[str, Any]:
    from ttcsim.strategies import Beam, BestOfN

    strat = resolve_strategy(strategy, reward_name)
    if isinstance(strat, BestOfN) and rew is None:
        raise TtcsimError(f"{strat.spec} needs a reward model", "reward_model")
    if not isinstance(strat, (BestOfN, Beam)) and rew is not None:
        raise TtcsimError(f"{strat.spec} takes no reward model", "reward_model")
    outs = _outputs(output_tokens, concurrent_queries, strat.draws_per_query)
    kw = dict(
        strategy=strat,
        prompt_tokens=prompt_tokens,
        output_tokens=outs,
        concurrent_queries=concurrent_queries,
        prefix_sharing=prefix_sharing,
        reward_spec=rew,
    )
    sampler = TraceSampler(nvml).start()
    timings: list[WorkloadTiming] = []
    try:
        run_workload(dec, **kw)  # warm-up: graphs, Triton, cuBLAS
        time.sleep(TRACE_PAD_S)  # a tick or two of settled counter before the window
        t0 = time.monotonic()
        while not timings or time.monotonic() - t0 < min_window_s:
            timings.append(run_workload(dec, **kw))
        time.sleep(TRACE_PAD_S)
    finally:
        sampler.stop()
    k = len(timings)
    # sum over the repeats' own [start, end] spans: excludes the few host-side
    # microseconds between repeats, so energy_j and latency_s cover the same time
    energy = sum(sampler.energy_between(t.start_s, t.end_s) for t in timings) / k

    def mean(attr: str) -> float:
        return sum(getattr(t, attr) for t in timings) / k

    model = dec.spec.name
    return {
        "id": run_id
        or f"{model}-{strat.spec}-p{prompt_tokens}-q{concurrent_queries}-{int(time.time())}",
        "hw": nvml.name.lower(),
        "model": model,
        "dtype": DTYPE_NAME,
        "prompt_tokens": int(prompt_tokens),
        "concurrent_queries": int(concurrent_queries),
        "strategy": strat.spec,
        "output_tokens": outs,
        "reward_model": reward_name,
        "prefix_sharing": bool(prefix_sharing),
        "energy_j": energy,
        "latency_s": mean("total_time_s"),
        "prefill_latency_s": mean("prefill_time_s"),
        "decode_latency_s": mean("decode_time_s"),
        "score_latency_s": mean("score_time_s"),
        "prefill_energy_j": None,
        "decode_energy_j": None,
        "idle_power_w": float(idle_power_w),
        "repeats": k,
        "gpu_name": nvml.name,
        "driver_version": nvml.driver_version,
        "measured_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def measure_run(
    spec_name_or_spec: Any,
    strategy: str,
    prompt_tokens: int,
    output_tokens: int | Sequence[int],
    concurrent_queries: int,
    *,
    reward_model: Any = None,
    prefix_sharing: bool = True,
    device_index: int = 0,
    min_window_s: float = 1.5,
    run_id: str | None = None,
    idle_power_w: float | None = None,
    torch_device: str | None = None,
) -> dict[str, Any]:
    """Measure one workload run; return its record (keys :data:`RECORD_KEYS`).

    Parameters
    ----------
    spec_name_or_spec : str or ModelSpec
        Catalog name, ``config.json`` path or spec.
    strategy : str
        ``"single"``, ``"vote<N>"``, ``"bon<N>"``, ``"beam<W>[:...]"`` or
        ``"refine<K>[:...]"`` (options as :func:`ttcsim.strategies.parse_strategy`
        reads them, e.g. ``"beam4:step=64,depth=8"``); the record holds its
        canonical spec.
    prompt_tokens : int
        Prompt length [tokens].
    output_tokens : int or list of int
        Lengths the strategy reads, query-major: per sample (single, vote,
        bon), per query (beam: ``depth = ceil(L / step)``), per round
        (refine).  One int for all, the lengths of one query, or all of them.
    concurrent_queries : int
        Queries served together.
    reward_model : str or ModelSpec, optional
        Reward model of ``bon<N>``; verifier of ``beam<W>`` (default: the
        spec's ``rm=``, else the policy's weights with a cache of their own).
    prefix_sharing : bool
        Prefix caching: the prompt is prefilled once per query and shared
        (vote/bon); the verifier of beam reads the cached prefix and
        prefills only each new step; refine prefills only each round's new
        tokens.
    min_window_s : float
        Shortest measured window [s]; the workload repeats until it is reached.
    idle_power_w : float, optional
        Idle power [W]; measured for 3 s before the run when not given.
    torch_device : str, optional
        Torch device for the decoder (default ``cuda:<device_index>``; tests
        pass ``"cpu"`` with a fake NVML).

    Returns
    -------
    dict
        ``energy_j`` [J] and ``*latency_s`` [s] are per workload (averaged
        over ``repeats``); ``prefill_energy_j`` / ``decode_energy_j`` are
        ``None`` (not measured separately).
    """
    from ttcsim.models import get_model

    spec = get_model(spec_name_or_spec)
    rspec = _reward_spec(strategy, reward_model)
    tdev = _torch_device(device_index, torch_device)
    with NvmlDevice(device_index) as nvml:
        idle = measure_idle_power(nvml) if idle_power_w is None else idle_power_w
        dec = ReferenceDecoder(spec, tdev)
        rew = ReferenceDecoder(rspec, tdev, score_only=True) if rspec is not None else None
        return _measure(
            dec,
            rew,
            nvml,
            strategy=strategy,
            prompt_tokens=prompt_tokens,
            output_tokens=output_tokens,
            concurrent_queries=concurrent_queries,
            prefix_sharing=prefix_sharing,
            min_window_s=min_window_s,
            idle_power_w=idle,
            run_id=run_id,
            reward_name=rspec.name if rspec else None,
        )


def _reward_spec(strategy: Any, reward_model: Any) -> Any:
    """The reward model / verifier spec of a run: ``reward_model`` or the strategy's ``rm=``.

    Checks that the two agree when both are given.
    """
    from ttcsim.models import get_model

    rspec = get_model(reward_model) if reward_model is not None else None
    strat = resolve_strategy(strategy, rspec.name if rspec is not None else None)
    named = _verifier_name(strat)
    if rspec is None and named is not None:
        rspec = get_model(named)
    elif rspec is not None and named is not None and named != rspec.name:
        raise TtcsimError(
            f"reward_model {rspec.name!r} contradicts the strategy's rm={named}", "reward_model"
        )
    return rspec


def _cache_need_bytes(spec: Any, run: dict[str, Any], rspec: Any = None) -> float:
    """KV-cache bytes one run allocates (policy, and the beam verifier's cache) [B]."""
    from ttcsim.strategies import Beam, Refine

    strat = resolve_strategy(run["strategy"])
    q = int(run["concurrent_queries"])
    p = int(run["prompt_tokens"])
    sharing = run.get("prefix_sharing", True)
    outs = _outputs(run["output_tokens"], q, strat.draws_per_query)
    if isinstance(strat, Beam):
        n_cand, positions = q * strat.candidates, beam_cache_tokens(strat, p, outs)
        pool = kv_cache_bytes(spec, n_cand, positions)
        verifier = kv_cache_bytes(rspec or spec, n_cand, positions) if sharing else 0.0
        return pool + verifier
    if isinstance(strat, Refine):
        prompt_cap, gen_cap = refine_cache_tokens(strat, p, outs, sharing)
        return kv_cache_bytes(spec, q, prompt_cap) + kv_cache_bytes(spec, q, gen_cap)
    n = strat.samples_per_query
    prompts = q if sharing else q * n
    return kv_cache_bytes(spec, prompts, p) + kv_cache_bytes(spec, q * n, max(outs))


def _note(progress: bool, text: str) -> None:
    if progress:
        print(text, file=sys.stderr, flush=True)


def measure_many(
    specs: Sequence[dict[str, Any]],
    out_jsonl: str | Path,
    progress: bool = True,
    *,
    device_index: int = 0,
    idle_power_w: float | None = None,
    torch_device: str | None = None,
) -> list[dict[str, Any]]:
    """Measure a list of runs, loading each model once; append one JSON line per run.

    Each entry of ``specs`` holds :func:`measure_run`'s arguments by name:
    ``model``, ``strategy``, ``prompt_tokens``, ``output_tokens``,
    ``concurrent_queries``, and optionally ``reward_model``,
    ``prefix_sharing``, ``min_window_s``, ``id``.  Runs are grouped by model
    (largest KV cache first, so the cache is allocated once); reward models
    stay loaded across groups.  Each record is appended to ``out_jsonl`` and
    flushed as soon as it is measured.  A run whose weights or cache do not
    fit (estimate above free memory, or CUDA out-of-memory) is skipped with a
    note on stderr.  Idle power is measured once at the start unless given.
    """
    from ttcsim.models import get_model

    torch = __import__("torch")
    runs = [dict(r) for r in specs]
    for i, r in enumerate(runs):
        unknown = set(r) - SPEC_KEYS
        missing = {
            "model",
            "strategy",
            "prompt_tokens",
            "output_tokens",
            "concurrent_queries",
        } - set(r)
        if unknown or missing:
            raise TtcsimError(
                f"run {i}: unknown keys {sorted(unknown)}, missing {sorted(missing)}", "specs"
            )
        r["_rspec"] = _reward_spec(r["strategy"], r.get("reward_model"))
    out = Path(out_jsonl)
    out.parent.mkdir(parents=True, exist_ok=True)
    tdev = _torch_device(device_index, torch_device)
    cuda = torch.device(tdev).type == "cuda"
    records: list[dict[str, Any]] = []
    groups: dict[str, list[int]] = {}
    model_specs = {}
    for i, r in enumerate(runs):
        spec = get_model(r["model"])
        model_specs[spec.name] = spec
        groups.setdefault(spec.name, []).append(i)
    rewards: dict[str, ReferenceDecoder] = {}
    done = 0
    with NvmlDevice(device_index) as nvml:
        idle = measure_idle_power(nvml) if idle_power_w is None else float(idle_power_w)
        _note(progress, f"idle power {idle:.1f} W on {nvml.name}; {len(runs)} runs")
        for name, idx in groups.items():
            spec = model_specs[name]
            idx.sort(key=lambda i: -_cache_need_bytes(spec, runs[i], runs[i]["_rspec"]))
            dec = None
            try:
                free = torch.cuda.mem_get_info(torch.device(tdev))[0] if cuda else math.inf
                if weight_bytes(spec) > 0.92 * free:
                    raise MemoryError(
                        f"weights {weight_bytes(spec) / 1e9:.1f} GB > free {free / 1e9:.1f} GB"
                    )
                dec = ReferenceDecoder(spec, tdev)
            except (MemoryError, torch.cuda.OutOfMemoryError) as exc:
                for _ in idx:
                    done += 1
                    _note(progress, f"[{done}/{len(runs)}] skip {name}: does not fit ({exc})")
                continue
            for i in idx:
                r = runs[i]
                done += 1
                label = (
                    f"[{done}/{len(runs)}] {name} {r['strategy']} p={r['prompt_tokens']} "
                    f"q={r['concurrent_queries']}"
                )
                rew = None
                try:
                    rspec = r["_rspec"]
                    if rspec is not None:
                        if rspec.name not in rewards:
                            rewards[rspec.name] = ReferenceDecoder(rspec, tdev, score_only=True)
                        rew = rewards[rspec.name]
                    if cuda:
                        free = torch.cuda.mem_get_info(torch.device(tdev))[0]
                        need = _cache_need_bytes(spec, r, rspec)
                        held = dec.cache_bytes + (rew.cache_bytes if rew is not None else 0.0)
                        if need > 0.9 * free + held:
                            raise MemoryError(
                                f"KV cache {need / 1e9:.1f} GB > free {free / 1e9:.1f} GB"
                            )
                    rec = _measure(
                        dec,
                        rew,
                        nvml,
                        strategy=r["strategy"],
                        prompt_tokens=int(r["prompt_tokens"]),
                        output_tokens=r["output_tokens"],
                        concurrent_queries=int(r["concurrent_queries"]),
                        prefix_sharing=bool(r.get("prefix_sharing", True)),
                        min_window_s=float(r.get("min_window_s", 1.5)),
                        idle_power_w=idle,
                        run_id=r.get("id"),
                        reward_name=rew.spec.name if rew else None,
                    )
                except (MemoryError, torch.cuda.OutOfMemoryError) as exc:
                    dec.release_cache()
                    if rew is not None:
                        rew.release_cache()
                    _note(progress, f"{label}: skipped, does not fit ({str(exc).splitlines()[0]})")
                    continue
                with out.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(rec) + "\n")
                    f.flush()
                records.append(rec)
                _note(
                    progress,
                    f"{label}: {rec['energy_j']:.1f} J, {rec['latency_s']:.3f} s, "
                    f"{rec['energy_j'] / max(rec['latency_s'], 1e-9):.0f} W avg, "
                    f"k={rec['repeats']}",
                )
            del dec
            if cuda:
                torch.cuda.empty_cache()
    return records
