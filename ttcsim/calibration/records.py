"""Run records: measured energy and time of whole runs (JSON lines).

Schema (totals are for the whole run; unknown keys are ignored)::

    {"id": str?, "hw": str, "model": str, "dtype": "bf16", "prompt_tokens": int,
     "concurrent_queries": int, "strategy": "single"|"vote<N>"|"bon<N>"|any spec,
     "output_tokens": [int, ...],          # concurrent_queries x draws per query
     "reward_model": str|null, "prefix_sharing": bool? (default true),
     "energy_j": float, "latency_s": float,
     "prefill_latency_s": float?, "decode_latency_s": float?, "score_latency_s": float?,
     "prefill_energy_j": float|null?, "decode_energy_j": float|null?, "idle_power_w": float?}

Engine-layer keys (all optional)::

     "engine": "vllm" | {"name": "vllm", "version": "0.5.4", "max_num_seqs": 256, ...},
     "tp": int (default 1), "max_num_seqs": int?, "tpot_s": float?, "ttft_s": float?,
     "measure": "run" | "steady-state", "running_batch": float?

``engine`` absent means ``reference``; an object overrides the named profile's
settings (:func:`ttcsim.engines.engine_from_record`); ``max_num_seqs`` at top
level is the same as inside the object.  ``measure: steady-state`` is a
throughput run of a continuous-batching engine measured only while its running
batch stays at about ``running_batch`` sequences (ML.ENERGY's protocol): then
``energy_j`` is the energy **per request** (all GPUs), ``tpot_s`` the mean time
per output token, ``latency_s`` may be omitted, ``prompt_tokens`` and
``output_tokens`` may be length specs (``"lognormal:..."``, a comma list) of one
request, and ``concurrent_queries`` is ignored.

``strategy`` is any spec :func:`ttcsim.strategies.parse_strategy` reads; the
lengths per query are its ``draws_per_query`` (samples for vote/bon, one per
query for ``beam<W>``, one per round for ``refine<K>``).  A run's ``energy_j``
covers all its queries; :func:`predict_record` compares
it with ``concurrent_queries`` times ttcsim's per-query energy.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from ttcsim.errors import TtcsimError


class RunRecord(BaseModel):
    """One measured run."""

    model_config = ConfigDict(extra="allow", frozen=True, allow_inf_nan=False)  # unknown keys kept

    id: str | None = None
    hw: str = Field(min_length=1)
    model: str = Field(min_length=1)
    dtype: str = "bf16"
    prompt_tokens: int | str
    concurrent_queries: int = Field(default=1, ge=1, le=1_000_000)
    strategy: str = "single"
    output_tokens: list[int] | str
    reward_model: str | None = None
    prefix_sharing: bool = True
    energy_j: float = Field(gt=0)
    latency_s: float | None = Field(default=None, gt=0)
    engine: str | dict | None = None
    tp: int = Field(default=1, ge=1, le=64)
    max_num_seqs: int | None = Field(default=None, ge=1, le=65536)
    tpot_s: float | None = Field(default=None, gt=0)
    ttft_s: float | None = Field(default=None, ge=0)
    measure: Literal["run", "steady-state"] = "run"
    running_batch: float | None = Field(default=None, gt=0, le=65536)
    prefill_latency_s: float | None = Field(default=None, ge=0)
    decode_latency_s: float | None = Field(default=None, ge=0)
    score_latency_s: float | None = Field(default=None, ge=0)
    prefill_energy_j: float | None = Field(default=None, ge=0)
    decode_energy_j: float | None = Field(default=None, ge=0)
    idle_power_w: float | None = Field(default=None, ge=0)

    @field_validator("output_tokens")
    @classmethod
    def _positive(cls, v: list[int] | str) -> list[int] | str:
        if isinstance(v, list) and (not v or any(x < 1 for x in v)):
            raise ValueError("output_tokens must be a non-empty list of lengths >= 1")
        return v

    @field_validator("prompt_tokens")
    @classmethod
    def _prompt(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 1 <= v <= 2_000_000:
            raise ValueError("prompt_tokens must be between 1 and 2000000")
        return v

    @field_validator("energy_j", "latency_s")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError("must be finite")
        return v

    @model_validator(mode="after")
    def _measure(self) -> RunRecord:
        if self.measure == "run":
            if self.latency_s is None:
                raise ValueError("latency_s: a run record needs latency_s (or measure: "
                                 "steady-state)")
            if isinstance(self.output_tokens, str) or isinstance(self.prompt_tokens, str):
                raise ValueError("a run record lists its output_tokens and a whole prompt_tokens; "
                                 "length specs need measure: steady-state")
        elif self.running_batch is None and self.max_num_seqs is None:
            raise ValueError("running_batch: a steady-state record needs running_batch "
                             "(or max_num_seqs)")
        return self

    @property
    def engine_spec(self):
        """The engine value with the top-level ``max_num_seqs`` folded in (None: reference)."""
        if self.max_num_seqs is None:
            return self.engine
        eng = self.engine if isinstance(self.engine, dict) else {"name": self.engine or
                                                                  "reference"}
        return {**eng, "max_num_seqs": eng.get("max_num_seqs", self.max_num_seqs)}

    @property
    def label(self) -> str:
        """``id`` or a description built from the run's shape."""
        return self.id or (
            f"{self.model}/{self.strategy}/p{self.prompt_tokens}/q{self.concurrent_queries}"
        )


def read_runs(path: str | Path, recording: bool = False) -> list[RunRecord]:
    """Read a JSONL file of run records; errors name ``file:line`` and the key.

    ``recording``: the file is a recording that may have been interrupted (``calibrate
    run``): an unterminated last line that is not valid JSON is skipped, and no
    records at all is an empty list rather than an error.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise TtcsimError(f"cannot read run records: {exc}", str(path)) from None
    runs = []
    for i, line in enumerate(lines, start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{path}:{i}"
        try:
            data = json.loads(line)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, 5000-digit ints, nesting
            if recording and i == len(lines) and not text.endswith("\n"):
                break  # interrupted while appending this record
            raise TtcsimError(f"invalid JSON ({getattr(exc, 'msg', exc)})", where) from None
        if not isinstance(data, dict):
            raise TtcsimError("a run record must be a JSON object", where)
        try:
            runs.append(RunRecord.model_validate(data))
        except ValidationError as exc:
            err = exc.errors()[0]
            key = ".".join(str(x) for x in err["loc"])
            msg = "missing required key" if err["type"] == "missing" else err["msg"]
            raise TtcsimError(f"{key}: {msg}", where) from None
    if not runs and not recording:
        raise TtcsimError("no run records", str(path))
    return runs


def write_runs(path: str | Path, runs: list[RunRecord | dict]) -> None:
    """Write run records as JSON lines (atomically: temp file, then rename)."""
    from ttcsim.io import atomic_write_text

    lines = [
        json.dumps(r.model_dump(exclude_none=False) if isinstance(r, RunRecord) else r)
        for r in runs
    ]
    atomic_write_text(path, "\n".join(lines) + "\n")
