"""Engine physics: pure functions from an engine profile and a workload to passes.

Notation: a decode step over ``b`` running sequences of context ``x = sum (P + s)``
has, from the hardware profile, GPU time ``t_gpu(b, x)`` and dynamic energy
``E_dyn(b, x)`` (:mod:`ttcsim.simulator.roofline`).  The engine adds:

**Host time and overlap.**  Exposed host time per pass (``L`` layers)::

    t_host = (1 - overlap) (step_s + L per_layer_s + (tp - 1) per_tp_rank_s + b per_sequence_s
                            [+ prefill_s + T per_prefill_token_s])            [s]
    t      = t_gpu + t_host                                                   [s]
    E      = n_gpus (P_static t_gpu + P_gap t_host + E_dyn)                   [J]
    P_gap  = P_idle + gap_power_fraction * P_active                           [W]

The sum (not ``max(t_gpu, t_host)``) keeps a step affine in the context at a
fixed batch, so the closed-form decode sums, the exact expectation over random
lengths and the vectorised sweep all stay exact; ``overlap`` is the share of
host time hidden under GPU work.  A host-bound step therefore draws the
time-weighted mix of the pass's power and ``P_gap`` -- the power coefficients
are untouched.

**Kernels.**  Efficiencies are the hardware's times the engine's scale
(capped at 1).  With CUDA graphs a decode batch runs its GEMMs padded to the
next captured bucket (:func:`~ttcsim.simulator.roofline.padded_batch`).

**Length-growing costs.**  A dynamic cache that appends with ``torch.cat``
moves ``append_copy_factor * x * b_kv`` bytes per step (read and write: 2), at
the weight-streaming bandwidth, ``e_B`` per byte.

**Batching** (applied by :mod:`ttcsim.simulator.phases`):

* ``lockstep`` -- one batch that shrinks as sequences finish (today);
* ``static-padded`` -- every sequence of the batch runs ``max(L) - 1`` steps
  (finished rows stay), the batch never shrinks and every query waits for the
  longest: :func:`padded_lengths`;
* ``continuous`` -- at most ``B = min(max_num_seqs, KV-feasible)`` sequences
  run; a finished sequence's slot is refilled from the queue
  (:func:`continuous_schedule`).  With ``n <= B`` this is ``lockstep``.

**KV memory** (:func:`kv_sizing_tokens`): ``static`` allocates every sequence
for the longest length; ``paged`` holds the tokens in use, whose peak over a
shrinking batch is ``max_j L_(j) (n - j)`` for sorted lengths.  A continuous
engine never refuses a batch that the pool cannot hold: its running batch is
limited to what fits (:func:`kv_feasible_batch`); recompute preemption, which
vLLM uses when blocks run out mid-sequence, is not priced (the admission limit
keeps it rare; stated in ``docs/MODEL.md``).
"""

from __future__ import annotations

import math

import numpy as np

from ttcsim.engines.schema import EngineProfile


def scaled_parameters(p, engine: EngineProfile):
    """Hardware :class:`~ttcsim.hardware.ModelParameters` with the engine's kernel scales.

    ``eta' = min(eta * scale, 1)`` for weight streaming, GEMM, decode and
    prefill attention; ``memory_usable_fraction`` becomes the engine's
    ``gpu_memory_utilization`` when it sets one.
    """
    k = engine.kernels
    update = {
        "weight_stream_efficiency": min(p.weight_stream_efficiency
                                        * k.weight_stream_efficiency_scale, 1.0),
        "gemm_efficiency": min(p.gemm_efficiency * k.gemm_efficiency_scale, 1.0),
        "attention_decode_efficiency": min(
            p.attention_decode_efficiency * k.attention_decode_efficiency_scale, 1.0),
        "attention_prefill_efficiency": min(
            p.attention_prefill_efficiency * k.attention_prefill_efficiency_scale, 1.0),
    }
    if engine.kv_cache.gpu_memory_utilization is not None:
        update["memory_usable_fraction"] = engine.kv_cache.gpu_memory_utilization
    return p.model_copy(update=update)


def coefficient_terms(engine: EngineProfile, profile, spec, tp: int) -> dict:
    """Engine fields of :class:`~ttcsim.simulator.coefficients.PassCoefficients`.

    Host terms are exposed times (already ``* (1 - overlap)``); the gap saving
    is ``P_static - P_gap = (1 - gap_power_fraction) P_active`` per GPU.
    ``kv_copy_factor`` is turned into bytes per KV token by the caller.
    """
    h = engine.host
    exposed = 1.0 - h.overlap
    k = engine.kernels
    return {
        "engine_name": engine.name,
        "host_pass_s": exposed * (h.step_s + spec.n_layers * h.per_layer_s
                                  + (tp - 1) * h.per_tp_rank_s),
        "host_sequence_s": exposed * h.per_sequence_s,
        "host_prefill_s": exposed * h.prefill_s,
        "host_prefill_token_s": exposed * h.per_prefill_token_s,
        "host_gap_saving_w": (1.0 - h.gap_power_fraction) * profile.parameters.active_power_w,
        "kv_copy_factor": engine.kv_cache.append_copy_factor,
        "decode_batch_buckets": tuple(float(b) for b in k.graph_batch_buckets)
        if k.cuda_graphs else (),
        "batching": engine.batching.policy,
        "max_num_seqs": int(engine.batching.max_num_seqs or 0),
        "prefill_tokens_per_pass": float(engine.prefill.max_tokens_per_pass or 0),
        "prefill_chunked": engine.prefill.chunked,
    }


def shares_prefix(engine: EngineProfile | None, requested: bool) -> bool:
    """Whether a query's samples share its prompt: asked for, and the engine can.

    ``share_parallel_prefill`` governs parallel samples and ``prefix_caching``
    reuse across rounds; ttcsim has one switch for both, so both must allow it
    (HF generate allows neither: every row is prefilled).
    """
    if engine is None:
        return requested
    p = engine.prefix
    return requested and (p.share_parallel_prefill or p.prefix_caching)


def padded_lengths(values: np.ndarray) -> np.ndarray:
    """Static padded batch: every nonzero length of a row becomes the row's longest.

    ``values`` is ``(n,)`` or ``(draws, n)``; 0 (an idle slot) stays 0.
    """
    v = np.asarray(values, dtype=float)
    longest = v.max(axis=-1, keepdims=True) if v.size else v
    return np.where(v > 0, np.broadcast_to(longest, v.shape), 0.0)


def prefill_passes(n_prompts: float, prompt_tokens: float, tokens_per_pass: float,
                   chunked: bool) -> float:
    """Number of passes a prefill of ``n`` prompts of ``P`` tokens takes.

    Unlimited (``tokens_per_pass = 0``): one.  Chunked: ``ceil(n P / budget)``.
    Not chunked: whole prompts per pass, ``ceil(n / floor(budget / P))`` (a
    prompt longer than the budget takes a pass of its own).
    """
    if tokens_per_pass <= 0 or n_prompts <= 0:
        return 1.0
    total = n_prompts * prompt_tokens
    if chunked or prompt_tokens <= 0:
        return float(max(1, math.ceil(total / tokens_per_pass - 1e-9)))
    per_pass = max(1, int(tokens_per_pass // max(prompt_tokens, 1.0)))
    return float(max(1, math.ceil(n_prompts / per_pass - 1e-9)))


def kv_sizing_tokens(lengths: np.ndarray, allocation: str) -> float:
    """Output tokens per sequence the KV cache is sized for (known lengths).

    ``static``: the longest.  ``paged``: the peak of tokens in use over the
    shrinking batch, ``max_j L_(j) (n - j) / n`` (``L`` sorted ascending), since
    a finished sequence frees its blocks.
    """
    v = np.sort(np.asarray(lengths, dtype=float))
    if v.size == 0:
        return 0.0
    if allocation != "paged":
        return float(v[-1])
    n = v.size
    return float(np.max(v * (n - np.arange(n))) / n)


def kv_feasible_batch(free_bytes: float, kv_bytes_per_token: float, tokens_per_sequence: float,
                      block_tokens: int = 16) -> int:
    """Running sequences a paged KV pool of ``free_bytes`` holds at once.

    Each sequence holds ``ceil(tokens / block) * block`` tokens; at least 0.
    """
    per_seq = math.ceil(max(tokens_per_sequence, 1.0) / block_tokens) * block_tokens
    if kv_bytes_per_token <= 0:
        return 1 << 30
    return max(int(free_bytes // (per_seq * kv_bytes_per_token)), 0)


def continuous_schedule(steps: np.ndarray, slots: int):
    """FCFS continuous batching of sequences needing ``steps[d, i]`` decode steps.

    Vectorised over rows ``d`` (draws).  The first ``slots`` sequences start at
    step 0; each later one starts when the earliest slot frees (list
    scheduling).  Returns ``(start, saturated)``: each sequence's start step and,
    per row, the step at which the last sequence was admitted (until then all
    ``slots`` run).  Cost: O(n) numpy operations of size ``draws x slots``.
    """
    s = np.atleast_2d(np.asarray(steps, dtype=float))
    draws, n = s.shape
    start = np.zeros_like(s)
    k = min(slots, n)
    free = s[:, :k].copy()
    rows = np.arange(draws)
    for i in range(k, n):
        j = np.argmin(free, axis=1)
        t = free[rows, j]
        start[:, i] = t
        free[rows, j] = t + s[:, i]
    saturated = start[:, n - 1] if n > k else np.zeros(draws)
    return start, saturated
