"""Token-length distributions and their spec grammar.

A length is a positive integer.  Continuous families are discretised as
``L = min(ceil(X), max)`` (at least 1), so ``P(L > s) = P(X > s)`` for
integer ``s < max`` and 0 beyond.

Spec grammar (``--output-tokens`` / ``--prompt-tokens``)::

    800                                   fixed length
    700,900,1200                          one length per generated sequence
    lognormal:median=800,sigma=0.7[,max=8192]
    gamma:mean=800,shape=2[,max=...]
    normal:mean=800,std=200[,min=1][,max=...]     (truncated normal)
    empirical:FILE.csv[,column=NAME]      observed lengths, one per row
    mix:0.6*lognormal:median=300,sigma=0.5|0.4*lognormal:median=3000,sigma=0.6
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ttcsim.errors import TtcsimError

#: Tail mass ignored when an unbounded distribution is cut for integration.
TAIL_PROBABILITY = 1e-9
#: Hard cap on lengths an unbounded distribution may reach [tokens].
ABSOLUTE_MAX_TOKENS = 2_000_000


class LengthDistribution:
    """Distribution of a positive integer length."""

    kind = "abstract"

    def survival(self, s: np.ndarray) -> np.ndarray:
        """``P(L > s)`` for integer ``s`` (array)."""
        raise NotImplementedError

    def upper_bound(self) -> int:
        """Largest length with non-negligible probability [tokens]."""
        raise NotImplementedError

    def sample(self, rng: np.random.Generator, size) -> np.ndarray:
        """Draw integer lengths (float array) with ``rng``."""
        raise NotImplementedError

    @property
    def is_fixed(self) -> bool:
        """Whether every draw is the same length."""
        return False

    def survival_steps(self) -> np.ndarray:
        """``P(L > s)`` for decode steps ``s = 1 .. upper_bound() - 1``."""
        s = np.arange(1, max(self.upper_bound(), 1), dtype=float)
        return self.survival(s)

    def mean(self) -> float:
        """``E[L] = sum_{s>=0} P(L > s)`` [tokens]."""
        return 1.0 + float(self.survival_steps().sum())

    def second_moment(self) -> float:
        """``E[L^2] = sum_{s>=0} (2s + 1) P(L > s)`` [tokens^2]."""
        s = np.arange(1, max(self.upper_bound(), 1), dtype=float)
        return 1.0 + float(((2 * s + 1) * self.survival(s)).sum())

    def quantile(self, q: float) -> float:
        """Smallest length ``l`` with ``P(L <= l) >= q``."""
        s = np.arange(0, self.upper_bound() + 1, dtype=float)
        cdf = 1.0 - self.survival(s)
        return float(s[min(np.searchsorted(cdf, q - 1e-12), s.size - 1)])


@dataclass(frozen=True)
class Fixed(LengthDistribution):
    """Every sequence has ``tokens`` tokens."""

    tokens: int
    kind = "fixed"

    def survival(self, s):  # noqa: D102
        return (np.asarray(s, dtype=float) < self.tokens).astype(float)

    def upper_bound(self):  # noqa: D102
        return self.tokens

    def sample(self, rng, size):  # noqa: D102
        return np.full(size, float(self.tokens))

    @property
    def is_fixed(self):  # noqa: D102
        return True

    def __str__(self) -> str:
        return str(self.tokens)


@dataclass(frozen=True)
class Continuous(LengthDistribution):
    """A scipy continuous distribution discretised by ``ceil`` and clipped to ``[lo, hi]``."""

    spec: str
    frozen_dist: object = field(repr=False)
    lo: int = 1
    hi: int | None = None
    kind = "continuous"

    def survival(self, s):  # noqa: D102
        s = np.asarray(s, dtype=float)
        below = 1.0 - self.frozen_dist.cdf(self.lo - 1)  # mass kept above lo-1 (truncation)
        p = np.where(s < self.lo, 1.0, self.frozen_dist.sf(s) / max(below, 1e-300))
        if self.hi is not None:
            p = np.where(s >= self.hi, 0.0, p)
        return np.clip(p, 0.0, 1.0)

    def upper_bound(self):  # noqa: D102
        if self.hi is not None:
            return self.hi
        q = self.frozen_dist.isf(TAIL_PROBABILITY)
        return int(min(max(math.ceil(q), self.lo), ABSOLUTE_MAX_TOKENS))

    def sample(self, rng, size):  # noqa: D102
        u = rng.uniform(self.frozen_dist.cdf(self.lo - 1), 1.0, size)
        x = np.ceil(self.frozen_dist.ppf(np.minimum(u, 1 - 1e-16)))
        x = np.maximum(x, self.lo)
        return np.minimum(x, self.hi) if self.hi is not None else np.minimum(x, ABSOLUTE_MAX_TOKENS)

    def __str__(self) -> str:
        return self.spec


@dataclass(frozen=True)
class Empirical(LengthDistribution):
    """Observed lengths, each equally likely."""

    values: tuple[float, ...]
    label: str = "empirical"
    kind = "empirical"

    def survival(self, s):  # noqa: D102
        v = np.sort(np.asarray(self.values))
        return 1.0 - np.searchsorted(v, np.asarray(s, dtype=float), side="right") / v.size

    def upper_bound(self):  # noqa: D102
        return int(max(self.values))

    def sample(self, rng, size):  # noqa: D102
        return rng.choice(np.asarray(self.values, dtype=float), size=size)

    def __str__(self) -> str:
        return self.label


@dataclass(frozen=True)
class Mixture(LengthDistribution):
    """Weighted mixture of distributions (e.g. easy and hard queries)."""

    weights: tuple[float, ...]
    parts: tuple[LengthDistribution, ...]
    label: str = "mix"
    kind = "mixture"

    def survival(self, s):  # noqa: D102
        return sum(w * p.survival(s) for w, p in zip(self.weights, self.parts, strict=True))

    def upper_bound(self):  # noqa: D102
        return max(p.upper_bound() for p in self.parts)

    def sample(self, rng, size):  # noqa: D102
        which = rng.choice(len(self.parts), size=size, p=np.asarray(self.weights))
        out = np.empty(size)
        for i, part in enumerate(self.parts):
            mask = which == i
            out[mask] = part.sample(rng, int(mask.sum()))
        return out

    def __str__(self) -> str:
        return self.label


@dataclass(frozen=True)
class LengthList:
    """Explicit lengths, one per generated sequence (not a distribution)."""

    values: tuple[int, ...]

    def __str__(self) -> str:
        return ",".join(str(v) for v in self.values)


LengthSpec = LengthDistribution | LengthList


def _kv(body: str, where: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in body.split(","):
        if "=" not in part:
            raise TtcsimError(f"expected key=value, got {part!r}", where)
        k, v = part.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _num(params: dict[str, str], key: str, where: str, positive: bool = True) -> float:
    if key not in params:
        raise TtcsimError(f"missing {key}=", where)
    try:
        value = float(params.pop(key))
    except ValueError:
        raise TtcsimError(f"{key} must be a number", where) from None
    if not math.isfinite(value) or (positive and value <= 0):
        raise TtcsimError(f"{key} must be a finite positive number, got {value:g}", where)
    return value


def _int_bound(params: dict[str, str], key: str, where: str) -> int | None:
    if key not in params:
        return None
    v = _num(params, key, where)
    if v != int(v) or v > ABSOLUTE_MAX_TOKENS:
        raise TtcsimError(f"{key} must be a whole number <= {ABSOLUTE_MAX_TOKENS}", where)
    return int(v)


def _positive_int(text: str, where: str) -> int:
    try:
        value = float(text)
    except ValueError:
        raise TtcsimError(f"not a token count or distribution: {text!r}", where) from None
    if not math.isfinite(value) or value != int(value) or value < 1:
        raise TtcsimError(f"token counts must be whole numbers >= 1, got {text!r}", where)
    if value > ABSOLUTE_MAX_TOKENS:
        raise TtcsimError(f"token count {text} exceeds {ABSOLUTE_MAX_TOKENS}", where)
    return int(value)


def parse_lengths(
    spec: str | int | list | LengthSpec, where: str = "--output-tokens"
) -> LengthSpec:
    """Parse a length spec (see the module docstring) into a distribution or a list."""
    if isinstance(spec, (LengthDistribution, LengthList)):
        return spec
    if isinstance(spec, (int, np.integer)):
        return Fixed(_positive_int(str(spec), where))
    if isinstance(spec, (list, tuple)):
        return LengthList(tuple(_positive_int(str(v), where) for v in spec))
    text = str(spec).strip()
    if not text:
        raise TtcsimError("empty length spec", where)
    if ":" not in text:
        parts = [p for p in text.split(",")]
        if len(parts) == 1:
            return Fixed(_positive_int(parts[0], where))
        return LengthList(tuple(_positive_int(p.strip(), where) for p in parts))
    family, body = text.split(":", 1)
    family = family.strip().lower()
    if family == "mix":
        return _parse_mixture(body, text, where)
    if family == "empirical":
        return _parse_empirical(body, where)
    from scipy import stats  # lazy: only distributions need it

    params = _kv(body, where)
    lo = _int_bound(params, "min", where) or 1
    hi = _int_bound(params, "max", where)
    if family == "lognormal":
        sigma = _num(params, "sigma", where)
        if sigma > 5:
            raise TtcsimError(f"sigma={sigma:g} is implausibly wide (max 5)", where)
        if "median" in params:
            scale = _num(params, "median", where)
        else:  # E[X] = median * exp(sigma^2 / 2)
            scale = _num(params, "mean", where) * math.exp(-sigma * sigma / 2.0)
        dist = stats.lognorm(s=sigma, scale=scale)
    elif family == "gamma":
        mean, shape = _num(params, "mean", where), _num(params, "shape", where)
        dist = stats.gamma(a=shape, scale=mean / shape)
    elif family in ("normal", "truncnormal"):
        dist = stats.norm(loc=_num(params, "mean", where), scale=_num(params, "std", where))
    else:
        raise TtcsimError(
            f"unknown distribution {family!r}; valid: lognormal, gamma, normal, empirical, mix",
            where,
        )
    if params:
        raise TtcsimError(f"unknown parameter(s) {sorted(params)} for {family}", where)
    if hi is not None and hi < lo:
        raise TtcsimError(f"max={hi} is below min={lo}", where)
    out = Continuous(spec=text, frozen_dist=dist, lo=lo, hi=hi)
    if out.survival(np.array([float(lo)]))[0] <= 0 and hi is None:
        raise TtcsimError("distribution has no mass at positive lengths", where)
    return out


def _parse_mixture(body: str, text: str, where: str) -> Mixture:
    weights, parts = [], []
    for item in body.split("|"):
        if "*" not in item:
            raise TtcsimError(f"mixture part {item!r} needs WEIGHT*SPEC", where)
        w, sub = item.split("*", 1)
        try:
            weight = float(w)
        except ValueError:
            raise TtcsimError(f"mixture weight {w!r} is not a number", where) from None
        if not (weight > 0 and math.isfinite(weight)):
            raise TtcsimError("mixture weights must be positive", where)
        part = parse_lengths(sub, where)
        if isinstance(part, LengthList):
            raise TtcsimError("a mixture part must be a distribution, not a list", where)
        weights.append(weight)
        parts.append(part)
    total = sum(weights)
    return Mixture(tuple(w / total for w in weights), tuple(parts), label=text)


def _parse_empirical(body: str, where: str) -> Empirical:
    path_text, _, opts = body.partition(",")
    column = _kv(opts, where).get("column") if opts else None
    path = Path(path_text)
    try:
        import pandas as pd

        frame = pd.read_csv(path)
    except FileNotFoundError:
        raise TtcsimError(f"no such file {path}", where) from None
    except Exception as exc:  # pandas raises many parser errors
        raise TtcsimError(f"cannot read {path}: {exc}", where) from None
    col = column or frame.columns[0]
    if col not in frame:
        raise TtcsimError(f"{path} has no column {col!r}", where)
    values = pd.to_numeric(frame[col], errors="coerce").dropna().to_numpy()
    values = values[values >= 1]
    if values.size == 0:
        raise TtcsimError(f"{path}: no lengths >= 1 in column {col!r}", where)
    return Empirical(tuple(float(v) for v in np.ceil(values)), label=f"empirical:{path.name}")
