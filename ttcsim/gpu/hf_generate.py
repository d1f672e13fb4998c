"""Measured energy and time of Hugging Face transformers ``generate`` runs.

The engine users actually run: ``model.generate`` with its defaults (eager
PyTorch, SDPA attention, ``DynamicCache``), on a model built with random
weights from a real architecture (:func:`hf_config` turns a ttcsim catalog
:class:`~ttcsim.models.ModelSpec` into a ``LlamaConfig``/``Qwen2Config``;
energy and time do not depend on the weight values).

What HF runs, and what the record says:

* ``strategy="single"`` with ``concurrent_queries=q``: one static batch of
  ``q`` independent prompts (greedy decoding);
* ``strategy="vote<N>"``: ``num_return_sequences=N`` (sampling, ``top_k=50``,
  temperature 1): ``generate`` repeats every prompt ``N`` times *before* the
  first forward pass, so every row is prefilled and keeps its own prompt KV
  (``prefix_sharing: false``);
* output lengths are forced per row by :class:`ForcedLengths` (EOS suppressed
  before row ``i``'s length ``L_i``, forced at it).  The batch is static and
  padded: finished rows keep computing (their tokens are replaced by the pad
  token) until the longest row ends, so every run takes ``max(L)`` forward
  passes (one prefill + ``max(L) - 1`` decode steps).  ``output_tokens`` holds
  the per-row lengths the user gets; ``decode_steps`` the passes HF ran.

Timing (host clock, :func:`time.perf_counter`): ``latency_s`` is the whole
``generate`` call with a device sync after it; ``ttft_s`` is the time to the
first logits-processor call, which comes right after the prefill's forward
pass (the device is synchronised there, once); ``tpot_s = (latency_s -
ttft_s) / (max(L) - 1)`` [s per decode step].  The processor also stamps every
later step (no sync: the loop synchronises once per step anyway in its
stopping check), giving the step-time profile over the output
(``step_time_profile_s``: mean step time in up to 16 equal bins).

Energy is read from the NVML total-energy counter by a
:class:`~ttcsim.gpu.nvml.TraceSampler` that the caller runs for the whole
campaign: ``energy_j = mean_i E[start_i, end_i]`` over the ``k`` repeats
(:func:`~ttcsim.gpu.nvml.energy_between`), the whole board's energy with idle
included; ``idle_power_w`` is recorded beside it.
"""

from __future__ import annotations

import datetime as _dt
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ttcsim.errors import TtcsimError

ENGINE_NAME = "hf-transformers"
PROFILE_BINS = 16  # bins of the recorded step-time profile
SAMPLE_TOP_K = 50  # transformers' historical GenerationConfig default

#: Values of the models' published ``config.json`` that ttcsim's ModelSpec does
#: not hold (they change no FLOP or byte; kept so the built model is the real one).
#: Sources: huggingface.co/meta-llama/Llama-3.2-1B, Llama-3.2-3B, Llama-3.1-8B and
#: huggingface.co/Qwen/Qwen2.5-7B, Qwen2.5-14B, Qwen2.5-32B, file config.json.
HF_EXTRAS: dict[str, dict[str, Any]] = {
    "llama": {"rope_theta": 500000.0, "rms_norm_eps": 1e-5, "bos": 128000, "eos": 128001},
    "qwen2": {"rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "bos": 151643, "eos": 151643},
}


def hf_config(spec: Any, *, attn_implementation: str = "sdpa") -> Any:
    """A transformers ``LlamaConfig``/``Qwen2Config`` with ``spec``'s architecture.

    ``spec`` is a :class:`~ttcsim.models.ModelSpec` of family ``llama`` or
    ``qwen2`` (dense).  Shapes come from the spec; rope base, norm epsilon and
    token ids from :data:`HF_EXTRAS`.  RoPE frequency scaling is left out (it
    only rescales the inverse frequencies once at load).
    """
    import inspect

    from transformers import LlamaConfig, Qwen2Config

    family = spec.family
    if family not in HF_EXTRAS or spec.is_moe:
        raise TtcsimError(
            f"model {spec.name!r}: family {family!r} has no HF config here; valid: llama, qwen2",
            "model",
        )
    extra = HF_EXTRAS[family]
    vocab = int(spec.vocab_size)
    eos = extra["eos"] if extra["eos"] < vocab else vocab - 1
    bos = extra["bos"] if extra["bos"] < vocab else 0
    kw: dict[str, Any] = dict(
        vocab_size=vocab,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.n_layers,
        num_attention_heads=spec.n_heads,
        num_key_value_heads=spec.n_kv_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_context_tokens,
        rms_norm_eps=extra["rms_norm_eps"],
        tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    cls = LlamaConfig if family == "llama" else Qwen2Config
    params = inspect.signature(cls.__init__).parameters
    if "rope_parameters" in params:  # transformers >= 5
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": extra["rope_theta"]}
    else:
        kw["rope_theta"] = extra["rope_theta"]
    if family == "llama":
        kw["attention_bias"] = bool(spec.attention_bias)
    cfg = cls(**kw)
    cfg._attn_implementation = attn_implementation
    return cfg


def build_model(spec: Any, device: str, *, attn_implementation: str = "sdpa") -> Any:
    """Random-weight ``AutoModelForCausalLM`` of ``spec`` in bf16, created on ``device``.

    Parameters are allocated and initialised (normal, std 0.02) directly on the
    device, so a 32B model loads in seconds.  Returns the model in eval mode.
    """
    import torch
    from transformers import AutoModelForCausalLM

    cfg = hf_config(spec, attn_implementation=attn_implementation)
    with torch.device(device):
        try:
            model = AutoModelForCausalLM.from_config(
                cfg, dtype=torch.bfloat16, attn_implementation=attn_implementation
            )
        except TypeError:  # transformers < 4.56 spells it torch_dtype
            model = AutoModelForCausalLM.from_config(
                cfg, torch_dtype=torch.bfloat16, attn_implementation=attn_implementation
            )
    first = next(model.parameters()).device
    if first != torch.device(device):
        model = model.to(device)  # an older transformers ignored the device context
    return model.eval()


def set_attention(model: Any, attn_implementation: str) -> None:
    """Switch a built model's attention kernel (``"sdpa"`` or ``"eager"``)."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(attn_implementation)
    else:
        model.config._attn_implementation = attn_implementation


def _logits_processor_base() -> type:
    from transformers import LogitsProcessor

    return LogitsProcessor


class ForcedLengths:
    """Logits processor: row ``i`` ends with EOS exactly at its ``lengths[i]``-th new token.

    Called once per forward pass with the ids so far (``prompt + n`` generated)
    and the next-token scores: where ``n + 1 == L_i`` every score but EOS's is
    set to the dtype's minimum; where ``n + 1 < L_i`` EOS's is.  Vectorised, no
    device sync except once at the first call, which stamps the time to first
    token; every call appends a host time stamp to :attr:`stamps_s`.
    """

    def __init__(self, lengths: Any, prompt_tokens: int, eos_token_id: int, sync: Callable) -> None:
        self.lengths = lengths  # (rows,) long tensor on the model's device
        self.prompt_tokens = int(prompt_tokens)
        self.eos = int(eos_token_id)
        self.sync = sync
        self.stamps_s: list[float] = []

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        """Scores with EOS forced or suppressed per row (see the class docstring)."""
        import torch

        if not self.stamps_s:
            self.sync()
        self.stamps_s.append(time.perf_counter())
        n = input_ids.shape[1] - self.prompt_tokens
        last = (self.lengths == n + 1)[:, None]
        low = torch.finfo(scores.dtype).min
        eos_score = torch.where(last[:, 0], 0.0, low).to(scores.dtype)
        scores = scores.masked_fill(last, low)
        scores[:, self.eos] = eos_score
        return scores


@dataclass(frozen=True)
class HfRun:
    """One HF run: what to generate and how often.

    ``outputs`` are per row, query-major (``concurrent_queries x samples``);
    ``repeats=0`` means "as many as make the window last ``min_window_s``".
    """

    id: str
    model: str
    strategy: str  # "single" or "vote<N>"
    prompt_tokens: int
    outputs: tuple[int, ...]
    concurrent_queries: int = 1
    repeats: int = 0
    min_window_s: float = 1.0
    attn_implementation: str = "sdpa"
    cache_implementation: str = "dynamic"  # or "static" (no torch.compile)
    tier: str = "core"  # "core" runs are reserved time; "extra" only if time is left
    note: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def samples_per_query(self) -> int:
        """``N`` of ``vote<N>``, 1 for ``single``."""
        if self.strategy == "single":
            return 1
        if self.strategy.startswith("vote") and self.strategy[4:].isdigit():
            return int(self.strategy[4:])
        raise TtcsimError(f"run {self.id}: strategy {self.strategy!r}; valid: single, vote<N>")

    @property
    def rows(self) -> int:
        """Rows of the static batch (``concurrent_queries x N``)."""
        return self.concurrent_queries * self.samples_per_query

    @property
    def decode_steps(self) -> int:
        """Forward passes HF runs: the longest row's length."""
        return max(self.outputs)

    def check(self) -> HfRun:
        """Raise a one-line error when lengths and rows disagree; return self."""
        if len(self.outputs) != self.rows or min(self.outputs) < 1:
            raise TtcsimError(
                f"run {self.id}: {len(self.outputs)} output lengths for {self.rows} rows "
                "(concurrent_queries x samples), each >= 1",
                "outputs",
            )
        if self.cache_implementation not in ("dynamic", "static"):
            raise TtcsimError(
                f"run {self.id}: cache {self.cache_implementation!r}; valid: dynamic, static"
            )
        return self


def _bins(stamps_s: Sequence[float], n_bins: int = PROFILE_BINS) -> list[float]:
    """Mean interval [s] between consecutive stamps in up to ``n_bins`` equal bins."""
    import numpy as np

    d = np.diff(np.asarray(stamps_s, dtype=float))
    if d.size == 0:
        return []
    parts = np.array_split(d, min(n_bins, d.size))
    return [float(p.mean()) for p in parts]


def generate_once(model: Any, run: HfRun, device: str, seed: int = 0) -> dict[str, Any]:
    """One ``generate`` call of ``run``; returns host times and the checked lengths.

    Keys: ``start_s``/``end_s`` (monotonic clock, for the energy window),
    ``latency_s``, ``ttft_s``, ``stamps_s`` (perf_counter per forward pass),
    ``lengths`` (per row, from the returned ids: up to and including the
    first EOS).
    """
    import torch
    from transformers import LogitsProcessorList

    cuda = torch.device(device).type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    eos = int(model.config.eos_token_id)
    vocab = int(model.config.vocab_size)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, vocab, (run.concurrent_queries, run.prompt_tokens), generator=gen)
    ids[ids == eos] = (eos + 1) % vocab
    ids = ids.to(device)
    lengths = torch.tensor(run.outputs, dtype=torch.long, device=device)
    base = _logits_processor_base()
    proc_cls = type("ForcedLengthsProcessor", (ForcedLengths, base), {})
    proc = proc_cls(lengths, run.prompt_tokens, eos, sync)
    n = run.samples_per_query
    kw: dict[str, Any] = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=run.decode_steps,
        num_return_sequences=n,
        logits_processor=LogitsProcessorList([proc]),
        eos_token_id=eos,
        pad_token_id=eos,
        use_cache=True,
    )
    if n > 1:
        kw.update(do_sample=True, temperature=1.0, top_k=SAMPLE_TOP_K, top_p=1.0)
    else:
        kw.update(do_sample=False)
    if run.cache_implementation == "static":
        kw.update(cache_implementation="static", disable_compile=True)
    torch.manual_seed(seed)
    sync()
    t0_mono, t0 = time.monotonic(), time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**kw)
    sync()
    t1, t1_mono = time.perf_counter(), time.monotonic()
    gen_ids = out[:, run.prompt_tokens :].cpu()
    is_eos = gen_ids == eos
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, gen_ids.shape[1])
    stamps = proc.stamps_s
    return {
        "start_s": t0_mono,
        "end_s": t1_mono,
        "latency_s": t1 - t0,
        "ttft_s": (stamps[0] - t0) if stamps else t1 - t0,
        "stamps_s": stamps,
        "end_perf_s": t1,
        "lengths": [int(x) for x in first],
    }


def engine_record(
    transformers_version: str, run: HfRun, *, compile_model: bool = False
) -> dict[str, Any]:
    """The record's ``engine`` object (name, version and settings the engine layer reads)."""
    return {
        "name": ENGINE_NAME,
        "version": transformers_version,
        "batching": "static-padded",
        "prefix_caching": False,
        "cuda_graphs": bool(compile_model),
    }


def engine_settings(versions: dict[str, str], run: HfRun) -> dict[str, Any]:
    """Everything else that identifies the HF configuration (kept beside ``engine``)."""
    return {
        "attn_implementation": run.attn_implementation,
        "cache_implementation": run.cache_implementation,
        "torch_compile": False,
        "decoding": "sample" if run.samples_per_query > 1 else "greedy",
        "top_k": SAMPLE_TOP_K if run.samples_per_query > 1 else None,
        "dtype": "bfloat16",
        "weights": "random (normal, std 0.02), architecture from the published config",
        "length_control": "per-row EOS forced at the target length (logits processor)",
        **versions,
    }


def measure_hf_run(
    model: Any,
    run: HfRun,
    sampler: Any,
    *,
    device: str,
    idle_power_w: float,
    versions: dict[str, str],
    hw: str,
    gpu_name: str,
    driver_version: str,
    settle_s: float = 0.2,
) -> dict[str, Any]:
    """Measure ``run`` ``k`` times on a running ``sampler``; return its run record.

    ``k = run.repeats``, or (when 0) repeats until the window lasts
    ``run.min_window_s``.  ``energy_j`` [J], ``latency_s``, ``ttft_s``,
    ``tpot_s`` [s] are means over the repeats; ``*_repeats`` lists hold each
    repeat's value (the repeat spread).  Raises :class:`TtcsimError` when HF
    returned other lengths than asked for.
    """
    run.check()
    time.sleep(settle_s)
    reps: list[dict[str, Any]] = []
    t_window = time.monotonic()
    while (run.repeats and len(reps) < run.repeats) or (
        not run.repeats and (not reps or time.monotonic() - t_window < run.min_window_s)
    ):
        reps.append(generate_once(model, run, device, seed=len(reps)))
    time.sleep(settle_s)  # a counter tick after the window before the energy is read
    got = reps[0]["lengths"]
    if got != list(run.outputs):
        bad = sum(a != b for a, b in zip(got, run.outputs, strict=True))
        raise TtcsimError(f"run {run.id}: {bad} rows ended at other lengths than asked")
    energies = [sampler.energy_between(r["start_s"], r["end_s"]) for r in reps]
    k = len(reps)
    steps = run.decode_steps

    def mean(xs: Sequence[float]) -> float:
        return float(sum(xs) / len(xs))

    lat = [r["latency_s"] for r in reps]
    ttft = [r["ttft_s"] for r in reps]
    tpot = [(r["latency_s"] - r["ttft_s"]) / (steps - 1) if steps > 1 else math.nan for r in reps]
    profile = _bins(reps[-1]["stamps_s"])  # one interval per decode step
    return {
        "id": run.id,
        "hw": hw,
        "model": run.model,
        "dtype": "bf16",
        "tp": 1,
        "prompt_tokens": run.prompt_tokens,
        "concurrent_queries": run.concurrent_queries,
        "strategy": run.strategy,
        "output_tokens": list(run.outputs),
        "reward_model": None,
        "prefix_sharing": False,
        "engine": engine_record(versions["transformers_version"], run),
        "engine_settings": engine_settings(versions, run),
        "energy_j": mean(energies),
        "latency_s": mean(lat),
        "prefill_latency_s": mean(ttft),
        "decode_latency_s": mean(lat) - mean(ttft),
        "ttft_s": mean(ttft),
        "tpot_s": mean(tpot) if steps > 1 else None,
        "decode_steps": steps,
        "rows": run.rows,
        "idle_power_w": float(idle_power_w),
        "repeats": k,
        "energy_j_repeats": energies,
        "latency_s_repeats": lat,
        "ttft_s_repeats": ttft,
        "step_time_profile_s": profile,
        "window_monotonic_s": [reps[0]["start_s"], reps[-1]["end_s"]],
        "window_unix_s": [
            reps[0]["start_s"] + (time.time() - time.monotonic()),
            reps[-1]["end_s"] + (time.time() - time.monotonic()),
        ],
        "tier": run.tier,
        "note": run.note,
        "gpu_name": gpu_name,
        "driver_version": driver_version,
        "measured_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
