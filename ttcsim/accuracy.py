"""Accuracy tables: measured accuracy of (model, strategy, output-token cap) options.

A table is a YAML or CSV file (format in ``docs/ACCURACY.md``).  Each row says
how accurate one option is on one benchmark, how long its generations are, and
where the number comes from::

    model: deepseek-r1-distill-qwen-7b     # catalog name, alias or config.json
    strategy: vote64                       # single | cot | vote<N> | bon<N>
    benchmark: aime-2024
    difficulty: hard                       # optional class for `ttcsim route`
    accuracy_pct: 83.3                     # [%], 0..100
    output_tokens: lognormal:mean=7800,sigma=0.7,max=32768   # per sample, uncapped
    max_output_tokens: 8192                # optional cap; lengths become min(L, cap)
    source: arXiv 2501.12948, Table 5, AIME 2024 cons@64

A ``defaults:`` block supplies fields shared by every row.  Tables shipped in
``ttcsim/data/accuracy/`` are found by name (``ttcsim pareto --accuracy
deepseek-r1-distill``); the file name equals the table's ``name``.  Every
validation error names ``file:line`` of the offending row or field.
"""

from __future__ import annotations

import csv
import functools
import io
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ttcsim.distributions import ABSOLUTE_MAX_TOKENS, LengthSpec, parse_lengths
from ttcsim.errors import TtcsimError, UnknownNameError
from ttcsim.io import parse_yaml
from ttcsim.units import DTYPE_BYTES

_STRICT = ConfigDict(extra="forbid", frozen=True)

#: Name pattern of a table (also its bundled file name).
_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]*$"


class AccuracyRow(BaseModel):
    """One option's accuracy on one benchmark, with the lengths it generates."""

    model_config = _STRICT

    model: str = Field(min_length=1, description="catalog model, alias or config.json path")
    strategy: str = Field(default="single", description="single | cot | vote<N> | bon<N>")
    benchmark: str = Field(min_length=1)
    difficulty: str | None = Field(default=None, description="class name for routing")
    accuracy_pct: float = Field(ge=0.0, le=100.0, description="accuracy [%]")
    output_tokens: str = Field(description="length spec per sample, before any cap [tokens]")
    max_output_tokens: int | None = Field(
        default=None, ge=1, le=ABSOLUTE_MAX_TOKENS, description="output-token cap [tokens]"
    )
    prompt_tokens: int = Field(default=512, ge=1, le=10_000_000, description="[tokens]")
    concurrency: int = Field(default=1, ge=1, le=1_000_000, description="queries batched")
    tp: int | None = Field(default=None, ge=1, le=64, description="GPUs; None: smallest that fits")
    weight_dtype: str = "bf16"
    reward_model: str | None = None
    source: str = Field(min_length=1, description="where the accuracy comes from")
    note: str | None = None

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        from ttcsim.models import get_model

        try:
            spec = get_model(value)
        except UnknownNameError as exc:
            raise ValueError(
                f"unknown model {value!r} (see `ttcsim models list`; {len(exc.valid)} names known)"
            ) from None
        except TtcsimError as exc:
            raise ValueError(str(exc)) from None
        is_path = "/" in value or value.endswith(".json")
        return value if is_path else spec.name

    @field_validator("strategy", mode="before")
    @classmethod
    def _known_strategy(cls, value) -> str:
        from ttcsim.strategies import parse_strategy

        try:
            return parse_strategy(str(value)).spec
        except TtcsimError as exc:
            raise ValueError(str(exc).removeprefix("--strategy: ")) from None

    @field_validator("benchmark", "difficulty")
    @classmethod
    def _lower(cls, value: str | None) -> str | None:
        return None if value is None else value.strip().lower()

    @field_validator("output_tokens", mode="before")
    @classmethod
    def _valid_lengths(cls, value) -> str:
        text = str(value).strip()
        try:
            parse_lengths(text, "output_tokens")
        except TtcsimError as exc:
            raise ValueError(str(exc).removeprefix("output_tokens: ")) from None
        return text

    @field_validator("weight_dtype")
    @classmethod
    def _dtype(cls, value: str) -> str:
        if value not in DTYPE_BYTES or value == "fp32":
            raise ValueError(f"unknown weight dtype {value!r}; valid: bf16, fp16, fp8, int8, int4")
        return value

    @property
    def samples_per_query(self) -> int:
        """Generated sequences per query (``N`` of ``vote<N>``/``bon<N>``, else 1)."""
        from ttcsim.strategies import parse_strategy

        return parse_strategy(self.strategy).samples_per_query

    def lengths(self) -> LengthSpec:
        """Parsed uncapped length spec."""
        return parse_lengths(self.output_tokens, "output_tokens")


class AccuracyTable(BaseModel):
    """A validated accuracy table.  ``where`` holds ``file:line`` of each row."""

    model_config = _STRICT

    kind: Literal["accuracy-table"] = "accuracy-table"
    version: Literal[1] = 1
    name: str = Field(pattern=_NAME_PATTERN)
    title: str = ""
    example: bool = Field(default=False, description="transcribed example, not for decisions")
    citations: list[str] = Field(default_factory=list)
    assumptions: list[str] = Field(default_factory=list)
    rows: tuple[AccuracyRow, ...] = Field(min_length=1)
    where: tuple[str, ...] = Field(default=(), exclude=True)

    def location(self, index: int) -> str:
        """``file:line`` of row ``index`` (or the table name when unknown)."""
        return self.where[index] if index < len(self.where) else f"{self.name} row {index + 1}"

    @property
    def benchmarks(self) -> list[str]:
        """Benchmarks in order of first appearance."""
        return list(dict.fromkeys(r.benchmark for r in self.rows))


# --------------------------------------------------------------------- loading


def _yaml_lines(text: str) -> tuple[dict[str, int], dict[str, int], list[tuple[int, dict]]]:
    """Line numbers (1-based) of top-level keys, ``defaults`` keys, and each row and its keys."""
    root = yaml.compose(text)
    top: dict[str, int] = {}
    defaults: dict[str, int] = {}
    rows: list[tuple[int, dict]] = []
    if not isinstance(root, yaml.MappingNode):
        return top, defaults, rows
    for key, value in root.value:
        top[str(key.value)] = key.start_mark.line + 1
        if key.value == "defaults" and isinstance(value, yaml.MappingNode):
            defaults = {str(k.value): k.start_mark.line + 1 for k, _ in value.value}
        if key.value == "rows" and isinstance(value, yaml.SequenceNode):
            for item in value.value:
                keys = (
                    {str(k.value): k.start_mark.line + 1 for k, _ in item.value}
                    if isinstance(item, yaml.MappingNode)
                    else {}
                )
                rows.append((item.start_mark.line + 1, keys))
    return top, defaults, rows


def _first_error(exc: ValidationError) -> tuple[str, str]:
    err = exc.errors()[0]
    field = str(err["loc"][0]) if err["loc"] else ""
    msg = err["msg"].removeprefix("Value error, ")
    return field, msg


def _validate_rows(
    raw_rows: list,
    defaults: dict,
    label: str,
    row_lines: list[tuple[int, dict]],
    default_lines: dict[str, int],
) -> tuple[list[AccuracyRow], list[str]]:
    rows: list[AccuracyRow] = []
    where: list[str] = []
    for i, raw in enumerate(raw_rows):
        line, key_lines = row_lines[i] if i < len(row_lines) else (0, {})
        loc = f"{label}:{line}" if line else f"{label} row {i + 1}"
        if not isinstance(raw, dict):
            raise TtcsimError("a row must be a mapping of field: value", loc)
        merged = {**defaults, **{k: v for k, v in raw.items() if v is not None and v != ""}}
        try:
            rows.append(AccuracyRow.model_validate(merged))
        except ValidationError as exc:
            field, msg = _first_error(exc)
            if field in key_lines:
                at = f"{label}:{key_lines[field]}"
            elif field in default_lines and field in defaults:
                at = f"{label}:{default_lines[field]}"
            else:
                at = loc
            name = f"{field}: " if field else ""
            raise TtcsimError(f"{name}{msg}", at) from None
        where.append(loc)
    return rows, where


def _build_table(header: dict, raw_rows: list, label: str, top_lines, default_lines, row_lines):
    defaults = header.pop("defaults", None) or {}
    if not isinstance(defaults, dict):
        raise TtcsimError("defaults must be a mapping", f"{label}:{top_lines.get('defaults', 1)}")
    if not raw_rows:
        raise TtcsimError("the table has no rows", f"{label}:{top_lines.get('rows', 1)}")
    rows, where = _validate_rows(raw_rows, defaults, label, row_lines, default_lines)
    try:
        return AccuracyTable.model_validate({**header, "rows": rows, "where": tuple(where)})
    except ValidationError as exc:
        field, msg = _first_error(exc)
        at = f"{label}:{top_lines[field]}" if field in top_lines else label
        raise TtcsimError(f"{field}: {msg}" if field else msg, at) from None


def parse_yaml_table(text: str, label: str) -> AccuracyTable:
    """Validate a YAML table; ``label`` (the file name) prefixes error locations."""
    data = parse_yaml(text, label)
    top_lines, default_lines, row_lines = _yaml_lines(text)  # parses, as data did
    if not isinstance(data, dict):
        raise TtcsimError("an accuracy table must be a YAML mapping with rows:", label)
    raw_rows = data.pop("rows", None)
    if not isinstance(raw_rows, list):
        raise TtcsimError("rows: must be a list of rows", f"{label}:{top_lines.get('rows', 1)}")
    return _build_table(data, raw_rows, label, top_lines, default_lines, row_lines)


#: CSV metadata comments (``# key: value``) and the table field each fills.
_CSV_META = {
    "name": "name",
    "title": "title",
    "example": "example",
    "citation": "citations",
    "assumption": "assumptions",
}


def parse_csv_table(text: str, label: str, default_name: str) -> AccuracyTable:
    """Validate a CSV table: ``# key: value`` metadata lines, a header row, one row per line."""
    header: dict = {"name": default_name, "citations": [], "assumptions": []}
    meta_lines: dict[str, int] = {}
    body: list[tuple[int, str]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped.startswith("#"):
            key, sep, value = stripped.lstrip("#").partition(":")
            key = key.strip().lower()
            if sep and key in _CSV_META:
                field = _CSV_META[key]
                meta_lines.setdefault(field, number)
                if field in ("citations", "assumptions"):
                    header[field].append(value.strip())
                elif field == "example":
                    header[field] = value.strip().lower() in ("true", "yes", "1")
                else:
                    header[field] = value.strip()
            continue
        if stripped:
            body.append((number, line))
    if not body:
        raise TtcsimError("no header row", label)
    reader = csv.reader(io.StringIO("\n".join(line for _, line in body)))
    records = list(reader)
    columns = [c.strip() for c in records[0]]
    header_line = body[0][0]
    raw_rows, row_lines = [], []
    for (number, _), values in zip(body[1:], records[1:], strict=True):
        if len(values) != len(columns):
            raise TtcsimError(
                f"expected {len(columns)} comma-separated values, got {len(values)}",
                f"{label}:{number}",
            )
        raw_rows.append({c: v.strip() for c, v in zip(columns, values, strict=True)})
        row_lines.append((number, dict.fromkeys(columns, number)))
    top_lines = meta_lines | {"rows": header_line}
    return _build_table(header, raw_rows, label, top_lines, {}, row_lines)


def _bundled_dir():
    return resources.files("ttcsim").joinpath("data/accuracy")


@functools.cache
def bundled_tables() -> dict[str, str]:
    """Names of the tables shipped with ttcsim -> their file names."""
    out: dict[str, str] = {}
    for entry in sorted(_bundled_dir().iterdir(), key=lambda e: e.name):
        if entry.name.endswith((".yaml", ".yml", ".csv")):
            out[entry.name.rsplit(".", 1)[0]] = entry.name
    return out


def _parse(text: str, label: str, file_name: str) -> AccuracyTable:
    stem = file_name.rsplit(".", 1)[0]
    if file_name.endswith(".csv"):
        return parse_csv_table(text, label, stem)
    return parse_yaml_table(text, label)


@functools.lru_cache(maxsize=16)
def _load_bundled(name: str) -> AccuracyTable:
    file_name = bundled_tables()[name]
    text = _bundled_dir().joinpath(file_name).read_text(encoding="utf-8")
    table = _parse(text, file_name, file_name)
    if table.name != name:
        raise TtcsimError(f"name {table.name!r} differs from the file name", file_name)
    return table


def load_accuracy_table(name_or_path: str | Path) -> AccuracyTable:
    """Load a bundled table by name, or a YAML/CSV file by path."""
    key = str(name_or_path)
    if key in bundled_tables():
        return _load_bundled(key)
    path = Path(key)
    if not path.suffix:
        valid = ", ".join(bundled_tables())
        raise TtcsimError(
            f"no bundled table {key!r}; bundled: {valid} (or give a file path)", "--accuracy"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TtcsimError("no such file", str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TtcsimError(f"cannot read: {exc}", str(path)) from None
    return _parse(text, str(path), path.name)
