"""Engine profiles: how an inference engine schedules work onto a GPU.

A hardware profile (:mod:`ttcsim.hardware`) holds the GPU's physics and the
best-case kernel costs measured with ttcsim's lean CUDA-graph reference
decoder.  An *engine profile* says what a real engine adds on top, with no GPU
constants in it (so an engine fitted on one GPU transfers to another):

* ``batching`` -- ``lockstep`` (the reference decoder: one batch that shrinks
  as sequences finish), ``static-padded`` (HF ``generate``: finished rows stay
  in the batch until the longest ends, so every row runs ``max(L) - 1`` decode
  steps) or ``continuous`` (vLLM: at most ``max_num_seqs`` running sequences,
  refilled from the queue);
* ``prefix`` -- whether the samples of one query share the prompt's prefill
  and KV (``share_parallel_prefill``) and whether the engine caches prefixes
  across requests (``prefix_caching``);
* ``host`` -- host (CPU/Python/scheduler) time per pass, per layer, per running
  sequence, per prefill and per prefill token, and how much of it overlaps the
  GPU; while exposed host time runs the GPU waits at ``gap_power_fraction`` of
  its active power above idle;
* ``kernels`` -- CUDA graphs and their batch buckets, and multipliers on the
  hardware's best-kernel efficiencies;
* ``kv_cache`` -- ``static`` per-sequence allocation for the longest length or
  ``paged`` allocation of the tokens in use, the memory fraction it may use,
  and a per-step copy of the cache (HF dynamic cache appends with
  ``torch.cat``);
* ``prefill`` -- tokens per prefill pass and chunked prefill.

The formulas are in :mod:`ttcsim.engines.physics` and ``docs/MODEL.md``
("Engines").  Every value has a source in ``provenance.sources`` (keyed by the
dotted field name) or comes from the calibration in ``provenance.calibration``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: Unknown keys, mutation and NaN/inf are all refused.
_STRICT = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

BatchingPolicy = Literal["lockstep", "static-padded", "continuous"]
EngineStatus = Literal["datasheet-default", "calibrated", "transferred"]


class Batching(BaseModel):
    """How sequences share decode passes."""

    model_config = _STRICT

    policy: BatchingPolicy = "lockstep"
    max_num_seqs: int | None = Field(
        default=None, ge=1, le=65536, description="continuous: most running sequences"
    )

    @model_validator(mode="after")
    def _continuous_needs_limit(self) -> Batching:
        if self.policy == "continuous" and self.max_num_seqs is None:
            raise ValueError("batching.max_num_seqs is required for policy continuous")
        return self


class Prefix(BaseModel):
    """Sharing of prompts between sequences."""

    model_config = _STRICT

    share_parallel_prefill: bool = Field(
        default=True, description="the samples of one query share one prefill and its KV"
    )
    prefix_caching: bool = Field(
        default=True, description="KV of earlier passes/rounds is reused across requests"
    )


class Host(BaseModel):
    """Host time of one forward pass and how it overlaps the GPU.

    Exposed host time of a pass (``L`` layers, ``b`` running sequences, ``T``
    prefill tokens)::

        t_host = (1 - overlap) * (step_s + L * per_layer_s + (tp - 1) * per_tp_rank_s
                                  + b * per_sequence_s
                                  [+ prefill_s + T * per_prefill_token_s  for a prefill])

    and the pass takes ``t_gpu + t_host`` (the GPU waits for the host for
    ``t_host``), drawing ``P_idle + gap_power_fraction * P_active`` meanwhile.
    """

    model_config = _STRICT

    step_s: float = Field(default=0.0, ge=0, le=1.0, description="per pass [s]")
    per_layer_s: float = Field(default=0.0, ge=0, le=1e-2, description="per layer per pass [s]")
    per_tp_rank_s: float = Field(
        default=0.0, ge=0, le=0.1,
        description="per pass per tensor-parallel rank beyond the first (input broadcast) [s]",
    )
    per_sequence_s: float = Field(
        default=0.0, ge=0, le=1e-2, description="per running sequence per pass [s]"
    )
    prefill_s: float = Field(default=0.0, ge=0, le=1.0, description="per prefill pass [s]")
    per_prefill_token_s: float = Field(
        default=0.0, ge=0, le=1e-3, description="per prompt token of a prefill pass [s]"
    )
    overlap: float = Field(
        default=0.0, ge=0, le=1.0, description="fraction of host time hidden under GPU work"
    )
    gap_power_fraction: float = Field(
        default=0.0, ge=0, le=1.0,
        description="share of active power drawn while the GPU waits for the host",
    )


class Kernels(BaseModel):
    """Kernel choices relative to the hardware profile's best-case kernels."""

    model_config = _STRICT

    cuda_graphs: bool = True
    graph_batch_buckets: list[int] = Field(
        default_factory=list,
        description="decode batch sizes captured as graphs; a batch runs padded to the next",
    )
    weight_stream_efficiency_scale: float = Field(default=1.0, gt=0.05, le=2.0)
    gemm_efficiency_scale: float = Field(default=1.0, gt=0.05, le=2.0)
    attention_decode_efficiency_scale: float = Field(default=1.0, gt=0.05, le=2.0)
    attention_prefill_efficiency_scale: float = Field(default=1.0, gt=0.05, le=2.0)

    @model_validator(mode="after")
    def _buckets(self) -> Kernels:
        b = self.graph_batch_buckets
        if b and (b != sorted(set(b)) or b[0] < 1):
            raise ValueError("kernels.graph_batch_buckets must be increasing whole numbers >= 1")
        if b and not self.cuda_graphs:
            raise ValueError("kernels.graph_batch_buckets needs cuda_graphs: true")
        return self


class KVCache(BaseModel):
    """KV-cache allocation and per-step cache copies."""

    model_config = _STRICT

    allocation: Literal["static", "paged"] = "static"
    gpu_memory_utilization: float | None = Field(
        default=None, gt=0.3, le=1.0,
        description="fraction of GPU memory the engine may use (None: the hardware profile's)",
    )
    block_tokens: int = Field(default=16, ge=1, le=4096, description="paged block size [tokens]")
    append_copy_factor: float = Field(
        default=0.0, ge=0.0, le=8.0,
        description="bytes copied per decode step / bytes of KV in use (dynamic-cache concat: 2)",
    )


class Prefill(BaseModel):
    """How prompts are cut into prefill passes."""

    model_config = _STRICT

    max_tokens_per_pass: int | None = Field(
        default=None, ge=16, le=10_000_000,
        description="prompt tokens per prefill pass (vLLM max_num_batched_tokens); None: all",
    )
    chunked: bool = Field(default=False, description="long prompts are split into chunks")


class EngineCalibration(BaseModel):
    """Where a calibrated or transferred engine's values come from."""

    model_config = _STRICT

    method: str = Field(min_length=3)
    date: str | None = None
    hardware: str | None = Field(default=None, description="hardware profile of the fit runs")
    runs: str | None = Field(default=None, description="the run records fitted")
    residuals: dict[str, float] = Field(default_factory=dict)
    identifiability: dict[str, float] = Field(default_factory=dict)
    held_at_prior: list[str] = Field(default_factory=list)
    notes: str | None = None


class EngineProvenance(BaseModel):
    """A source for every value (dotted field name -> text) and the calibration record."""

    model_config = _STRICT

    status: EngineStatus
    sources: dict[str, str] = Field(default_factory=dict)
    calibration: EngineCalibration | None = None

    @model_validator(mode="after")
    def _calibrated_needs_record(self) -> EngineProvenance:
        if self.status != "datasheet-default" and self.calibration is None:
            raise ValueError(f"a {self.status} engine profile needs provenance.calibration")
        return self


class EngineProfile(BaseModel):
    """One inference engine (see the module docstring)."""

    model_config = _STRICT

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9.\-]*$")
    display_name: str
    version: str | None = None
    aliases: list[str] = Field(default_factory=list)
    batching: Batching = Field(default_factory=Batching)
    prefix: Prefix = Field(default_factory=Prefix)
    host: Host = Field(default_factory=Host)
    kernels: Kernels = Field(default_factory=Kernels)
    kv_cache: KVCache = Field(default_factory=KVCache)
    prefill: Prefill = Field(default_factory=Prefill)
    provenance: EngineProvenance

    @property
    def status(self) -> str:
        """``datasheet-default``, ``calibrated`` or ``transferred``."""
        return self.provenance.status

    @property
    def is_reference(self) -> bool:
        """Whether the engine adds nothing to the hardware profile (today's behaviour)."""
        return self.without_provenance() == REFERENCE_SETTINGS

    def without_provenance(self) -> dict:
        """The settings that change predictions (everything but names and provenance)."""
        d = self.model_dump()
        for k in ("name", "display_name", "version", "aliases", "provenance"):
            d.pop(k)
        return d

    def with_settings(self, settings: dict) -> EngineProfile:
        """A copy with ``{"host": {"step_s": ...}, "batching": {...}}`` overrides, validated."""
        data = self.model_dump()
        for block, values in settings.items():
            if isinstance(values, dict) and isinstance(data.get(block), dict):
                data[block] = {**data[block], **values}
            else:
                data[block] = values
        return EngineProfile.model_validate(data)


#: The settings of the reference engine: every block at its defaults.
REFERENCE_SETTINGS = {
    "batching": Batching().model_dump(),
    "prefix": Prefix().model_dump(),
    "host": Host().model_dump(),
    "kernels": Kernels().model_dump(),
    "kv_cache": KVCache().model_dump(),
    "prefill": Prefill().model_dump(),
}
