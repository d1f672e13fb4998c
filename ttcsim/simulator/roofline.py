"""Time and energy of one forward pass: a roofline with calibrated efficiencies.

For a pass over ``T`` new tokens that reads ``K`` cached context tokens and
computes ``A`` (query, key) attention pairs, per GPU, at clock scale ``s``::

    W(T)    = W_shared + E_touched(T) * W_expert                     [B]
    t_lin   = rl(W(T) / B_w,  T * F_lin / (R_gemm * s))               [s]
    t_attn  = rl(K * b_kv / B_attn,  A * f_attn / (R_attn * s))       [s]
    t_comm  = t_ar_fixed + T * t_ar_token          (tensor parallel) [s]
    t_act   = X(T) / B_w                       (activation spill) [s]
    t       = t_lin + t_attn + t_comm + t_act + L * t_layer + t_step [s]
    E_mem   = e_B * (W(T) + (K + T) * b_kv + X(T))                   [J]
    E_comp  = e_F * T * F_lin + (e_A * min(A, K) + e_F16 * (A - K)+) * f_attn
                                                     (at s = 1)      [J]
    E_dyn   = E_mem + s^gamma * E_comp                               [J]

``X(T)`` (:func:`activation_hbm_bytes`) is the activation traffic between the
unfused kernels that spills from the L2 to HBM.  Decode attention pairs (one
per cached key read, ``min(A, K)``) cost ``e_A`` each (the memory-bound
split-K kernel, fitted from the decode-attention windows); the other pairs
(a prefill's causal pairs over its new tokens) are compute-bound flash
attention on the tensor cores and cost the bf16 GEMM energy per FLOP ``e_F16``.

``rl(a, b) = (a^p + b^p)^(1/p)`` is a smooth roofline: memory traffic and
compute overlap within a kernel, imperfectly near the ridge point (``p`` =
``roofline_exponent``; ``p -> inf`` is the classic ``max``).  ``B_w``/``B_attn``
are achieved bandwidths, ``R_gemm``/``R_attn`` achieved FLOP rates at the
maximum clock (peak times calibrated efficiency).  GEMMs, attention and the
fixed per-layer work are separate kernels, so their times add.  ``s = 1``
unless the pass would exceed the power limit, in which case ``s`` is set by
:func:`ttcsim.simulator.power.solve_clock_scale`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ttcsim.simulator.coefficients import PassCoefficients
from ttcsim.simulator.power import solve_clock_scale

#: L2 cache per GPU [B]: 50 MB on the H100 SXM5 (NVIDIA H100 Tensor Core GPU
#: Architecture whitepaper, 2022); the H200 has the same GH100 die.  One value for
#: every profile (A100: 40 MB, L4: 48 MB): it only sets where activations spill.
L2_CACHE_BYTES = 50e6


@dataclass(frozen=True)
class PassCost:
    """Cost of forward passes; every field broadcasts over scenarios."""

    time_s: np.ndarray
    #: dynamic energy, summed over the ``n_gpus`` GPUs [J]
    dynamic_energy_j: np.ndarray
    #: total energy (static + dynamic), summed over the GPUs [J]
    energy_j: np.ndarray
    #: whether the power limit stretched the pass
    throttled: np.ndarray


def weight_bytes_read(c: PassCoefficients, tokens) -> np.ndarray:
    """Weights one pass over ``tokens`` tokens reads from HBM [B].

    Routed experts count only if some token picks them (see
    :func:`ttcsim.simulator.architecture.experts_touched`).
    """
    tokens = np.asarray(tokens, dtype=float)
    if not c.n_experts:
        return np.full_like(tokens, c.shared_weight_bytes)
    miss = 1.0 - c.n_active_experts / c.n_experts
    touched = c.n_experts * (1.0 - np.power(miss, tokens))
    return c.shared_weight_bytes + touched * c.expert_bytes


def padded_batch(buckets, batch) -> np.ndarray:
    """Decode batch a CUDA-graph engine runs: the smallest bucket ``>= batch``.

    A batch above the largest bucket runs eagerly at its own size; 0 stays 0.
    """
    b = np.asarray(batch, dtype=float)
    sizes = np.asarray(buckets, dtype=float)
    i = np.searchsorted(sizes, b, side="left")
    return np.where((b > 0) & (i < sizes.size), sizes[np.minimum(i, sizes.size - 1)], b)


def exposed_host_time_s(c: PassCoefficients, sequences, tokens, prefill: bool = False):
    """Host time of a pass that the GPU waits for [s] (engine terms, see ``ttcsim.engines``).

    ``t_host = h_pass + h_seq * b [+ h_prefill + h_token * T for a prefill]``,
    each already multiplied by ``1 - overlap``.
    """
    host = c.host_pass_s + c.host_sequence_s * np.asarray(sequences, dtype=float)
    if prefill:
        host = host + c.host_prefill_s + c.host_prefill_token_s * np.asarray(tokens, dtype=float)
    return host


def smooth_roofline(a, b, p: float):
    """``(a^p + b^p)^(1/p)`` computed stably (``max(a, b)`` for ``p`` >= 64)."""
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    hi = np.maximum(a, b)
    if p >= 64:
        return hi
    lo = np.minimum(a, b)
    ratio = lo / np.where(hi > 0, hi, 1.0)  # 0 where both are 0
    return hi * np.power(1.0 + np.power(ratio, p), 1.0 / p)


def linear_time_s(c: PassCoefficients, tokens, clock_scale=1.0) -> np.ndarray:
    """GEMM time ``rl(W(T) / B_w, T * F_lin / (R_gemm * s))`` [s]."""
    tokens = np.asarray(tokens, dtype=float)
    return smooth_roofline(
        weight_bytes_read(c, tokens) / c.weight_bandwidth_bytes_per_s,
        tokens * c.linear_flops_per_token / (c.gemm_flops_per_s * clock_scale),
        c.roofline_exponent,
    )


def attention_bandwidth_bytes_per_s(c: PassCoefficients, sequences) -> np.ndarray:
    """Achieved KV-read bandwidth with ``sequences`` sequences in the pass [B/s].

    Decode attention parallelises over (sequence, KV head) pairs; with few of
    them the kernel cannot fill the GPU::

        B_attn(b) = B_hbm * eta_attn_dec * u / (u + u_half),   u = b * n_kv_heads_per_gpu
    """
    u = np.maximum(np.asarray(sequences, dtype=float), 1e-6) * c.kv_heads_per_gpu  # 0: no pass
    if c.attention_half_parallelism <= 0:
        return np.full_like(u, c.attention_bandwidth_bytes_per_s)
    return (
        c.attention_bandwidth_bytes_per_s * u / np.maximum(u + c.attention_half_parallelism, 1e-30)
    )


def attention_time_per_pair_s(c: PassCoefficients, sequences=1e9) -> np.ndarray:
    """Decode attention time per (query, cached key) pair at full clock [s].

    Both the KV bytes and the FLOPs are proportional to the pairs, so the
    smooth roofline of the two is too.  ``sequences`` sets the bandwidth
    (:func:`attention_bandwidth_bytes_per_s`).
    """
    return smooth_roofline(
        c.kv_bytes_per_token / attention_bandwidth_bytes_per_s(c, sequences),
        c.attention_flops_per_pair / c.attention_flops_per_s,
        c.roofline_exponent,
    )


def activation_hbm_bytes(c: PassCoefficients, tokens) -> np.ndarray:
    """Activation bytes a pass over ``tokens`` tokens moves through HBM [B].

    ``X(T) = T * b_act * clip((T * r_max - L2) / L2, 0, 1)``.  Between the
    GEMMs, each token's activations go through unfused elementwise kernels
    (RMSNorm, RoPE, SwiGLU, residual adds, KV writes, GEMM inputs and
    outputs): ``b_act`` bytes per token
    (``PassCoefficients.activation_bytes_per_token``).  A kernel reads what
    the previous one wrote; while the largest activation tensor, ``T * r_max``
    bytes (the gate/up output), fits in the L2 those reads hit it, and once it
    is more than twice the L2 a streaming write evicts its start before the
    next kernel reads it (LRU), so everything goes through HBM; linear in
    between.  Decode batches (``T <= 256``: under 15 MB) stay in the L2;
    prefill chunks of thousands of tokens stream through HBM at the
    weight-streaming bandwidth, at HBM energy per byte.
    """
    tokens = np.asarray(tokens, dtype=float)
    working_set = tokens * c.activation_row_bytes
    spill = np.clip((working_set - L2_CACHE_BYTES) / L2_CACHE_BYTES, 0.0, 1.0)
    return tokens * c.activation_bytes_per_token * spill


def fixed_time_s(c: PassCoefficients, tokens) -> np.ndarray:
    """Per-pass overheads and all-reduces: ``L*t_layer + t_step + t_ar + T*t_ar_token`` [s]."""
    tokens = np.asarray(tokens, dtype=float)
    return c.fixed_time_per_pass_s + c.allreduce_fixed_s + tokens * c.allreduce_time_per_token_s


def forward_pass(
    c: PassCoefficients,
    tokens,
    kv_read_tokens,
    attention_pairs,
    sequences=None,
    kv_hbm_tokens=None,
    prefill: bool = False,
) -> PassCost:
    """Cost of one forward pass (see the module formula); zero where ``tokens`` is 0.

    Parameters
    ----------
    tokens : new tokens in the pass (prefill: prompt tokens; decode: batch size)
    kv_read_tokens : cached tokens whose K/V the attention reads (sets its time)
    attention_pairs : (query, key) pairs the attention computes
    sequences : sequences in the pass, for attention parallelism (default ``tokens``)
    kv_hbm_tokens : cached tokens whose K/V come from HBM (sets the energy; default
        ``kv_read_tokens``).  Fewer when samples share a prompt: the shared prefix
        is fetched from HBM once per step and re-read from L2 by the other samples.
    prefill : add the profile's fixed ``prefill_overhead_s`` (host and launch work
        of a prefill pass, which serving engines run without CUDA graphs)

    Engine terms (``c.has_engine_terms``; none for the reference engine): a
    decode step (``kv_read_tokens == attention_pairs``, not a prefill) runs its
    GEMMs at the CUDA-graph bucket ``pad(T)`` and copies
    ``kv_copy_bytes_per_token * K`` bytes at the weight-streaming bandwidth;
    every pass adds the exposed host time ``t_host``
    (:func:`exposed_host_time_s`) to its fixed time, during which each GPU
    draws ``P_static - host_gap_saving_w``::

        t = t_gpu + t_host,   E = n_gpus (P_static t_gpu + P_gap t_host + E_dyn)
    """
    kv_hbm_tokens = kv_read_tokens if kv_hbm_tokens is None else kv_hbm_tokens
    sequences = tokens if sequences is None else sequences
    tokens, kv_read, pairs, seqs, kv_hbm = np.broadcast_arrays(
        *(
            np.asarray(v, dtype=float)
            for v in (tokens, kv_read_tokens, attention_pairs, sequences, kv_hbm_tokens)
        )
    )
    shape = tokens.shape
    tokens, kv_read, pairs, seqs, kv_hbm = (
        v.reshape(-1) for v in (tokens, kv_read, pairs, seqs, kv_hbm)
    )
    lin = tokens  # tokens the GEMMs run (a decode batch padded to its CUDA-graph bucket)
    if c.has_engine_terms:
        decode = (kv_read == pairs) & (not prefill)  # a decode step reads what it attends
        if c.decode_batch_buckets:
            lin = np.where(decode, padded_batch(c.decode_batch_buckets, tokens), tokens)
    w_bytes = weight_bytes_read(c, lin)
    t_wm = w_bytes / c.weight_bandwidth_bytes_per_s
    t_wc = lin * c.linear_flops_per_token / c.gemm_flops_per_s
    t_am = kv_read * c.kv_bytes_per_token / attention_bandwidth_bytes_per_s(c, seqs)
    t_ac = pairs * c.attention_flops_per_pair / c.attention_flops_per_s
    x_act = activation_hbm_bytes(c, lin)
    t_fix = (
        fixed_time_s(c, lin)
        + x_act / c.weight_bandwidth_bytes_per_s
        + (c.prefill_overhead_s if prefill else 0.0)
    )
    p = c.roofline_exponent

    def time_at(s, parts):
        wm, wc, am, ac, fix = parts
        return smooth_roofline(wm, wc / s, p) + smooth_roofline(am, ac / s, p) + fix

    e_mem = c.energy_per_byte_j * (w_bytes + (kv_hbm + tokens) * c.kv_bytes_per_token + x_act)
    e_comp = (
        c.energy_per_linear_flop_j * lin * c.linear_flops_per_token
        + c.attention_flops_per_pair
        * (
            c.energy_per_attention_flop_j * np.minimum(pairs, kv_read)
            + c.energy_per_bf16_flop_j * np.maximum(pairs - kv_read, 0.0)
        )
    )
    if c.has_engine_terms:
        # exposed host time (the GPU waits, at the gap power) and per-step cache copies
        host = exposed_host_time_s(c, seqs, tokens, prefill)
        copied = np.where(decode, c.kv_copy_bytes_per_token * kv_read, 0.0)
        t_fix = t_fix + host + copied / c.weight_bandwidth_bytes_per_s
        e_mem = e_mem + c.energy_per_byte_j * copied - c.host_gap_saving_w * host
    t = time_at(1.0, (t_wm, t_wc, t_am, t_ac, t_fix))
    active = tokens > 0
    safe_t = np.where(active, t, 1.0)
    throttled = active & (c.static_power_w + (e_mem + e_comp) / safe_t > c.power_limit_w)
    e_dyn = e_mem + e_comp
    if throttled.any():
        idx = np.nonzero(throttled)
        sub = tuple(v[idx] for v in (t_wm, t_wc, t_am, t_ac, t_fix))
        # power fields may vary per pass (options of several GPUs stacked together)
        static_w, limit_w, gamma = (
            np.broadcast_to(np.asarray(v, dtype=float), t.shape)[idx]
            for v in (c.static_power_w, c.power_limit_w, c.dvfs_energy_exponent)
        )
        s = solve_clock_scale(
            lambda x, j: time_at(x, sub if j is None else tuple(v[j] for v in sub)),
            e_mem[idx],
            e_comp[idx],
            static_w,
            limit_w,
            gamma,
        )
        t = t.copy()
        e_dyn = e_dyn.copy()
        e_dyn[idx] = e_mem[idx] + s**gamma * e_comp[idx]
        # if even the lowest clock stays over the limit (memory traffic alone too
        # costly), the limiter stretches the pass until the power is the limit
        head = np.maximum(limit_w - static_w, 1e-9)
        t[idx] = np.maximum(time_at(s, sub), e_dyn[idx] / head)
    t = np.where(active, t, 0.0)
    e_dyn = np.where(active, e_dyn, 0.0)
    energy = c.n_gpus * (c.static_power_w * t + e_dyn)
    return PassCost(
        time_s=t.reshape(shape),
        dynamic_energy_j=(c.n_gpus * e_dyn).reshape(shape),
        energy_j=energy.reshape(shape),
        throttled=throttled.reshape(shape),
    )
