"""Steady state of a continuous-batching engine: a running batch of about ``B`` sequences.

The serving benchmarks (ML.ENERGY) measure a continuous-batching engine only
while requests are still queued, so the running batch stays near ``B``, and
report energy per request and the time per output token (TPOT).  With
prompts ``P`` and output lengths ``L`` (independent; ``E[L] = m1``,
``E[L^2] = m2``), every decode step advances ``B`` sequences by one token, so
``B / (m1 - 1)`` requests finish per step and as many are admitted.  Exact for
step costs affine in the context (the hardware model at full clock)::

    x_step   = B ((m1 - 1) E[P] + (m2 - m1) / 2) / (m1 - 1)   mean context per step [tokens]
    k        = max(1, B / (m1 - 1))         prompts per prefill pass (capped by the budget)
    E_req    = (m1 - 1) / B * E_step(B, x_step) + E_prefill(k) / k                  [J]
    TPOT     = t_step(B, x_step) + t_prefill(k) * (B / (m1 - 1)) / k                 [s]

``E_step``/``t_step`` and the prefill pass come from
:func:`~ttcsim.simulator.roofline.forward_pass` with the engine's coefficients
(host time, graph buckets, power limit included).  Prefills run as iterations
of their own (chunked prefill off), so they stall the running sequences: the
second TPOT term.  ``B`` defaults to ``min(max_num_seqs, KV-feasible)`` with
each running sequence holding ``E[P] + m2 / (2 m1)`` tokens (the
length-biased mean age of a running sequence).  Sliding-window layers read
and keep ``K_eff`` of the mean context (``docs/MODEL.md``; an upper bound on
the mean of ``K_eff``, which is concave).
"""

from __future__ import annotations

from dataclasses import dataclass

from ttcsim.distributions import as_distribution, parse_lengths
from ttcsim.engines.load import get_engine
from ttcsim.engines.physics import kv_feasible_batch
from ttcsim.errors import DoesNotFitError, TtcsimError
from ttcsim.hardware import get_profile
from ttcsim.models import get_model
from ttcsim.simulator.coefficients import context_read_tokens, pass_coefficients
from ttcsim.simulator.roofline import forward_pass


@dataclass(frozen=True)
class SteadyState:
    """Per-request cost of a continuous-batching engine in its steady state (all GPUs)."""

    running_batch: float  #: B [sequences]
    energy_per_request_j: float
    tpot_s: float  #: mean time per output token of a running request
    decode_step_s: float  #: one decode step at batch B
    prefill_pass_s: float  #: one prefill pass of k prompts
    prompts_per_prefill: float  #: k
    energy_decode_per_request_j: float
    energy_prefill_per_request_j: float
    power_w: float  #: mean board power (all GPUs) [W]
    output_tokens_per_s: float
    gpus: int


def _moments(spec, where: str) -> tuple[float, float]:
    d = as_distribution(parse_lengths(spec, where))
    return float(d.mean()), float(d.second_moment())


def steady_state(
    hw="h100",
    model="8b",
    engine="vllm",
    prompt_tokens=512,
    output_tokens=256,
    running_batch: float | None = None,
    tp: int = 1,
    weight_dtype: str = "bf16",
    kv_dtype: str | None = None,
) -> SteadyState:
    """Energy per request and TPOT of ``engine`` at a steady running batch (module formula).

    ``prompt_tokens``/``output_tokens`` are length specs of one request
    (an int, a comma list, a distribution).  ``running_batch`` None: the
    engine's ``max_num_seqs`` limited by the paged KV pool.
    """
    profile, spec, eng = get_profile(hw), get_model(model), get_engine(engine)
    kv_dtype = kv_dtype or ("fp8" if weight_dtype == "fp8" else "bf16")
    c = pass_coefficients(profile, spec, weight_dtype, kv_dtype, tp, eng)
    p1, p2 = _moments(prompt_tokens, "--prompt-tokens")
    m1, m2 = _moments(output_tokens, "--output-tokens")
    if m1 <= 1.0:
        raise TtcsimError("a steady state needs a mean output of more than 1 token",
                          "--output-tokens")
    if running_batch is None:
        slots = eng.batching.max_num_seqs or 1
        free = c.memory_capacity_bytes - c.weight_bytes_total - slots * spec.vocab_size * 4.0
        held = float(context_read_tokens(c, p1 + m2 / (2.0 * m1)))  # sliding layers: window
        fit = kv_feasible_batch(free, c.kv_bytes_per_token, held,
                                eng.kv_cache.block_tokens)
        if fit < 1:
            raise DoesNotFitError(f"{spec.name}: no sequence fits the KV cache", "--model")
        running_batch = float(min(slots, fit))
    b = float(running_batch)
    steps = m1 - 1.0
    x = b * (steps * p1 + (m2 - m1) / 2.0) / steps
    x = b * context_read_tokens(c, x / b) if c.windowed_fraction else x  # window on the mean
    step = forward_pass(c, b, x, x)
    admitted = b / steps  # requests admitted per decode step
    k = max(1.0, admitted)
    if eng.prefill.max_tokens_per_pass:
        k = max(1.0, min(k, eng.prefill.max_tokens_per_pass / max(p1, 1.0)))
    pre = forward_pass(c, k * p1, 0.0, k * (p2 + p1) / 2.0, sequences=k, prefill=True)
    e_dec = steps / b * float(step.energy_j)
    e_pre = float(pre.energy_j) / k
    tpot = float(step.time_s) + float(pre.time_s) * admitted / k
    time_per_request = steps / b * float(step.time_s) + float(pre.time_s) / k
    return SteadyState(
        running_batch=b,
        energy_per_request_j=e_dec + e_pre,
        tpot_s=tpot,
        decode_step_s=float(step.time_s),
        prefill_pass_s=float(pre.time_s),
        prompts_per_prefill=k,
        energy_decode_per_request_j=e_dec,
        energy_prefill_per_request_j=e_pre,
        power_w=(e_dec + e_pre) / time_per_request,
        output_tokens_per_s=m1 / time_per_request,
        gpus=c.n_gpus,
    )
