"""Whether a (hardware, model, dtype, tensor-parallel) deployment can exist at all.

These checks refuse setups that no serving engine would start, instead of
pricing them silently:

* **Tensor parallelism** shards attention by heads (Megatron-style, as vLLM
  and SGLang do): ``tp`` must divide the query heads.  For the KV heads,
  ``tp`` must divide them, or, when there are fewer KV heads than GPUs, be a
  multiple of them: each KV head is then *replicated* on ``tp / n_kv_heads``
  GPUs (vLLM's rule), so every GPU stores and reads one KV head
  (:func:`kv_heads_per_gpu`).  An MLA model (DeepSeek-V2/V3) caches one
  latent per token, kept whole on every GPU, so only its query heads count.
* **Weight dtypes with their own tensor-core rate** (fp8, int8: W8A8) need
  those tensor cores: the profile must list ``peak_flops_per_s.<dtype>``.  An
  A100 has no fp8 tensor cores, so fp8 weights on it are refused rather than
  priced at the bf16 rate (an emulation whose cost ttcsim does not model).
  int4 is weight-only (dequantised to bf16) and runs everywhere; an fp8 KV
  cache is a storage format, also allowed everywhere.

Each check returns the reason as text (``None`` when fine), so callers can
raise it (``predict``), or list it per option (``plan``) or per row
(``sweep``).  :func:`check_deployment` raises a one-line
:class:`~ttcsim.errors.TtcsimError` that names the option.
"""

from __future__ import annotations

from ttcsim.errors import TtcsimError

#: Weight dtypes that compute on their own tensor cores (the profile must list them).
TENSOR_CORE_DTYPES = ("fp8", "int8")


def tensor_parallel_problem(spec, tp: int) -> str | None:
    """Why ``spec`` cannot be sharded ``tp`` ways by attention heads (``None``: it can)."""
    if tp <= 1:
        return None
    if spec.n_heads % tp:
        return f"{spec.name} has {spec.n_heads} attention heads, which {tp} GPUs cannot split"
    if getattr(spec, "is_mla", False):  # one latent KV head, kept whole on every GPU
        return None
    kv = spec.n_kv_heads
    if kv >= tp and kv % tp:
        return f"{spec.name} has {kv} KV heads, which {tp} GPUs cannot split"
    if kv < tp and tp % kv:
        return (
            f"{spec.name} has {kv} KV heads: {tp} GPUs can neither split them nor replicate "
            f"them evenly (tp must divide {kv} or be a multiple of it)"
        )
    return None


def kv_heads_per_gpu(spec, tp: int) -> float:
    """KV heads each GPU stores and reads: ``n_kv / tp``, at least one (replicated) [heads]."""
    return max(spec.n_kv_heads / tp, 1.0)


def dtype_problem(profile, weight_dtype: str) -> str | None:
    """Why ``profile`` cannot run ``weight_dtype`` weights (``None``: it can)."""
    if weight_dtype in TENSOR_CORE_DTYPES and weight_dtype not in (
        profile.datasheet.peak_flops_per_s
    ):
        listed = ", ".join(sorted(profile.datasheet.peak_flops_per_s))
        return (
            f"{profile.name} has no {weight_dtype} tensor cores (its profile lists peak FLOP/s "
            f"for {listed}); use bf16, fp16 or int4 weights"
        )
    return None


def check_deployment(profile, spec, weight_dtype: str, tp: int) -> None:
    """Raise :class:`TtcsimError` naming ``--dtype`` or ``--tp`` for an impossible setup."""
    problem = dtype_problem(profile, weight_dtype)
    if problem:
        raise TtcsimError(problem, "--dtype")
    problem = tensor_parallel_problem(spec, tp)
    if problem:
        raise TtcsimError(problem, "--tp")
