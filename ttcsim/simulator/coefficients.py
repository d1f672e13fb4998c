"""Per-GPU coefficients of one (hardware, model, dtype, tensor-parallel) deployment.

:func:`pass_coefficients` folds a :class:`~ttcsim.hardware.HardwareProfile` and a
:class:`~ttcsim.models.ModelSpec` into the handful of numbers the forward-pass
cost needs, so the hot functions in :mod:`ttcsim.simulator.roofline` take only
floats or numpy arrays (and so broadcast over scenarios).  All quantities are
per GPU: with tensor parallelism ``tp`` weights, KV heads and FLOPs are split
``tp`` ways (Megatron-style column/row sharding).  With fewer KV heads than
``tp``, each KV head is replicated on ``tp / n_kv_heads`` GPUs, so a GPU stores
and reads one KV head (see :mod:`ttcsim.deployment`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ttcsim.hardware import HardwareProfile
from ttcsim.models import ModelSpec
from ttcsim.simulator import architecture as arch
from ttcsim.units import COMPUTE_DTYPE, dtype_bytes

#: Activations and all-reduce payloads are bf16.
ACTIVATION_BYTES = 2.0


@dataclass(frozen=True)
class PassCoefficients:
    """Numbers that fix the cost of a forward pass on one GPU of a ``tp``-way group."""

    n_gpus: int
    n_layers: int
    hidden_size: int
    n_experts: int
    n_active_experts: int
    shared_weight_bytes: float  #: weights read by every pass [B]
    expert_bytes: float  #: one routed expert across all layers [B]
    linear_flops_per_token: float  #: [FLOP/token]
    kv_bytes_per_token: float  #: K+V, all layers [B/token]
    attention_flops_per_pair: float  #: [FLOP/(query*key)]
    attention_window_tokens: float  #: sliding window W [tokens]; inf without one
    windowed_fraction: float  #: phi: share of KV bytes and attention FLOPs in sliding layers
    weight_bandwidth_bytes_per_s: float  #: achieved when streaming weights
    attention_bandwidth_bytes_per_s: float  #: achieved when reading KV
    gemm_flops_per_s: float  #: achieved dense GEMM rate in the weight dtype
    attention_flops_per_s: float  #: achieved (flash) attention rate, bf16
    fixed_time_per_pass_s: float  #: ``L * layer_overhead_s + step_overhead_s``
    allreduce_time_per_token_s: float  #: payload part of the per-pass all-reduces
    allreduce_fixed_s: float  #: latency part of the per-pass all-reduces
    idle_power_w: float
    static_power_w: float  #: ``idle_power_w + active_power_w``
    power_limit_w: float
    energy_per_byte_j: float
    energy_per_linear_flop_j: float  #: scaled to the weight dtype's tensor-core rate
    energy_per_attention_flop_j: float
    roofline_exponent: float  #: p of the smooth roofline
    kv_heads_per_gpu: float  #: KV heads a GPU attends over
    attention_half_parallelism: float  #: (sequence, KV head) pairs for half attention efficiency
    prefill_overhead_s: float  #: fixed time per prefill pass [s]
    dvfs_energy_exponent: float  #: gamma: energy/FLOP ~ clock_scale**gamma when throttled
    memory_capacity_bytes: float  #: usable per GPU
    weight_bytes_total: float  #: all weights on this GPU (every expert)
    # Engine terms (:mod:`ttcsim.engines.physics`); all zero/empty for the reference
    # engine, whose passes are priced exactly as without them.
    engine_name: str = "reference"
    has_engine_terms: bool = False  #: any host, copy or bucket term below is set
    host_pass_s: float = 0.0  #: exposed host time per pass: (1-ov)(step + L*per_layer) [s]
    host_sequence_s: float = 0.0  #: exposed host time per running sequence per pass [s]
    host_prefill_s: float = 0.0  #: exposed host time per prefill pass [s]
    host_prefill_token_s: float = 0.0  #: exposed host time per prefill token [s]
    host_gap_saving_w: float = 0.0  #: P_static - P_gap while the GPU waits for the host [W]
    kv_copy_bytes_per_token: float = 0.0  #: bytes copied per decode step per KV token in use
    decode_batch_buckets: tuple[float, ...] = ()  #: CUDA-graph batch sizes (padded up to)
    batching: str = "lockstep"  #: lockstep | static-padded | continuous
    max_num_seqs: int = 0  #: continuous batching: most running sequences
    prefill_tokens_per_pass: float = 0.0  #: 0: one pass per prefill phase
    prefill_chunked: bool = False  #: a prompt may be split across prefill passes
    #: bf16 tensor-core energy per FLOP (prefill attention's causal pairs) [J/FLOP]
    energy_per_bf16_flop_j: float = 0.0
    #: activation bytes per token through the unfused elementwise kernels [B/token]
    activation_bytes_per_token: float = 0.0
    #: bytes per token of the largest activation tensor (gate/up output) [B/token]
    activation_row_bytes: float = 1.0



def _ffn_width(spec: ModelSpec) -> int:
    """Intermediate width a token's FFN computes (active and shared experts for MoE)."""
    if spec.is_moe:
        return spec.expert_intermediate_size * (spec.n_active_experts + spec.n_shared_experts)
    return spec.intermediate_size


def activation_bytes_per_token(spec: ModelSpec) -> float:
    """Activation bytes one token moves through a pass's unfused kernels [B/token].

    Count of the reads and writes per layer of an eager (unfused) decoder
    layer, in elements, times ``ACTIVATION_BYTES``::

        L * (14 H + 8 I + (11 H_q + 8 H_kv) d)

    ``14 H``: two RMSNorms (read + write), two residual adds (2 reads + 1
    write), the QKV, O, gate/up and down GEMMs' H-wide inputs/outputs;
    ``8 I``: gate/up output (2 I), SiLU (read + write I), the product (2 reads
    + 1 write), the down GEMM's input; ``(11 H_q + 8 H_kv) d``: QKV output,
    RoPE on q and k (four passes), KV-cache writes, the GQA K/V expansion and
    the attention's q/o.  About 14 MB per token for Llama-3.1-8B.
    """
    h, d = spec.hidden_size, spec.head_dim
    per_layer = 14 * h + 8 * _ffn_width(spec) + (11 * spec.n_heads + 8 * spec.n_kv_heads) * d
    return float(spec.n_layers * per_layer * ACTIVATION_BYTES)


def pass_coefficients(
    profile: HardwareProfile,
    spec: ModelSpec,
    weight_dtype: str = "bf16",
    kv_dtype: str = "bf16",
    tp: int = 1,
    engine=None,
) -> PassCoefficients:
    """Fold profile and model into :class:`PassCoefficients`.

    Energy per FLOP in a dtype whose peak rate is ``r`` times bf16's is the bf16
    figure divided by ``r`` (same power at each dtype's peak).  The per-pass
    all-reduce model is a ring: ``2 * L`` all-reduces of ``T * H`` activations,
    each ``latency + 2 * (tp - 1) / tp * bytes / (B_link * efficiency)``.

    ``engine`` (an :class:`~ttcsim.engines.EngineProfile`, None = reference)
    scales the efficiencies, sets the usable memory and adds the engine terms
    (:func:`ttcsim.engines.physics.coefficient_terms`).
    """
    ds, p = profile.datasheet, profile.parameters
    w_bytes = dtype_bytes(weight_dtype)
    compute_dtype = COMPUTE_DTYPE[weight_dtype]
    peak_bf16 = ds.peak_flops_per_s["bf16"]
    peak_w = ds.peak_flops_for(compute_dtype)
    link = ds.interconnect_bandwidth_bytes_per_s * p.interconnect_efficiency
    ring = 2.0 * (tp - 1) / tp if tp > 1 else 0.0
    n_allreduce = 2 * spec.n_layers if tp > 1 else 0
    # the MLA latent is one head: every GPU keeps it all; fewer KV heads than GPUs: replicas
    kv_split = 1 if spec.is_mla else min(tp, spec.n_kv_heads)
    extra: dict = {}
    if engine is not None and not engine.is_reference:
        from ttcsim.engines.physics import coefficient_terms, scaled_parameters

        p = scaled_parameters(p, engine)
        extra = coefficient_terms(engine, profile, spec, tp)
    c = PassCoefficients(
        n_gpus=tp,
        n_layers=spec.n_layers,
        hidden_size=spec.hidden_size,
        n_experts=spec.n_experts,
        n_active_experts=spec.n_active_experts,
        shared_weight_bytes=arch.shared_weight_parameters(spec) * w_bytes / tp,
        expert_bytes=spec.n_moe_layers * arch.expert_parameters_per_layer(spec) * w_bytes / tp,
        linear_flops_per_token=arch.linear_flops_per_token(spec) / tp,
        kv_bytes_per_token=arch.kv_elements_per_token(spec) * dtype_bytes(kv_dtype) / kv_split,
        attention_flops_per_pair=arch.attention_flops_per_token_pair(spec) / tp,
        attention_window_tokens=arch.attention_window_tokens(spec),
        windowed_fraction=arch.windowed_layer_fraction(spec),
        weight_bandwidth_bytes_per_s=ds.hbm_bandwidth_bytes_per_s * p.weight_stream_efficiency,
        attention_bandwidth_bytes_per_s=ds.hbm_bandwidth_bytes_per_s
        * p.attention_decode_efficiency,
        gemm_flops_per_s=peak_w * p.gemm_efficiency,
        attention_flops_per_s=peak_bf16 * p.attention_prefill_efficiency,
        fixed_time_per_pass_s=spec.n_layers * p.layer_overhead_s + p.step_overhead_s,
        allreduce_time_per_token_s=n_allreduce * ring * spec.hidden_size * ACTIVATION_BYTES / link,
        allreduce_fixed_s=n_allreduce * p.allreduce_latency_s,
        idle_power_w=p.idle_power_w,
        static_power_w=p.idle_power_w + p.active_power_w,
        power_limit_w=ds.power_limit_w,
        energy_per_byte_j=p.hbm_energy_j_per_byte,
        energy_per_linear_flop_j=p.compute_energy_j_per_flop * peak_bf16 / peak_w,
        energy_per_attention_flop_j=p.attention_energy_j_per_flop,
        roofline_exponent=p.roofline_exponent,
        kv_heads_per_gpu=max(spec.n_kv_heads / tp, 1.0),
        attention_half_parallelism=p.attention_half_parallelism,
        prefill_overhead_s=p.prefill_overhead_s,
        dvfs_energy_exponent=p.dvfs_energy_exponent,
        memory_capacity_bytes=ds.memory_capacity_bytes * p.memory_usable_fraction,
        weight_bytes_total=arch.parameter_count(spec) * w_bytes / tp,
        energy_per_bf16_flop_j=p.compute_energy_j_per_flop,
        activation_bytes_per_token=activation_bytes_per_token(spec) / tp,
        activation_row_bytes=2.0 * _ffn_width(spec) * ACTIVATION_BYTES / tp,
    )
    if extra:
        kv = extra.pop("kv_copy_factor") * c.kv_bytes_per_token
        c = replace(c, kv_copy_bytes_per_token=kv, **extra)
        c = replace(c, has_engine_terms=bool(
            c.host_pass_s or c.host_sequence_s or c.host_prefill_s or c.host_prefill_token_s
            or c.kv_copy_bytes_per_token or c.decode_batch_buckets
        ))
    return c


def context_read_tokens(c: PassCoefficients, context_tokens):
    """Cached tokens a query over ``C`` context tokens reads (and a sequence keeps) [tokens].

    In full-attention-layer equivalents, ``C - phi * max(C - W, 0)``
    (:func:`~ttcsim.simulator.architecture.attended_tokens`); ``context_tokens``
    itself, untouched, for a model without sliding-window layers.
    """
    if not np.any(c.windowed_fraction):
        return context_tokens
    return arch.attended_tokens(context_tokens, c.attention_window_tokens, c.windowed_fraction)


def attention_pairs(c: PassCoefficients, new_tokens, cached_tokens=0.0):
    """(query, key) pairs of ``new_tokens`` after ``cached_tokens``, sliding layers counted.

    :func:`~ttcsim.simulator.architecture.windowed_causal_pairs`; exactly
    :func:`~ttcsim.simulator.architecture.causal_pairs` without a window.
    """
    if not np.any(c.windowed_fraction):
        return arch.causal_pairs(new_tokens, cached_tokens)
    return arch.windowed_causal_pairs(
        new_tokens, cached_tokens, c.attention_window_tokens, c.windowed_fraction
    )


def kv_cache_tokens(c: PassCoefficients, kv_tokens, sequences):
    """KV tokens ``sequences`` sequences holding ``kv_tokens`` in all keep, windows counted.

    A sliding layer keeps at most ``W`` tokens per sequence, so the cache in
    full-layer equivalents is ``K - phi * max(K - n W, 0)`` (exact for equal
    sequences, an upper bound otherwise); ``kv_tokens`` untouched without a window.
    """
    if not np.any(c.windowed_fraction):
        return kv_tokens
    window = np.asarray(sequences, dtype=float) * c.attention_window_tokens
    return arch.attended_tokens(kv_tokens, window, c.windowed_fraction)
