"""Datasheet-default model parameters for a GPU that was never calibrated.

The rule (each number is a stated assumption, replaced by calibration):

* ``gemm_efficiency = 0.78``: an H100 SXM runs an 8192^3 bf16 GEMM at about
  790 of 989 TFLOP/s (ANCHORS.md, measured on our machines);
* ``weight_stream_efficiency = 0.85``: device-to-device copies reach about
  3.0 of 3.35 TB/s on an H100 (ANCHORS.md); decode GEMVs come a little lower;
* ``attention_decode_efficiency = 0.6``, ``attention_prefill_efficiency = 0.5``:
  paged/flash attention kernels reach well below GEMM rates;
* ``active_power_w = 0.12 * power_limit_w``: clocks up, nothing moving;
* ``compute_energy_j_per_flop``: a GEMM at ``gemm_efficiency`` draws exactly
  the power limit (Splitwise, arXiv 2311.18677: "prefill runs at the power
  limit")::

      e_flop = (P_limit - P_idle - P_active) / (peak_bf16 * gemm_efficiency)

* ``hbm_energy_j_per_byte``: weight streaming at ``weight_stream_efficiency``
  draws half the limit (batch-1 decode of an 8B model "draws roughly half the
  limit", ANCHORS.md; Splitwise's 380 W of 700 W for H100 decode)::

      e_byte = (0.5 * P_limit - P_idle - P_active) / (B_hbm * weight_stream_efficiency)

* ``layer_overhead_s = 6e-6`` and ``step_overhead_s = 1.5e-4``: a few small
  kernels per layer and sampling/host work per step under CUDA graphs.
"""

from __future__ import annotations

from ttcsim.hardware import Datasheet, ModelParameters

GEMM_EFFICIENCY = 0.78
WEIGHT_STREAM_EFFICIENCY = 0.85
ATTENTION_DECODE_EFFICIENCY = 0.6
ATTENTION_PREFILL_EFFICIENCY = 0.5
ACTIVE_POWER_FRACTION = 0.12
DECODE_POWER_FRACTION = 0.5
LAYER_OVERHEAD_S = 6e-6
STEP_OVERHEAD_S = 1.5e-4


def default_parameters(datasheet: Datasheet, idle_power_w: float) -> ModelParameters:
    """Derive model parameters from datasheet peaks by the rule in the module docstring.

    ``idle_power_w`` [W] is the one measured input (published or read on the card).
    """
    limit_w = datasheet.power_limit_w
    active_w = ACTIVE_POWER_FRACTION * limit_w
    peak_bf16 = datasheet.peak_flops_per_s["bf16"]
    flop_j = (limit_w - idle_power_w - active_w) / (peak_bf16 * GEMM_EFFICIENCY)
    decode_dyn_w = max(DECODE_POWER_FRACTION * limit_w - idle_power_w - active_w, 0.05 * limit_w)
    byte_j = decode_dyn_w / (datasheet.hbm_bandwidth_bytes_per_s * WEIGHT_STREAM_EFFICIENCY)
    return ModelParameters(
        idle_power_w=idle_power_w,
        active_power_w=active_w,
        hbm_energy_j_per_byte=byte_j,
        compute_energy_j_per_flop=flop_j,
        gemm_efficiency=GEMM_EFFICIENCY,
        weight_stream_efficiency=WEIGHT_STREAM_EFFICIENCY,
        attention_decode_efficiency=ATTENTION_DECODE_EFFICIENCY,
        attention_prefill_efficiency=ATTENTION_PREFILL_EFFICIENCY,
        layer_overhead_s=LAYER_OVERHEAD_S,
        step_overhead_s=STEP_OVERHEAD_S,
    )
