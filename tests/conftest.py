"""Shared fixtures: a hand-made H100-like profile and Llama-3.1-8B's architecture.

These are independent of the shipped YAML data so the physics tests stay
hand-checkable when profiles are recalibrated.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings

from ttcsim.hardware import CalibrationInfo, Datasheet, HardwareProfile, Provenance
from ttcsim.models import ModelSpec
from ttcsim.simulator.defaults import default_parameters

DATASHEET_KEYS = [
    "memory_capacity_bytes",
    "hbm_bandwidth_bytes_per_s",
    "power_limit_w",
    "interconnect_bandwidth_bytes_per_s",
    "peak_flops_per_s.bf16",
    "peak_flops_per_s.fp8",
]


def make_profile(**param_overrides) -> HardwareProfile:
    ds = Datasheet(
        memory_capacity_bytes=80e9,
        hbm_bandwidth_bytes_per_s=3.35e12,
        peak_flops_per_s={"bf16": 989e12, "fp8": 1979e12},
        power_limit_w=700.0,
        interconnect_bandwidth_bytes_per_s=450e9,
    )
    params = default_parameters(ds, idle_power_w=120.0)
    if param_overrides:
        params = params.model_copy(update=param_overrides)
    return HardwareProfile(
        name="test-h100",
        display_name="test H100",
        vendor="nvidia",
        datasheet=ds,
        parameters=params,
        provenance=Provenance(
            datasheet_sources={k: "test fixture" for k in DATASHEET_KEYS},
            parameters=CalibrationInfo(status="datasheet-default", method="test fixture"),
        ),
    )


LLAMA_8B = ModelSpec(
    name="llama-3.1-8b",
    n_layers=32,
    hidden_size=4096,
    n_heads=32,
    n_kv_heads=8,
    head_dim=128,
    intermediate_size=14336,
    vocab_size=128256,
)

#: A two-layer decoder small enough for the reference decoder's CPU tests.
TINY = ModelSpec(
    name="tiny",
    n_layers=2,
    hidden_size=64,
    n_heads=4,
    n_kv_heads=2,
    head_dim=16,
    intermediate_size=128,
    vocab_size=97,
    attention_bias=True,
    max_context_tokens=4096,
)

MOE = ModelSpec(
    name="tiny-moe",
    n_layers=4,
    hidden_size=1024,
    n_heads=16,
    n_kv_heads=4,
    head_dim=64,
    intermediate_size=4096,
    vocab_size=32000,
    n_experts=8,
    n_active_experts=2,
    moe_intermediate_size=1024,
)


@pytest.fixture
def h100():
    return make_profile()


@pytest.fixture
def llama8b():
    return LLAMA_8B


def bounded_settings(max_examples: int, fixtures: bool = False):
    """Fixed, derandomized, bounded hypothesis settings (CI-stable and fast).

    ``fixtures``: also allow function-scoped pytest fixtures (e.g. ``tmp_path``).
    """
    checks = [HealthCheck.too_slow, HealthCheck.filter_too_much]
    if fixtures:
        checks.insert(1, HealthCheck.function_scoped_fixture)
    return settings(
        max_examples=max_examples,
        derandomize=True,
        database=None,
        deadline=None,
        print_blob=True,
        suppress_health_check=checks,
    )

