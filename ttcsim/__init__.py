"""ttcsim: analytical energy simulator for LLM inference with test-time compute.

The Python API mirrors the CLI::

    import ttcsim
    r = ttcsim.predict(hw="h100", model="8b", strategy="vote5")
    r.energy_j, r.latency_s

``predict`` is imported eagerly (the submodule of the same name would
otherwise shadow it); matplotlib and scipy load only when used.
"""

from __future__ import annotations

from ttcsim.predict import Prediction, predict

__version__ = "0.1.0"

__all__ = ["predict", "Prediction", "get_profile", "get_model", "parse_strategy"]


def __getattr__(name: str):
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
