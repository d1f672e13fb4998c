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
    """``H*(n_q*d) + 2*H*(n_kv*d) + (n_q*d)*H`` (+ q/k/v bias) [parameters]."""
    q = spec.n_heads * spec.head_dim
    kv = spec.n_kv_heads * spec.head_dim
    bias = (q + 2 * kv) if spec.attention_bias else 0
    return float(spec.hidden_size * q + 2 * spec.hidden_size * kv + q * spec.hidden_size + bias)


def expert_parameters_per_layer(spec: ModelSpec) -> float:
    """One SwiGLU expert (gate, up, down): ``3*H*I_e`` [parameters]."""
    return 3.0 * spec.hidden_size * spec.expert_intermediate_size


def dense_ffn_parameters_per_layer(spec: ModelSpec) -> float:
    """Non-routed FFN per layer: ``3*H*I`` for dense models; shared experts and router for MoE."""
    if not spec.is_moe:
        return 3.0 * spec.hidden_size * spec.intermediate_size
    router = spec.hidden_size * spec.n_experts
    return float(router) + spec.n_shared_experts * expert_parameters_per_layer(spec)


def embedding_parameters(spec: ModelSpec) -> float:
    """Input embedding plus the LM head unless tied: ``V*H*(1 or 2)`` [parameters]."""
    return float(spec.vocab_size * spec.hidden_size * (1 if spec.tie_word_embeddings else 2))


def parameter_count(spec: ModelSpec) -> float:
    """Total parameters, every expert included (norm weights ``2H`` per layer + ``H``)."""
    per_layer = (
        attention_parameters_per_layer(spec)
        + dense_ffn_parameters_per_layer(spec)
        + spec.n_experts * expert_parameters_per_layer(spec)
        + 2 * spec.hidden_size
    )
    return spec.n_layers * per_layer + embedding_parameters(spec) + spec.hidden_size


def active_parameter_count(spec: ModelSpec) -> float:
    """Parameters used by one token: ``k`` of ``E`` routed experts."""
    inactive = (spec.n_experts - spec.n_active_experts) * expert_parameters_per_layer(spec)
    return parameter_count(spec) - spec.n_layers * inactive


def matmul_parameters_per_token(spec: ModelSpec) -> float:
    """Weights one token multiplies with: all layers' active matmuls plus the LM head.

    The embedding lookup is a gather, not a matmul; the LM head (``V*H``) is.
    """
    per_layer = (
        attention_parameters_per_layer(spec)
        + dense_ffn_parameters_per_layer(spec)
        + spec.n_active_experts * expert_parameters_per_layer(spec)
    )
    return spec.n_layers * per_layer + spec.vocab_size * spec.hidden_size


def linear_flops_per_token(spec: ModelSpec) -> float:
    """``2 * matmul_parameters_per_token`` [FLOP/token]."""
    return 2.0 * matmul_parameters_per_token(spec)


def shared_weight_parameters(spec: ModelSpec) -> float:
    """Weights every forward pass reads whatever its batch: all but routed experts, plus LM head."""
    per_layer = attention_parameters_per_layer(spec) + dense_ffn_parameters_per_layer(spec)
    return spec.n_layers * per_layer + spec.vocab_size * spec.hidden_size


def experts_touched(spec: ModelSpec, tokens: np.ndarray | float) -> np.ndarray | float:
    """Expected distinct routed experts per layer hit by ``tokens`` tokens.

    With uniform, independent top-k routing each expert is missed by one token
    with probability ``1 - k/E``, so ``E * (1 - (1 - k/E)**T)``; 0 for dense models.
    """
    if not spec.is_moe:
        return np.zeros_like(np.asarray(tokens, dtype=float)) if np.ndim(tokens) else 0.0
    miss = 1.0 - spec.n_active_experts / spec.n_experts
    return spec.n_experts * (1.0 - np.power(miss, tokens))


def kv_elements_per_token(spec: ModelSpec) -> float:
    """K and V elements one token stores over all layers: ``2 * L * n_kv * d``."""
    return 2.0 * spec.n_layers * spec.n_kv_heads * spec.head_dim


def attention_flops_per_token_pair(spec: ModelSpec) -> float:
    """FLOP for one query token attending to one context token: ``4 * L * n_q * d``.

    ``QK^T`` and ``PV`` are each ``2 * n_q * d`` FLOP per (query, key) pair per layer.
    """
    return 4.0 * spec.n_layers * spec.n_heads * spec.head_dim


def causal_pairs(new_tokens: np.ndarray | float, cached_tokens: np.ndarray | float = 0.0):
    """(query, key) pairs of causal attention over ``new_tokens`` after ``cached_tokens``.

    ``sum_{i=1..S} (C + i) = S*C + S*(S+1)/2`` for ``S`` new and ``C`` cached tokens.
    """
    s = np.asarray(new_tokens, dtype=float)
    return s * np.asarray(cached_tokens, dtype=float) + s * (s + 1.0) / 2.0
