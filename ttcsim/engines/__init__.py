"""The engine layer: how an inference engine turns a workload into GPU passes.

Pipeline position (issue 13): scenario -> workload (strategy phases) ->
**engine** -> hardware physics -> result.  The hardware profile holds the GPU's
physics and the best-case kernel costs of ttcsim's CUDA-graph reference
decoder; an :class:`EngineProfile` adds what a real engine does on top:

* batching policy (``lockstep`` | ``static-padded`` | ``continuous`` with
  ``max_num_seqs``), applied by the decode phases;
* prefix sharing (whether ``n`` samples share one prefill);
* exposed host time per pass, layer, running sequence, prefill and prefill
  token, during which the GPU waits at reduced power;
* kernels: CUDA-graph batch buckets, efficiency multipliers;
* KV memory: static or paged allocation, ``gpu_memory_utilization``;
* costs that grow with context (dynamic-cache copies) and prefill splitting.

Public API::

    get_engine("vllm")            # -> EngineProfile (vllm-0.5); names, aliases or a YAML path
    list_engines()                # shipped names
    engine_from_record(value)     # a run record's ``engine`` (name or object with settings)
    engine_to_yaml(profile)       # a validated YAML text

    ttcsim.predict(..., engine="hf-transformers")
    ttcsim.engines.steady.steady_state(...)   # continuous batching at a running batch of B

The physics (formulas in each docstring and in ``docs/MODEL.md``, "Engines")
lives in :mod:`ttcsim.engines.physics`; the engine's numbers reach the
simulator as extra fields of
:class:`~ttcsim.simulator.coefficients.PassCoefficients`, all zero for
``reference``, so the reference engine is today's model bit for bit.
"""

from ttcsim.engines.load import (
    DEFAULT_ENGINE,
    engine_aliases,
    engine_from_record,
    engine_to_yaml,
    get_engine,
    list_engines,
    load_engine_file,
)
from ttcsim.engines.schema import EngineProfile

__all__ = [
    "DEFAULT_ENGINE",
    "EngineProfile",
    "engine_aliases",
    "engine_from_record",
    "engine_to_yaml",
    "get_engine",
    "list_engines",
    "load_engine_file",
]
