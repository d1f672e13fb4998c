"""ttcsim: analytical energy simulator for LLM inference with test-time compute.

The Python API mirrors the CLI::

    import ttcsim
    r = ttcsim.predict(hw="h100", model="8b", strategy="vote5")
    r.energy_j, r.latency_s

Heavy modules load lazily so ``ttcsim --help`` starts fast.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["predict", "Prediction", "get_profile", "get_model", "parse_strategy"]


def __getattr__(name: str):
    if name in ("predict", "Prediction"):
        from ttcsim import predict as _p

        return getattr(_p, name)
    if name == "get_profile":
        from ttcsim.hardware import get_profile

        return get_profile
    if name == "get_model":
        from ttcsim.models import get_model

        return get_model
    if name == "parse_strategy":
        from ttcsim.strategies import parse_strategy

        return parse_strategy
    raise AttributeError(name)
