"""Reference decoder: a random-weight Llama/Qwen-style transformer for energy measurement.

The decoder does the *work* of serving a :class:`~ttcsim.models.ModelSpec` --
the same matmuls, the same KV-cache reads -- with random bf16 weights
(``normal(0, 0.02)``, made on the device, nothing downloaded).  Token values
are meaningless; only the work is real.

Architecture (per layer): RMSNorm -> fused QKV projection (optional bias,
Qwen2) -> RoPE -> GQA attention -> output projection -> residual -> RMSNorm ->
SwiGLU MLP (or, for MoE specs, top-k routed SwiGLU experts plus shared
experts) -> residual.  Final RMSNorm and LM head (tied to the embedding when
``tie_word_embeddings``).  A *score-only* decoder (the reward model of
best-of-N) has a 1-output score head instead of the LM head and no KV cache.

KV cache (static, preallocated, token-major ``[layer, slot, token, kv_head,
head_dim]``), in two parts:

* the *prompt cache*, one slot per prefilled prompt;
* the *generation cache*, one slot per generated sequence.

A sequence attends to ``prompt_cache[pslot][:plen] ++ gen_cache[seq][:glen]``.
With prefix sharing, the N samples of one query share one ``pslot``: the prompt
is prefilled once and never copied.

Decode attention reads exactly each sequence's current context length:
a split-K ("flash-decoding") Triton kernel on CUDA, with lengths and slot
indices read from device tensors so that decode steps can be CUDA graphs
(one graph per distinct batch size, captured lazily).  The eager fallback
:func:`decode_attention_reference` is exact but reads the whole cache
(masked); it is what CPU tests run.  Finished sequences leave the batch:
only the small index tensors are compacted, never the cache.

MoE layers loop over the experts that received tokens (``index_select`` /
``index_add_``), which needs the host to know the routing: MoE decoders run
without CUDA graphs and are launch-overhead bound at small batch.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ttcsim.errors import TtcsimError
from ttcsim.models import ModelSpec
from ttcsim.units import DTYPE_BYTES

DTYPE_NAME = "bf16"
WEIGHT_STD = 0.02
ROPE_THETA = 1.0e6
RMS_EPS = 1e-6
BLOCK_N = 64  # KV positions per Triton loop iteration
BLOCK_H = 16  # query heads per program (GQA group padded to the tl.dot minimum)
MAX_SPLITS = 32


def _torch() -> Any:
    import torch

    return torch


# --------------------------------------------------------------------------- cost model


def _attention_params(spec: ModelSpec) -> int:
    d = spec.head_dim
    qkv = spec.hidden_size * (spec.n_heads + 2 * spec.n_kv_heads) * d
    return qkv + spec.n_heads * d * spec.hidden_size


def _expected_unique_experts(spec: ModelSpec, tokens: int) -> float:
    """Expected distinct routed experts hit by ``tokens`` tokens under uniform routing."""
    e, k = spec.n_experts, spec.n_active_experts
    return e * (1.0 - (1.0 - k / e) ** max(tokens, 0))


def weight_bytes(
    spec: ModelSpec, dtype_bytes: float = DTYPE_BYTES["bf16"], score_only: bool = False
) -> float:
    """Bytes of all weights the decoder allocates [B].

    ``embedding + layers x (attention + norms + FFN) + final norm + head``;
    the head is ``vocab x hidden`` unless tied (or a 1-row score head when
    ``score_only``).  MoE FFN: router + all experts + shared experts.
    """
    h = spec.hidden_size
    if spec.is_moe:
        ie = spec.expert_intermediate_size
        ffn = h * spec.n_experts + 3 * h * ie * (spec.n_experts + spec.n_shared_experts)
    else:
        ffn = 3 * h * spec.intermediate_size
    bias = (spec.n_heads + 2 * spec.n_kv_heads) * spec.head_dim if spec.attention_bias else 0
    per_layer = _attention_params(spec) + bias + ffn + 2 * h
    head = h if score_only else (0 if spec.tie_word_embeddings else spec.vocab_size * h)
    return float(spec.vocab_size * h + spec.n_layers * per_layer + h + head) * dtype_bytes


def kv_cache_bytes(
    spec: ModelSpec, slots: int, tokens: int, dtype_bytes: float = DTYPE_BYTES["bf16"]
) -> float:
    """Bytes of a K+V cache of ``slots x tokens`` positions [B]: ``2 L s t H_kv d b``."""
    return 2.0 * spec.n_layers * slots * tokens * spec.n_kv_heads * spec.head_dim * dtype_bytes


def decode_step_flops(spec: ModelSpec, batch: int, context_tokens: float) -> float:
    """Matmul FLOPs of one decode step [FLOP].

    ``2 B (L (attn + k_active FFN + router) + V H) + 4 B L H_q d c``: two
    FLOPs per weight per token, plus ``QK^T`` and ``PV`` over ``c`` context
    tokens (the ``c`` of each sequence, averaged).
    """
    h, layers = spec.hidden_size, spec.n_layers
    if spec.is_moe:
        ie = spec.expert_intermediate_size
        ffn = h * spec.n_experts + 3 * h * ie * (spec.n_active_experts + spec.n_shared_experts)
    else:
        ffn = 3 * h * spec.intermediate_size
    per_token = layers * (_attention_params(spec) + ffn) + spec.vocab_size * h
    attn = 4.0 * layers * spec.n_heads * spec.head_dim * context_tokens
    return batch * (2.0 * per_token + attn)


def decode_step_hbm_bytes(
    spec: ModelSpec, batch: int, context_tokens: float, dtype_bytes: float = DTYPE_BYTES["bf16"]
) -> float:
    """Bytes one decode step must move through HBM [B].

    Weights read once per step (all layers, LM head; for MoE only the
    expected distinct experts ``E (1 - (1 - k/E)^B)``) plus the K and V cache
    read, ``2 L B c H_kv d b``.  Activations are ignored (<< 1 % at B <= 256).
    """
    h = spec.hidden_size
    if spec.is_moe:
        ie = spec.expert_intermediate_size
        experts = _expected_unique_experts(spec, batch) + spec.n_shared_experts
        ffn = h * spec.n_experts + 3 * h * ie * experts
    else:
        ffn = 3 * h * spec.intermediate_size
    weights = spec.n_layers * (_attention_params(spec) + ffn) + spec.vocab_size * h
    kv = 2.0 * spec.n_layers * batch * context_tokens * spec.n_kv_heads * spec.head_dim
    return (weights + kv) * dtype_bytes


# --------------------------------------------------------------------------- attention


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether ``triton`` imports (its kernels also need CUDA tensors or TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


@functools.lru_cache(maxsize=1)
def _triton_kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def _decode_attn_stage1(
        Q, KP, VP, KG, VG, PSLOT, SEQ, PLEN, GLEN, O_PART, LSE_PART,
        sm_scale, n_splits,
        s_qb, s_qh,
        s_kp0, s_kp1, s_kph,
        s_kg0, s_kg1, s_kgh,
        s_ob, s_oh, s_os,
        s_lb, s_lh,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_HQ: tl.constexpr, BLOCK_KV: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        pslot = tl.load(PSLOT + b).to(tl.int64)
        seq = tl.load(SEQ + b).to(tl.int64)
        plen = tl.load(PLEN + b).to(tl.int64)
        total = plen + tl.load(GLEN + b).to(tl.int64)
        per_split = tl.cdiv(tl.cdiv(total, n_splits), BLOCK_KV) * BLOCK_KV
        start = split * per_split
        end = tl.minimum(start + per_split, total)

        offs_h = tl.arange(0, BLOCK_HQ)
        offs_d = tl.arange(0, BLOCK_D)
        h_mask = offs_h < GROUP
        d_mask = offs_d < HEAD_DIM
        heads = kvh * GROUP + offs_h
        q = tl.load(
            Q + b * s_qb + heads[:, None] * s_qh + offs_d[None, :],
            mask=h_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        m_i = tl.full([BLOCK_HQ], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_HQ], tl.float32)
        acc = tl.zeros([BLOCK_HQ, BLOCK_D], tl.float32)
        kp_base = pslot * s_kp0 + kvh * s_kph
        kg_base = seq * s_kg0 + kvh * s_kgh
        for n0 in range(start, end, BLOCK_KV):
            offs_n = n0 + tl.arange(0, BLOCK_KV)
            valid = offs_n < end
            in_p = valid & (offs_n < plen)
            in_g = valid & (offs_n >= plen)
            p_off = kp_base + tl.where(in_p, offs_n, 0)[:, None] * s_kp1 + offs_d[None, :]
            g_off = kg_base + tl.where(in_g, offs_n - plen, 0)[:, None] * s_kg1 + offs_d[None, :]
            mp = in_p[:, None] & d_mask[None, :]
            mg = in_g[:, None] & d_mask[None, :]
            k = tl.load(KP + p_off, mask=mp, other=0.0) + tl.load(KG + g_off, mask=mg, other=0.0)
            s = tl.dot(q, tl.trans(k)).to(tl.float32) * sm_scale
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(VP + p_off, mask=mp, other=0.0) + tl.load(VG + g_off, mask=mg, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
            m_i = m_new
        has = l_i > 0
        out = acc / tl.where(has, l_i, 1.0)[:, None]
        lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(
            O_PART + b * s_ob + heads[:, None] * s_oh + split * s_os + offs_d[None, :],
            out,
            mask=h_mask[:, None] & d_mask[None, :],
        )
        tl.store(LSE_PART + b * s_lb + heads * s_lh + split, lse, mask=h_mask)

    return _decode_attn_stage1


def choose_num_splits(
    batch: int, n_kv_heads: int, max_context_tokens: int, n_sms: int = 132
) -> int:
    """Split-K factor: ``B H_kv S >= 2 x SMs`` programs, no split under 256 tokens."""
    want = math.ceil(2 * n_sms / max(1, batch * n_kv_heads))
    return int(max(1, min(MAX_SPLITS, want, math.ceil(max_context_tokens / 256))))


def decode_attention_triton(q, kp, vp, kg, vg, pslot, seq, plen, glen, num_splits: int = 1) -> Any:
    """Split-K decode attention (Triton); same contract as :func:`decode_attention_reference`.

    Grid ``(B, H_kv, S)``: each program takes the ``H_q/H_kv`` query heads of
    one KV head (padded to 16 for ``tl.dot``) over one contiguous share of that
    sequence's ``plen + glen`` positions, and writes a partial output and its
    log-sum-exp; a softmax over the ``S`` log-sum-exps combines them.  All
    lengths and slots are read on the device: CUDA-graph capturable.
    """
    torch = _torch()
    b, hq, d = q.shape
    hkv = kp.shape[2]
    group = hq // hkv
    if group > BLOCK_H:
        raise TtcsimError(f"GQA group {group} > {BLOCK_H} not supported by the Triton kernel")
    for t in (kp, vp, kg, vg):
        if t.stride(-1) != 1 or t.shape[-1] != d:
            raise TtcsimError("KV cache must be contiguous in head_dim")
    if q.stride(-1) != 1:
        q = q.contiguous()
    o_part = torch.empty((b, hq, num_splits, d), device=q.device, dtype=torch.float32)
    lse = torch.empty((b, hq, num_splits), device=q.device, dtype=torch.float32)
    kernel = _triton_kernel()
    kernel[(b, hkv, num_splits)](
        q, kp, vp, kg, vg, pslot, seq, plen, glen, o_part, lse,
        1.0 / math.sqrt(d), num_splits,
        q.stride(0), q.stride(1),
        kp.stride(0), kp.stride(1), kp.stride(2),
        kg.stride(0), kg.stride(1), kg.stride(2),
        o_part.stride(0), o_part.stride(1), o_part.stride(2),
        lse.stride(0), lse.stride(1),
        GROUP=group, HEAD_DIM=d, BLOCK_D=max(16, 1 << (d - 1).bit_length()),
        BLOCK_HQ=BLOCK_H, BLOCK_KV=BLOCK_N,
    )  # fmt: skip
    if num_splits == 1:
        return o_part[:, :, 0].to(q.dtype)
    w = torch.softmax(lse, dim=-1)
    return (w.unsqueeze(-1) * o_part).sum(2).to(q.dtype)


def decode_attention_reference(
    q, kp, vp, kg, vg, pslot, seq, plen, glen, num_splits: int = 1
) -> Any:
    """Exact decode attention in plain torch (reads the whole cache, masked).

    Parameters (torch tensors; ``B`` sequences, ``d`` head_dim)
    ----------
    q : [B, H_q, d]
    kp, vp : [prompt_slots, T_p, H_kv, d] prompt cache of one layer
    kg, vg : [gen_slots, T_g, H_kv, d] generation cache of one layer
    pslot, seq : int64 [B] prompt slot and generation slot of each sequence
    plen, glen : int64 [B] valid prompt / generated positions (``glen``
        includes the token being decoded, whose K/V is already written)
    num_splits : ignored (same signature as the Triton version)

    Returns ``softmax(q k^T / sqrt(d)) v`` over the ``plen + glen`` valid
    positions, ``[B, H_q, d]`` in ``q``'s dtype; computed in fp32.
    """
    torch = _torch()
    b, hq, d = q.shape
    hkv = kp.shape[2]
    k = torch.cat([kp.index_select(0, pslot), kg.index_select(0, seq)], 1).float()
    v = torch.cat([vp.index_select(0, pslot), vg.index_select(0, seq)], 1).float()
    tp, tg = kp.shape[1], kg.shape[1]
    valid = torch.cat(
        [
            torch.arange(tp, device=q.device)[None, :] < plen[:, None],
            torch.arange(tg, device=q.device)[None, :] < glen[:, None],
        ],
        1,
    )  # [B, T]
    qg = q.float().reshape(b, hkv, hq // hkv, d)
    scores = torch.einsum("bhgd,bthd->bhgt", qg, k) / math.sqrt(d)
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    out = torch.einsum("bhgt,bthd->bhgd", torch.softmax(scores, -1), v)
    return out.reshape(b, hq, d).to(q.dtype)


# --------------------------------------------------------------------------- decoder


def _rms(x: Any, w: Any) -> Any:
    """RMSNorm ``x / sqrt(mean(x^2) + eps) * w`` (one fused kernel where torch has it)."""
    f = _torch().nn.functional
    if hasattr(f, "rms_norm"):
        return f.rms_norm(x, (x.shape[-1],), w, RMS_EPS)
    xf = x.float()
    return (xf * (xf.pow(2).mean(-1, keepdim=True) + RMS_EPS).rsqrt()).to(x.dtype) * w


def _rope(x: Any, cos: Any, sin: Any) -> Any:
    torch = _torch()
    x1, x2 = x.chunk(2, -1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1)


@dataclass
class _DecodeState:
    """Static device tensors (and the CUDA graph) for one decode batch size."""

    batch: int
    tokens: Any
    seq: Any
    pslot: Any
    plen: Any
    glen: Any
    num_splits: int
    graph: Any = None
    logits: Any = None


class ReferenceDecoder:
    """Random-weight decoder for one :class:`ModelSpec` on one device.

    Parameters
    ----------
    spec : ModelSpec
    device : str or torch.device
        ``"cuda"``, ``"cuda:1"``, ``"cpu"``.
    dtype : torch.dtype, optional
        Weight and activation dtype; default ``torch.bfloat16``.
    seed : int
        Seed of the random weights and prompts.
    score_only : bool
        Reward model: a ``[1, hidden]`` score head, no LM head, no KV cache.
    use_triton, use_cuda_graphs : bool, optional
        Default: both on for CUDA devices when available (graphs off for MoE).
    prefill_chunk_tokens : int
        Prompts are prefilled in chunks of about this many tokens (whole
        prompts; at least one prompt per chunk) to bound activation memory.
    """

    def __init__(
        self,
        spec: ModelSpec,
        device: Any = "cuda",
        *,
        dtype: Any = None,
        seed: int = 0,
        score_only: bool = False,
        use_triton: bool | None = None,
        use_cuda_graphs: bool | None = None,
        prefill_chunk_tokens: int = 16384,
    ) -> None:
        torch = _torch()
        self.spec = spec
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dtype = dtype or torch.bfloat16
        self.score_only = score_only
        cuda = self.device.type == "cuda"
        self.use_triton = (cuda and triton_available()) if use_triton is None else use_triton
        graphs = cuda and not spec.is_moe if use_cuda_graphs is None else use_cuda_graphs
        if graphs and (spec.is_moe or not cuda):
            raise TtcsimError("CUDA graphs need a CUDA device and a dense (non-MoE) model")
        self.use_cuda_graphs = bool(graphs)
        self.prefill_chunk_tokens = int(prefill_chunk_tokens)
        self.n_sms = (
            torch.cuda.get_device_properties(self.device).multi_processor_count if cuda else 132
        )
        self._gen = torch.Generator(device=self.device)
        self._gen.manual_seed(seed)
        self._init_weights()
        self.prompt_slots = self.prompt_capacity_tokens = 0
        self.gen_slots = self.gen_capacity_tokens = 0
        self.kp = self.vp = self.kg = self.vg = self.out_tokens = None
        self._rope_tokens = 0
        self._states: dict[int, _DecodeState] = {}
        self._pool = None
        self.last_logits = None

    # ---------------------------------------------------------------- setup
    def _randn(self, *shape: int) -> Any:
        torch = _torch()
        t = torch.empty(shape, device=self.device, dtype=self.dtype)
        return t.normal_(0.0, WEIGHT_STD, generator=self._gen)

    def _init_weights(self) -> None:
        torch = _torch()
        s, h, d = self.spec, self.spec.hidden_size, self.spec.head_dim
        ones = functools.partial(torch.ones, device=self.device, dtype=self.dtype)
        qkv = (s.n_heads + 2 * s.n_kv_heads) * d
        self.embed = self._randn(s.vocab_size, h)
        self.layers: list[dict[str, Any]] = []
        for _ in range(s.n_layers):
            lw: dict[str, Any] = {
                "ln1": ones(h),
                "ln2": ones(h),
                "wqkv": self._randn(qkv, h),
                "bqkv": self._randn(qkv) if s.attention_bias else None,
                "wo": self._randn(h, s.n_heads * d),
            }
            if s.is_moe:
                ie = s.expert_intermediate_size
                lw["router"] = self._randn(s.n_experts, h)
                lw["e_gu"] = self._randn(s.n_experts, 2 * ie, h)
                lw["e_down"] = self._randn(s.n_experts, h, ie)
                if s.n_shared_experts:
                    lw["w_gu"] = self._randn(2 * ie * s.n_shared_experts, h)
                    lw["w_down"] = self._randn(h, ie * s.n_shared_experts)
            else:
                lw["w_gu"] = self._randn(2 * s.intermediate_size, h)
                lw["w_down"] = self._randn(h, s.intermediate_size)
            self.layers.append(lw)
        self.norm_f = ones(h)
        if self.score_only:
            self.head = self._randn(1, h)
        else:
            self.head = self.embed if s.tie_word_embeddings else self._randn(s.vocab_size, h)

    def _ensure_rope(self, n_positions: int) -> None:
        if n_positions <= self._rope_tokens:
            return
        torch = _torch()
        n = max(n_positions, 2 * self._rope_tokens)
        d = self.spec.head_dim
        inv = ROPE_THETA ** (
            -torch.arange(0, d // 2, device=self.device, dtype=torch.float32) * 2 / d
        )
        ang = torch.arange(n, device=self.device, dtype=torch.float32)[:, None] * inv[None, :]
        self.cos, self.sin = ang.cos().to(self.dtype), ang.sin().to(self.dtype)
        self._rope_tokens = n

    def ensure_capacity(
        self, prompt_slots: int, prompt_tokens: int, gen_slots: int, gen_tokens: int
    ) -> None:
        """Grow the static KV caches to at least these sizes (never shrinks).

        Growing reallocates the caches and drops every captured CUDA graph
        (they point at the old buffers).  Memory: :func:`kv_cache_bytes` of
        ``prompt_slots x prompt_tokens`` plus ``gen_slots x gen_tokens``.
        """
        if self.score_only:
            raise TtcsimError("a score-only (reward) decoder has no KV cache")
        need = (prompt_slots, prompt_tokens, gen_slots, max(1, gen_tokens))
        have = (
            self.prompt_slots,
            self.prompt_capacity_tokens,
            self.gen_slots,
            self.gen_capacity_tokens,
        )
        if all(n <= h for n, h in zip(need, have, strict=True)):
            return
        torch = _torch()
        new = tuple(max(n, h) for n, h in zip(need, have, strict=True))
        self.release_cache()
        s = self.spec
        mk = functools.partial(torch.zeros, device=self.device, dtype=self.dtype)
        prompt_shape = (s.n_layers, new[0], new[1], s.n_kv_heads, s.head_dim)
        gen_shape = (s.n_layers, new[2], new[3], s.n_kv_heads, s.head_dim)
        self.kp, self.vp = mk(prompt_shape), mk(prompt_shape)
        self.kg, self.vg = mk(gen_shape), mk(gen_shape)
        self.out_tokens = torch.full((new[2], new[3] + 1), -1, device=self.device, dtype=torch.long)
        self.prompt_slots, self.prompt_capacity_tokens, self.gen_slots, self.gen_capacity_tokens = (
            new
        )
        self._ensure_rope(new[1] + new[3] + 1)

    def release_cache(self) -> None:
        """Free the KV caches and all CUDA graphs."""
        self._states.clear()
        self._pool = None
        self.kp = self.vp = self.kg = self.vg = self.out_tokens = None
        self.prompt_slots = self.prompt_capacity_tokens = self.gen_slots = (
            self.gen_capacity_tokens
        ) = 0
        self.last_logits = None
        if self.device.type == "cuda":
            _torch().cuda.empty_cache()

    @property
    def n_graphs(self) -> int:
        """Number of captured decode CUDA graphs (one per batch size)."""
        return sum(st.graph is not None for st in self._states.values())

    def step_cost(self, batch: int, context_tokens: float) -> tuple[float, float]:
        """``(hbm_bytes, flops)`` of one decode step (:func:`decode_step_hbm_bytes`, ...flops)."""
        db = float(self.embed.element_size())
        return (
            decode_step_hbm_bytes(self.spec, batch, context_tokens, db),
            decode_step_flops(self.spec, batch, context_tokens),
        )

    def reseed(self, seed: int) -> None:
        """Restart the random stream of :meth:`random_tokens` (weights are already drawn)."""
        self._gen.manual_seed(seed)

    def random_tokens(self, *shape: int) -> Any:
        """Random token ids on the device (seeded)."""
        torch = _torch()
        return torch.randint(
            0,
            self.spec.vocab_size,
            shape,
            device=self.device,
            generator=self._gen,
            dtype=torch.long,
        )

    # ---------------------------------------------------------------- blocks
    def _mlp(self, x: Any, lw: dict[str, Any]) -> Any:
        torch = _torch()
        f = torch.nn.functional
        if not self.spec.is_moe:
            g, u = f.linear(x, lw["w_gu"]).chunk(2, -1)
            return f.linear(f.silu(g) * u, lw["w_down"])
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        k = self.spec.n_active_experts
        probs = torch.softmax(f.linear(x2, lw["router"]).float(), -1)
        w, idx = probs.topk(k, -1)
        w = (w / w.sum(-1, keepdim=True)).to(x.dtype).flatten()
        flat = idx.flatten()
        order = flat.argsort()
        counts = torch.bincount(flat, minlength=self.spec.n_experts).tolist()  # host sync
        out = torch.zeros_like(x2)
        start = 0
        for e, c in enumerate(counts):
            if not c:
                continue
            sel = order[start : start + c]
            start += c
            tok = sel // k
            g, u = f.linear(x2.index_select(0, tok), lw["e_gu"][e]).chunk(2, -1)
            y = f.linear(f.silu(g) * u, lw["e_down"][e]) * w.index_select(0, sel)[:, None]
            out.index_add_(0, tok, y)
        if "w_gu" in lw:
            g, u = f.linear(x2, lw["w_gu"]).chunk(2, -1)
            out = out + f.linear(f.silu(g) * u, lw["w_down"])
        return out.view(shape)

    def _qkv(self, x: Any, lw: dict[str, Any], cos: Any, sin: Any) -> tuple[Any, Any, Any]:
        """Fused QKV projection, RoPE on q and k together; views ``[..., heads, d]``."""
        s = self.spec
        qkv = _torch().nn.functional.linear(x, lw["wqkv"], lw["bqkv"])
        qkv = qkv.view(*x.shape[:-1], s.n_heads + 2 * s.n_kv_heads, s.head_dim)
        qk = _rope(qkv[..., : s.n_heads + s.n_kv_heads, :], cos, sin)
        return (
            qk[..., : s.n_heads, :],
            qk[..., s.n_heads :, :],
            qkv[..., s.n_heads + s.n_kv_heads :, :],
        )

    def _forward_prefill(self, tokens: Any, slots: Any | None, last_index: Any) -> Any:
        """One chunk: tokens [b, T] -> final-normed hidden at ``last_index`` [b, H]."""
        torch = _torch()
        f = torch.nn.functional
        s = self.spec
        b, t = tokens.shape
        group = s.n_heads // s.n_kv_heads
        self._ensure_rope(t)
        cos, sin = self.cos[:t][None, :, None, :], self.sin[:t][None, :, None, :]
        x = f.embedding(tokens, self.embed)
        for li, lw in enumerate(self.layers):
            q, k, v = self._qkv(_rms(x, lw["ln1"]), lw, cos, sin)
            if slots is not None:
                self.kp[li][slots, :t] = k
                self.vp[li][slots, :t] = v
            kk, vv = k.transpose(1, 2), v.transpose(1, 2)
            if group > 1:
                kk, vv = kk.repeat_interleave(group, 1), vv.repeat_interleave(group, 1)
            o = f.scaled_dot_product_attention(q.transpose(1, 2), kk, vv, is_causal=True)
            x = x + f.linear(o.transpose(1, 2).reshape(b, t, -1), lw["wo"])
            x = x + self._mlp(_rms(x, lw["ln2"]), lw)
        last = x[torch.arange(b, device=x.device), last_index]
        return _rms(last, self.norm_f)

    def prefill(self, tokens: Any, slots: Any | None = None, lengths: Any | None = None) -> Any:
        """Prefill prompts ``tokens`` [n, T] (chunked); return head outputs at each last position.

        ``slots`` (int64 [n]): prompt-cache slots to write K/V to (None: no
        cache write).  ``lengths`` (int64 [n]): valid lengths of right-padded
        rows (default ``T``); causal attention makes the padding harmless.
        Returns logits [n, V] (or scores [n, 1] for a score-only decoder).
        """
        torch = _torch()
        n, t = tokens.shape
        if slots is not None and (self.kp is None or t > self.prompt_capacity_tokens):
            raise TtcsimError("prompt cache too small: call ensure_capacity first")
        last = lengths - 1 if lengths is not None else torch.full((n,), t - 1, device=self.device)
        per = max(1, self.prefill_chunk_tokens // t)
        outs = []
        for i in range(0, n, per):
            sl = slots[i : i + per] if slots is not None else None
            outs.append(self._forward_prefill(tokens[i : i + per], sl, last[i : i + per]))
        h = torch.cat(outs, 0)
        return torch.nn.functional.linear(h, self.head)

    # ---------------------------------------------------------------- decode
    def _state(self, batch: int) -> _DecodeState:
        st = self._states.get(batch)
        if st is None:
            torch = _torch()
            z = functools.partial(torch.zeros, batch, device=self.device, dtype=torch.long)
            ctx = self.prompt_capacity_tokens + self.gen_capacity_tokens
            splits = choose_num_splits(batch, self.spec.n_kv_heads, ctx, self.n_sms)
            st = _DecodeState(batch, z(), z(), z(), z(), z(), splits)
            self._states[batch] = st
        return st

    def _decode_body(self, st: _DecodeState) -> Any:
        """Compute one step for the batch in ``st`` (idempotent: no counters advance)."""
        torch = _torch()
        f = torch.nn.functional
        s = self.spec
        tg = self.gen_capacity_tokens
        attn = decode_attention_triton if self.use_triton else decode_attention_reference
        pos = st.plen + st.glen
        glen1 = st.glen + 1
        row = st.seq * tg + st.glen
        cos, sin = self.cos[pos][:, None, :], self.sin[pos][:, None, :]
        x = f.embedding(st.tokens, self.embed)
        for li, lw in enumerate(self.layers):
            q, k, v = self._qkv(_rms(x, lw["ln1"]), lw, cos, sin)
            kg, vg = self.kg[li], self.vg[li]
            kg.view(-1, s.n_kv_heads, s.head_dim).index_copy_(0, row, k)
            vg.view(-1, s.n_kv_heads, s.head_dim).index_copy_(0, row, v)
            o = attn(
                q, self.kp[li], self.vp[li], kg, vg, st.pslot, st.seq, st.plen, glen1, st.num_splits
            )
            x = x + f.linear(o.reshape(st.batch, -1), lw["wo"])
            x = x + self._mlp(_rms(x, lw["ln2"]), lw)
        logits = f.linear(_rms(x, self.norm_f), self.head)
        nxt = logits.argmax(-1)
        self.out_tokens.view(-1).index_copy_(0, st.seq * (tg + 1) + glen1, nxt)
        return logits, nxt

    def _step(self, st: _DecodeState) -> None:
        torch = _torch()
        if not self.use_cuda_graphs:
            logits, nxt = self._decode_body(st)
            st.tokens.copy_(nxt)
            st.glen.add_(1)
            self.last_logits = logits
            return
        if st.graph is None:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up: compiles Triton, sets up cuBLAS
                    self._decode_body(st)
            torch.cuda.current_stream(self.device).wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                logits, nxt = self._decode_body(st)
                st.tokens.copy_(nxt)
                st.glen.add_(1)
            st.graph, st.logits = graph, logits
        st.graph.replay()
        self.last_logits = st.logits

    def decode(
        self, first_tokens: Any, pslot: Sequence[int], prompt_tokens: int, steps: Sequence[int]
    ) -> int:
        """Decode ``steps[i]`` tokens for sequence ``i`` (slot ``i``); return the step count.

        Sequence ``i`` starts from ``first_tokens[i]`` (the prefill's output,
        written to ``out_tokens[i, 0]``; row ``i`` is reset to -1 first, and
        decode step ``j`` writes ``out_tokens[i, j]``), reads prompt slot
        ``pslot[i]`` of ``prompt_tokens`` positions, and leaves the batch after
        its own number of steps (the index tensors are compacted; the cache
        is not touched).
        """
        torch = _torch()
        n = len(steps)
        if n > self.gen_slots or max(steps, default=0) > self.gen_capacity_tokens:
            raise TtcsimError("generation cache too small: call ensure_capacity first")
        self.out_tokens[:n].fill_(-1)
        self.out_tokens[:n, 0] = first_tokens[:n]
        active = [i for i in range(n) if steps[i] > 0]
        if not active:
            return 0
        idx = torch.tensor(active, device=self.device)
        st = self._state(len(active))
        st.tokens.copy_(first_tokens.index_select(0, idx))
        st.seq.copy_(idx)
        st.pslot.copy_(torch.tensor([pslot[i] for i in active], device=self.device))
        st.plen.fill_(prompt_tokens)
        st.glen.zero_()
        done = 0
        while True:
            todo = min(steps[i] for i in active) - done
            for _ in range(todo):
                self._step(st)
            done += todo
            keep = [j for j, i in enumerate(active) if steps[i] > done]
            if not keep:
                return done
            kidx = torch.tensor(keep, device=self.device)
            new = self._state(len(keep))
            for name in ("tokens", "seq", "pslot", "plen", "glen"):
                getattr(new, name).copy_(getattr(st, name).index_select(0, kidx))
            active = [active[j] for j in keep]
            st = new


# --------------------------------------------------------------------------- workload


@dataclass(frozen=True)
class WorkloadTiming:
    """Wall times of one workload run.

    ``*_time_s`` are ``time.perf_counter`` differences [s] between device
    synchronisations; ``*_start_s`` / ``*_end_s`` are ``time.monotonic``
    stamps [s] (the clock of :class:`ttcsim.gpu.nvml.TraceSampler`).  Without a
    reward model the score phase is empty (start = end = decode end).
    """

    prefill_time_s: float
    decode_time_s: float
    score_time_s: float
    total_time_s: float
    prefill_start_s: float
    prefill_end_s: float
    decode_start_s: float
    decode_end_s: float
    score_start_s: float
    score_end_s: float
    prefill_tokens: int
    generated_tokens: int
    decode_steps: int
    scored_tokens: int


def _sync(device: Any) -> None:
    torch = _torch()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def run_workload(
    spec: ModelSpec | ReferenceDecoder,
    *,
    prompt_tokens: int,
    output_tokens: Sequence[int],
    samples_per_query: int,
    concurrent_queries: int,
    prefix_sharing: bool = True,
    reward_spec: ModelSpec | ReferenceDecoder | None = None,
    device: Any = None,
    sync_timer: bool = True,
) -> WorkloadTiming:
    """Serve ``concurrent_queries`` queries x ``samples_per_query`` samples once.

    1. prefill: ``concurrent_queries`` prompts of ``prompt_tokens`` (with
       ``prefix_sharing``; else one prompt per sample), writing the prompt
       KV cache; the prefill's last logits give each sequence's first token;
    2. decode: one token per active sequence per step; sequence ``i`` stops
       after ``output_tokens[i]`` tokens in all (first token included);
    3. score (best-of-N, when ``reward_spec``): one batched prefill of
       ``prompt + candidate`` on the reward model (right-padded to the
       longest candidate).

    ``spec``/``reward_spec`` may be built decoders (reused: weights, caches
    and CUDA graphs persist between calls).  ``sync_timer``: synchronise
    the device at each phase boundary (needed for true phase times).
    """
    torch = _torch()
    if isinstance(spec, ReferenceDecoder):
        dec = spec
    else:
        dec = ReferenceDecoder(spec, device if device is not None else "cuda")
    if reward_spec is None or isinstance(reward_spec, ReferenceDecoder):
        rew = reward_spec
    else:
        rew = ReferenceDecoder(reward_spec, dec.device, score_only=True)
    n_seq = concurrent_queries * samples_per_query
    outs = [int(o) for o in output_tokens]
    if concurrent_queries < 1 or samples_per_query < 1 or prompt_tokens < 1:
        raise TtcsimError("prompt_tokens, samples_per_query and concurrent_queries must be >= 1")
    if len(outs) != n_seq or min(outs) < 1:
        raise TtcsimError(
            f"output_tokens needs {n_seq} entries >= 1 (queries x samples), got {len(outs)}"
        )
    if prompt_tokens + max(outs) > dec.spec.max_context_tokens:
        raise TtcsimError(
            f"context {prompt_tokens + max(outs)} exceeds {dec.spec.name}'s "
            f"{dec.spec.max_context_tokens} tokens"
        )
    n_prompts = concurrent_queries if prefix_sharing else n_seq
    dec.ensure_capacity(n_prompts, prompt_tokens, n_seq, max(outs) - 1)
    queries = dec.random_tokens(concurrent_queries, prompt_tokens)
    query_of = torch.arange(n_seq, device=dec.device) // samples_per_query
    prompts = queries if prefix_sharing else queries.index_select(0, query_of)  # N identical copies
    slots = torch.arange(n_prompts, device=dec.device)
    pslot = [i // samples_per_query if prefix_sharing else i for i in range(n_seq)]
    pslot_t = torch.tensor(pslot, device=dec.device)
    sync = (lambda: _sync(dec.device)) if sync_timer else (lambda: None)

    _sync(dec.device)
    t0, m0 = time.perf_counter(), time.monotonic()
    first = dec.prefill(prompts, slots).argmax(-1).index_select(0, pslot_t)
    sync()
    t1, m1 = time.perf_counter(), time.monotonic()
    steps = dec.decode(first, pslot, prompt_tokens, [o - 1 for o in outs])
    sync()
    t2, m2 = time.perf_counter(), time.monotonic()
    scored = 0
    if rew is not None:
        o_max = max(outs)
        gen = dec.out_tokens[:n_seq, :o_max].clamp_min(0)
        cand = torch.cat([queries.index_select(0, query_of), gen], 1)
        lengths = torch.tensor([prompt_tokens + o for o in outs], device=dec.device)
        rew.prefill(cand, None, lengths)
        scored = n_seq * (prompt_tokens + o_max)
    _sync(dec.device)
    t3, m3 = time.perf_counter(), time.monotonic()
    return WorkloadTiming(
        prefill_time_s=t1 - t0,
        decode_time_s=t2 - t1,
        score_time_s=t3 - t2,
        total_time_s=t3 - t0,
        prefill_start_s=m0,
        prefill_end_s=m1,
        decode_start_s=m1,
        decode_end_s=m2,
        score_start_s=m2,
        score_end_s=m3,
        prefill_tokens=n_prompts * prompt_tokens,
        generated_tokens=sum(outs),
        decode_steps=steps,
        scored_tokens=scored,
    )


# --------------------------------------------------------------------------- self-check


def _check_close(name: str, got: Any, want: Any, tol: float, report: dict[str, Any]) -> None:
    err = float((got.float() - want.float()).abs().max())
    scale = float(want.float().abs().max()) or 1.0
    report[name] = {"max_abs_err": err, "rel": err / scale}
    if not err <= tol * scale:
        raise AssertionError(f"{name}: max |err| {err:.3g} > {tol} x {scale:.3g}")


def decoder_self_check(device: str = "cuda", verbose: bool = True) -> dict[str, Any]:
    """Check the decoder on the real device; raise ``AssertionError`` on a mismatch.

    1. Triton decode attention vs :func:`decode_attention_reference` (random
       bf16 cache, mixed lengths, shared prompt slots, several split counts);
    2. a tiny model: CUDA-graph + Triton decode logits vs a dense prefill of
       ``prompt + first token`` (eager, SDPA);
    3. shrinking batch: each sequence gets exactly its number of tokens;
    4. prefix sharing gives the same first-step logits as separate prefills;
    5. timing of batch-1 and batch-32 decode of a ~1B model, for a sanity look.

    Returns a dict of errors and timings (printed when ``verbose``).
    """
    from ttcsim.gpu import require_gpu

    torch = _torch()
    if device.startswith("cuda"):
        require_gpu()
    rep: dict[str, Any] = {"triton": triton_available()}
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(1)

    def rnd(*shape: int) -> Any:
        return torch.randn(shape, device=dev, generator=g).to(torch.bfloat16)

    # 1. attention kernel
    if triton_available() and dev.type == "cuda":
        for hq, hkv, d in ((32, 8, 128), (28, 4, 128), (16, 16, 64), (40, 8, 128)):
            b, tp, tg = 6, 700, 300
            kp, vp, kg, vg = (
                rnd(3, tp, hkv, d),
                rnd(3, tp, hkv, d),
                rnd(b, tg, hkv, d),
                rnd(b, tg, hkv, d),
            )
            q = rnd(b, hq, d)
            pslot = torch.tensor([0, 0, 1, 2, 2, 2], device=dev)
            seq = torch.tensor([5, 1, 2, 3, 4, 0], device=dev)
            plen = torch.tensor([1, 700, 64, 65, 333, 129], device=dev)
            glen = torch.tensor([1, 300, 1, 63, 200, 17], device=dev)
            want = decode_attention_reference(q, kp, vp, kg, vg, pslot, seq, plen, glen)
            for splits in (1, 3, 16):
                got = decode_attention_triton(q, kp, vp, kg, vg, pslot, seq, plen, glen, splits)
                _check_close(f"attn_h{hq}_{hkv}_d{d}_s{splits}", got, want, 2e-2, rep)
    else:
        rep["attention"] = "skipped (no Triton or no CUDA)"

    # 2-4. tiny model, graphs + triton vs eager references
    tiny = ModelSpec(
        name="tiny-check", n_layers=2, hidden_size=256, n_heads=8, n_kv_heads=2, head_dim=32,
        intermediate_size=512, vocab_size=1000, attention_bias=True, max_context_tokens=4096,
    )  # fmt: skip
    dec = ReferenceDecoder(tiny, dev, seed=3)
    p_len, n_q, n_s = 37, 2, 3
    outs = [5, 1, 9, 2, 7, 3]
    run_workload(
        dec, prompt_tokens=p_len, output_tokens=outs, samples_per_query=n_s, concurrent_queries=n_q
    )
    counts = (dec.out_tokens[: len(outs)] >= 0).sum(1).tolist()
    rep["token_counts"] = counts
    if counts != outs:
        raise AssertionError(f"shrinking batch: token counts {counts} != targets {outs}")
    rep["graphs"] = dec.n_graphs
    ref = ReferenceDecoder(tiny, dev, seed=3, use_triton=False, use_cuda_graphs=False)
    two = [2] * (n_q * n_s)
    for sharing in (True, False):
        dec.reseed(7)
        ref.reseed(7)
        run_workload(dec, prompt_tokens=p_len, output_tokens=two, samples_per_query=n_s,
                     concurrent_queries=n_q, prefix_sharing=sharing)  # fmt: skip
        logits = dec.last_logits.clone()
        run_workload(ref, prompt_tokens=p_len, output_tokens=two, samples_per_query=n_s,
                     concurrent_queries=n_q, prefix_sharing=sharing)  # fmt: skip
        _check_close(f"graph_vs_eager_logits_sharing={sharing}", logits, ref.last_logits, 5e-2, rep)
        if sharing:
            shared = logits
        else:
            _check_close("prefix_sharing_logits", logits, shared, 5e-2, rep)
    # dense check: decode-step logits equal a full prefill of prompt + first token
    n_seq = n_q * n_s
    prompts = ref.random_tokens(n_q, p_len)  # any prompt works: rerun with known tokens
    ref.ensure_capacity(n_q, p_len, n_seq, 1)
    first = ref.prefill(prompts, torch.arange(n_q, device=dev)).argmax(-1)
    pslot = [i // n_s for i in range(n_seq)]
    first_s = first.index_select(0, torch.tensor(pslot, device=dev))
    ref.decode(first_s, pslot, p_len, [1] * n_seq)
    full = torch.cat(
        [prompts.index_select(0, torch.tensor(pslot, device=dev)), first_s[:, None]], 1
    )
    _check_close("decode_vs_prefill_logits", ref.last_logits, ref.prefill(full), 5e-2, rep)

    # 5. timing on a ~1B model
    small = ModelSpec(
        name="llama-1b-like", n_layers=16, hidden_size=2048, n_heads=32, n_kv_heads=8, head_dim=64,
        intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True,
    )  # fmt: skip
    big = ReferenceDecoder(small, dev)
    for batch in (1, 32):
        kw = dict(
            prompt_tokens=512,
            output_tokens=[129] * batch,
            samples_per_query=1,
            concurrent_queries=batch,
        )
        run_workload(big, **kw)
        t = run_workload(big, **kw)
        rep[f"1b_b{batch}_step_ms"] = 1e3 * t.decode_time_s / max(1, t.decode_steps)
        rep[f"1b_b{batch}_prefill_ms"] = 1e3 * t.prefill_time_s
    if verbose:
        for k, v in rep.items():
            print(f"{k}: {v}")
        print("decoder_self_check: OK")
    return rep
