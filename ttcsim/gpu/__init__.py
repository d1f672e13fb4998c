"""Real-GPU measurement: NVML energy traces, a reference decoder, microbenchmarks.

Everything here needs an NVIDIA GPU, PyTorch with CUDA and ``nvidia-ml-py``.
None of them is imported when this package is imported: each module imports
torch (and only :mod:`ttcsim.gpu.nvml` imports pynvml) inside the functions
that need it, so the rest of ttcsim, and its tests, run without a GPU.

:func:`gpu_status` is the one availability check; :func:`require_gpu` turns a
negative answer into :class:`~ttcsim.errors.GpuUnavailableError`.

Modules:

* :mod:`ttcsim.gpu.nvml` -- NVML device wrapper, background trace sampler and
  :func:`~ttcsim.gpu.nvml.energy_between` (energy from the cumulative counter);
* :mod:`ttcsim.gpu.decoder` -- random-weight Llama/Qwen-style decoder with a
  static KV cache, prefix sharing, CUDA-graph decode and a Triton
  decode-attention kernel; :func:`~ttcsim.gpu.decoder.run_workload`;
* :mod:`ttcsim.gpu.measure` -- energy of one workload run (``measure_run``) and
  of a list of runs (``measure_many``);
* :mod:`ttcsim.gpu.microbench` -- calibration windows (idle, weight streaming,
  GEMM, decode attention, decoder).
"""

from __future__ import annotations

from ttcsim.errors import GpuUnavailableError


def gpu_status() -> tuple[bool, str]:
    """Check once whether GPU measurement can run here.

    Returns ``(True, description)`` when torch imports, ``torch.cuda`` sees a
    device, pynvml imports and ``nvmlInit`` succeeds; otherwise
    ``(False, reason)`` with the first thing that is missing.
    """
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 - any import failure means "no torch"
        return False, f"torch not importable ({exc.__class__.__name__}: {exc})"
    if not torch.cuda.is_available():
        return False, f"torch {torch.__version__} sees no CUDA device"
    from ttcsim.gpu import nvml

    ok, why = nvml.nvml_status()
    if not ok:
        return False, why
    return True, f"{torch.cuda.get_device_name(0)} (torch {torch.__version__}, {why})"


def require_gpu() -> None:
    """Raise :class:`GpuUnavailableError` ("no NVIDIA GPU: ...") unless :func:`gpu_status` is ok."""
    ok, why = gpu_status()
    if not ok:
        raise GpuUnavailableError(f"no NVIDIA GPU: {why}")


__all__ = ["gpu_status", "require_gpu"]
