"""ttcsim: analytical energy simulator for LLM inference with test-time compute.

The Python API mirrors the CLI::

    import ttcsim
    r = ttcsim.predict(hw="h100", model="8b", strategy="vote5")
    r.energy_j, r.latency_s
    ttcsim.predict(hw="h200", model="8b", strategy="vote8", engine="hf-transformers")
    ttcsim.steady_state(hw="a100", model="8b", engine="vllm", running_batch=128)

Everything is imported on first use (PEP 562 ``__getattr__``), so ``ttcsim
--help`` loads neither numpy nor pydantic.  ``ttcsim.predict`` is always the
function: the submodule of the same name, once imported, would otherwise
replace it as the package's attribute, so the package's ``__setattr__`` keeps
the function (``sys.modules["ttcsim.predict"]`` is the module).
"""

from __future__ import annotations

import sys
import types

__version__ = "0.1.0"

__all__ = [
    "predict", "Prediction", "get_profile", "get_model", "parse_strategy", "get_engine",
    "steady_state",
]

_LAZY = {
    "predict": "ttcsim.predict",
    "Prediction": "ttcsim.predict",
    "get_profile": "ttcsim.hardware",
    "get_model": "ttcsim.models",
    "parse_strategy": "ttcsim.strategies",
    "get_engine": "ttcsim.engines",
    "steady_state": "ttcsim.engines.steady",
}


class _Package(types.ModuleType):
    """The ``ttcsim`` module: importing ``ttcsim.predict`` keeps ``ttcsim.predict()``."""

    def __setattr__(self, name: str, value) -> None:
        if name == "predict" and isinstance(value, types.ModuleType):
            value = value.predict
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ttcsim' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
