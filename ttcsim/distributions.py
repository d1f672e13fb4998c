"""Token-length distributions and their spec grammar.

A length is a positive integer.  Continuous families are discretised as
``L = min(ceil(X), max)`` with ``X`` conditioned on ``X > min - 1``, so for
integer ``s``::

    P(L > s) = 1                                   s < min
             = P(X > s) / P(X > min - 1)           min <= s < max
             = 0                                   s >= max

``min`` *truncates* (lengths below it never occur: a truncated normal), while
``max`` *clips* (a generation cap: longer outputs are cut at ``max`` tokens,
so ``P(L = max)`` holds the whole tail).

Spec grammar (``--output-tokens`` / ``--prompt-tokens``)::

    800                                   fixed length
    700,900,1200                          output: one length per generated sequence;
                                          prompt: equally likely prompt lengths
    lognormal:median=800,sigma=0.7[,max=8192]      (or mean= instead of median=)
    gamma:mean=800,shape=2[,min=...][,max=...]
    normal:mean=800,std=200[,min=1][,max=...]      (truncated normal; alias truncnormal)
    empirical:FILE.csv[,column=NAME][,weight=NAME] observed lengths, one per row, or a
                                          histogram: lengths with a count column
    mix:0.6*lognormal:median=300,sigma=0.5|0.4*lognormal:median=3000,sigma=0.6

Moments and quantiles are exact sums over the integer support
(``E[L] = sum_{s>=0} P(L > s)``); unbounded families are cut where the tail
mass falls below :data:`TAIL_PROBABILITY`.  Transforms used by strategies and
metrics: :class:`Clipped` (budget forcing) and :class:`Shifted` (marginal
costs).  :func:`quadrature_nodes` turns a prompt-length distribution into a
few weighted points for exact-in-probability expectations.
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

    def _cached(self, key, compute):
        """``compute()`` once per instance (distributions are immutable; arrays read-only)."""
        memo = self.__dict__.setdefault("_memo", {})  # frozen dataclasses: no __setattr__
        if key not in memo:
            value = compute()
            if isinstance(value, np.ndarray):
                value.setflags(write=False)
            memo[key] = value
        return memo[key]

    def survival_steps(self) -> np.ndarray:
        """``P(L > s)`` for decode steps ``s = 1 .. upper_bound() - 1`` (read-only array)."""

        def compute():
            s = np.arange(1, max(self.upper_bound(), 1), dtype=float)
            return np.asarray(self.survival(s), dtype=float)

        return self._cached("survival_steps", compute)

    def mean(self) -> float:
        """``E[L] = sum_{s>=0} P(L > s)`` [tokens]."""
        return self._cached("mean", lambda: 1.0 + float(self.survival_steps().sum()))

    def second_moment(self) -> float:
        """``E[L^2] = sum_{s>=0} (2s + 1) P(L > s)`` [tokens^2]."""

        def compute():
            s = np.arange(1, max(self.upper_bound(), 1), dtype=float)
            return 1.0 + float(((2 * s + 1) * self.survival(s)).sum())

        return self._cached("second_moment", compute)

    def quantile(self, q: float) -> float:
        """Smallest length ``l`` with ``P(L <= l) >= q``."""

        def table():
            s = np.arange(0, self.upper_bound() + 1, dtype=float)
            return s, 1.0 - self.survival(s)

        s, cdf = self._cached("cdf", table)
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
class ContinuousLaw:
    """A lognormal, gamma or normal law: ``cdf``, ``sf``, ``ppf`` and ``isf`` (arrays).

    The formulas of ``scipy.stats`` (``lognorm(s=shape, scale=scale)``,
    ``gamma(a=shape, scale=scale)``, ``norm(loc, scale)``), evaluated with the
    same ``scipy.special`` functions (``ndtr``, ``ndtri``, ``gammainc``,
    ``gammaincc``, ``gammaincinv``, ``gammainccinv``) in the same order, so the
    values are scipy's bit for bit; ``scipy.stats`` itself costs ~0.4 s to import.
    With ``z = (x - loc) / scale``::

        lognormal  cdf = ndtr(ln z / shape)     ppf = exp(shape * ndtri(q)) * scale
        gamma      cdf = gammainc(shape, z)     ppf = gammaincinv(shape, q) * scale
        normal     cdf = ndtr(z)                ppf = ndtri(q) * scale + loc

    Lognormal and gamma live on ``x > 0`` (``cdf = 0`` at and below 0).
    """

    family: str  #: "lognormal", "gamma" or "normal"
    shape: float  #: sigma (lognormal), shape a (gamma); unused for the normal
    scale: float  #: median (lognormal), theta (gamma), std (normal) [tokens]
    loc: float = 0.0  #: mean of the normal [tokens]

    def _below(self, x):
        """``(z, inside)``: standardised ``x`` and whether it lies in the open support."""
        z = (np.asarray(x, dtype=float) - self.loc) / self.scale
        if self.family == "normal":
            return z, np.ones(z.shape, dtype=bool)
        return z, z > 0

    def cdf(self, x):  # noqa: D102
        return self._tail(x, upper=False)

    def sf(self, x):  # noqa: D102
        return self._tail(x, upper=True)

    def _tail(self, x, upper: bool):
        from scipy import special as sc  # lazy: only random lengths need it

        z, inside = self._below(x)
        zi = np.where(inside, z, 1.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            if self.family == "lognormal":
                y = np.log(zi) / self.shape
                v = sc.ndtr(-y) if upper else sc.ndtr(y)
            elif self.family == "gamma":
                v = sc.gammaincc(self.shape, zi) if upper else sc.gammainc(self.shape, zi)
            else:
                v = sc.ndtr(-zi) if upper else sc.ndtr(zi)
        return np.where(inside, v, 1.0 if upper else 0.0)[()]

    def ppf(self, q):  # noqa: D102
        return self._inverse(q, upper=False)

    def isf(self, q):  # noqa: D102
        return self._inverse(q, upper=True)

    def _inverse(self, q, upper: bool):
        from scipy import special as sc

        q = np.asarray(q, dtype=float)
        inside = (q > 0) & (q < 1)
        qi = np.where(inside, q, 0.5)
        if self.family == "lognormal":
            v = np.exp(self.shape * (-sc.ndtri(qi) if upper else sc.ndtri(qi)))
        elif self.family == "gamma":
            v = sc.gammainccinv(self.shape, qi) if upper else sc.gammaincinv(self.shape, qi)
        else:
            v = -sc.ndtri(qi) if upper else sc.ndtri(qi)
        low = -np.inf if self.family == "normal" else 0.0
        at_zero, at_one = (np.inf, low) if upper else (low, np.inf)
        v = v * self.scale + self.loc
        return np.where(inside, v, np.where(q == 0, at_zero, at_one))[()]


@dataclass(frozen=True)
class Continuous(LengthDistribution):
    """A :class:`ContinuousLaw` discretised by ``ceil`` and clipped to ``[lo, hi]``."""

    spec: str
    frozen_dist: object = field(repr=False)
    lo: int = 1
    hi: int | None = None
    kind = "continuous"

    def survival(self, s):  # noqa: D102
        s = np.asarray(s, dtype=float)
        # mass kept above lo-1 (truncation)
        below = self._cached("below", lambda: 1.0 - self.frozen_dist.cdf(self.lo - 1))
        p = np.where(s < self.lo, 1.0, self.frozen_dist.sf(s) / max(below, 1e-300))
        # without max= the cap is ABSOLUTE_MAX_TOKENS, as in sample()
        p = np.where(s >= (self.hi if self.hi is not None else ABSOLUTE_MAX_TOKENS), 0.0, p)
        return np.clip(p, 0.0, 1.0)

    def upper_bound(self):  # noqa: D102
        if self.hi is not None:
            return self.hi
        return self._cached("upper_bound", self._tail_bound)

    def _tail_bound(self) -> int:
        with np.errstate(over="ignore"):  # a huge scale overflows isf to inf
            q = min(float(self.frozen_dist.isf(TAIL_PROBABILITY)), ABSOLUTE_MAX_TOKENS)
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
    """Observed lengths: each value is drawn with probability ``weight / sum(weights)``.

    Without weights every observation is equally likely.  ``P(L > s)`` is the
    weighted fraction of observations above ``s``.
    """

    values: tuple[float, ...]
    label: str = "empirical"
    weights: tuple[float, ...] | None = None
    kind = "empirical"

    def _table(self) -> tuple[np.ndarray, np.ndarray]:
        """Sorted values and their cumulative probabilities (cached)."""
        cached = self.__dict__.get("_cached_table")
        if cached is None:
            v = np.asarray(self.values, dtype=float)
            w = np.ones_like(v) if self.weights is None else np.asarray(self.weights, dtype=float)
            order = np.argsort(v, kind="stable")
            v, w = v[order], w[order]
            cached = (v, np.cumsum(w) / w.sum())
            object.__setattr__(self, "_cached_table", cached)
        return cached

    def survival(self, s):  # noqa: D102
        v, cdf = self._table()
        idx = np.searchsorted(v, np.asarray(s, dtype=float), side="right")
        below = np.where(idx > 0, cdf[np.maximum(idx - 1, 0)], 0.0)
        return np.clip(1.0 - below, 0.0, 1.0)

    def upper_bound(self):  # noqa: D102
        return int(max(self.values))

    def sample(self, rng, size):  # noqa: D102
        v, cdf = self._table()
        if self.weights is None:
            return rng.choice(np.asarray(self.values, dtype=float), size=size)
        u = rng.uniform(0.0, 1.0, size)
        return v[np.minimum(np.searchsorted(cdf, u, side="right"), v.size - 1)]

    def __str__(self) -> str:
        return self.label


@dataclass(frozen=True)
class Clipped(LengthDistribution):
    """``L' = min(max(L, lo), hi)``: lengths forced up to ``lo`` and cut at ``hi``.

    ``P(L' > s) = 1`` for ``s < lo``, ``P(L > s)`` for ``lo <= s < hi``, 0 for
    ``s >= hi`` (budget forcing: forced continuations below ``lo``, a forced end
    at ``hi``).
    """

    base: LengthDistribution
    lo: int = 1
    hi: int | None = None
    kind = "clipped"

    def survival(self, s):  # noqa: D102
        s = np.asarray(s, dtype=float)
        p = np.where(s < self.lo, 1.0, self.base.survival(s))
        if self.hi is not None:
            p = np.where(s >= self.hi, 0.0, p)
        return p

    def upper_bound(self):  # noqa: D102
        ub = max(self.base.upper_bound(), self.lo)
        return ub if self.hi is None else min(ub, self.hi)

    def sample(self, rng, size):  # noqa: D102
        return np.clip(self.base.sample(rng, size), self.lo, self.hi)

    @property
    def is_fixed(self):  # noqa: D102
        return self.base.is_fixed or (self.hi is not None and self.hi <= self.lo)

    @property
    def tokens(self) -> int:
        """The single length when :attr:`is_fixed` [tokens]."""
        if self.hi is not None and self.hi <= self.lo:
            return int(self.hi)
        return int(min(max(self.base.tokens, self.lo), self.hi or ABSOLUTE_MAX_TOKENS))

    def __str__(self) -> str:
        return f"clip({self.base},min={self.lo},max={self.hi if self.hi is not None else 'none'})"


@dataclass(frozen=True)
class Shifted(LengthDistribution):
    """``L' = L + delta`` (``delta >= 0``): ``P(L' > s) = P(L > s - delta)``."""

    base: LengthDistribution
    delta: int
    kind = "shifted"

    def survival(self, s):  # noqa: D102
        s = np.asarray(s, dtype=float)
        return np.where(s < self.delta, 1.0, self.base.survival(s - self.delta))

    def upper_bound(self):  # noqa: D102
        return self.base.upper_bound() + self.delta

    def sample(self, rng, size):  # noqa: D102
        return self.base.sample(rng, size) + self.delta

    @property
    def is_fixed(self):  # noqa: D102
        return self.base.is_fixed

    @property
    def tokens(self) -> int:
        """The single length when :attr:`is_fixed` [tokens]."""
        return int(self.base.tokens) + self.delta

    def __str__(self) -> str:
        return f"{self.base}+{self.delta}"


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
        k = k.strip()
        if k in out:
            raise TtcsimError(f"{k}= given twice", where)
        out[k] = v.strip()
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


#: Parsed text specs (immutable results; specs that read a file are not kept).
_PARSED: dict[tuple[str, str], LengthSpec] = {}


def parse_lengths(
    spec: str | int | list | LengthSpec, where: str = "--output-tokens"
) -> LengthSpec:
    """Parse a length spec (see the module docstring) into a distribution or a list."""
    if isinstance(spec, (LengthDistribution, LengthList)):
        return spec
    if isinstance(spec, str):
        key = (spec, where)
        hit = _PARSED.get(key)
        if hit is None:
            hit = _parse_lengths(spec, where)
            if "empirical" not in spec.lower():
                if len(_PARSED) > 256:
                    _PARSED.clear()
                _PARSED[key] = hit
        return hit
    return _parse_lengths(spec, where)


def _parse_lengths(spec, where: str) -> LengthSpec:
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
        dist = ContinuousLaw("lognormal", sigma, scale)
    elif family == "gamma":
        mean, shape = _num(params, "mean", where), _num(params, "shape", where)
        dist = ContinuousLaw("gamma", shape, mean / shape)
    elif family in ("normal", "truncnormal"):
        mean = _num(params, "mean", where)
        dist = ContinuousLaw("normal", 0.0, _num(params, "std", where), loc=mean)
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
    if not dist.sf(lo - 1) > 0:  # min= truncates to a region without mass (also with max=)
        raise TtcsimError(f"distribution has no mass at lengths >= {lo}", where)
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
    top = max(weights)  # scale first: a sum of huge weights overflows to inf
    total = sum(w / top for w in weights)
    return Mixture(tuple(w / top / total for w in weights), tuple(parts), label=text)


def _parse_empirical(body: str, where: str) -> Empirical:
    path_text, _, opts = body.partition(",")
    params = _kv(opts, where) if opts else {}
    column, weight = params.pop("column", None), params.pop("weight", None)
    if params:
        raise TtcsimError(f"unknown parameter(s) {sorted(params)} for empirical", where)
    path = Path(path_text.strip())
    try:
        import pandas as pd

        frame = pd.read_csv(path)
    except FileNotFoundError:
        raise TtcsimError(f"no such file {path}", where) from None
    except Exception as exc:  # pandas raises many parser errors
        raise TtcsimError(f"cannot read {path}: {exc}", where) from None
    if frame.empty:
        raise TtcsimError(f"{path} has no rows", where)
    col = column or frame.columns[0]
    for name in (col, weight):
        if name is not None and name not in frame:
            cols = list(frame.columns)
            raise TtcsimError(f"{path} has no column {name!r}; columns: {cols}", where)
    values = pd.to_numeric(frame[col], errors="coerce").to_numpy(dtype=float)
    bad = ~(np.isfinite(values) & (values >= 1) & (values <= ABSOLUTE_MAX_TOKENS))
    if bad.any():
        row = int(np.argmax(bad))
        raise TtcsimError(
            f"{path}: {int(bad.sum())} row(s) of column {col!r} are not lengths in "
            f"1..{ABSOLUTE_MAX_TOKENS} (first: data row {row + 1}, {frame[col].iloc[row]!r})",
            where,
        )
    weights = None
    if weight is not None:
        w = pd.to_numeric(frame[weight], errors="coerce").to_numpy(dtype=float)
        if not (np.isfinite(w).all() and (w >= 0).all() and w.sum() > 0):
            raise TtcsimError(f"{path}: column {weight!r} must hold counts >= 0, not all 0", where)
        keep = w > 0
        values, weights = values[keep], tuple(float(x) for x in w[keep])
    return Empirical(
        tuple(float(v) for v in np.ceil(values)), label=f"empirical:{path.name}", weights=weights
    )


def shift_lengths(lengths: LengthSpec, delta: int) -> LengthSpec:
    """Every length plus ``delta >= 0`` tokens (used for marginal costs)."""
    if delta < 0:
        raise ValueError("delta must be >= 0")
    if delta == 0:
        return lengths
    if isinstance(lengths, LengthList):
        return LengthList(tuple(v + delta for v in lengths.values))
    if isinstance(lengths, Fixed):
        return Fixed(lengths.tokens + delta)
    return lengths._cached(("shifted", delta), lambda: Shifted(lengths, delta))


def clip_lengths(lengths: LengthSpec, lo: int = 1, hi: int | None = None) -> LengthSpec:
    """Lengths forced into ``[lo, hi]`` (see :class:`Clipped`)."""
    if isinstance(lengths, LengthList):
        v = np.clip(np.asarray(lengths.values), lo, hi)
        return LengthList(tuple(int(x) for x in v))
    if isinstance(lengths, Fixed):
        return Fixed(int(np.clip(lengths.tokens, lo, hi)))
    return Clipped(lengths, lo, hi)


def as_distribution(lengths: LengthSpec) -> LengthDistribution:
    """A length list read as equally likely values (how prompt-length lists are read)."""
    if isinstance(lengths, LengthList):
        if len(set(lengths.values)) == 1:
            return Fixed(int(lengths.values[0]))
        return Empirical(tuple(float(v) for v in lengths.values), label=str(lengths))
    return lengths


#: Points used to integrate over a prompt-length distribution.
MAX_QUADRATURE_NODES = 64
#: Probability mass of the upper tail that quadrature_nodes refines geometrically.
TAIL_STRATA_MASS = 0.04


def quadrature_nodes(
    dist: LengthDistribution, max_nodes: int = MAX_QUADRATURE_NODES
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted points ``(values, weights)`` standing in for a length distribution.

    ``E[f(L)] ~= sum_i w_i f(v_i)``.  Exact (the support with its
    probabilities) when the distribution takes at most ``max_nodes`` values.
    Otherwise the probability axis is cut into strata ``(u_{i-1}, u_i]`` and
    each is represented by its conditional mean ``v_i = integral q(u) du /
    (u_i - u_{i-1})`` (``q`` the quantile function) with weight ``u_i - u_{i-1}``:
    exact for any ``f`` affine within a stratum, and ``sum_i w_i v_i = E[L]``
    always.  Three quarters of the nodes cut ``[0, 0.96]`` evenly; the rest
    halve the remaining tail again and again (``1 - 0.04/2^j``), because
    heavy-tailed lengths put much of a convex cost there (for a lognormal
    with sigma 0.9, ``E[L^2]`` comes out within 0.3 %).  Weights sum to 1.
    """
    if dist.is_fixed:
        return np.array([float(dist.tokens)]), np.array([1.0])
    ub = max(dist.upper_bound(), 1)
    s = np.arange(0, ub + 1, dtype=float)
    surv = np.asarray(dist.survival(s), dtype=float)
    cdf = 1.0 - surv  # cdf[l] = P(L <= l)
    pmf = np.diff(cdf)  # pmf[l-1] = P(L = l), l = 1..ub
    lengths = s[1:]
    support = pmf > 0
    if support.sum() <= max_nodes:
        v, w = lengths[support], pmf[support]
        return v, w / w.sum()
    cdf = cdf[1:] / cdf[-1]
    partial = np.concatenate([[0.0], np.cumsum(lengths * pmf / pmf.sum())])

    def integral(u):  # int_0^u q(v) dv
        idx = np.minimum(np.searchsorted(cdf, u, side="left"), cdf.size - 1)
        prev = np.where(idx > 0, cdf[np.maximum(idx - 1, 0)], 0.0)
        return partial[idx] + lengths[idx] * (u - prev)

    body = (3 * max_nodes) // 4
    edges = np.concatenate(
        [
            np.linspace(0.0, 1.0 - TAIL_STRATA_MASS, body + 1),
            1.0 - TAIL_STRATA_MASS * 0.5 ** np.arange(1, max_nodes - body),
            [1.0],
        ]
    )
    widths = np.diff(edges)
    values = np.diff(integral(edges)) / widths
    # strata inside one atom (e.g. the mass a max= clip piles at max) are one node
    merged, where = np.unique(np.round(values, 6), return_inverse=True)
    return merged, np.bincount(where.ravel(), widths, merged.size)
