"""ML.ENERGY Leaderboard v2 results as ttcsim run records.

The leaderboard (repository ``ml-energy/benchmark``, Apache-2.0) publishes one
JSON file per (task, GPU, model, ``max_num_seqs``, TP, PP) run of vLLM 0.5.4::

    data/llm_text_generation/{chat,code}/<GPU>/<org>/<model>/bs<N>+tp<T>+pp<P>.json

with ``Model`` (HF hub id), ``GPU``, ``TP``, ``PP``, ``Energy/req (J)``,
``Avg TPOT (s)``, ``Token tput (tok/s)``, ``Avg Output Tokens``,
``Avg BS (reqs)`` and ``Max BS (reqs)``.  Energy and throughput are
**steady-state** figures: measured over the iterations while requests were
still waiting, so about ``Avg BS`` sequences were running, with the new
requests' prefills (own iterations, chunked prefill off) interleaved::

    Energy/req = E_steady / tokens_steady * Avg Output Tokens      [J]
                 (NVML energy of all TP x PP GPUs)

:func:`import_tree` turns each file into one ``measure: steady-state`` run
record (a ``dict`` that :class:`ttcsim.calibration.records.RunRecord` reads):

* ``hw``: the GPU name through :data:`GPU_PROFILES`;
* ``model``: the HF id through the model catalog's hub-id resolution;
* ``tp``, ``max_num_seqs``, ``running_batch`` (``Avg BS``) and ``engine``: ``vllm``
  0.5.4 with the benchmark's settings (:data:`BENCHMARK_ENGINE_SETTINGS`);
* ``prompt_tokens``: the task's prompts as equally likely lengths (a comma list):
  their lengths in characters (shipped in ``ttcsim/data/mlenergy_v2_prompt_chars.csv``)
  plus the system prompt, over a stated characters-per-token ratio
  (:data:`CHARS_PER_TOKEN`), plus the chat template (:func:`prompt_tokens`);
* ``output_tokens``: a length distribution with the measured mean
  (:func:`output_length_spec`; the per-request lengths are not published);
* ``energy_j``: the energy per request;
* ``tpot_s``: the steady-state time per output token of a running request,
  from the steady-state throughput (:func:`steady_tpot_s`).  The file's own
  ``Avg TPOT`` is kept as ``tpot_reported_s``: it is a mean over *all* engine
  iterations of the run, the ramp-up and the draining tail included (where the
  batch shrinks and steps get faster), so it falls below the steady state's
  time per token as more requests finish per step (``docs/VALIDATION.md``).

Results that ttcsim cannot represent are skipped with a reason: pipeline
parallelism (``pp > 1``), a GPU without a hardware profile, a model that is not
in the catalog, or a file that is not a result.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ttcsim.errors import TtcsimError

#: Citation written into every record.
SOURCE = (
    "ML.ENERGY Leaderboard v2, repository ml-energy/benchmark, commit "
    "b10121d51c68c3dd22daa8c799e4415445a25040 (Apache-2.0)"
)

#: GPU names (nvidia-smi spelling, with or without ``NVIDIA ``) -> hardware profile.
GPU_PROFILES: dict[str, str] = {
    "a100-sxm4-40gb": "a100-sxm-40gb",
    "a100-sxm4-80gb": "a100-sxm-80gb",
    "a100 80gb pcie": "a100-pcie-80gb",
    "h100 80gb hbm3": "h100-sxm-80gb",
    "h100 pcie": "h100-pcie-80gb",
    "h100 nvl": "h100-nvl-94gb",
    "h200": "h200-sxm-141gb",
    "l40s": "l40s",
    "l4": "l4",
    "b200": "b200",
    "amd instinct mi300x": "mi300x",
}


@dataclass(frozen=True)
class Task:
    """One leaderboard task's fixed request settings (from the upstream benchmark scripts)."""

    name: str
    max_output_tokens: int  #: ``max_tokens`` of every request
    requests: int  #: requests sent in one run
    temperature: float
    chat_template: bool
    dataset: str
    extra_prompt_chars: int  #: characters every prompt carries besides its own (system prompt)
    template_tokens: int  #: chat-template role markup and BOS [tokens]


#: The two text-generation tasks (``../shared/mlenergy-v2/README.md`` and the
#: upstream ``benchmark/llm_text_generation/chat/scripts/benchmark_client.py``).
#: Every chat request carries the client's system prompt ("You are an artificial
#: intelligence assistant that gives helpful answers to the user's questions or
#: instructions.", 112 characters) and the model's chat template; 12 tokens of
#: template markup (BOS, role headers, end-of-turn markers, as in Llama 3's
#: template) are assumed.  Code prompts are raw text: one BOS token.
TASKS: dict[str, Task] = {
    "chat": Task("chat", 1024, 2000, 0.8, True, "ShareGPT first human turns, 500 x 4", 112, 12),
    "code": Task("code", 512, 1640, 0.0, False, "HumanEval prompts, 164 x 10", 0, 1),
}

#: Shape of the gamma distribution assumed for the per-request output lengths
#: (coefficient of variation 1/sqrt(2) = 0.71 before clipping; only the mean is
#: published).  Its effect is measured in docs/VALIDATION.md.
OUTPUT_LENGTH_SHAPE = 2.0

#: Characters per token assumed when converting the prompt lengths (no tokenizer
#: files offline).  Chat: about 4 characters per token for common English text
#: (OpenAI's tokenizer guide, "What are tokens and how to count them": "one token
#: generally corresponds to ~4 characters of text for common English text").  Code:
#: HumanEval prompts are Python with indentation, digits and doctests, which
#: Llama-family tokenizers split finely (every digit is a token).  3.3 was assumed
#: first; the ratio was then chosen on the six *fit* runs only (docs/VALIDATION.md):
#: their residual falls as the ratio falls (3.3: 15 % max, 3.0: 14 %, 2.8: 12 %, 2.5:
#: 10 %, 2.2: 8 %), and 2.5 is the lowest value taken as plausible for Python, so the
#: ratio does not absorb an unexplained prefill cost.  Its effect on the held-out
#: error is measured there ("chars/token sensitivity").
CHARS_PER_TOKEN: dict[str, float] = {"chat": 4.0, "code": 2.5}

#: vLLM settings of every leaderboard run besides ``max_num_seqs`` (upstream
#: benchmark scripts; ``../shared/mlenergy-v2/README.md``), as the flat keys of a
#: run record's ``engine`` object.  ``max_num_batched_tokens`` is vLLM 0.5's
#: default with chunked prefill off: ``max(max_model_len, 2048)`` = 4096.
BENCHMARK_ENGINE_SETTINGS: dict[str, object] = {
    "gpu_memory_utilization": 0.95,
    "chunked_prefill": False,
    "max_num_batched_tokens": 4096,
    "prefix_caching": False,
    "cuda_graphs": True,
}

#: Settings that the engine object has no key for, kept in the record for the reader.
BENCHMARK_NOTES: dict[str, object] = {
    "engine_image": "mlenergy/vllm:v0.5.4-openai",
    "max_model_len": 4096,
    "preemption_mode": "recompute",
    "request_rate": "inf",
    "power_limit_w": 400.0,
}

_RESULT_NAME = re.compile(r"^bs(\d+)\+tp(\d+)\+pp(\d+)\.json$")
_FIELDS = (
    "Model", "GPU", "TP", "PP", "Energy/req (J)", "Avg TPOT (s)", "Token tput (tok/s)",
    "Avg Output Tokens", "Avg BS (reqs)", "Max BS (reqs)",
)


@dataclass
class ImportResult:
    """Records written and results skipped (``(id, reason)``)."""

    records: list[dict] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    root: Path | None = None


def find_tree(path: str | Path) -> Path:
    """The ``llm_text_generation`` folder for ``path``.

    Accepts that folder itself, its parent (``data``), a checkout root (holding
    ``data/llm_text_generation``) or a folder that holds ``chat``/``code`` task
    folders directly.
    """
    p = Path(path)
    if not p.is_dir():
        raise TtcsimError("not a folder", str(path))
    for candidate in (p, p / "llm_text_generation", p / "data" / "llm_text_generation"):
        if candidate.is_dir() and any((candidate / t).is_dir() for t in TASKS):
            return candidate
    raise TtcsimError(
        "no ML.ENERGY result tree here (expected chat/ or code/ under "
        "llm_text_generation, data/llm_text_generation or the folder itself)", str(path),
    )


def gpu_profile(gpu_name: str) -> str | None:
    """Hardware profile name for an nvidia-smi GPU name, or None if ttcsim has none."""
    key = gpu_name.strip().lower().removeprefix("nvidia ").strip()
    return GPU_PROFILES.get(key)


def resolve_model(hf_id: str) -> str | None:
    """Catalog model name for an HF hub id (``meta-llama/Meta-Llama-3.1-8B-Instruct``)."""
    from ttcsim import models

    return models.resolve_model_name(hf_id)


@functools.cache
def _shipped_prompt_chars() -> dict[str, tuple[int, ...]]:
    text = resources.files("ttcsim").joinpath("data/mlenergy_v2_prompt_chars.csv").read_text(
        encoding="utf-8"
    )
    rows = csv.DictReader(line for line in text.splitlines() if not line.startswith("#"))
    out: dict[str, list[int]] = {t: [] for t in TASKS}
    for row in rows:
        out[row["task"]].append(int(row["prompt_chars"]))
    return {t: tuple(v) for t, v in out.items()}


def read_prompt_chars(path: str | Path | None = None) -> dict[str, tuple[int, ...]]:
    """Prompt lengths [characters] per task.

    ``path``: a ``prompt_lengths.json`` (``{"chat": {"prompt_chars": [...]}, ...}``);
    None: the copy shipped with ttcsim.
    """
    if path is None:
        return _shipped_prompt_chars()
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        out = {t: tuple(int(c) for c in data[t]["prompt_chars"]) for t in TASKS if t in data}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TtcsimError(f"cannot read prompt lengths: {exc}", str(path)) from None
    if not out or any(not v or min(v) < 0 for v in out.values()):
        raise TtcsimError("no usable prompt_chars lists for chat/code", str(path))
    return out


def prompt_tokens(
    chars: tuple[int, ...] | list[int], chars_per_token: float, task: Task | None = None
) -> list[int]:
    """Prompt lengths in tokens as the engine saw them.

    ``round((chars + extra_chars) / chars_per_token) + template_tokens`` (at least
    1), with the task's system prompt (``extra_chars``) and chat-template markup
    (``template_tokens``); no task: the characters alone.
    """
    if not chars_per_token > 0:
        raise TtcsimError(f"must be > 0, got {chars_per_token}", "--chars-per-token")
    extra = task.extra_prompt_chars if task else 0
    markup = task.template_tokens if task else 0
    return [max(1, round((c + extra) / chars_per_token) + markup) for c in chars]


def _result(path: Path) -> dict:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    missing = [k for k in _FIELDS if k not in data]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    for k in _FIELDS[2:]:
        v = data[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{k} must be a positive number, got {v!r}")
    return data


def output_length_spec(mean_tokens: float, cap: int, shape: float | None = None) -> str:
    """Output-length distribution of one request with the measured mean (a length spec).

    The per-request lengths are not published, only their mean.  Assumed: a gamma
    distribution of shape :data:`OUTPUT_LENGTH_SHAPE` clipped at the task's
    ``max_tokens`` (``cap``), its ``mean`` parameter solved by bisection so that the
    clipped mean equals ``mean_tokens`` (within 0.05 token).
    """
    from ttcsim.distributions import as_distribution, parse_lengths

    shape = OUTPUT_LENGTH_SHAPE if shape is None else shape
    target = min(max(float(mean_tokens), 1.0), cap - 0.5)

    def spec(x: float) -> str:
        return f"gamma:mean={x:.2f},shape={shape:g},max={cap}"

    def mean_of(x: float) -> float:
        return as_distribution(parse_lengths(spec(x), "output_tokens")).mean()

    lo, hi = target * 0.5, target * 20.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if mean_of(mid) < target:
            lo = mid
        else:
            hi = mid
        if hi - lo < 0.01:
            break
    return spec(0.5 * (lo + hi))


def steady_tpot_s(running_batch: float, mean_output_tokens: float, tokens_per_s: float) -> float:
    """Steady-state time per output token of a running request [s], from the throughput.

    Each decode step (with the prefill passes between steps) advances the ``B``
    running sequences by one token and finishes ``B / (L - 1)`` requests, whose
    first tokens came from their prefills, so ``tput = (B + B / (L - 1)) / t_cycle``::

        TPOT_steady = t_cycle = B * L / ((L - 1) * tput)
    """
    steps = max(mean_output_tokens - 1.0, 1.0)
    return running_batch * (steps + 1.0) / (steps * tokens_per_s)


def result_to_record(
    data: dict,
    record_id: str,
    task: Task,
    max_num_seqs: int,
    model: str,
    hw: str,
    prompt_lengths: list[int],
    chars_per_token: float,
    output_shape: float | None = None,
) -> dict:
    """One run record from one parsed result file (see the module docstring)."""
    tp, pp = int(data["TP"]), int(data["PP"])
    out_mean = float(data["Avg Output Tokens"])
    batch = float(data["Avg BS (reqs)"])
    tput = float(data["Token tput (tok/s)"])
    mean_prompt = sum(prompt_lengths) / len(prompt_lengths)
    return {
        "id": record_id,
        "source": SOURCE,
        "measure": "steady-state",
        "hw": hw,
        "gpu_name": str(data["GPU"]),
        "model": model,
        "hf_model": str(data["Model"]),
        "dtype": "bf16",
        "tp": tp,
        "pp": pp,
        "engine": {"name": "vllm", "version": "0.5.4", "max_num_seqs": max_num_seqs,
                   **BENCHMARK_ENGINE_SETTINGS},
        "engine_notes": dict(BENCHMARK_NOTES),
        "max_num_seqs": max_num_seqs,
        "running_batch": batch,
        "strategy": "single",
        "prefix_sharing": False,
        "task": task.name,
        "requests": task.requests,
        "prompt_tokens": ",".join(str(n) for n in prompt_lengths),
        "prompt_tokens_mean": mean_prompt,
        "chars_per_token": chars_per_token,
        "output_tokens": output_length_spec(out_mean, task.max_output_tokens, output_shape),
        "output_tokens_mean": out_mean,
        "max_output_tokens": task.max_output_tokens,
        "energy_j": float(data["Energy/req (J)"]),
        "tpot_s": steady_tpot_s(batch, out_mean, tput),
        "tpot_reported_s": float(data["Avg TPOT (s)"]),
        "throughput_tokens_per_s": tput,
    }


def import_tree(
    path: str | Path,
    chars_per_token: dict[str, float] | None = None,
    prompt_chars_path: str | Path | None = None,
    output_shape: float | None = None,
) -> ImportResult:
    """Run records for every result file under ``path`` (see :func:`find_tree`).

    ``chars_per_token`` overrides :data:`CHARS_PER_TOKEN` per task and
    ``output_shape`` :data:`OUTPUT_LENGTH_SHAPE` (both for sensitivity checks).  Records
    come in sorted path order; ``skipped`` lists ``(id, reason)`` for results
    that cannot be represented.
    """
    root = find_tree(path)
    ratios = {**CHARS_PER_TOKEN, **(chars_per_token or {})}
    chars = read_prompt_chars(prompt_chars_path)
    result = ImportResult(root=root)
    for task_name, task in TASKS.items():
        task_dir = root / task_name
        if not task_dir.is_dir():
            continue
        lengths = (prompt_tokens(chars[task_name], ratios[task_name], task)
                   if task_name in chars else None)
        for file in sorted(task_dir.rglob("*.json")):
            m = _RESULT_NAME.match(file.name)
            if not m:
                continue  # models.json and other non-result files
            rel = file.relative_to(root).with_suffix("").as_posix()
            n, tp_name, pp_name = (int(g) for g in m.groups())
            try:
                data = _result(file)
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                result.skipped.append((rel, f"not a result file ({exc})"))
                continue
            reason = _unsupported(data, n, tp_name, pp_name, lengths)
            if reason:
                result.skipped.append((rel, reason))
                continue
            hw = gpu_profile(str(data["GPU"]))
            model = resolve_model(str(data["Model"]))
            if hw is None:
                result.skipped.append((rel, f"no hardware profile for GPU {data['GPU']!r}"))
                continue
            if model is None:
                result.skipped.append((rel, f"model {data['Model']!r} not in the catalog"))
                continue
            result.records.append(
                result_to_record(data, rel, task, n, model, hw, lengths, ratios[task_name],
                                 output_shape)
            )
    return result


def _unsupported(data: dict, n: int, tp: int, pp: int, lengths) -> str | None:
    if (int(data["TP"]), int(data["PP"])) != (tp, pp):
        return f"file name says tp{tp}+pp{pp}, contents TP {data['TP']} PP {data['PP']}"
    if pp > 1:
        return f"pipeline parallelism (pp={pp}) is not modelled"
    if lengths is None:
        return "no prompt lengths for this task"
    if abs(float(data["Max BS (reqs)"]) - n * pp) > 0.5:
        return f"Max BS {data['Max BS (reqs)']} is not bs{n} x pp{pp}"
    return None
