"""Parameter, FLOP and byte counts of a decoder-only transformer.

Pure functions of a :class:`~ttcsim.models.ModelSpec`.  Notation inside the
formulas: ``H`` hidden size, ``L`` layers, ``n_q``/``n_kv`` query/KV heads,
``d`` head dim, ``I`` FFN width, ``V`` vocab, ``E``/``k`` routed/active experts.

Counts are per token unless the name says otherwise.  A multiply-accumulate is
2 FLOP.
"""

from __future__ import annotations

import numpy as np

from ttcsim.models import ModelSpec


def attention_parameters_per_layer(spec: ModelSpec) -> float:
    """Attention projections of one layer [parameters].

    Multi-head / grouped-query attention: ``H*(n_q*d) + 2*H*(n_kv*d) + (n_q*d)*H``
    (+ q/k/v biases ``n_q*d + 2*n_kv*d`` with ``attention_bias``, + the output
    bias ``H`` as well with ``linear_bias``).

    DeepSeek multi-head latent attention (MLA; ``r_kv`` = ``kv_lora_rank``,
    ``r_q`` = ``q_lora_rank``, ``d_r`` rope and ``d_v`` value head dims, ``d =
    d_nope + d_r``): queries ``H*r_q + r_q + r_q*n_q*d`` (or ``H*n_q*d`` without
    ``r_q``), latent down-projection ``H*(r_kv + d_r)`` and its norm ``r_kv``,
    up-projection ``r_kv*n_q*(d_nope + d_v)``, output ``n_q*d_v*H``.
    """
    h = spec.hidden_size
    if spec.is_mla:
        d, d_r, d_v, r_kv = spec.head_dim, spec.qk_rope_head_dim, spec.value_head_dim, (
            spec.kv_lora_rank
        )
        r_q = spec.q_lora_rank
        q = h * spec.n_heads * d if r_q is None else h * r_q + r_q + r_q * spec.n_heads * d
        kv = h * (r_kv + d_r) + r_kv + r_kv * spec.n_heads * (d - d_r + d_v)
        return float(q + kv + spec.n_heads * d_v * h)
    q = spec.n_heads * spec.head_dim
    kv = spec.n_kv_heads * spec.head_dim
    bias = (q + 2 * kv) if spec.attention_bias or spec.linear_bias else 0
    if spec.linear_bias:
        bias += h
    return float(h * q + 2 * h * kv + q * h + bias)


def ffn_parameters(spec: ModelSpec, width: int) -> float:
    """One FFN of ``width`` ``I``: ``3*H*I`` gated (SwiGLU/GeGLU), ``2*H*I`` plain [parameters].

    With ``linear_bias`` the biases add ``2*I + H`` (gated) or ``I + H`` (plain).
    """
    h = spec.hidden_size
    if not spec.linear_bias:
        return (3.0 if spec.ffn_gated else 2.0) * h * width
    matrices, biases = (3, 2) if spec.ffn_gated else (2, 1)
    return float(matrices * h * width + biases * width + h)


def expert_parameters_per_layer(spec: ModelSpec) -> float:
    """One routed (or shared) expert: ``3*H*I_e`` for a SwiGLU expert [parameters]."""
    return ffn_parameters(spec, spec.expert_intermediate_size)


def dense_ffn_parameters_per_layer(spec: ModelSpec) -> float:
    """Non-routed FFN of one MoE layer (router ``H*E`` + shared experts), or the dense FFN."""
    if not spec.is_moe:
        return ffn_parameters(spec, spec.intermediate_size)
    router = spec.hidden_size * spec.n_experts
    return float(router) + spec.n_shared_experts * expert_parameters_per_layer(spec)


def _dense_ffn_layers_parameters(spec: ModelSpec) -> float:
    """The ``n_dense_layers`` leading dense FFNs of an MoE model (``first_k_dense_replace``)."""
    if not spec.is_moe:
        return 0.0
    return spec.n_dense_layers * ffn_parameters(spec, spec.intermediate_size)


def _ffn_layers(spec: ModelSpec) -> int:
    """Layers whose FFN :func:`dense_ffn_parameters_per_layer` describes."""
    return spec.n_moe_layers if spec.is_moe else spec.n_layers


def embedding_parameters(spec: ModelSpec) -> float:
    """Input embedding plus the LM head unless tied: ``V*H*(1 or 2)`` [parameters]."""
    return float(spec.vocab_size * spec.hidden_size * (1 if spec.tie_word_embeddings else 2))


def parameter_count(spec: ModelSpec) -> float:
    """Total parameters, every expert included.

    ``L * (attention + norms) + L_ffn * (FFN or router + shared + E experts) +
    dense layers + embeddings + final norm``; a norm is ``H`` weights (``2H`` with
    ``linear_bias``: LayerNorm), ``norms_per_layer`` of them per layer.  Every
    term is a whole number below 2**53, so the float sum is exact in any order.
    """
    norm = spec.hidden_size * (2 if spec.linear_bias else 1)
    attn = spec.n_layers * (attention_parameters_per_layer(spec) + spec.norms_per_layer * norm)
    ffn = _ffn_layers(spec) * (
        dense_ffn_parameters_per_layer(spec) + spec.n_experts * expert_parameters_per_layer(spec)
    )
    return attn + ffn + _dense_ffn_layers_parameters(spec) + embedding_parameters(spec) + norm


def active_parameter_count(spec: ModelSpec) -> float:
    """Parameters used by one token: ``k`` of ``E`` routed experts in each MoE layer."""
    inactive = (spec.n_experts - spec.n_active_experts) * expert_parameters_per_layer(spec)
    return parameter_count(spec) - spec.n_moe_layers * inactive


def matmul_parameters_per_token(spec: ModelSpec) -> float:
    """Weights one token multiplies with: all layers' active matmuls plus the LM head.

    The embedding lookup is a gather, not a matmul; the LM head (``V*H``) is.
    """
    per_layer = dense_ffn_parameters_per_layer(spec) + (
        spec.n_active_experts * expert_parameters_per_layer(spec)
    )
    return (
        spec.n_layers * attention_parameters_per_layer(spec)
        + _ffn_layers(spec) * per_layer
        + _dense_ffn_layers_parameters(spec)
        + spec.vocab_size * spec.hidden_size
    )


def linear_flops_per_token(spec: ModelSpec) -> float:
    """``2 * matmul_parameters_per_token`` [FLOP/token]."""
    return 2.0 * matmul_parameters_per_token(spec)


def shared_weight_parameters(spec: ModelSpec) -> float:
    """Weights every forward pass reads whatever its batch: all but routed experts, plus LM head."""
    return (
        spec.n_layers * attention_parameters_per_layer(spec)
        + _ffn_layers(spec) * dense_ffn_parameters_per_layer(spec)
        + _dense_ffn_layers_parameters(spec)
        + spec.vocab_size * spec.hidden_size
    )


def experts_touched(spec: ModelSpec, tokens: np.ndarray | float) -> np.ndarray | float:
    """Expected distinct routed experts per layer hit by ``tokens`` tokens.

    With uniform, independent top-k routing each expert is missed by one token
    with probability ``1 - k/E``, so ``E * (1 - (1 - k/E)**T)``; 0 for dense models.
    """
    if not spec.is_moe:
        return np.zeros_like(np.asarray(tokens, dtype=float)) if np.ndim(tokens) else 0.0
    miss = 1.0 - spec.n_active_experts / spec.n_experts
    return spec.n_experts * (1.0 - np.power(miss, tokens))


def kv_elements_per_layer_token(spec: ModelSpec) -> int:
    """Cache elements one token keeps in one layer.

    ``2 * n_kv * d`` (K and V); MLA keeps the compressed latent and the shared
    rope key instead: ``r_kv + d_r`` (DeepSeek-V2, arXiv 2405.04434, sec. 2.1).
    """
    if spec.is_mla:
        return spec.kv_lora_rank + spec.qk_rope_head_dim
    return 2 * spec.n_kv_heads * spec.head_dim


def kv_elements_per_token(spec: ModelSpec) -> float:
    """Cache elements one token stores over all layers: ``2*L*n_kv*d`` (MLA ``L*(r_kv + d_r)``).

    For a full context; a sliding-window layer keeps only its window (see
    :func:`windowed_layer_fraction` and :func:`attended_tokens`).
    """
    if spec.is_mla:
        return float(spec.n_layers * kv_elements_per_layer_token(spec))
    return 2.0 * spec.n_layers * spec.n_kv_heads * spec.head_dim


def attention_flops_per_token_pair(spec: ModelSpec) -> float:
    """FLOP for one query token attending to one context token: ``4 * L * n_q * d``.

    ``QK^T`` and ``PV`` are each ``2 * n_q * d`` FLOP per (query, key) pair per layer.
    MLA is priced as its serving kernels run it, over the latent with the
    up-projections absorbed: ``2 * L * n_q * ((r_kv + d_r) + r_kv)``.
    """
    if spec.is_mla:
        return 2.0 * spec.n_layers * spec.n_heads * (2 * spec.kv_lora_rank + spec.qk_rope_head_dim)
    return 4.0 * spec.n_layers * spec.n_heads * spec.head_dim


def windowed_layer_fraction(spec: ModelSpec) -> float:
    """``phi = L_sliding / L``: share of KV bytes and attention FLOPs in sliding-window layers.

    Layers of one model have the same heads, so the share of layers is the share
    of per-token KV and per-pair attention work.
    """
    return spec.n_sliding_layers / spec.n_layers


def attention_window_tokens(spec: ModelSpec) -> float:
    """The sliding window ``W`` [tokens]; ``inf`` for a model without one."""
    if not spec.n_sliding_layers or spec.sliding_window_tokens is None:
        return float("inf")
    return float(spec.sliding_window_tokens)


def attended_tokens(context_tokens, window_tokens: float = float("inf"), fraction: float = 0.0):
    """Context a query reads, in full-attention-layer equivalents [tokens].

    A sliding layer reads (and keeps) only the last ``W`` of ``C`` tokens, so
    with a share ``phi`` of such layers ``C_eff = C - phi * max(C - W, 0)``;
    ``C`` itself (unchanged, bit for bit) when ``phi = 0``.  Also the cache a
    sequence of ``C`` tokens holds.
    """
    c = np.asarray(context_tokens, dtype=float)
    if fraction == 0.0:
        return c
    return c - fraction * np.maximum(c - window_tokens, 0.0)


def _triangle(x):
    """``T(x) = x+ (x+ + 1) / 2`` with ``x+ = max(x, 0)``: ``sum_{i=1..x} i`` for whole ``x``."""
    x = np.maximum(x, 0.0)
    return x * (x + 1.0) / 2.0


def windowed_causal_pairs(new_tokens, cached_tokens=0.0, window_tokens=float("inf"),
                          fraction: float = 0.0):
    """:func:`causal_pairs` with a share ``phi`` of layers attending only the last ``W`` keys.

    Query ``i`` (``1..S``) attends ``min(C + i, W)`` keys in a sliding layer, so
    the pairs lost are ``sum_i max(C + i - W, 0) = T(C + S - W) - T(C - W)``
    (:func:`_triangle`) and ``A = S*C + S*(S+1)/2 - phi * (T(C+S-W) - T(C-W))``.
    Exactly :func:`causal_pairs` when ``phi = 0``.
    """
    full = causal_pairs(new_tokens, cached_tokens)
    if fraction == 0.0:
        return full
    s = np.asarray(new_tokens, dtype=float)
    c = np.asarray(cached_tokens, dtype=float)
    return full - fraction * (_triangle(c + s - window_tokens) - _triangle(c - window_tokens))


def causal_pairs(new_tokens: np.ndarray | float, cached_tokens: np.ndarray | float = 0.0):
    """(query, key) pairs of causal attention over ``new_tokens`` after ``cached_tokens``.

    ``sum_{i=1..S} (C + i) = S*C + S*(S+1)/2`` for ``S`` new and ``C`` cached tokens.
    """
    s = np.asarray(new_tokens, dtype=float)
    return s * np.asarray(cached_tokens, dtype=float) + s * (s + 1.0) / 2.0
