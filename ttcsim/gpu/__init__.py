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

import importlib

from ttcsim.errors import GpuUnavailableError

#: Modules of the ``[gpu]`` extra and the package that provides each.
GPU_EXTRA = (("torch", "torch"), ("pynvml", "nvidia-ml-py"))
#: How :func:`gpu_status` starts its reason when the extra is not installed.
MISSING_EXTRA = "the [gpu] extra is not installed"


def missing_gpu_packages() -> list[str]:
    """Packages of the ``[gpu]`` extra that are not installed (import fails: module not found)."""
    missing = []
    for module, package in GPU_EXTRA:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name in (None, module):
                missing.append(package)
        except Exception:  # noqa: BLE001, S110 - installed but broken: gpu_status says why
            pass
    return missing


def gpu_status() -> tuple[bool, str]:
    """Check once whether GPU measurement can run here.

    Returns ``(True, description)`` when torch imports, ``torch.cuda`` sees a
    device, pynvml imports and ``nvmlInit`` succeeds; otherwise
    ``(False, reason)`` with the first thing that is missing.  A package of the
    ``[gpu]`` extra that is not installed comes first, as
    ``"the [gpu] extra is not installed (missing: torch); pip install 'ttcsim[gpu]'"``:
    that is not the same as a machine without a GPU.
    """
    missing = missing_gpu_packages()
    if missing:
        return False, f"{MISSING_EXTRA} (missing: {', '.join(missing)}); pip install 'ttcsim[gpu]'"
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 - installed, but it does not import
        return False, f"torch is installed but does not import ({exc.__class__.__name__}: {exc})"
    if not torch.cuda.is_available():
        return False, f"torch {torch.__version__} sees no CUDA device"
    from ttcsim.gpu import nvml

    ok, why = nvml.nvml_status()
    if not ok:
        return False, why
    return True, f"{torch.cuda.get_device_name(0)} (torch {torch.__version__}, {why})"


def require_gpu() -> None:
    """Raise :class:`GpuUnavailableError` unless :func:`gpu_status` is ok.

    The message is ``no NVIDIA GPU: ...``, or, when the ``[gpu]`` extra is not
    installed, says which package is missing and how to install it.
    """
    ok, why = gpu_status()
    if not ok:
        raise GpuUnavailableError(why if why.startswith(MISSING_EXTRA) else f"no NVIDIA GPU: {why}")


__all__ = ["gpu_status", "missing_gpu_packages", "require_gpu"]
