"""Error bands: how far a prediction may be from what the GPU will measure.

Every profile has a band (:class:`~ttcsim.hardware.ErrorBand`): a relative
error ``w`` for energy and one for latency, measured as ttcsim measures errors,
relative to the *measured* value (``APE = |pred - meas| / meas``).  A measured
value ``m`` is inside the band of a prediction ``p`` exactly when its APE is at
most ``w``::

    low  = p / (1 + w)          high = p / (1 - w)          (so low <= p <= high)

The band is asymmetric around ``p`` (a prediction 40 % low needs ``high = 1.67 p``).

Where the width comes from, by the profile's status (``provenance.parameters``):

* ``calibrated``: the profile's stored band, a quantile of the APE of its
  shipped parameters on held-out runs of the reference decoder (the method is
  stored with it; ``bench/band_coverage.py`` computes it);
* ``transferred``: the stored spread of the transfer check (a profile moved
  H100 -> H200 and H200 -> H100, ``bench/transfer_check.py``), widened for a
  cross-generation or cross-vendor step (:data:`DISTANCE_WIDENING`);
* ``datasheet-default``: :data:`DATASHEET_DEFAULT_BAND`, 50 %: uncalibrated
  defaults measured 35-45 % low on H100 and H200 (issue 15); a 50 % band holds a
  measured value up to 2x the prediction.

A profile without a stored band gets its status's fallback (:data:`FALLBACK_APE`).
"""

from __future__ import annotations

import numpy as np

from ttcsim.hardware import ErrorBand, HardwareProfile

#: Width of a datasheet-default profile's band (APE, energy and latency).
DATASHEET_DEFAULT_BAND = 0.50
#: Fallback APE per status when a profile stores no band.
FALLBACK_APE = {
    "calibrated": 0.15, "transferred": 0.25, "datasheet-default": DATASHEET_DEFAULT_BAND
}
#: Multiplier on a transfer check's spread by how far the transfer reaches: the
#: check itself is within one generation (Hopper H100 <-> H200); a step across
#: generations or vendors is not checked, so its band is widened (capped below
#: the datasheet-default width).
DISTANCE_WIDENING = {"same-generation": 1.0, "cross-generation": 1.5, "cross-vendor": 2.0}
#: Quantile of held-out APE that sets a measured band (p90).
BAND_QUANTILE = 90.0


def profile_band(profile: HardwareProfile) -> ErrorBand:
    """The error band of ``profile``: stored, else its status's fallback."""
    info = profile.provenance.parameters
    if info.band is not None:
        return info.band
    ape = FALLBACK_APE[info.status]
    return ErrorBand(
        energy_ape=ape, latency_ape=ape, method=f"fallback for status {info.status!r}"
    )


def interval(value, ape: float):
    """``(value / (1 + ape), value / (1 - ape))``: every measured value within ``ape``."""
    v = np.asarray(value, dtype=float) if not isinstance(value, float) else value
    return v / (1.0 + ape), v / (1.0 - ape)


def band_ape_from_errors(ape_fraction, quantile: float = BAND_QUANTILE) -> float:
    """Band width from held-out APEs (fractions): their ``quantile`` (linear interpolation)."""
    a = np.asarray(ape_fraction, dtype=float)
    if a.size == 0:
        raise ValueError("no errors to size a band from")
    return float(np.percentile(a, quantile))


def transferred_band(check_energy_ape: float, check_latency_ape: float, distance: str,
                     method: str) -> ErrorBand:
    """Band of a transferred profile: the transfer check's spread x :data:`DISTANCE_WIDENING`.

    Capped at :data:`DATASHEET_DEFAULT_BAND` (a transfer is never less certain than
    the defaults it replaces).
    """
    k = DISTANCE_WIDENING[distance]
    return ErrorBand(
        energy_ape=round(min(check_energy_ape * k, DATASHEET_DEFAULT_BAND), 4),
        latency_ape=round(min(check_latency_ape * k, DATASHEET_DEFAULT_BAND), 4),
        method=f"{method}; x{k:g} for a {distance} transfer",
    )


def format_band(ape: float) -> str:
    """``±12 %`` for a table."""
    return f"\u00b1{ape * 100:.0f} %"
