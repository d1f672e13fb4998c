"""Run records: measured energy and time of whole runs (JSON lines).

Schema (totals are for the whole run; unknown keys are ignored)::

    {"id": str?, "hw": str, "model": str, "dtype": "bf16", "prompt_tokens": int,
     "concurrent_queries": int, "strategy": "single"|"vote<N>"|"bon<N>"|any spec,
     "output_tokens": [int, ...],          # concurrent_queries x draws per query
     "reward_model": str|null, "prefix_sharing": bool? (default true),
     "energy_j": float, "latency_s": float,
     "prefill_latency_s": float?, "decode_latency_s": float?, "score_latency_s": float?,
     "prefill_energy_j": float|null?, "decode_energy_j": float|null?, "idle_power_w": float?}

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

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ttcsim.errors import TtcsimError


class RunRecord(BaseModel):
    """One measured run."""

    model_config = ConfigDict(extra="allow", frozen=True, allow_inf_nan=False)  # unknown keys kept

    id: str | None = None
    hw: str = Field(min_length=1)
    model: str = Field(min_length=1)
    dtype: str = "bf16"
    prompt_tokens: int = Field(ge=1, le=2_000_000)
    concurrent_queries: int = Field(default=1, ge=1, le=1_000_000)
    strategy: str
    output_tokens: list[int] = Field(min_length=1)
    reward_model: str | None = None
    prefix_sharing: bool = True
    energy_j: float = Field(gt=0)
    latency_s: float = Field(gt=0)
    prefill_latency_s: float | None = Field(default=None, ge=0)
    decode_latency_s: float | None = Field(default=None, ge=0)
    score_latency_s: float | None = Field(default=None, ge=0)
    prefill_energy_j: float | None = Field(default=None, ge=0)
    decode_energy_j: float | None = Field(default=None, ge=0)
    idle_power_w: float | None = Field(default=None, ge=0)

    @field_validator("output_tokens")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(x < 1 for x in v):
            raise ValueError("output_tokens must all be >= 1")
        return v

    @field_validator("energy_j", "latency_s")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("must be finite")
        return v

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
