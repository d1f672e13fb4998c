"""Hardware profiles: typed, validated parameters of one GPU.

A profile has three parts:

* ``datasheet`` -- vendor peak figures (memory, bandwidth, FLOP/s, power
  limit, interconnect), each with a source in ``provenance.datasheet_sources``;
* ``parameters`` -- what the physics in :mod:`ttcsim.simulator` needs beyond
  peaks: achieved efficiencies, fixed overheads and the power-model
  coefficients.  They are either *datasheet defaults* (derived by a stated
  rule from the datasheet and published measurements) or *calibrated* from an
  NVML trace, as ``provenance.parameters.status`` says;
* ``provenance`` -- where every number comes from.

Profiles ship as one YAML file per device in :mod:`ttcsim.hardware_profiles`;
the file name equals the profile's ``name``.
"""

from __future__ import annotations

import functools
import math
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ttcsim.errors import TtcsimError, UnknownNameError
from ttcsim.io import parse_yaml

#: Unknown keys, mutation and NaN/inf are all refused.
_STRICT = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

#: A what-if power cap must leave this factor of the static power (see
#: :meth:`HardwareProfile.min_power_limit`).
STATIC_HEADROOM = 1.1

#: Compute dtypes a profile may list peak FLOP/s for.
COMPUTE_DTYPES = ("fp32", "tf32", "bf16", "fp16", "fp8", "int8")


class Datasheet(BaseModel):
    """Vendor peak figures of one GPU (dense, no sparsity)."""

    model_config = _STRICT

    memory_capacity_bytes: float = Field(gt=1e9, lt=1e13, description="HBM/GDDR capacity [B]")
    hbm_bandwidth_bytes_per_s: float = Field(gt=1e10, lt=1e14, description="memory bandwidth [B/s]")
    peak_flops_per_s: dict[str, float] = Field(description="dense peak per compute dtype [FLOP/s]")
    power_limit_w: float = Field(gt=10, le=3000, description="board power limit (TDP) [W]")
    interconnect_bandwidth_bytes_per_s: float = Field(
        gt=1e9, lt=1e13, description="GPU-to-GPU bandwidth, one direction [B/s]"
    )
    min_power_limit_w: float | None = Field(
        default=None, gt=10, le=3000,
        description="lowest board power limit the driver accepts ('Min Power Limit') [W]",
    )

    @model_validator(mode="after")
    def _check_peaks(self) -> Datasheet:
        if "bf16" not in self.peak_flops_per_s:
            raise ValueError("peak_flops_per_s must list bf16")
        for dtype, flops in self.peak_flops_per_s.items():
            if dtype not in COMPUTE_DTYPES:
                raise ValueError(f"peak_flops_per_s: unknown dtype {dtype!r}")
            if not 1e12 <= flops <= 1e17:
                raise ValueError(f"peak_flops_per_s.{dtype}={flops:g} outside [1e12, 1e17] FLOP/s")
        if self.min_power_limit_w is not None and self.min_power_limit_w > self.power_limit_w:
            raise ValueError(
                f"min_power_limit_w {self.min_power_limit_w:g} exceeds power_limit_w "
                f"{self.power_limit_w:g}"
            )
        return self

    def peak_flops_for(self, dtype: str) -> float:
        """Peak FLOP/s for compute dtype ``dtype``; fp16 falls back to bf16, int8 to fp8."""
        fallbacks = {"fp16": "bf16", "int8": "fp8", "fp8": "bf16", "tf32": "bf16"}
        key = dtype
        while key not in self.peak_flops_per_s:
            if key not in fallbacks:
                raise TtcsimError(f"profile has no peak FLOP/s for dtype {dtype!r}")
            key = fallbacks[key]
        return self.peak_flops_per_s[key]


class ModelParameters(BaseModel):
    """Parameters of the roofline and power model beyond the datasheet.

    Time (see :mod:`ttcsim.simulator.roofline`):
      ``gemm_efficiency`` -- achieved / peak FLOP/s of large dense GEMMs;
      ``weight_stream_efficiency`` -- achieved / peak bandwidth when decode
      GEMMs stream the weights; ``attention_decode_efficiency`` -- achieved /
      peak bandwidth reading the KV cache in decode attention;
      ``attention_prefill_efficiency`` -- achieved / peak FLOP/s of prefill
      (flash) attention; ``layer_overhead_s`` -- fixed time per layer per
      forward pass (small kernels, launch gaps); ``step_overhead_s`` -- fixed
      time per forward pass (embedding, sampling, host work).

    ``roofline_exponent`` -- ``p`` of the smooth roofline
    ``(t_mem^p + t_comp^p)^(1/p)`` (memory and compute overlap imperfectly
    near the ridge point; ``p`` large gives ``max``).

    Power (see :mod:`ttcsim.simulator.power`)::

        P = idle_power_w + active_power_w
            + hbm_energy_j_per_byte * (bytes / s)
            + s_clk^gamma * (compute_energy_j_per_flop * GEMM FLOP / s
                             + attention_energy_j_per_flop * attention FLOP / s),

    where ``s_clk <= 1`` is the clock scale the GPU falls to when the demand
    would exceed the power limit (1 otherwise) and ``gamma`` is
    ``dvfs_energy_exponent``: lower clocks run at lower voltage, so each FLOP
    costs less energy.
    """

    model_config = _STRICT

    idle_power_w: float = Field(ge=0, le=1500, description="power with nothing running [W]")
    active_power_w: float = Field(
        ge=0, le=1500, description="extra static power while kernels run, clocks up [W]"
    )
    hbm_energy_j_per_byte: float = Field(ge=0, le=1e-8, description="dynamic energy per byte [J/B]")
    compute_energy_j_per_flop: float = Field(
        ge=0, le=1e-10, description="dynamic energy per bf16 tensor-core FLOP [J/FLOP]"
    )
    gemm_efficiency: float = Field(gt=0, le=1)
    weight_stream_efficiency: float = Field(gt=0, le=1)
    attention_decode_efficiency: float = Field(gt=0, le=1)
    attention_prefill_efficiency: float = Field(gt=0, le=1)
    layer_overhead_s: float = Field(ge=0, le=1e-3, description="per layer per forward pass [s]")
    step_overhead_s: float = Field(ge=0, le=1e-1, description="per forward pass [s]")
    attention_energy_j_per_flop: float = Field(
        ge=0,
        le=1e-9,
        default=5e-12,
        description="dynamic energy per FLOP of a decode attention pair, one per cached "
        "key read (prefill pairs cost compute_energy_j_per_flop) [J/FLOP]",
    )
    attention_half_parallelism: float = Field(
        ge=0.0,
        le=1e5,
        default=0.0,
        description=(
            "decode attention reaches half its bandwidth efficiency with this many "
            "(sequence, KV head) pairs per GPU; 0 = always full efficiency"
        ),
    )
    prefill_overhead_s: float = Field(
        ge=0.0, le=1.0, default=0.0, description="fixed host/launch time per prefill pass [s]"
    )
    roofline_exponent: float = Field(
        ge=1.0,
        le=64.0,
        default=2.0,
        description="p of the smooth roofline (t_mem^p + t_comp^p)^(1/p); large p = max()",
    )
    dvfs_energy_exponent: float = Field(
        ge=0.0,
        le=4.0,
        default=1.5,
        description="energy per FLOP scales as (clock / max clock)^gamma when power-limited",
    )
    interconnect_efficiency: float = Field(gt=0, le=1, default=0.7)
    allreduce_latency_s: float = Field(ge=0, le=1e-3, default=8e-6)
    memory_usable_fraction: float = Field(gt=0.3, le=1.0, default=0.9)


class ParameterTransfer(BaseModel):
    """How one parameter was moved from a calibrated profile onto this GPU."""

    model_config = _STRICT

    source_value: float
    factor: float = Field(gt=0, description="value = source_value * factor (before clamps)")
    rule: str = Field(min_length=3)


class TransferInfo(BaseModel):
    """A ``transferred`` profile: its source and the rule used for every parameter."""

    model_config = _STRICT

    source_profile: str = Field(min_length=1)
    source_status: str = Field(min_length=3)
    distance: Literal["same-generation", "cross-generation", "cross-vendor"]
    parameters: dict[str, ParameterTransfer]


class ErrorBand(BaseModel):
    """Relative uncertainty of a profile's predictions (see :mod:`ttcsim.uncertainty`).

    ``energy_ape`` / ``latency_ape`` are absolute errors relative to the measured
    value (``|pred - meas| / meas``): the band is every measured value within it,
    ``[pred / (1 + ape), pred / (1 - ape)]``.
    """

    model_config = _STRICT

    energy_ape: float = Field(gt=0, lt=0.95)
    latency_ape: float = Field(gt=0, lt=0.95)
    method: str = Field(min_length=3)
    n_runs: int | None = Field(default=None, ge=1)


class CalibrationInfo(BaseModel):
    """Where the :class:`ModelParameters` came from."""

    model_config = _STRICT

    status: Literal["datasheet-default", "calibrated", "transferred"]
    method: str = Field(min_length=3)
    date: str | None = None
    gpu_name: str | None = None
    driver_version: str | None = None
    trace: str | None = None
    residuals: dict[str, float] = Field(default_factory=dict)
    notes: str | None = None
    transfer: TransferInfo | None = None
    band: ErrorBand | None = None

    @model_validator(mode="after")
    def _calibrated_needs_context(self) -> CalibrationInfo:
        if self.status == "calibrated" and not (self.date and self.gpu_name):
            raise ValueError("a calibrated profile needs date and gpu_name in its provenance")
        if (self.status == "transferred") != (self.transfer is not None):
            raise ValueError("a transferred profile (and only one) needs a transfer record")
        return self


class Provenance(BaseModel):
    """Sources for every datasheet figure and the calibration record."""

    model_config = _STRICT

    datasheet_sources: dict[str, str]
    parameters: CalibrationInfo


class HardwareProfile(BaseModel):
    """One GPU: datasheet peaks, model parameters, provenance."""

    model_config = _STRICT

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9\-]*$")
    display_name: str
    vendor: Literal["nvidia", "amd", "other"]
    aliases: list[str] = Field(default_factory=list)
    datasheet: Datasheet
    parameters: ModelParameters
    provenance: Provenance

    @model_validator(mode="after")
    def _cross_checks(self) -> HardwareProfile:
        limit = self.datasheet.power_limit_w
        p = self.parameters
        if p.idle_power_w >= limit:
            raise ValueError(f"idle_power_w {p.idle_power_w} must be below power_limit_w {limit}")
        if p.idle_power_w + p.active_power_w >= limit:
            raise ValueError("idle_power_w + active_power_w must be below power_limit_w")
        # the throttle slows compute, never memory traffic: streaming at the datasheet
        # bandwidth must fit under the limit, or predicted power could exceed it
        memory_w = p.hbm_energy_j_per_byte * self.datasheet.hbm_bandwidth_bytes_per_s
        if p.idle_power_w + p.active_power_w + memory_w > limit:
            raise ValueError(
                f"idle_power_w + active_power_w + hbm_energy_j_per_byte x hbm_bandwidth "
                f"= {p.idle_power_w + p.active_power_w + memory_w:.0f} W exceeds "
                f"power_limit_w {limit:g} W"
            )
        required = {
            "memory_capacity_bytes",
            "hbm_bandwidth_bytes_per_s",
            "power_limit_w",
            "interconnect_bandwidth_bytes_per_s",
        } | {f"peak_flops_per_s.{d}" for d in self.datasheet.peak_flops_per_s}
        if self.datasheet.min_power_limit_w is not None:
            required.add("min_power_limit_w")
        missing = sorted(required - set(self.provenance.datasheet_sources))
        if missing:
            raise ValueError(f"provenance.datasheet_sources lacks a source for {missing}")
        return self

    @property
    def calibrated(self) -> bool:
        """Whether the model parameters were fitted to measurements on this GPU."""
        return self.provenance.parameters.status == "calibrated"

    def with_power_limit(self, power_limit_w: float | None, where: str = "--power-limit-w"):
        """A copy whose board power limit is ``power_limit_w`` [W] (a what-if cap).

        Allowed from :meth:`min_power_limit` up to the datasheet ``power_limit_w``;
        ``None`` (or the datasheet limit itself) returns the profile unchanged.  The copy keeps
        the name with a ``-pl<W>w`` suffix so outputs say which cap they price;
        the throttle physics (:mod:`ttcsim.simulator.power`) does the rest.
        """
        if power_limit_w is None:
            return self
        lo, hi = self.min_power_limit(), self.datasheet.power_limit_w
        ok = isinstance(power_limit_w, (int, float)) and not isinstance(power_limit_w, bool)
        if not ok or not (math.isfinite(power_limit_w) and lo <= power_limit_w <= hi):
            raise TtcsimError(
                f"must be between the board's minimum {lo:g} W and its limit {hi:g} W for "
                f"{self.name}, got {power_limit_w!r}",
                where,
            )
        if power_limit_w == hi:
            return self
        ds = self.datasheet.model_copy(update={"power_limit_w": float(power_limit_w)})
        return self.model_copy(
            update={"datasheet": ds, "name": f"{self.name}-pl{power_limit_w:g}w".replace(".", "p")}
        )

    def min_power_limit(self) -> float:
        """Lowest what-if power limit [W], a whole number of watts.

        The board's ``min_power_limit_w``, raised to :data:`STATIC_HEADROOM` x the
        static power ``P_idle + P_active`` where that is higher.

        The throttle model holds static power fixed and slows only the clock, so a cap
        at or below the static power leaves no power for work (the model would
        stretch every pass without bound); such caps are refused rather than priced.
        """
        p = self.parameters
        floor = STATIC_HEADROOM * (p.idle_power_w + p.active_power_w)
        board = self.datasheet.min_power_limit_w or floor
        return float(min(self.datasheet.power_limit_w, math.ceil(max(board, floor))))

    def with_parameters(
        self, parameters: ModelParameters, info: CalibrationInfo
    ) -> HardwareProfile:
        """Return a copy with new model parameters and calibration record."""
        prov = self.provenance.model_copy(update={"parameters": info})
        return self.model_copy(update={"parameters": parameters, "provenance": prov})

    def checked(self) -> HardwareProfile:
        """Re-run every validation (a copy made with ``model_copy`` skips them).

        Raises :class:`~ttcsim.errors.TtcsimError` naming the first bad field.
        """
        try:
            return HardwareProfile.model_validate(self.model_dump())
        except ValidationError as exc:
            raise TtcsimError(f"invalid profile: {_first_error(exc)}", self.name) from None

    def to_yaml(self) -> str:
        """Serialise to the YAML layout the loader reads (after :meth:`checked`).

        A profile that would not load back is never written.
        """
        data = self.checked().model_dump(mode="json")
        return yaml.safe_dump(data, sort_keys=False, width=100)


def _first_error(exc: ValidationError) -> str:
    """``loc: message (got value)`` of a pydantic error, on one line."""
    err = exc.errors()[0]
    loc = ".".join(str(x) for x in err["loc"]) or "profile"
    msg = err["msg"]
    got = err.get("input")
    if got is None or isinstance(got, (bool, int, float, str)):
        msg += f" (got {got!r})" if err["type"] != "missing" else ""
    return f"{loc}: {msg}"


def _profile_dir() -> Path:
    return Path(str(resources.files("ttcsim.hardware_profiles")))


@functools.cache
def _builtin_files() -> dict[str, Path]:
    return {p.stem: p for p in sorted(_profile_dir().glob("*.yaml"))}


@functools.cache
def _builtin_aliases() -> dict[str, str]:
    aliases: dict[str, str] = {}
    for name in _builtin_files():
        for alias in load_profile_file(_builtin_files()[name]).aliases:
            aliases[alias] = name
    return aliases


def list_profiles() -> list[str]:
    """Names of the profiles shipped with ttcsim."""
    return list(_builtin_files())


def load_profile_file(path: str | Path) -> HardwareProfile:
    """Load and validate one profile YAML; errors name the file and the field."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TtcsimError(f"cannot read profile: {exc}", str(path)) from None
    data = parse_yaml(text, str(path))
    if not isinstance(data, dict):
        raise TtcsimError("a profile must be a YAML mapping", str(path))
    try:
        profile = HardwareProfile.model_validate(data)
    except ValidationError as exc:
        raise TtcsimError(_first_error(exc), str(path)) from None
    if path.parent == _profile_dir() and profile.name != path.stem:
        raise TtcsimError(f"name {profile.name!r} differs from the file name", str(path))
    return profile


@functools.lru_cache(maxsize=64)
def _load_builtin(name: str) -> HardwareProfile:
    return load_profile_file(_builtin_files()[name])


def get_profile(
    name_or_path: str | Path | HardwareProfile, where: str = "--hw"
) -> HardwareProfile:
    """Resolve a profile by name, alias or YAML path.

    Raises :class:`~ttcsim.errors.UnknownNameError` listing the valid names,
    naming the option ``where``.
    """
    if isinstance(name_or_path, HardwareProfile):
        return name_or_path
    key = str(name_or_path)
    if key.endswith((".yaml", ".yml")) or "/" in key:
        return load_profile_file(key)
    key = key.lower()
    files = _builtin_files()
    key = _builtin_aliases().get(key, key)
    if key not in files:
        valid = list(files) + sorted(_builtin_aliases())
        raise UnknownNameError("hardware", str(name_or_path), valid, where)
    return _load_builtin(key)


def profile_name_for_gpu(gpu_name: str) -> str | None:
    """Best shipped profile for an NVML/vendor device name, e.g. ``NVIDIA H100 80GB HBM3``.

    Returns None when no profile matches.
    """
    n = gpu_name.lower().replace("-", " ")
    rules = [
        ("h200", "h200-sxm-141gb"),
        ("b200", "b200"),
        ("mi300x", "mi300x"),
        ("l40s", "l40s"),
        ("h100 nvl", "h100-nvl-94gb"),
        ("h100 pcie", "h100-pcie-80gb"),
        ("h100", "h100-sxm-80gb"),
        ("a100 pcie", "a100-pcie-80gb"),
        ("a100 sxm4 40gb", "a100-sxm-40gb"),
        ("a100 40gb", "a100-sxm-40gb"),
        ("a100", "a100-sxm-80gb"),
        (" l4", "l4"),
    ]
    for key, name in rules:
        if key in f" {n}":
            return name if name in _builtin_files() else None
    return None
