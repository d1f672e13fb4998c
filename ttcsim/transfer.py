"""Transfer: model parameters for an uncalibrated GPU from a calibrated family member.

A calibrated profile (fitted on a real GPU) holds parameters no datasheet gives:
overheads, efficiencies, energies per byte and per FLOP.  :func:`transfer_parameters`
moves them onto another GPU's datasheet by the rules below, each a ratio of
published properties of the two GPUs (:data:`FAMILIES`), so no measurement of the
target GPU is needed.  ``S`` is the source, ``T`` the target::

    idle_power_w        = idle_S / TDP_S * TDP_T    (a published idle of T wins)
    active_power_w      = active_S / TDP_S * TDP_T
    compute_energy_j_per_flop, attention_energy_j_per_flop
                        = e_S * node_T / node_S                       (process node)
    hbm_energy_j_per_byte
                        = e_S * (MEM_SHARE * mem_T / mem_S + (1 - MEM_SHARE) * node_T / node_S)
                          capped so streaming at B_T fits: <= 0.95 (TDP_T - P_static) / B_T
    layer_overhead_s    = t_S * clock_S / clock_T     (small latency-bound kernels, GPU side)
    step_overhead_s, prefill_overhead_s = copied      (host and launch work)
    efficiencies, roofline_exponent, dvfs_energy_exponent, attention_half_parallelism,
    interconnect_efficiency, allreduce_latency_s, memory_usable_fraction = copied
                          (same generation: the same kernels on the same SM design;
                           across generations an assumption, widened in the band)

``node`` is energy per operation of the process node relative to TSMC N7
(:data:`NODE_ENERGY`), ``mem`` energy per byte of the memory technology relative
to HBM3 (:data:`MEMORY_ENERGY`), ``clock`` the maximum SM clock.  ``MEM_SHARE``
is the share of the per-byte energy spent in the DRAM stack and its PHY (the rest
moves the data on chip: L2, crossbar, SM load path, which scales with the node).

Every number in the tables is a stated assumption or cites a source; the rule
is checked by transferring H100 -> H200 and H200 -> H100 (``bench/transfer_check.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ttcsim.hardware import (
    Datasheet,
    HardwareProfile,
    ModelParameters,
    ParameterTransfer,
    TransferInfo,
)

#: Energy per operation by process node, relative to TSMC N7.  TSMC's N5
#: announcement: "up to 30 % power reduction" at the same speed versus N7 -> 0.70;
#: NVIDIA's 4N (Hopper, Ada) is an N5-family node -> 0.70; 4NP (Blackwell) is
#: assumed 5 % better than 4N (no published figure) -> 0.665.
NODE_ENERGY = {"N7": 1.0, "N5": 0.70, "4N": 0.70, "4NP": 0.665}
#: Energy per byte of the memory technology relative to HBM3 (DRAM stack + PHY).
#: Assumptions from the interfaces (no per-bit figure for these parts is
#: published by their vendors): HBM2e runs its 1024-bit interface at a lower
#: rate with older DRAM cells (1.10); HBM3e is HBM3 at a higher rate, same I/O
#: class (0.95); GDDR6 drives 32-bit channels over the board at 16-18 Gb/s per
#: pin, about twice HBM's I/O energy (1.6 for stack + PHY).
MEMORY_ENERGY = {"HBM2e": 1.10, "HBM3": 1.0, "HBM3e": 0.95, "GDDR6": 1.6}
#: Share of the per-byte energy in the DRAM and its PHY (the rest is on chip).
MEM_SHARE = 0.5
#: A transferred HBM energy may use at most this fraction of the headroom above
#: static power when streaming at the datasheet bandwidth (the profile check).
STREAM_HEADROOM = 0.95


@dataclass(frozen=True)
class Family:
    """Published properties of one GPU that the transfer rules use."""

    generation: str  #: architecture: ampere, hopper, ada, blackwell, cdna3
    vendor: str
    memory: str  #: key of MEMORY_ENERGY
    node: str  #: key of NODE_ENERGY
    max_clock_mhz: float  #: maximum SM (boost) clock
    source: str


_A100 = "NVIDIA A100 datasheet (2021) and whitepaper: HBM2e, TSMC N7, boost 1,410 MHz"
_H100 = "NVIDIA H100 whitepaper (2022): TSMC 4N; SXM5 HBM3, max SM clock 1,980 MHz (nvidia-smi)"
FAMILIES: dict[str, Family] = {
    "a100-sxm-40gb": Family("ampere", "nvidia", "HBM2e", "N7", 1410, _A100),
    "a100-sxm-80gb": Family("ampere", "nvidia", "HBM2e", "N7", 1410, _A100),
    "a100-pcie-80gb": Family("ampere", "nvidia", "HBM2e", "N7", 1410, _A100),
    "h100-sxm-80gb": Family("hopper", "nvidia", "HBM3", "4N", 1980, _H100),
    "h100-pcie-80gb": Family(
        "hopper", "nvidia", "HBM2e", "4N", 1755,
        "NVIDIA H100 datasheet (2023): PCIe card with HBM2e (2 TB/s); boost 1,755 MHz",
    ),
    "h100-nvl-94gb": Family(
        "hopper", "nvidia", "HBM3", "4N", 1785,
        "NVIDIA H100 NVL product brief (2023): HBM3 (3.9 TB/s); boost 1,785 MHz",
    ),
    "h200-sxm-141gb": Family(
        "hopper", "nvidia", "HBM3e", "4N", 1980,
        "NVIDIA H200 datasheet (2024): HBM3e, same GH100 die and clocks as H100 SXM",
    ),
    "l4": Family(
        "ada", "nvidia", "GDDR6", "4N", 2040,
        "NVIDIA L4 datasheet (2023) and Ada whitepaper: AD104, TSMC 4N, GDDR6, boost 2,040 MHz",
    ),
    "l40s": Family(
        "ada", "nvidia", "GDDR6", "4N", 2520,
        "NVIDIA L40S datasheet (2023): AD102, TSMC 4N, GDDR6, boost 2,520 MHz",
    ),
    "b200": Family(
        "blackwell", "nvidia", "HBM3e", "4NP", 1965,
        "NVIDIA Blackwell architecture brief (2024): TSMC 4NP, HBM3e; max clock 1,965 MHz "
        "assumed (no datasheet figure)",
    ),
    "mi300x": Family(
        "cdna3", "amd", "HBM3", "N5", 2100,
        "AMD Instinct MI300X data sheet (2023): HBM3, compute dies on TSMC N5, peak engine "
        "clock 2,100 MHz",
    ),
}

#: Parameters copied unchanged, with the reason written into the provenance.
COPIED = (
    "gemm_efficiency", "weight_stream_efficiency", "attention_decode_efficiency",
    "attention_prefill_efficiency", "attention_half_parallelism", "roofline_exponent",
    "dvfs_energy_exponent", "interconnect_efficiency", "allreduce_latency_s",
    "memory_usable_fraction", "step_overhead_s", "prefill_overhead_s",
)


def distance(source: Family, target: Family) -> str:
    """``same-generation``, ``cross-generation`` or ``cross-vendor``."""
    if source.vendor != target.vendor:
        return "cross-vendor"
    return "same-generation" if source.generation == target.generation else "cross-generation"


def transfer_parameters(
    source: HardwareProfile,
    source_family: Family,
    target: Datasheet,
    target_family: Family,
    idle_power_w: float | None = None,
) -> tuple[ModelParameters, TransferInfo]:
    """Target parameters and the per-parameter record, by the rules in the module docstring.

    ``idle_power_w`` [W]: a published idle power of the target, used instead of the
    TDP-scaled source idle (``None``: scale).  Pure: nothing of the target GPU is
    measured.
    """
    ps, ds = source.parameters, source.datasheet
    tdp = target.power_limit_w / ds.power_limit_w
    node = NODE_ENERGY[target_family.node] / NODE_ENERGY[source_family.node]
    mem = MEMORY_ENERGY[target_family.memory] / MEMORY_ENERGY[source_family.memory]
    clock = source_family.max_clock_mhz / target_family.max_clock_mhz
    rules: dict[str, ParameterTransfer] = {}
    out: dict[str, float] = {}

    def put(name: str, factor: float, rule: str, value: float | None = None) -> None:
        src = float(getattr(ps, name))
        out[name] = src * factor if value is None else value
        rules[name] = ParameterTransfer(source_value=src, factor=factor, rule=rule)

    if idle_power_w is None:
        put("idle_power_w", tdp, "idle_S / TDP_S * TDP_T (TDP ratio)")
    else:
        put("idle_power_w", tdp, "published idle power of the target GPU", value=idle_power_w)
    put("active_power_w", tdp, "active_S / TDP_S * TDP_T (TDP ratio)")
    for name in ("compute_energy_j_per_flop", "attention_energy_j_per_flop"):
        put(name, node, f"process node {source_family.node} -> {target_family.node}")
    byte_factor = MEM_SHARE * mem + (1.0 - MEM_SHARE) * node
    static_w = out["idle_power_w"] + out["active_power_w"]
    cap = STREAM_HEADROOM * (target.power_limit_w - static_w) / target.hbm_bandwidth_bytes_per_s
    byte_j = min(ps.hbm_energy_j_per_byte * byte_factor, cap)
    put(
        "hbm_energy_j_per_byte", byte_factor,
        f"memory {source_family.memory} -> {target_family.memory} ({MEM_SHARE:g} of the energy) "
        f"and node {source_family.node} -> {target_family.node} (the rest)"
        + ("; capped so streaming at the datasheet bandwidth fits the limit"
           if byte_j < ps.hbm_energy_j_per_byte * byte_factor else ""),
        value=byte_j,
    )
    put("layer_overhead_s", clock, "max SM clock ratio clock_S / clock_T (latency-bound kernels)")
    for name in COPIED:
        put(name, 1.0, "copied (" + (
            "host and launch work" if name.endswith("overhead_s") else
            "same kernels, same SM design" if source_family.generation == target_family.generation
            else "assumed equal across generations"
        ) + ")")
    info = TransferInfo(
        source_profile=source.name,
        source_status=source.provenance.parameters.status,
        distance=distance(source_family, target_family),
        parameters=rules,
    )
    return ModelParameters.model_validate(out), info


def choose_source(target: str, calibrated: dict[str, HardwareProfile]) -> str:
    """The calibrated profile to transfer from: same generation, then same memory, then H100.

    Ties go to the name that sorts first.
    """
    t = FAMILIES[target]
    candidates = [n for n in calibrated if n in FAMILIES and n != target]
    if not candidates:
        raise ValueError("no calibrated profile with a known family to transfer from")

    def score(name: str):
        f = FAMILIES[name]
        return (f.vendor == t.vendor, f.generation == t.generation, f.memory == t.memory,
                name == "h100-sxm-80gb")

    return sorted(candidates, key=lambda n: (tuple(not x for x in score(n)), n))[0]
