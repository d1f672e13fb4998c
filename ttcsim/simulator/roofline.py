"""Time and energy of one forward pass: a roofline with calibrated efficiencies.

For a pass over ``T`` new tokens that reads ``K`` cached context tokens and
computes ``A`` (query, key) attention pairs, per GPU::

    W(T)    = W_shared + E_touched(T) * W_expert                     [B]
    t_lin   = max(W(T) / B_w,  T * F_lin / R_gemm)                   [s]
    t_attn  = max(K * b_kv / B_attn,  A * f_attn / R_attn)           [s]
    t_comm  = t_ar_fixed + T * t_ar_token          (tensor parallel) [s]
    t       = t_lin + t_attn + t_comm + L * t_layer + t_step         [s]
    E_dyn   = e_B * (W(T) + (K + T) * b_kv) + e_F * T * F_lin + e_A * A * f_attn   [J]

``B_w``/``B_attn`` are achieved bandwidths and ``R_gemm``/``R_attn`` achieved
FLOP rates (peak times calibrated efficiency).  The roofline assumes compute
and memory traffic overlap perfectly *within* the GEMMs and within attention,
but that GEMMs, attention and the fixed per-layer work run one after another
(they are separate kernels).  Then the power limit applies
(:func:`ttcsim.simulator.power.throttled_time_s`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ttcsim.simulator.coefficients import PassCoefficients
from ttcsim.simulator.power import throttled_time_s


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


def linear_time_s(c: PassCoefficients, tokens) -> np.ndarray:
    """``max(W(T) / B_w, T * F_lin / R_gemm)`` [s]."""
    tokens = np.asarray(tokens, dtype=float)
    return np.maximum(
        weight_bytes_read(c, tokens) / c.weight_bandwidth_bytes_per_s,
        tokens * c.linear_flops_per_token / c.gemm_flops_per_s,
    )


def attention_time_per_pair_s(c: PassCoefficients) -> float:
    """Decode attention time per (query, cached key) pair: memory or compute bound [s]."""
    return max(
        c.kv_bytes_per_token / c.attention_bandwidth_bytes_per_s,
        c.attention_flops_per_pair / c.attention_flops_per_s,
    )


def fixed_time_s(c: PassCoefficients, tokens) -> np.ndarray:
    """Per-pass overheads and all-reduces: ``L*t_layer + t_step + t_ar + T*t_ar_token`` [s]."""
    tokens = np.asarray(tokens, dtype=float)
    return c.fixed_time_per_pass_s + c.allreduce_fixed_s + tokens * c.allreduce_time_per_token_s


def forward_pass(c: PassCoefficients, tokens, kv_read_tokens, attention_pairs) -> PassCost:
    """Cost of one forward pass (see the module formula); zero where ``tokens`` is 0.

    Parameters
    ----------
    tokens : new tokens in the pass (prefill: prompt tokens; decode: batch size)
    kv_read_tokens : cached tokens whose K/V the pass reads from HBM
    attention_pairs : (query, key) pairs the attention computes
    """
    tokens = np.asarray(tokens, dtype=float)
    kv_read = np.asarray(kv_read_tokens, dtype=float)
    pairs = np.asarray(attention_pairs, dtype=float)
    w_bytes = weight_bytes_read(c, tokens)
    t_lin = linear_time_s(c, tokens)
    t_attn = np.maximum(
        kv_read * c.kv_bytes_per_token / c.attention_bandwidth_bytes_per_s,
        pairs * c.attention_flops_per_pair / c.attention_flops_per_s,
    )
    t = t_lin + t_attn + fixed_time_s(c, tokens)
    e_dyn = (
        c.energy_per_byte_j * (w_bytes + (kv_read + tokens) * c.kv_bytes_per_token)
        + c.energy_per_linear_flop_j * tokens * c.linear_flops_per_token
        + c.energy_per_attention_flop_j * pairs * c.attention_flops_per_pair
    )
    t_cap = throttled_time_s(t, e_dyn, c.static_power_w, c.power_limit_w)
    active = tokens > 0
    t_cap = np.where(active, t_cap, 0.0)
    e_dyn = np.where(active, e_dyn, 0.0)
    energy = c.n_gpus * (c.static_power_w * t_cap + e_dyn)
    return PassCost(
        time_s=t_cap,
        dynamic_energy_j=c.n_gpus * e_dyn,
        energy_j=energy,
        throttled=active & (t_cap > t),
    )
