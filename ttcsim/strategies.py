"""Test-time-compute strategies: small classes behind one registry.

A strategy turns one query into phases (:mod:`ttcsim.simulator.phases`).
Spec grammar: a name optionally followed by an integer (``vote5``,
``bon16``); ``cot`` is an alias of ``single``.  ``ttcsim strategies`` lists
every registered strategy with its cost formula.

Notation in the cost formulas: ``Q`` concurrent queries, ``N`` samples per
query, ``P`` prompt tokens, ``L_i`` output tokens of sample ``i``,
``Prefill(T)`` a prefill pass over ``T`` tokens, ``Decode(n; L)`` decoding
``n`` sequences in one batch that shrinks as they finish.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from ttcsim.errors import TtcsimError, UnknownNameError
from ttcsim.simulator.coefficients import PassCoefficients
from ttcsim.simulator.phases import PhaseCost, decode_phase, prefill_phase, score_phase

#: Largest N accepted for parallel sampling.
MAX_SAMPLES = 4096


@dataclass(frozen=True)
class Workload:
    """What a strategy needs to build its phases."""

    policy: PassCoefficients
    prompt_tokens: int
    lengths: object  #: a LengthSpec or phases.Draws
    concurrency: int
    prefix_cache: bool
    #: returns coefficients of a named reward model (None: the policy model)
    reward: Callable[[str | None], PassCoefficients]


class Strategy:
    """Base class; subclasses set ``name``, ``pattern`` and implement :meth:`phases`."""

    name: ClassVar[str]
    pattern: ClassVar[str]
    summary: ClassVar[str]
    samples_per_query: int = 1

    def phases(self, w: Workload) -> list[PhaseCost]:
        """The phases of a batch of ``w.concurrency`` queries."""
        raise NotImplementedError

    @classmethod
    def formula(cls) -> str:
        """The cost formula from the class docstring (the lines after the first)."""
        doc = (cls.__doc__ or "").strip().splitlines()
        return "\n".join(line.strip() for line in doc[1:] if line.strip())

    @property
    def spec(self) -> str:
        """Canonical spec string, e.g. ``vote5``."""
        return self.name


_REGISTRY: dict[str, type[Strategy]] = {}
_ALIASES: dict[str, str] = {"cot": "single"}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator adding a strategy to the registry."""
    _REGISTRY[cls.name] = cls
    return cls


def _parallel_prefill(w: Workload, samples: int) -> PhaseCost:
    """Prompt prefill: once per query with prefix caching, else once per sample."""
    copies = 1 if w.prefix_cache else samples
    return prefill_phase(w.policy, w.concurrency * copies, w.prompt_tokens)


@register
class Single(Strategy):
    """One answer (plain or chain-of-thought decoding).

    E = Prefill(Q*P) + Decode(Q; L)
    """

    name = "single"
    pattern = "single | cot"
    summary = "one sample per query"

    def phases(self, w: Workload) -> list[PhaseCost]:  # noqa: D102
        return [
            _parallel_prefill(w, 1),
            decode_phase(w.policy, w.prompt_tokens, w.lengths, w.concurrency, 1),
        ]


@register
@dataclass(frozen=True)
class Vote(Strategy):
    """Self-consistency: N samples, majority vote on their answers.

    E = Prefill(Q*P) [x N without prefix cache] + Decode(Q*N; L_1..L_N); the longest sample
    sets the duration and the batch shrinks as samples finish (vote1 == single).
    """

    n: int = 5
    name: ClassVar[str] = "vote"
    pattern: ClassVar[str] = "vote<N>"
    summary: ClassVar[str] = "N parallel samples, majority vote"

    @property
    def samples_per_query(self) -> int:  # noqa: D102
        return self.n

    @property
    def spec(self) -> str:  # noqa: D102
        return f"vote{self.n}"

    def phases(self, w: Workload) -> list[PhaseCost]:  # noqa: D102
        return [
            _parallel_prefill(w, self.n),
            decode_phase(w.policy, w.prompt_tokens, w.lengths, w.concurrency, self.n),
        ]


@register
@dataclass(frozen=True)
class BestOfN(Strategy):
    """Best-of-N: N samples, each scored by an outcome reward model.

    E = vote<N> + Prefill_RM(sum_i (P + L_i)): one reward-model prefill over prompt +
    candidate per candidate (reward model defaults to the policy model).
    """

    n: int = 4
    reward_model: str | None = None
    name: ClassVar[str] = "bon"
    pattern: ClassVar[str] = "bon<N>"
    summary: ClassVar[str] = "N samples scored by a reward model (--reward-model)"

    @property
    def samples_per_query(self) -> int:  # noqa: D102
        return self.n

    @property
    def spec(self) -> str:  # noqa: D102
        return f"bon{self.n}"

    def phases(self, w: Workload) -> list[PhaseCost]:  # noqa: D102
        return [
            _parallel_prefill(w, self.n),
            decode_phase(w.policy, w.prompt_tokens, w.lengths, w.concurrency, self.n),
            score_phase(
                w.reward(self.reward_model), w.prompt_tokens, w.lengths, w.concurrency, self.n
            ),
        ]


_SPEC = re.compile(r"^([a-z][a-z\-]*?)(\d+)?$")


def strategy_names() -> list[str]:
    """Patterns of every registered strategy, e.g. ``['single | cot', 'vote<N>', ...]``."""
    return [cls.pattern for cls in _REGISTRY.values()]


def registry() -> dict[str, type[Strategy]]:
    """The registry (name -> class), for listing."""
    return dict(_REGISTRY)


def parse_strategy(spec: str | Strategy, reward_model: str | None = None) -> Strategy:
    """Parse ``single``, ``cot``, ``vote<N>`` or ``bon<N>`` into a strategy object."""
    if isinstance(spec, Strategy):
        return spec
    text = str(spec).strip().lower()
    m = _SPEC.match(text)
    name = _ALIASES.get(m.group(1), m.group(1)) if m else None
    if not m or name not in _REGISTRY:
        raise UnknownNameError("strategy", str(spec), strategy_names(), "--strategy")
    cls = _REGISTRY[name]
    count = m.group(2)
    if cls is Single:
        if count:
            raise TtcsimError(f"{name} takes no count", "--strategy")
        return Single()
    if count is None:
        raise TtcsimError(f"{name} needs a sample count, e.g. {name}5", "--strategy")
    n = int(count)
    if not 1 <= n <= MAX_SAMPLES:
        raise TtcsimError(f"sample count must be 1..{MAX_SAMPLES}, got {n}", "--strategy")
    if cls is BestOfN:
        return BestOfN(n=n, reward_model=reward_model)
    return cls(n=n)
