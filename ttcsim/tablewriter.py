r"""Streaming table writers: Parquet (when pyarrow is importable) or CSV, chunk by chunk.

A writer takes column chunks -- a dict of numpy arrays, label columns as
integer codes into fixed category lists -- and appends them to one file, so
a table of any length is written with the memory of one chunk.  The file is
written under a temporary name and moved into place when the writer closes
(no half-written output after an error).

CSV is formatted with numpy rather than per value in Python: every float is
written as Python's ``repr`` writes it (the shortest decimal that reads back
to the same double, so the file holds the results bit for bit), and the
bytes of a chunk are assembled as one ``(rows, width)`` matrix and compacted
with a mask.  The output is byte-identical to
``DataFrame.to_csv(index=False, lineterminator="\\n")``.
"""

from __future__ import annotations

import os
import tempfile
from fractions import Fraction
from pathlib import Path

import numpy as np

from ttcsim.errors import TtcsimError

#: Rows formatted at once by the CSV writer (bounds its scratch memory).
CSV_BLOCK_ROWS = 1 << 15


def parquet_available() -> bool:
    """Whether pyarrow can be imported (Parquet output)."""
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_format(path: str | Path, fmt: str = "auto") -> str:
    """``csv`` or ``parquet`` from ``fmt`` or, for ``auto``, from the file suffix.

    ``auto`` with a suffix other than ``.csv``/``.parquet``/``.pq`` picks Parquet
    when pyarrow is importable, else CSV.
    """
    suffix = Path(path).suffix.lower()
    if fmt == "auto":
        if suffix == ".csv":
            fmt = "csv"
        elif suffix in (".parquet", ".pq"):
            fmt = "parquet"
        else:
            fmt = "parquet" if parquet_available() else "csv"
    if fmt not in ("csv", "parquet"):
        raise TtcsimError(f"unknown format {fmt!r}; valid: auto, csv, parquet", "--format")
    if fmt == "parquet" and not parquet_available():
        raise TtcsimError(
            "Parquet needs pyarrow (pip install pyarrow); or write CSV (--out FILE.csv)", "--out"
        )
    return fmt


class _AtomicFile:
    """A temporary file beside ``path``, moved onto it by :meth:`commit`."""

    def __init__(self, path: str | Path, overwrite: bool):
        self.path = Path(path)
        if not overwrite and self.path.exists():
            raise TtcsimError("exists; pass --force to overwrite", str(self.path))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        os.close(fd)
        self.tmp = Path(tmp)

    def commit(self) -> None:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o666 & ~umask)  # mkstemp creates 0600
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        self.tmp.unlink(missing_ok=True)


class TableWriter:
    """Append column chunks to a CSV or Parquet file (see the module docstring).

    ``categories`` maps each label column to its labels; such columns arrive as codes.
    """

    def __init__(
        self,
        path: str | Path,
        columns: list[str],
        categories: dict[str, list[str]],
        fmt: str = "auto",
        overwrite: bool = True,
    ):
        self.format = resolve_format(path, fmt)
        self.columns = list(columns)
        self.categories = {k: list(v) for k, v in categories.items() if k in self.columns}
        self._file = _AtomicFile(path, overwrite)
        self.path = self._file.path
        self.rows = 0
        #: threads formatting CSV blocks (1: the sweep already evaluates on another thread)
        self.threads = 1
        self._parquet = None
        self._csv = None
        if self.format == "csv":
            self._csv = open(self._file.tmp, "wb")  # noqa: SIM115 (closed in close())
            self._csv.write((",".join(_csv_quote(c) for c in self.columns) + "\n").encode())
            self._labels = {k: _label_block(v) for k, v in self.categories.items()}

    def write(self, chunk: dict[str, np.ndarray]) -> None:
        """Append one chunk (every column the same length)."""
        n = len(chunk[self.columns[0]])
        if self.format == "csv":
            parts = [
                {k: chunk[k][lo : lo + CSV_BLOCK_ROWS] for k in self.columns}
                for lo in range(0, n, CSV_BLOCK_ROWS)
            ]
            if len(parts) > 1 and self.threads > 1:  # numpy releases the GIL: format in parallel
                from concurrent.futures import ThreadPoolExecutor

                with ThreadPoolExecutor(self.threads) as pool:
                    for text in pool.map(self._csv_bytes, parts):
                        self._csv.write(text)
            else:
                for part in parts:
                    self._csv.write(self._csv_bytes(part))
        else:
            self._write_parquet(chunk)
        self.rows += n

    def close(self) -> Path:
        """Finish the file and move it into place."""
        if self._csv is not None:
            self._csv.close()
        if self.format == "parquet" and self._parquet is None:
            self._write_parquet({k: _empty_column(k, self.categories) for k in self.columns})
        if self._parquet is not None:
            self._parquet.close()
        self._file.commit()
        return self.path

    def abort(self) -> None:
        """Drop the partial file."""
        try:
            if self._csv is not None:
                self._csv.close()
            if self._parquet is not None:
                self._parquet.close()
        finally:
            self._file.discard()

    # -- Parquet ---------------------------------------------------------------

    def _write_parquet(self, chunk: dict[str, np.ndarray]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        arrays = []
        for name in self.columns:
            values = chunk[name]
            if name in self.categories:
                arrays.append(
                    pa.DictionaryArray.from_arrays(
                        pa.array(values.astype(np.int32, copy=False)),
                        pa.array(self.categories[name], type=pa.string()),
                    )
                )
            else:
                arrays.append(pa.array(values))
        table = pa.Table.from_arrays(arrays, names=self.columns)
        if self._parquet is None:
            self._parquet = pq.ParquetWriter(self._file.tmp, table.schema)
        self._parquet.write_table(table)

    # -- CSV -------------------------------------------------------------------

    def _csv_bytes(self, part: dict[str, np.ndarray]) -> bytes:
        blocks, masks = [], []
        comma = None
        for i, name in enumerate(self.columns):
            values = part[name]
            if name in self._labels:
                table, lengths = self._labels[name]
                data = table[values]
                mask = np.arange(table.shape[1])[None, :] < lengths[values][:, None]
            elif values.dtype == bool:
                data, mask = _format_bools(values)
            elif values.dtype.kind in "iu":
                data, mask = _format_ints(values.astype(np.int64))
            else:
                data, mask = format_floats(values.astype(float, copy=False))
            if comma is None:
                comma = np.ones((len(values), 1), dtype=bool)
            blocks.append(data)
            masks.append(mask)
            sep = b"\n" if i == len(self.columns) - 1 else b","
            blocks.append(np.full((len(values), 1), sep[0], dtype=np.uint8))
            masks.append(comma)
        data = np.concatenate(blocks, axis=1)
        mask = np.concatenate(masks, axis=1)
        return data[mask].tobytes()


def _empty_column(name: str, categories: dict) -> np.ndarray:
    return np.zeros(0, dtype=np.int32 if name in categories else float)


def _csv_quote(text: str) -> str:
    if any(ch in text for ch in ',"\n\r'):
        return '"' + text.replace('"', '""') + '"'
    return text


def _label_block(labels: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Encoded labels as a ``(labels, width)`` byte table and their lengths."""
    encoded = [_csv_quote(v).encode() for v in labels]
    width = max([len(e) for e in encoded] + [1])
    table = np.zeros((len(encoded), width), dtype=np.uint8)
    for i, e in enumerate(encoded):
        table[i, : len(e)] = np.frombuffer(e, dtype=np.uint8)
    return table, np.array([len(e) for e in encoded], dtype=np.int64)


_TRUE, _FALSE = np.frombuffer(b"True ", np.uint8), np.frombuffer(b"False", np.uint8)


def _format_bools(values: np.ndarray):
    data = np.where(values[:, None], _TRUE[None, :], _FALSE[None, :])
    mask = np.ones(data.shape, dtype=bool)
    mask[:, 4] = ~values
    return data, mask


_ZERO = ord("0")
#: ASCII of every 4-digit group, as little-endian uint32 (bytes in reading order).
_LUT4 = np.array(
    [int.from_bytes(f"{i:04d}".encode(), "little") for i in range(10_000)], dtype=np.uint32
)


def _digits(values: np.ndarray, groups: int) -> np.ndarray:
    """Non-negative int64 values as ``4*groups`` zero-padded ASCII digits per row."""
    out = np.empty((values.size, groups), dtype=np.uint32)
    rest = values
    for g in range(groups - 1, -1, -1):
        rest, low = np.divmod(rest, 10_000)
        out[:, g] = _LUT4[low]
    return out.view(np.uint8).reshape(values.size, 4 * groups)


def _format_ints(values: np.ndarray):
    neg = values < 0
    mag = np.abs(values)
    digits = _digits(mag, 5)  # up to 20 digits
    nonzero = digits != _ZERO
    first = np.where(nonzero.any(axis=1), nonzero.argmax(axis=1), 19)
    data = np.empty((values.size, 21), dtype=np.uint8)
    data[:, 1:] = digits
    data[:, 0] = ord("-")
    mask = np.arange(21)[None, :] > first[:, None]
    mask[:, 0] = neg
    if neg.any():  # put the sign right before the first digit
        rows = np.flatnonzero(neg)
        data[rows, first[rows]] = ord("-")
        mask[rows, first[rows]] = True
        mask[rows, 0] = first[rows] == 0
    return data, mask


def _pow10_table(lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """``10**j`` for ``j = lo..hi`` as double-double ``(hi, lo)`` pairs."""
    heads, tails = [], []
    for j in range(lo, hi + 1):
        exact = Fraction(10) ** j
        head = float(exact)
        heads.append(head)
        tails.append(float(exact - Fraction(head)))
    return np.array(heads), np.array(tails)


_POW_LO_EXP, _POW_HI_EXP = -300, 300
_POW_HEAD, _POW_TAIL = _pow10_table(_POW_LO_EXP, _POW_HI_EXP)
_SPLIT = 134217729.0  # 2**27 + 1 (Dekker's split)
#: Magnitudes formatted by numpy; outside, per value by Python (denormals, huge values).
_FAST_MIN, _FAST_MAX = 1e-280, 1e280
_FLOAT_WIDTH = 24


def _scaled(a: np.ndarray, k: np.ndarray):
    """``a * 10**(16-k)`` as ``(nearest int64 D, remainder X - D)`` using double-double."""
    j = (16 - k) - _POW_LO_EXP
    head, tail = _POW_HEAD[j], _POW_TAIL[j]
    # Dekker's two-product: a * head == p + e exactly
    p = a * head
    t = _SPLIT * a
    a_hi = t - (t - a)
    a_lo = a - a_hi
    t = _SPLIT * head
    h_hi = t - (t - head)
    h_lo = head - h_hi
    e = ((a_hi * h_hi - p) + a_hi * h_lo + a_lo * h_hi) + a_lo * h_lo
    e = e + a * tail
    whole = np.floor(p)
    frac = (p - whole) + e
    r = np.rint(frac)
    return whole.astype(np.int64) + r.astype(np.int64), frac - r


def _shortest_digits(a: np.ndarray):
    """Digits of the shortest decimal (up to 17 significant) that reads back as ``a``.

    Returns ``(digits, k, nd, unsure)``: 17 ASCII digits of the significand ``D``
    with ``a ~ D * 10**(k-16)``, the count ``nd`` of significant digits, and a mask
    of values too close to a rounding tie or a round-trip boundary to decide in
    double-double precision (those are formatted by Python instead).  The 15- and
    16-digit candidates are the correctly rounded ones; a candidate is used when
    it lies within half the gap to the neighbouring doubles.
    """
    k = np.floor(np.log10(a)).astype(np.int64)
    d, rem = _scaled(a, k)
    for _ in range(3):
        high, low = d >= 10**17, d < 10**16
        if not (high.any() or low.any()):
            break
        fix = np.flatnonzero(high | low)
        k[fix] += np.where(high[fix], 1, -1)
        d[fix], rem[fix] = _scaled(a[fix], k[fix])
    scale = 0.5 * _POW_HEAD[(16 - k) - _POW_LO_EXP]
    half_gap_up = np.spacing(a) * scale  # a power of two has a smaller gap below
    half_gap_down = (a - np.nextafter(a, 0.0)) * scale
    unsure = np.abs(np.abs(rem) - 0.5) < 1e-6
    chosen = d.copy()
    done = np.zeros(a.size, dtype=bool)
    for drop in (2, 1):
        unit = 10**drop
        q, rr = np.divmod(d, unit)
        off = rr + rem  # X - q*unit, in units of the 17th digit
        # candidates q*unit (at -off from X) and (q+1)*unit (at unit-off): the closer one
        # is the correctly rounded decimal; next to a power of two only the other may fit
        low_gap = np.where(off > 0, half_gap_down, half_gap_up)
        ok_low = np.abs(off) < low_gap
        ok_high = unit - off < half_gap_up
        up = np.where(ok_low & ok_high, off > unit / 2, ok_high)
        ok = ~done & (ok_low | ok_high)
        unsure |= ~done & (
            (np.abs(off - unit / 2) < 1e-6)
            | (np.abs(np.abs(off) - low_gap) < 1e-6 * low_gap)
            | (np.abs(unit - off - half_gap_up) < 1e-6 * half_gap_up)
        )
        chosen = np.where(ok, (q + up) * unit, chosen)
        done |= ok
    carry = chosen >= 10**17
    chosen = np.where(carry, chosen // 10, chosen)
    k = k + carry
    digits = _digits(chosen, 5)[:, 3:]  # 17 ASCII digits
    nonzero = digits != _ZERO
    nd = 17 - nonzero[:, ::-1].argmax(axis=1)
    return digits, k, nd, unsure


def format_floats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Format float64 values as Python's ``repr`` does (NaN as an empty field).

    Returns a ``(n, 24)`` byte matrix and a mask of the bytes that belong to each value.
    """
    n = x.size
    data = np.zeros((n, _FLOAT_WIDTH), dtype=np.uint8)
    length = np.zeros(n, dtype=np.int64)
    a = np.abs(x)
    neg = np.signbit(x) & ~np.isnan(x)
    fast = (a >= _FAST_MIN) & (a <= _FAST_MAX)
    idx = np.flatnonzero(fast)
    if idx.size:
        digits, k, nd, unsure = _shortest_digits(a[idx])
        fast[idx[unsure]] = False
        decpt = k + 1
        positional = (decpt > -4) & (decpt <= 16)
        for value in np.unique(decpt[positional]).tolist():
            sel = np.flatnonzero(positional & (decpt == value))
            rows, dg, nds = idx[sel], digits[sel], nd[sel]
            if value >= 1:
                block = np.empty((sel.size, 18), dtype=np.uint8)
                block[:, :value] = dg[:, :value]
                block[:, value] = ord(".")
                block[:, value + 1 :] = dg[:, value:]
                data[rows, :18] = block
                length[rows] = np.maximum(nds, value + 1) + 1
            else:
                zeros = -value
                block = np.full((sel.size, 19 + zeros), _ZERO, dtype=np.uint8)
                block[:, 1] = ord(".")
                block[:, 2 + zeros :] = dg
                data[rows, : 19 + zeros] = block
                length[rows] = 2 + zeros + nds
        sci = np.flatnonzero(~positional)
        if sci.size:
            exp = decpt[sci] - 1
            exp_digits = np.where(np.abs(exp) >= 100, 3, 2)
            for count in np.unique(nd[sci]).tolist():
                for width in (2, 3):
                    sub = sci[(nd[sci] == count) & (exp_digits == width)]
                    if not sub.size:
                        continue
                    rows, dg, e = idx[sub], digits[sub], decpt[sub] - 1
                    size = (count + 1 if count > 1 else 1) + 2 + width
                    block = np.empty((sub.size, size), dtype=np.uint8)
                    block[:, 0] = dg[:, 0]
                    pos = 1
                    if count > 1:
                        block[:, 1] = ord(".")
                        block[:, 2 : count + 1] = dg[:, 1:count]
                        pos = count + 1
                    block[:, pos] = ord("e")
                    block[:, pos + 1] = np.where(e < 0, ord("-"), ord("+"))
                    mag = np.abs(e)
                    for w in range(width):
                        block[:, pos + 2 + w] = _ZERO + (mag // 10 ** (width - 1 - w)) % 10
                    data[rows, :size] = block
                    length[rows] = size
    zero = np.flatnonzero(a == 0)
    data[zero, :3] = np.frombuffer(b"0.0", np.uint8)
    length[zero] = 3
    inf = np.flatnonzero(np.isinf(a))
    data[inf, :3] = np.frombuffer(b"inf", np.uint8)
    length[inf] = 3
    other = np.flatnonzero(~fast & (a > 0) & np.isfinite(a))
    for i in other.tolist():
        text = repr(float(a[i])).encode()
        data[i, : len(text)] = np.frombuffer(text, np.uint8)
        length[i] = len(text)
    signed = np.flatnonzero(neg)
    if signed.size:
        data[signed, 1:] = data[signed, :-1]
        data[signed, 0] = ord("-")
        length[signed] += 1
    mask = np.arange(_FLOAT_WIDTH)[None, :] < length[:, None]
    return data, mask
