"""Unit constants and data-type sizes.

Everything inside ttcsim is SI: seconds, joules, watts, bytes, FLOP.  Decimal
prefixes (``GIGA``) are used for vendor figures quoted in GB and TB/s; binary
ones (``GIBI``) only where memory is reported in GiB.  Conversions happen only
at the edges (profiles in, tables out).
"""

from __future__ import annotations

KILO = 1e3
MEGA = 1e6
GIGA = 1e9
TERA = 1e12
PETA = 1e15
GIBI = 2.0**30

SECONDS_PER_HOUR = 3600.0
SECONDS_PER_DAY = 86400.0
JOULES_PER_KWH = 3.6e6
JOULES_PER_WH = 3600.0

#: Bytes per element of each supported storage dtype.  ``int4`` packs two
#: weights per byte; group-wise scales are ignored (< 2 % for group size 128).
DTYPE_BYTES: dict[str, float] = {
    "fp32": 4.0,
    "bf16": 2.0,
    "fp16": 2.0,
    "fp8": 1.0,
    "int8": 1.0,
    "int4": 0.5,
}

#: Which peak-FLOP/s entry of a profile a weight dtype computes with.  Weights
#: stored as int4 are dequantised and multiplied in bf16 (weight-only
#: quantisation, as in AWQ/GPTQ kernels); int8 and fp8 use their own tensor-core rate.
COMPUTE_DTYPE: dict[str, str] = {
    "fp32": "fp32",
    "bf16": "bf16",
    "fp16": "fp16",
    "fp8": "fp8",
    "int8": "int8",
    "int4": "bf16",
}


def dtype_bytes(dtype: str) -> float:
    """Return bytes per element of ``dtype`` [B]; raise ``ValueError`` for unknown names."""
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        valid = ", ".join(sorted(DTYPE_BYTES))
        raise ValueError(f"unknown dtype {dtype!r} (valid: {valid})") from None
