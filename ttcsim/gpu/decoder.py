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
best-of-N) has a 1-output score head instead of the LM head; it has a KV
cache only as the verifier of ``beam<W>``.

KV cache (static, preallocated, token-major ``[layer, slot, token, kv_head,
head_dim]``), in two parts:

* the *prompt cache*, one slot per prefilled prompt;
* the *generation cache*, one slot per generated sequence.

A sequence attends to ``prompt_cache[pslot][:plen] ++ gen_cache[seq][:glen]``.
With prefix sharing, the N samples of one query share one ``pslot``: the prompt
is prefilled once and never copied.  ``beam<W>`` instead uses the generation
cache as a pool of 16-token blocks (vLLM's paged layout, block size
:data:`~ttcsim.simulator.phases.KV_BLOCK_TOKENS`): each candidate reads its
context through a block table, candidates share the blocks of their common
prefix, and a fork copies only the partially filled last block
(copy-on-write).  :meth:`ReferenceDecoder.extend` prefills new tokens after
a cached prefix (refine's feedback, beam's verifier).

Decode attention reads exactly each sequence's current context length:
a split-K ("flash-decoding") Triton kernel on CUDA, with lengths and slot
indices read from device tensors so that decode steps can be CUDA graphs
(one graph per distinct batch size and cache layout, captured lazily).  The eager fallback
:func:`decode_attention_reference` is exact but reads the whole cache
(masked); it is what CPU tests run.  Finished sequences leave the batch:
only the small index tensors are compacted, never the cache.

MoE layers loop over the experts that received tokens (``index_select`` /
``index_add_``), which needs the host to know the routing: MoE decoders run
without CUDA graphs and are launch-overhead bound at small batch.
"""

from __future__ import annotations

import copy
import functools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ttcsim.errors import TtcsimError
from ttcsim.models import ModelSpec
from ttcsim.simulator.phases import KV_BLOCK_TOKENS
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
        Q, KP, VP, KG, VG, PSLOT, SEQ, PLEN, GLEN, BT, O_PART, LSE_PART,
        sm_scale, n_splits,
        s_qb, s_qh,
        s_kp0, s_kp1, s_kph,
        s_kg0, s_kg1, s_kgh,
        s_bt,
        s_ob, s_oh, s_os,
        s_lb, s_lh,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_HQ: tl.constexpr, BLOCK_KV: tl.constexpr,
        PAGED: tl.constexpr, PAGE: tl.constexpr,
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
            gpos = tl.where(in_g, offs_n - plen, 0)
            if PAGED:  # generated position -> row of its block (block table of sequence b)
                blk = tl.load(BT + b * s_bt + gpos // PAGE, mask=in_g, other=0).to(tl.int64)
                g_row = blk * PAGE + gpos % PAGE
                g_off = kvh * s_kgh + g_row[:, None] * s_kg1 + offs_d[None, :]
            else:
                g_off = kg_base + gpos[:, None] * s_kg1 + offs_d[None, :]
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


def decode_attention_triton(
    q, kp, vp, kg, vg, pslot, seq, plen, glen, num_splits: int = 1, block_table=None
) -> Any:
    """Split-K decode attention (Triton); same contract as :func:`decode_attention_reference`.

    Grid ``(B, H_kv, S)``: each program takes the ``H_q/H_kv`` query heads of
    one KV head (padded to 16 for ``tl.dot``) over one contiguous share of that
    sequence's ``plen + glen`` positions, and writes a partial output and its
    log-sum-exp; a softmax over the ``S`` log-sum-exps combines them.  All
    lengths, slots and block tables are read on the device: CUDA-graph
    capturable.  Without ``block_table`` the kernel is compiled exactly as
    before paging existed (``PAGED`` is a compile-time constant).
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
    paged = block_table is not None
    if paged and kg.stride(0) != kg.shape[1] * kg.stride(1):
        raise TtcsimError("a paged generation cache must be contiguous over (slot, token)")
    bt = block_table if paged else seq  # an unread placeholder pointer when not paged
    o_part = torch.empty((b, hq, num_splits, d), device=q.device, dtype=torch.float32)
    lse = torch.empty((b, hq, num_splits), device=q.device, dtype=torch.float32)
    kernel = _triton_kernel()
    kernel[(b, hkv, num_splits)](
        q, kp, vp, kg, vg, pslot, seq, plen, glen, bt, o_part, lse,
        1.0 / math.sqrt(d), num_splits,
        q.stride(0), q.stride(1),
        kp.stride(0), kp.stride(1), kp.stride(2),
        kg.stride(0), kg.stride(1), kg.stride(2),
        bt.stride(0) if paged else 0,
        o_part.stride(0), o_part.stride(1), o_part.stride(2),
        lse.stride(0), lse.stride(1),
        GROUP=group, HEAD_DIM=d, BLOCK_D=max(16, 1 << (d - 1).bit_length()),
        BLOCK_HQ=BLOCK_H, BLOCK_KV=BLOCK_N, PAGED=paged, PAGE=KV_BLOCK_TOKENS,
    )  # fmt: skip
    if num_splits == 1:
        return o_part[:, :, 0].to(q.dtype)
    w = torch.softmax(lse, dim=-1)
    return (w.unsqueeze(-1) * o_part).sum(2).to(q.dtype)


def paged_rows(block_table: Any, n_positions: int) -> Any:
    """Flat cache rows ``[B, n_positions]`` of generated positions ``0..n-1`` through a block table.

    Position ``g`` of sequence ``i`` lives in row ``bt[i, g // 16] * 16 + g % 16``
    of the generation cache viewed as ``[gen_slots * T_g, H_kv, d]`` (block
    ``j`` = rows ``16 j .. 16 j + 15``; :data:`KV_BLOCK_TOKENS` = 16).
    """
    torch = _torch()
    pos = torch.arange(n_positions, device=block_table.device)
    return block_table[:, pos // KV_BLOCK_TOKENS] * KV_BLOCK_TOKENS + pos % KV_BLOCK_TOKENS


def decode_attention_reference(
    q, kp, vp, kg, vg, pslot, seq, plen, glen, num_splits: int = 1, block_table=None
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
    block_table : int64 [B, n_blocks], optional
        Paged generation cache: generated position ``g`` of sequence ``i`` is
        row :func:`paged_rows` of ``kg`` viewed as ``[slots * T_g, H_kv, d]``
        (``seq`` is then unused).  Sequences share blocks by listing them.

    Returns ``softmax(q k^T / sqrt(d)) v`` over the ``plen + glen`` valid
    positions, ``[B, H_q, d]`` in ``q``'s dtype; computed in fp32.
    """
    torch = _torch()
    b, hq, d = q.shape
    hkv = kp.shape[2]
    if block_table is None:
        kgen, vgen = kg.index_select(0, seq), vg.index_select(0, seq)
    else:
        rows = paged_rows(block_table, block_table.shape[1] * KV_BLOCK_TOKENS)
        kgen, vgen = kg.reshape(-1, hkv, d)[rows], vg.reshape(-1, hkv, d)[rows]
    k = torch.cat([kp.index_select(0, pslot), kgen], 1).float()
    v = torch.cat([vp.index_select(0, pslot), vgen], 1).float()
    tp, tg = kp.shape[1], kgen.shape[1]
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
    """Static device tensors (and the CUDA graph) for one decode batch size.

    ``bt`` is the block table ``[batch, gen_capacity / 16]`` of a paged
    state (None otherwise); paged and contiguous states are kept apart.
    """

    batch: int
    tokens: Any
    seq: Any
    pslot: Any
    plen: Any
    glen: Any
    num_splits: int
    graph: Any = None
    logits: Any = None
    bt: Any = None

    _INDEX = ("tokens", "seq", "pslot", "plen", "glen")


@dataclass(frozen=True)
class DecodeSegment:
    """``steps`` decode steps at a fixed batch of ``batch`` sequences.

    ``context_tokens`` [tokens]: KV positions the attention reads at the
    segment's first step, summed over the batch (``sum_i plen_i + glen_i + 1``,
    the token being decoded included); it grows by ``batch`` per step.
    """

    batch: int
    steps: int
    context_tokens: int

    @property
    def kv_read_tokens(self) -> int:
        """KV positions read over the whole segment: ``s C0 + B s (s - 1) / 2``."""
        s = self.steps
        return s * self.context_tokens + self.batch * s * (s - 1) // 2


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
        self._states: dict[tuple[int, bool], _DecodeState] = {}
        self._pool = None
        self.last_logits = None
        self._verifier: ReferenceDecoder | None = None

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
        For paged use the generation cache is a pool of ``gen_slots x
        gen_tokens / 16`` blocks of 16 rows (``gen_tokens`` a multiple of
        16).  A score-only decoder gets a cache too (the verifier of
        ``beam<W>`` keeps the searched prefixes in it).
        """
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
        self._release_own_cache()
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
        """Free the KV caches and all CUDA graphs (and the verifier clone's cache)."""
        if self._verifier is not None:
            self._verifier.release_cache()
        self._release_own_cache()

    def _release_own_cache(self) -> None:
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
        """Number of captured decode CUDA graphs (one per batch size and layout)."""
        return sum(st.graph is not None for st in self._states.values())

    @property
    def cache_bytes(self) -> float:
        """Bytes held by the KV caches, the verifier clone's included [B]."""
        caches = (self.kp, self.vp, self.kg, self.vg)
        own = sum(t.numel() * t.element_size() for t in caches if t is not None)
        return float(own) + (self._verifier.cache_bytes if self._verifier is not None else 0.0)

    def verifier_clone(self) -> ReferenceDecoder:
        """A decoder with the same weights (shared, not copied) and a KV cache of its own.

        The default verifier of ``beam<W>`` is the policy model itself, run as
        a separate engine: it keeps its own cache of the searched prefixes
        (the analytical model prefills the prompt into it once per query).
        Built once and kept: its cache and rope tables persist across runs.
        """
        if self._verifier is None:
            torch = _torch()
            other = copy.copy(self)
            other._gen = torch.Generator(device=self.device)
            other._gen.manual_seed(0)
            other.prompt_slots = other.prompt_capacity_tokens = 0
            other.gen_slots = other.gen_capacity_tokens = 0
            other.kp = other.vp = other.kg = other.vg = other.out_tokens = None
            other._states = {}
            other._pool = None
            other.last_logits = None
            other._verifier = None
            self._verifier = other
        return self._verifier

    def copy_gen_rows(self, src_rows: Sequence[int], dst_rows: Sequence[int]) -> None:
        """Copy generation-cache rows ``src -> dst`` in every layer (K and V): copy-on-write.

        Rows index the cache viewed as ``[layer, gen_slots * T_g, H_kv, d]``;
        ``2 x layers x rows`` token vectors are read and written.
        """
        if not len(src_rows):
            return
        torch = _torch()
        s = self.spec
        src = torch.tensor(list(src_rows), device=self.device)
        dst = torch.tensor(list(dst_rows), device=self.device)
        for cache in (self.kg, self.vg):
            flat = cache.view(s.n_layers, -1, s.n_kv_heads, s.head_dim)
            flat.index_copy_(1, dst, flat.index_select(1, src))

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

    def _forward_prefill(
        self, tokens: Any, slots: Any | None, last_index: Any, rows: Any | None = None
    ) -> Any:
        """One chunk: tokens [b, T] -> final-normed hidden at ``last_index`` [b, H].

        K/V go to prompt-cache ``slots`` [b] or to generation-cache ``rows`` [b, T].
        """
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
            if rows is not None:
                flat = rows.reshape(-1)
                kv_shape = (-1, s.n_kv_heads, s.head_dim)
                self.kg[li].view(kv_shape).index_copy_(0, flat, k.reshape(kv_shape))
                self.vg[li].view(kv_shape).index_copy_(0, flat, v.reshape(kv_shape))
            kk, vv = k.transpose(1, 2), v.transpose(1, 2)
            if group > 1:
                kk, vv = kk.repeat_interleave(group, 1), vv.repeat_interleave(group, 1)
            o = f.scaled_dot_product_attention(q.transpose(1, 2), kk, vv, is_causal=True)
            x = x + f.linear(o.transpose(1, 2).reshape(b, t, -1), lw["wo"])
            x = x + self._mlp(_rms(x, lw["ln2"]), lw)
        last = x[torch.arange(b, device=x.device), last_index]
        return _rms(last, self.norm_f)

    def prefill(
        self,
        tokens: Any,
        slots: Any | None = None,
        lengths: Any | None = None,
        rows: Any | None = None,
    ) -> Any:
        """Prefill prompts ``tokens`` [n, T] (chunked); return head outputs at each last position.

        ``slots`` (int64 [n]): prompt-cache slots to write K/V to (None: no
        cache write).  ``rows`` (int64 [n, T]): generation-cache rows to
        write K/V to instead (a paged prompt, :func:`paged_rows`).
        ``lengths`` (int64 [n]): valid lengths of right-padded rows (default
        ``T``); causal attention makes the padding harmless.  Returns logits
        [n, V] (or scores [n, 1] for a score-only decoder).
        """
        torch = _torch()
        n, t = tokens.shape
        if slots is not None and (self.kp is None or t > self.prompt_capacity_tokens):
            raise TtcsimError("prompt cache too small: call ensure_capacity first")
        if rows is not None and self.kg is None:
            raise TtcsimError("generation cache missing: call ensure_capacity first")
        last = lengths - 1 if lengths is not None else torch.full((n,), t - 1, device=self.device)
        per = max(1, self.prefill_chunk_tokens // t)
        outs = []
        for i in range(0, n, per):
            sl = slots[i : i + per] if slots is not None else None
            rw = rows[i : i + per] if rows is not None else None
            outs.append(self._forward_prefill(tokens[i : i + per], sl, last[i : i + per], rw))
        h = torch.cat(outs, 0)
        return torch.nn.functional.linear(h, self.head)

    def extend(
        self,
        tokens: Any,
        *,
        pslot: Sequence[int],
        plen: Sequence[int],
        glen0: Sequence[int],
        seq: Sequence[int] | None = None,
        block_table: Any | None = None,
    ) -> Any:
        """Prefill ``S`` new tokens per sequence after a cached prefix; return last head outputs.

        Sequence ``i`` has ``plen[i]`` positions in prompt slot ``pslot[i]``
        and ``glen0[i]`` generated positions in its generation cache
        (contiguous slot ``seq[i]``, or paged through ``block_table[i]``).
        Its ``S`` new tokens (``tokens`` [n, S]) take positions ``plen +
        glen0 .. + S - 1``: their K/V are written to generation positions
        ``glen0 .. glen0 + S - 1`` and they attend to the whole cached prefix
        plus each other, causally.  Work: ``n S`` tokens through every
        matmul; the attention reads ``sum_i (plen_i + glen0_i)`` cached
        positions and computes ``sum_i (S (plen_i + glen0_i) + S (S + 1) / 2)``
        (query, key) pairs, as the analytical model's prefill with a cached
        prefix.  (Implementation: the prefix K/V are gathered per sequence
        -- one extra write and read of the cached bytes -- and fed to SDPA
        with a boolean lower-right causal mask; the query heads of each KV
        head are folded into the length axis, so the K/V are never expanded
        per query head.)
        Rows are processed in chunks of about ``4 x prefill_chunk_tokens``
        prefix + new tokens.  Returns logits [n, V] (scores [n, 1]).
        """
        torch = _torch()
        n, t = tokens.shape
        if self.kg is None:
            raise TtcsimError("generation cache missing: call ensure_capacity first")
        if (seq is None) == (block_table is None):
            raise TtcsimError("extend needs exactly one of seq (contiguous) or block_table (paged)")
        width = max(plen) + max(glen0) + t
        if max(glen0) + t > self.gen_capacity_tokens:
            raise TtcsimError("generation cache too small: call ensure_capacity first")
        self._ensure_rope(width)
        per = max(1, 4 * self.prefill_chunk_tokens // width)
        outs = []
        for i in range(0, n, per):
            j = slice(i, i + per)
            outs.append(
                self._forward_extend(
                    tokens[j],
                    list(pslot[j]),
                    list(plen[j]),
                    list(glen0[j]),
                    None if seq is None else list(seq[j]),
                    None if block_table is None else block_table[j],
                )
            )
        return torch.nn.functional.linear(torch.cat(outs, 0), self.head)

    def _forward_extend(self, tokens, pslot, plen, glen0, seq, block_table) -> Any:
        """One chunk of :meth:`extend`: final-normed hidden at each last new token [b, H]."""
        torch = _torch()
        f = torch.nn.functional
        s = self.spec
        dev = self.device
        b, t = tokens.shape
        group = s.n_heads // s.n_kv_heads
        kv_shape = (-1, s.n_kv_heads, s.head_dim)
        p_max, g_max = max(plen), max(glen0) + t
        plen_t = torch.tensor(plen, device=dev)
        glen0_t = torch.tensor(glen0, device=dev)
        new = torch.arange(t, device=dev)
        pos = (plen_t + glen0_t)[:, None] + new[None, :]  # [b, t] absolute positions
        cos, sin = self.cos[pos][:, :, None, :], self.sin[pos][:, :, None, :]
        gpos = torch.arange(g_max, device=dev)
        if block_table is not None:
            gen_rows = paged_rows(block_table, g_max)  # [b, g_max]
        else:
            seq_t = torch.tensor(seq, device=dev)
            gen_rows = seq_t[:, None] * self.gen_capacity_tokens + gpos[None, :]
        new_rows = gen_rows.gather(1, glen0_t[:, None] + new[None, :])  # [b, t]
        pslot_t = torch.tensor(pslot, device=dev)
        hkv, d = s.n_kv_heads, s.head_dim
        # queries of one KV head's group fold into the length axis (row g t + i: head g,
        # token i), so the cached K/V are read as they are, never expanded per query head
        if len(set(plen)) == 1 and len(set(glen0)) == 1:  # lower-right causal
            keys = torch.arange(p_max + g_max, device=dev)
            mask = (keys[None, :] <= new[:, None] + (p_max + glen0[0])).repeat(group, 1)
        else:  # key valid: inside the sequence's prompt, or generated and causally before
            key_p = torch.arange(p_max, device=dev)[None, None, :] < plen_t[:, None, None]
            key_p = key_p.expand(b, t, p_max)
            key_g = gpos[None, None, :] <= (glen0_t[:, None] + new[None, :])[:, :, None]
            mask = torch.cat([key_p, key_g], 2)[:, None].repeat(1, 1, group, 1)
        x = f.embedding(tokens, self.embed)
        for li, lw in enumerate(self.layers):
            q, k, v = self._qkv(_rms(x, lw["ln1"]), lw, cos, sin)
            kg_flat, vg_flat = self.kg[li].view(kv_shape), self.vg[li].view(kv_shape)
            kg_flat.index_copy_(0, new_rows.reshape(-1), k.reshape(kv_shape))
            vg_flat.index_copy_(0, new_rows.reshape(-1), v.reshape(kv_shape))
            kk, vv = kg_flat[gen_rows], vg_flat[gen_rows]  # [b, g_max, H_kv, d]
            if p_max:
                kk = torch.cat([self.kp[li][:, :p_max].index_select(0, pslot_t), kk], 1)
                vv = torch.cat([self.vp[li][:, :p_max].index_select(0, pslot_t), vv], 1)
            qg = q.reshape(b, t, hkv, group, d).permute(0, 2, 3, 1, 4).reshape(b, hkv, -1, d)
            o = f.scaled_dot_product_attention(
                qg, kk.transpose(1, 2), vv.transpose(1, 2), attn_mask=mask
            )  # [b, H_kv, group t, d]
            o = o.reshape(b, hkv, group, t, d).permute(0, 3, 1, 2, 4).reshape(b, t, -1)
            x = x + f.linear(o, lw["wo"])
            x = x + self._mlp(_rms(x, lw["ln2"]), lw)
        return _rms(x[:, -1], self.norm_f)

    # ---------------------------------------------------------------- decode
    def _state(self, batch: int, paged: bool = False) -> _DecodeState:
        st = self._states.get((batch, paged))
        if st is None:
            torch = _torch()
            z = functools.partial(torch.zeros, batch, device=self.device, dtype=torch.long)
            ctx = self.prompt_capacity_tokens + self.gen_capacity_tokens
            splits = choose_num_splits(batch, self.spec.n_kv_heads, ctx, self.n_sms)
            st = _DecodeState(batch, z(), z(), z(), z(), z(), splits)
            if paged:
                n_blocks = self.gen_capacity_tokens // KV_BLOCK_TOKENS
                st.bt = torch.zeros((batch, n_blocks), device=self.device, dtype=torch.long)
            self._states[(batch, paged)] = st
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
        if st.bt is None:
            row = st.seq * tg + st.glen
        else:  # paged: the row of position glen in its block
            blk = st.bt.gather(1, (st.glen // KV_BLOCK_TOKENS)[:, None])[:, 0]
            row = blk * KV_BLOCK_TOKENS + st.glen % KV_BLOCK_TOKENS
        cos, sin = self.cos[pos][:, None, :], self.sin[pos][:, None, :]
        x = f.embedding(st.tokens, self.embed)
        for li, lw in enumerate(self.layers):
            q, k, v = self._qkv(_rms(x, lw["ln1"]), lw, cos, sin)
            kg, vg = self.kg[li], self.vg[li]
            kg.view(-1, s.n_kv_heads, s.head_dim).index_copy_(0, row, k)
            vg.view(-1, s.n_kv_heads, s.head_dim).index_copy_(0, row, v)
            o = attn(
                q,
                self.kp[li],
                self.vp[li],
                kg,
                vg,
                st.pslot,
                st.seq,
                st.plen,
                glen1,
                st.num_splits,
                block_table=st.bt,
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
        n = len(steps)
        if n > self.gen_slots:
            raise TtcsimError("generation cache too small: call ensure_capacity first")
        self.out_tokens[:n].fill_(-1)
        done, _ = self.decode_rows(
            first_tokens[:n],
            seq=range(n),
            pslot=pslot[:n],
            plen=[prompt_tokens] * n,
            glen0=[0] * n,
            steps=steps,
        )
        return done

    def decode_rows(
        self,
        first_tokens: Any,
        *,
        seq: Sequence[int],
        pslot: Sequence[int],
        plen: Sequence[int],
        glen0: Sequence[int],
        steps: Sequence[int],
        block_table: Any | None = None,
    ) -> tuple[int, list[DecodeSegment]]:
        """Decode ``steps[i]`` tokens for each sequence, continuing where its cache ends.

        Sequence ``i`` (generation slot ``seq[i]``) reads ``plen[i]`` positions
        of prompt slot ``pslot[i]`` and ``glen0[i]`` generated positions, then
        feeds ``first_tokens[i]`` (written to ``out_tokens[seq, glen0]``) at
        generated position ``glen0[i]``; step ``j`` writes its K/V there and
        its argmax to ``out_tokens[seq, glen0 + j + 1]``.  The batch shrinks
        as sequences finish (only the index tensors are compacted).  With
        ``block_table`` ([n, gen_capacity / 16] int64) the generation cache
        is paged: sequences read and write through their own block lists,
        which may share blocks (``seq`` then only picks the ``out_tokens`` row).

        Returns the number of steps run and the fixed-batch segments.
        """
        torch = _torch()
        n = len(steps)
        seq, pslot, plen, glen0, steps = (list(v) for v in (seq, pslot, plen, glen0, steps))
        if (
            n > self.gen_slots
            or max((g + k for g, k in zip(glen0, steps, strict=True)), default=0)
            > self.gen_capacity_tokens
        ):
            raise TtcsimError("generation cache too small: call ensure_capacity first")
        dev = self.device
        seq_t = torch.tensor(seq, device=dev)
        first = first_tokens[:n]
        self.out_tokens.view(-1).index_copy_(
            0, seq_t * (self.gen_capacity_tokens + 1) + torch.tensor(glen0, device=dev), first
        )
        active = [i for i in range(n) if steps[i] > 0]
        if not active:
            return 0, []
        paged = block_table is not None
        idx = torch.tensor(active, device=dev)
        st = self._state(len(active), paged)
        st.tokens.copy_(first.index_select(0, idx))
        st.seq.copy_(seq_t.index_select(0, idx))
        for name, values in (("pslot", pslot), ("plen", plen), ("glen", glen0)):
            getattr(st, name).copy_(torch.tensor([values[i] for i in active], device=dev))
        if paged:
            st.bt.copy_(block_table.index_select(0, idx))
        done = 0
        segments = []
        while True:
            todo = min(steps[i] for i in active) - done
            context = sum(plen[i] + glen0[i] + done + 1 for i in active)
            for _ in range(todo):
                self._step(st)
            segments.append(DecodeSegment(len(active), todo, context))
            done += todo
            keep = [j for j, i in enumerate(active) if steps[i] > done]
            if not keep:
                return done, segments
            kidx = torch.tensor(keep, device=dev)
            new = self._state(len(keep), paged)
            for name in _DecodeState._INDEX + (("bt",) if paged else ()):
                getattr(new, name).copy_(getattr(st, name).index_select(0, kidx))
            active = [active[j] for j in keep]
            st = new


# --------------------------------------------------------------------------- workload

#: strategies the reference decoder runs (``ttcsim.strategies`` class names)
SUPPORTED_STRATEGIES = ("single", "vote<N>", "bon<N>", "beam<W>", "refine<K>")


@dataclass(frozen=True)
class PassLog:
    """One batched pass of a workload run (or a run of decode steps at one batch).

    Counts are those of the analytical model's phases, so a run can be
    checked against :mod:`ttcsim.strategies` pass by pass.

    phase : ``"prefill"``, ``"decode"``, ``"score"`` (a reward-model or
        verifier pass) or ``"copy"`` (copy-on-write of partial KV blocks)
    model : ``"policy"`` or ``"verifier"`` (the reward model / verifier)
    step : the beam step ``k`` or refine round ``r`` (1-based) the pass
        belongs to; 0 for beam's prompt prefills; 1 for single/vote/bon
    sequences : rows in the pass (decode: the batch; copy: children forked)
    new_tokens : tokens run through the model (decode: batch x steps; copy:
        token positions copied, in every layer, K and V)
    cached_tokens : KV positions read from the cache (prefill/score: the
        cached prefix of every row; decode: over all steps, each step's own
        token included, :attr:`DecodeSegment.kv_read_tokens`)
    passes : forward passes (decode: steps at this batch; copy: 0)
    """

    phase: str
    model: str
    step: int
    sequences: int
    new_tokens: int
    cached_tokens: int
    passes: int = 1


@dataclass(frozen=True)
class WorkloadTiming:
    """Wall times of one workload run.

    ``*_time_s`` are ``time.perf_counter`` differences [s] between device
    synchronisations; ``*_start_s`` / ``*_end_s`` are ``time.monotonic``
    stamps [s] (the clock of :class:`ttcsim.gpu.nvml.TraceSampler`).  Without a
    reward model the score phase is empty (start = end = decode end).  For
    ``beam``/``refine`` the phases interleave (one decode, verify or prefill
    pass per step or round): ``*_time_s`` are sums over the phase's passes
    (copy-on-write counts as decode for the policy, as score for the
    verifier), ``*_start_s`` / ``*_end_s`` the first start and the last end,
    and an empty phase has start = end = the run's end.  The whole run is
    ``[start_s, end_s]``.  ``passes`` logs every pass (:class:`PassLog`).
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
    passes: tuple[PassLog, ...] = ()

    @property
    def start_s(self) -> float:
        """Monotonic stamp of the run's start [s]."""
        return min(self.prefill_start_s, self.decode_start_s, self.score_start_s)

    @property
    def end_s(self) -> float:
        """Monotonic stamp of the run's end [s]."""
        return max(self.prefill_end_s, self.decode_end_s, self.score_end_s)

    def count(self, phase: str, model: str | None = None, attr: str = "passes") -> int:
        """Sum of ``attr`` over the logged passes of one phase (and model)."""
        return sum(
            getattr(p, attr)
            for p in self.passes
            if p.phase == phase and (model is None or p.model == model)
        )


def _sync(device: Any) -> None:
    torch = _torch()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class _PhaseClock:
    """Phase times of an interleaved run: the time since the last mark goes to the phase named.

    The device is synchronised at the start, at every mark when
    ``sync_timer`` and always at :meth:`finish`.
    """

    def __init__(self, device: Any, sync_timer: bool) -> None:
        self.device, self.sync_timer = device, sync_timer
        _sync(device)
        self.t0 = self.t = time.perf_counter()
        self.m0 = self.m = time.monotonic()
        self.total = {"prefill": 0.0, "decode": 0.0, "score": 0.0}
        self.first: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.phase = "prefill"
        self.log: list[PassLog] = []

    def mark(self, phase: str, sync: bool | None = None) -> None:
        if self.sync_timer if sync is None else sync:
            _sync(self.device)
        t, m = time.perf_counter(), time.monotonic()
        self.total[phase] += t - self.t
        self.first.setdefault(phase, self.m)
        self.last[phase] = m
        self.t, self.m, self.phase = t, m, phase

    def finish(self, **counts: int) -> WorkloadTiming:
        self.mark(self.phase, sync=True)
        end = self.m

        def stamps(phase: str) -> tuple[float, float]:
            return self.first.get(phase, end), self.last.get(phase, end)

        (p0, p1), (d0, d1), (s0, s1) = stamps("prefill"), stamps("decode"), stamps("score")
        return WorkloadTiming(
            prefill_time_s=self.total["prefill"],
            decode_time_s=self.total["decode"],
            score_time_s=self.total["score"],
            total_time_s=self.t - self.t0,
            prefill_start_s=p0,
            prefill_end_s=p1,
            decode_start_s=d0,
            decode_end_s=d1,
            score_start_s=s0,
            score_end_s=s1,
            passes=tuple(self.log),
            **counts,
        )


class _BlockPool:
    """Host-side allocator of 16-token KV blocks with reference counts (vLLM-style paging).

    ``tables[c]`` lists the blocks of sequence ``c``, position ``g`` in block
    ``tables[c][g // 16]``.  :meth:`fork` shares a parent's full blocks
    (reference count + 1, never copied) and gives the child a private copy of
    the partially filled last block: the copy-on-write of a serving engine.
    """

    def __init__(self, n_blocks: int, width: int) -> None:
        self.free = list(range(n_blocks - 1, -1, -1))
        self.refs = [0] * n_blocks
        self.width = width
        self.tables: dict[int, list[int]] = {}

    def _alloc(self) -> int:
        if not self.free:
            raise TtcsimError(
                "KV block pool exhausted (a bookkeeping bug: the pool is sized for "
                "unshared sequences)"
            )
        b = self.free.pop()
        self.refs[b] = 1
        return b

    def grow(self, seq: int, n_positions: int) -> None:
        """Give ``seq`` blocks for positions ``0 .. n_positions - 1``."""
        table = self.tables.setdefault(seq, [])
        while len(table) * KV_BLOCK_TOKENS < n_positions:
            table.append(self._alloc())
        if len(table) > self.width:
            raise TtcsimError("sequence longer than the generation cache")

    def release(self, seq: int) -> None:
        """Drop ``seq``'s blocks; a block is free once no sequence lists it."""
        for b in self.tables.pop(seq, []):
            self.refs[b] -= 1
            if not self.refs[b]:
                self.free.append(b)

    def fork(self, parent: int, child: int, filled: int) -> list[tuple[int, int]]:
        """``child`` continues ``parent``'s first ``filled`` positions; return rows to copy.

        Full blocks are shared; the ``filled mod 16`` rows of the partial
        block go to a fresh block of the child: ``(src_row, dst_row)`` pairs.
        """
        self.release(child)
        full, rem = divmod(filled, KV_BLOCK_TOKENS)
        table = self.tables[parent]
        shared = table[:full]
        for b in shared:
            self.refs[b] += 1
        self.tables[child] = list(shared)
        if not rem:
            return []
        src, dst = table[full], self._alloc()
        self.tables[child].append(dst)
        return [(src * KV_BLOCK_TOKENS + i, dst * KV_BLOCK_TOKENS + i) for i in range(rem)]

    def tensor(self, seqs: Sequence[int], device: Any) -> Any:
        """Block tables of ``seqs`` as int64 ``[len(seqs), width]`` (padded with block 0)."""
        rows = [self.tables.get(c, []) for c in seqs]
        return _torch().tensor(
            [r + [0] * (self.width - len(r)) for r in rows], device=device, dtype=_torch().long
        )


def _as_decoder(spec: Any, device: Any, score_only: bool = False) -> ReferenceDecoder:
    if isinstance(spec, ReferenceDecoder):
        return spec
    return ReferenceDecoder(spec, device if device is not None else "cuda", score_only=score_only)


def _strategy(strategy: Any) -> Any:
    from ttcsim.strategies import Beam, BestOfN, Refine, Single, Vote, parse_strategy

    strat = parse_strategy(strategy)
    if not isinstance(strat, (Single, Vote, BestOfN, Beam, Refine)):
        raise TtcsimError(
            f"the reference decoder runs {', '.join(SUPPORTED_STRATEGIES)}; not {strat.spec}",
            "strategy",
        )
    return strat


def run_workload(
    spec: ModelSpec | ReferenceDecoder,
    *,
    prompt_tokens: int,
    output_tokens: Sequence[int],
    samples_per_query: int | None = None,
    concurrent_queries: int,
    prefix_sharing: bool = True,
    reward_spec: ModelSpec | ReferenceDecoder | None = None,
    device: Any = None,
    sync_timer: bool = True,
    strategy: Any = None,
) -> WorkloadTiming:
    """Serve ``concurrent_queries`` queries once with one strategy; return its timing.

    ``strategy`` is a spec string or :class:`~ttcsim.strategies.Strategy`
    (``single``, ``vote<N>``, ``bon<N>``, ``beam<W>[:...]``,
    ``refine<K>[:...]``); without it, ``samples_per_query`` parallel samples
    (``vote``, or ``bon`` when ``reward_spec`` is given).  ``output_tokens``
    holds the lengths the strategy reads (:attr:`Strategy.draws_per_query`
    per query, query-major): one per sample for single/vote/bon, one per
    query for beam (its search depth ``min(depth, ceil(L / step))``), one
    per round for refine.  See :func:`_run_parallel`, :func:`_run_beam` and
    :func:`_run_refine` for exactly what each runs.

    ``spec``/``reward_spec`` may be built decoders (reused: weights, caches
    and CUDA graphs persist between calls).  ``reward_spec`` is the reward
    model of bon and the verifier of beam (default for beam: the spec's
    ``rm=`` model, else the policy's weights with a cache of its own).
    ``sync_timer``: synchronise the device at each phase boundary (needed
    for true phase times).
    """
    from ttcsim.models import get_model
    from ttcsim.strategies import Beam, Refine

    dec = _as_decoder(spec, device)
    strat = _strategy(strategy) if strategy is not None else None
    if concurrent_queries < 1 or prompt_tokens < 1:
        raise TtcsimError("prompt_tokens and concurrent_queries must be >= 1")
    common = dict(
        prompt_tokens=prompt_tokens,
        output_tokens=[int(o) for o in output_tokens],
        concurrent_queries=concurrent_queries,
        prefix_sharing=prefix_sharing,
        sync_timer=sync_timer,
    )
    if isinstance(strat, Beam):
        if reward_spec is not None:
            ver = _as_decoder(reward_spec, dec.device, score_only=True)
        elif strat.reward_model is not None:
            ver = ReferenceDecoder(get_model(strat.reward_model), dec.device, score_only=True)
        else:
            ver = dec.verifier_clone()
        return _run_beam(dec, ver, strat, **common)
    if isinstance(strat, Refine):
        if reward_spec is not None:
            raise TtcsimError(f"{strat.spec} takes no reward model", "reward_model")
        return _run_refine(dec, strat, **common)
    n = strat.samples_per_query if strat is not None else (samples_per_query or 1)
    if samples_per_query is not None and samples_per_query != n:
        raise TtcsimError(f"samples_per_query={samples_per_query} contradicts {strat.spec}")
    rew = None if reward_spec is None else _as_decoder(reward_spec, dec.device, score_only=True)
    return _run_parallel(dec, rew, samples_per_query=n, **common)


def _run_parallel(
    dec: ReferenceDecoder,
    rew: ReferenceDecoder | None,
    *,
    prompt_tokens: int,
    output_tokens: list[int],
    samples_per_query: int,
    concurrent_queries: int,
    prefix_sharing: bool,
    sync_timer: bool,
) -> WorkloadTiming:
    """``single`` / ``vote<N>`` / ``bon<N>``: N parallel samples per query.

    1. prefill: ``concurrent_queries`` prompts of ``prompt_tokens`` (with
       ``prefix_sharing``; else one prompt per sample), writing the prompt
       KV cache; the prefill's last logits give each sequence's first token;
    2. decode: one token per active sequence per step; sequence ``i`` stops
       after ``output_tokens[i]`` tokens in all (first token included);
    3. score (best-of-N, when ``rew``): one batched prefill of
       ``prompt + candidate`` on the reward model (right-padded to the
       longest candidate).
    """
    torch = _torch()
    n_seq = concurrent_queries * samples_per_query
    outs = output_tokens
    if samples_per_query < 1:
        raise TtcsimError("samples_per_query must be >= 1")
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
    dec.out_tokens[:n_seq].fill_(-1)
    steps, segments = dec.decode_rows(
        first,
        seq=range(n_seq),
        pslot=pslot,
        plen=[prompt_tokens] * n_seq,
        glen0=[0] * n_seq,
        steps=[o - 1 for o in outs],
    )
    sync()
    t2, m2 = time.perf_counter(), time.monotonic()
    log = [PassLog("prefill", "policy", 1, n_prompts, n_prompts * prompt_tokens, 0)]
    log += [
        PassLog("decode", "policy", 1, g.batch, g.batch * g.steps, g.kv_read_tokens, g.steps)
        for g in segments
    ]
    scored = 0
    if rew is not None:
        o_max = max(outs)
        gen = dec.out_tokens[:n_seq, :o_max].clamp_min(0)
        cand = torch.cat([queries.index_select(0, query_of), gen], 1)
        lengths = torch.tensor([prompt_tokens + o for o in outs], device=dec.device)
        rew.prefill(cand, None, lengths)
        scored = n_seq * (prompt_tokens + o_max)
        log.append(PassLog("score", "verifier", 1, n_seq, scored, 0))
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
        passes=tuple(log),
    )


def beam_depths(strategy: Any, output_tokens: Sequence[int]) -> list[int]:
    """Search steps per query: ``D = min(depth, max(1, ceil(L / T)))`` (as :class:`Beam`)."""
    t = strategy.step_tokens
    cap = strategy.depth if strategy.depth is not None else math.inf
    return [int(min(cap, max(1, -(-int(o) // t)))) for o in output_tokens]


def beam_cache_tokens(strategy: Any, prompt_tokens: int, output_tokens: Sequence[int]) -> int:
    """Positions per candidate the paged beam caches hold: ``P + D_max T`` in whole blocks [tokens].

    Each cache is a pool of ``W M Q`` times this many positions: enough for
    every candidate without any sharing, so sharing can never exhaust it.
    """
    need = prompt_tokens + max(beam_depths(strategy, output_tokens)) * strategy.step_tokens
    return -(-need // KV_BLOCK_TOKENS) * KV_BLOCK_TOKENS


def _run_beam(
    dec: ReferenceDecoder,
    ver: ReferenceDecoder,
    strat: Any,
    *,
    prompt_tokens: int,
    output_tokens: list[int],
    concurrent_queries: int,
    prefix_sharing: bool,
    sync_timer: bool,
) -> WorkloadTiming:
    """``beam<W>[:step=T,depth=D,expand=M]``: step-level beam search with a verifier.

    ``output_tokens`` holds one length ``L_q`` per query; query ``q`` searches
    ``D_q = min(depth, max(1, ceil(L_q / T)))`` steps (:func:`beam_depths`).
    Each query has ``W M`` candidate sequences (slots ``q W M .. q W M + W M
    - 1``).  The policy's KV cache is paged in 16-token blocks with
    reference counts (:class:`_BlockPool`, vLLM's layout): a candidate's
    context is its block list, candidates share the blocks of their common
    prefix, and decode attention reads every candidate's whole context
    (``P + s`` positions, shared blocks once per candidate, as
    ``decode_attention_*`` with a block table).  Per run:

    0. prefill the ``Q`` prompts (``Q P`` tokens) into the blocks of each
       query's first candidate; its logits give the first token.  With
       ``prefix_sharing`` the verifier prefills the prompts into its own
       cache too (``Q P`` tokens, phase ``score``).
    1. for step ``k = 1 .. max D_q`` over the queries with ``D_q >= k``:

       a. fork (phase ``copy``): at ``k = 1`` the first candidate of each
          query forks ``W M - 1`` children; at ``k >= 2`` each of the ``W``
          survivors forks ``M - 1`` children into the slots of the pruned
          candidates (whose blocks were freed) and continues itself.  A
          child shares the parent's full blocks and copies the ``f mod 16``
          filled rows of its partial block, ``f`` = the positions with K/V:
          policy ``P`` (k = 1) or ``P + (k-1) T - 1`` (the last generated
          token has no K/V until it is fed); verifier ``P + (k-1) T``.
          The analytical model copies ``(P + (k-1) T) mod 16`` per fork
          for the policy, and nothing for the verifier's cache.  Child ``j``
          of a parent continues with the parent's next token ``+ j`` (mod the
          vocabulary), so that the candidates differ as sampled expansions do:
          the first token of the step (at ``k >= 2`` set between the step's
          first and second decode steps; the decode work is unchanged).
       b. decode ``T`` tokens per candidate: ``T - 1`` steps at ``k = 1``
          (the first token came from the prefill), ``T`` steps after, at a
          fixed batch of ``W M`` x active queries (one CUDA graph per batch
          size); in all ``D T - 1`` steps per candidate over contexts
          ``P + 1 .. P + D T - 1``, as ``Decode(Q W M; D T)``.
       c. verify (phase ``score``): one batched pass of the verifier over the
          ``T`` new tokens of every active candidate.  With
          ``prefix_sharing``: ``T`` new tokens after ``P + (k-1) T`` cached
          positions per candidate (:meth:`ReferenceDecoder.extend`, written
          to the verifier's paged cache); without: a fresh prefill of the
          whole ``P + k T`` tokens per candidate.
       d. unless the query's search ends (``k = D_q``), the top ``W``
          candidates by score survive (argmax of the verifier's first output
          column), the others free their blocks.

    The verifier is ``ver``: a score-only reward model, or the policy's
    weights with a cache of their own (:meth:`ReferenceDecoder.verifier_clone`).
    ``generated_tokens`` = ``W M sum_q D_q T``; ``scored_tokens`` counts every
    verifier token, its prompt prefill included.
    """
    torch = _torch()
    q_n, p = concurrent_queries, prompt_tokens
    width, m_exp, t_step = strat.width, strat.expansion, strat.step_tokens
    wm = width * m_exp
    if len(output_tokens) != q_n or min(output_tokens) < 1:
        raise TtcsimError(
            f"{strat.spec}: output_tokens needs one length >= 1 per query ({q_n}), "
            f"got {len(output_tokens)}"
        )
    depths = beam_depths(strat, output_tokens)
    d_max = max(depths)
    positions = beam_cache_tokens(strat, p, output_tokens)
    longest = p + d_max * t_step
    for model in (dec, ver):
        if longest > model.spec.max_context_tokens:
            raise TtcsimError(
                f"context {longest} exceeds {model.spec.name}'s "
                f"{model.spec.max_context_tokens} tokens"
            )
    n_cand = q_n * wm
    dev = dec.device
    dec.ensure_capacity(1, 1, n_cand, positions)
    pool = _BlockPool(
        dec.gen_slots * dec.gen_capacity_tokens // KV_BLOCK_TOKENS,
        dec.gen_capacity_tokens // KV_BLOCK_TOKENS,
    )
    vpool = None
    if prefix_sharing:
        ver.ensure_capacity(1, 1, n_cand, positions)
        vpool = _BlockPool(
            ver.gen_slots * ver.gen_capacity_tokens // KV_BLOCK_TOKENS,
            ver.gen_capacity_tokens // KV_BLOCK_TOKENS,
        )
    prompts = dec.random_tokens(q_n, p)
    out = dec.out_tokens
    owners = [q * wm for q in range(q_n)]
    out[:n_cand].fill_(-1)
    out[:n_cand, :p] = prompts.repeat_interleave(wm, 0)
    clock = _PhaseClock(dev, sync_timer)
    log = clock.log

    for c in owners:
        pool.grow(c, p)
    first = dec.prefill(prompts, rows=paged_rows(pool.tensor(owners, dev), p)).argmax(-1)
    out[:n_cand, p] = first.repeat_interleave(wm)
    clock.mark("prefill")
    log.append(PassLog("prefill", "policy", 0, q_n, q_n * p, 0))
    scored = 0
    if vpool is not None:
        for c in owners:
            vpool.grow(c, p)
        ver.prefill(prompts, rows=paged_rows(vpool.tensor(owners, dev), p))
        clock.mark("score")
        log.append(PassLog("score", "verifier", 0, q_n, q_n * p, 0))
        scored += q_n * p

    forks = [(c, c + j) for c in owners for j in range(1, wm)]  # (parent, child) at k = 1
    steps_run = 0
    for k in range(1, d_max + 1):
        queries = [q for q in range(q_n) if depths[q] >= k]
        cands = [c for q in queries for c in range(q * wm, (q + 1) * wm)]
        n = len(cands)
        # a. fork: policy (with the out_tokens rows) and verifier caches
        filled = p if k == 1 else p + (k - 1) * t_step - 1
        pairs = [r for parent, child in forks for r in pool.fork(parent, child, filled)]
        dec.copy_gen_rows([a for a, _ in pairs], [b for _, b in pairs])
        children = rank = None
        if forks:  # children copy the token history; child j of a parent then takes token + j
            parents = torch.tensor([a for a, _ in forks], device=dev)
            children = torch.tensor([b for _, b in forks], device=dev)
            out.index_copy_(0, children, out.index_select(0, parents))
            rank = torch.tensor(_fork_ranks(forks), device=dev)
            if k == 1:  # the first token of the step is the prefill's
                out[children, p] = (out[children, p] + rank) % dec.spec.vocab_size
        clock.mark("decode")
        log.append(PassLog("copy", "policy", k, len(forks), len(pairs), 0, 0))
        if vpool is not None:
            vfilled = p + (k - 1) * t_step
            vpairs = [r for parent, child in forks for r in vpool.fork(parent, child, vfilled)]
            ver.copy_gen_rows([a for a, _ in vpairs], [b for _, b in vpairs])
            clock.mark("score")
            log.append(PassLog("copy", "verifier", k, len(forks), len(vpairs), 0, 0))
        # b. decode T tokens per candidate (T - 1 after the prefill's token); at k >= 2
        #    the children's first new token is set after the step's first decode step
        for c in cands:
            pool.grow(c, p + k * t_step - 1)
        bt = pool.tensor(cands, dev)
        cand_t = torch.tensor(cands, device=dev)
        pos, end = filled, p + k * t_step - 1
        split = [pos + 1] if k >= 2 and forks and end > pos + 1 else []
        segments = []
        for stop in split + [end]:
            done, more = dec.decode_rows(
                out.index_select(0, cand_t)[:, pos],
                seq=cands,
                pslot=[0] * n,
                plen=[0] * n,
                glen0=[pos] * n,
                steps=[stop - pos] * n,
                block_table=bt,
            )
            steps_run += done
            segments += more
            if k >= 2 and forks and pos == filled:
                new = out[children, pos + 1]
                out[children, pos + 1] = (new + rank) % dec.spec.vocab_size
            pos = stop
        if segments:  # one run of steps at one batch, however it was split
            g = DecodeSegment(n, sum(x.steps for x in segments), segments[0].context_tokens)
            log.append(PassLog("decode", "policy", k, n, n * g.steps, g.kv_read_tokens, g.steps))
        clock.mark("decode")
        # c. verify the T new tokens of every candidate
        if vpool is not None:
            for c in cands:
                vpool.grow(c, p + k * t_step)
            cached = p + (k - 1) * t_step
            scores = ver.extend(
                out.index_select(0, cand_t)[:, cached : cached + t_step],
                pslot=[0] * n,
                plen=[0] * n,
                glen0=[cached] * n,
                block_table=vpool.tensor(cands, dev),
            )
            log.append(PassLog("score", "verifier", k, n, n * t_step, n * cached))
            scored += n * t_step
        else:
            scores = ver.prefill(out.index_select(0, cand_t)[:, : p + k * t_step])
            log.append(PassLog("score", "verifier", k, n, n * (p + k * t_step), 0))
            scored += n * (p + k * t_step)
        clock.mark("score")
        # d. select the W best of each continuing query; pruned slots take the children
        forks = []
        going = [i for i, q in enumerate(queries) if depths[q] > k]
        if going:
            top = (
                scores[:, 0].float().view(len(queries), wm)[going].topk(width, dim=1).indices
            ).tolist()
            for i, best in zip(going, top, strict=True):
                base = queries[i] * wm
                keep = [base + j for j in best]
                pruned = [base + j for j in range(wm) if j not in best]
                for c in pruned:
                    pool.release(c)
                    if vpool is not None:
                        vpool.release(c)
                it = iter(pruned)
                forks += [(s, next(it)) for s in keep for _ in range(m_exp - 1)]
    return clock.finish(
        prefill_tokens=q_n * p,
        generated_tokens=wm * t_step * sum(depths),
        decode_steps=steps_run,
        scored_tokens=scored,
    )


def _fork_ranks(forks: Sequence[tuple[int, int]]) -> list[int]:
    """``j`` for the ``j``-th child (1-based) of each parent, in the order of ``forks``."""
    seen: dict[int, int] = {}
    ranks = []
    for parent, _ in forks:
        seen[parent] = seen.get(parent, 0) + 1
        ranks.append(seen[parent])
    return ranks


def refine_contexts(strategy: Any, prompt_tokens: int, lengths: Sequence[int]) -> list[int]:
    """Context ``C_r`` of each round of one query (lengths ``L_1..L_K``), as :class:`Refine`.

    ``C_1 = P``; ``C_r = P + sum_{j<r} L_j + (r - 1) F`` (history=all) or
    ``P + L_{r-1} + F`` (history=last).
    """
    f = strategy.feedback_tokens
    ctx = [prompt_tokens]
    for r in range(2, strategy.rounds + 1):
        if strategy.history == "all":
            ctx.append(prompt_tokens + sum(lengths[: r - 1]) + (r - 1) * f)
        else:
            ctx.append(prompt_tokens + lengths[r - 2] + f)
    return ctx


def refine_cache_tokens(
    strategy: Any, prompt_tokens: int, output_tokens: Sequence[int], prefix_sharing: bool
) -> tuple[int, int]:
    """``(prompt_tokens, gen_tokens)`` per query that the refine caches need [tokens]."""
    k = strategy.rounds
    per_query = [output_tokens[i : i + k] for i in range(0, len(output_tokens), k)]
    ctx = [refine_contexts(strategy, prompt_tokens, ls) for ls in per_query]
    if prefix_sharing:
        gen = max(
            c - prompt_tokens + ln
            for cs, ls in zip(ctx, per_query, strict=True)
            for c, ln in zip(cs, ls, strict=True)
        )
        return prompt_tokens, gen
    return max(max(cs) for cs in ctx), max(output_tokens)


def _run_refine(
    dec: ReferenceDecoder,
    strat: Any,
    *,
    prompt_tokens: int,
    output_tokens: list[int],
    concurrent_queries: int,
    prefix_sharing: bool,
    sync_timer: bool,
) -> WorkloadTiming:
    """``refine<K>[:feedback=F,history=all|last]``: K sequential revision rounds.

    ``output_tokens`` holds ``K`` lengths per query in round order
    (query-major).  Rounds run in lock step over the ``Q`` queries; round
    ``r`` of query ``q`` reads the context ``C_r`` of :func:`refine_contexts`
    and decodes ``L_r`` tokens: its first token comes from the round's
    prefill, then ``L_r - 1`` decode steps over contexts ``C_r + 1 ..``
    (the batch shrinks as queries finish the round).  Prefill of round ``r``:

    * round 1: the ``Q`` prompts (``Q P`` tokens) into prompt slots;
    * ``prefix_sharing`` (prefix caching; query ``q``'s cache is its prompt
      slot plus one generation slot holding answers and feedback in order):
      ``F`` feedback tokens after ``C_r - F`` cached positions
      (:meth:`ReferenceDecoder.extend`); with ``history=last`` from round 3
      on, the previous answer and the feedback (``L_{r-1} + F`` tokens)
      after the cached prompt, the generation slot starting over;
    * no prefix caching: the whole context, ``C_r`` tokens from scratch,
      into the query's prompt slot (the generation slot starts over).

    As in the analytical model an answer's last token is never fed through
    the model: the next round counts it as cached context, and the cache row
    it reads there holds stale values (the work is the same; only the
    numbers differ).  Rows whose prefill lengths differ run as one pass per
    length.  Feedback tokens are random.  ``refine1`` is ``single``.
    """
    torch = _torch()
    q_n, p, k_rounds = concurrent_queries, prompt_tokens, strat.rounds
    f_tok, last = strat.feedback_tokens, strat.history == "last"
    if len(output_tokens) != q_n * k_rounds or min(output_tokens) < 1:
        raise TtcsimError(
            f"{strat.spec}: output_tokens needs {k_rounds} lengths >= 1 per query "
            f"({q_n * k_rounds} in all, query-major), got {len(output_tokens)}"
        )
    lengths = [output_tokens[q * k_rounds : (q + 1) * k_rounds] for q in range(q_n)]
    ctx = [refine_contexts(strat, p, ls) for ls in lengths]
    longest = max(
        c + ln for cs, ls in zip(ctx, lengths, strict=True) for c, ln in zip(cs, ls, strict=True)
    )
    if longest > dec.spec.max_context_tokens:
        raise TtcsimError(
            f"context {longest} exceeds {dec.spec.name}'s {dec.spec.max_context_tokens} tokens"
        )
    prompt_cap, gen_cap = refine_cache_tokens(strat, p, output_tokens, prefix_sharing)
    dec.ensure_capacity(q_n, prompt_cap, q_n, gen_cap)
    dev = dec.device
    rows = list(range(q_n))
    prompts = dec.random_tokens(q_n, p)
    dec.out_tokens[:q_n].fill_(-1)
    clock = _PhaseClock(dev, sync_timer)
    log = clock.log
    steps_run = 0
    prefilled = 0

    def decode_round(r: int, first: Any, plen: list[int], glen0: list[int]) -> None:
        nonlocal steps_run
        done, segments = dec.decode_rows(
            first,
            seq=rows,
            pslot=rows,
            plen=plen,
            glen0=glen0,
            steps=[ls[r - 1] - 1 for ls in lengths],
        )
        steps_run += done
        clock.mark("decode")
        log.extend(
            PassLog("decode", "policy", r, g.batch, g.batch * g.steps, g.kv_read_tokens, g.steps)
            for g in segments
        )

    def by_length(sizes: list[int]) -> list[list[int]]:
        groups: dict[int, list[int]] = {}
        for q, size in enumerate(sizes):
            groups.setdefault(size, []).append(q)
        return list(groups.values())

    first = dec.prefill(prompts, torch.arange(q_n, device=dev)).argmax(-1)
    clock.mark("prefill")
    log.append(PassLog("prefill", "policy", 1, q_n, q_n * p, 0))
    prefilled += q_n * p
    decode_round(1, first, [p] * q_n, [0] * q_n)
    gen_end = [ls[0] for ls in lengths]  # generated positions in use (prefix caching)
    answer_at = [0] * q_n  # where the last answer starts in the generation slot
    for r in range(2, k_rounds + 1):
        first = torch.empty(q_n, device=dev, dtype=torch.long)
        if prefix_sharing and not (last and r >= 3):
            feedback = dec.random_tokens(q_n, f_tok)
            first = dec.extend(feedback, pslot=rows, plen=[p] * q_n, glen0=gen_end, seq=rows)
            first = first.argmax(-1)
            for q in rows:
                dec.out_tokens[q, gen_end[q] : gen_end[q] + f_tok] = feedback[q]
            log.append(
                PassLog("prefill", "policy", r, q_n, q_n * f_tok, sum(p + g for g in gen_end))
            )
            prefilled += q_n * f_tok
            start = [g + f_tok for g in gen_end]
            plen = [p] * q_n
        elif prefix_sharing:  # history=last, r >= 3: previous answer + feedback over the prompt
            sizes = [ls[r - 2] + f_tok for ls in lengths]
            for group in by_length(sizes):
                size = sizes[group[0]]
                answers = torch.stack(
                    [dec.out_tokens[q, answer_at[q] : answer_at[q] + size - f_tok] for q in group]
                )
                new = torch.cat([answers, dec.random_tokens(len(group), f_tok)], 1)
                got = dec.extend(
                    new, pslot=group, plen=[p] * len(group), glen0=[0] * len(group), seq=group
                )
                first[torch.tensor(group, device=dev)] = got.argmax(-1)
                for i, q in enumerate(group):
                    dec.out_tokens[q, :size] = new[i]
                log.append(
                    PassLog("prefill", "policy", r, len(group), len(group) * size, len(group) * p)
                )
                prefilled += len(group) * size
            start = sizes
            plen = [p] * q_n
        else:  # no prefix caching: the whole context from scratch
            sizes = [cs[r - 1] for cs in ctx]
            for group in by_length(sizes):
                size = sizes[group[0]]
                g_t = torch.tensor(group, device=dev)
                got = dec.prefill(dec.random_tokens(len(group), size), g_t)
                first[g_t] = got.argmax(-1)
                log.append(PassLog("prefill", "policy", r, len(group), len(group) * size, 0))
                prefilled += len(group) * size
            start = [0] * q_n
            plen = sizes
        clock.mark("prefill")
        decode_round(r, first, plen, start)
        answer_at = start
        gen_end = [s + ls[r - 1] for s, ls in zip(start, lengths, strict=True)]
    return clock.finish(
        prefill_tokens=prefilled,
        generated_tokens=sum(output_tokens),
        decode_steps=steps_run,
        scored_tokens=0,
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
       bf16 cache, mixed lengths, shared prompt slots, several split counts;
       contiguous and paged with shared blocks);
    2. a tiny model: CUDA-graph + Triton decode logits vs a dense prefill of
       ``prompt + first token`` (eager, SDPA);
    3. shrinking batch: each sequence gets exactly its number of tokens;
    4. prefix sharing gives the same first-step logits as separate prefills;
       ``refine``/``beam`` run the same passes with graphs as eagerly, and
       the paged beam cache (shared blocks, copied partial blocks) gives
       each candidate's logits as a dense prefill of its own history;
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
            b, tp, tg = 6, 700, 320  # 6 x 320 tokens = 120 blocks of 16 for the paged case
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
            # paged: block tables with shared blocks (sequences 0/1 and 3/4 share prefixes)
            n_blk = b * tg // KV_BLOCK_TOKENS
            perm = torch.randperm(n_blk, device=dev, generator=g)
            bt = perm[: b * 20].view(b, 20).clone()
            bt[1, :10], bt[4, :15] = bt[0, :10], bt[3, :15]
            bt = torch.cat([bt, torch.zeros((b, n_blk - 20), device=dev, dtype=bt.dtype)], 1)
            glen_p = torch.tensor([300, 170, 1, 240, 320, 16], device=dev)
            want = decode_attention_reference(
                q, kp, vp, kg, vg, pslot, seq, plen, glen_p, block_table=bt
            )
            for splits in (1, 3, 16):
                got = decode_attention_triton(
                    q, kp, vp, kg, vg, pslot, seq, plen, glen_p, splits, block_table=bt
                )
                _check_close(f"paged_attn_h{hq}_{hkv}_d{d}_s{splits}", got, want, 2e-2, rep)
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

    # 4b. refine and beam (paged cache, forks, verifier cache) on the graph + Triton path:
    # the same passes as the eager reference, and each final beam candidate's decode
    # logits equal a dense prefill of its own token history
    for strategy, outs in (
        ("refine3:feedback=8", [9, 5, 7, 12, 3, 6]),
        ("refine2:history=last", [20, 4, 6, 17]),
        ("beam2:step=8,expand=2", [40, 24]),
    ):
        logs = []
        for d in (ref, dec):
            d.reseed(5)
            t = run_workload(
                d,
                strategy=strategy,
                prompt_tokens=p_len,
                output_tokens=outs,
                concurrent_queries=n_q,
            )
            logs.append(t.passes)
        if logs[0] != logs[1]:
            raise AssertionError(f"{strategy}: graph and eager runs differ in their passes")
        rep[f"{strategy}_passes"] = len(logs[1])
    hist = dec.out_tokens[:4, : p_len + 40 - 1]  # query 0 searched 5 steps; query 1 only 3
    _check_close("beam_decode_vs_prefill_logits", dec.last_logits, dec.prefill(hist), 5e-2, rep)
    rep["graphs_after_beam"] = dec.n_graphs

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
