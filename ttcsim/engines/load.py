"""Finding engine profiles: shipped YAML by name or alias, a YAML path, or a run record's object.

``get_engine("vllm")`` resolves an alias to a versioned profile
(``vllm-0.5``); an unknown name is a one-line error listing the known ones.
A run record's ``engine`` may be a name or an object
``{"name": ..., "version": ..., <settings>}`` whose settings override the
named profile's (:func:`engine_from_record`).
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path

import yaml
from pydantic import ValidationError

from ttcsim.engines.schema import EngineProfile
from ttcsim.errors import TtcsimError, UnknownNameError
from ttcsim.io import parse_yaml

#: Name of the engine used when none is given (and for run records without ``engine``).
DEFAULT_ENGINE = "reference"

#: Flat keys a run record's engine object may use, and the block they set.
RECORD_SHORTCUTS = {
    "max_num_seqs": ("batching", "max_num_seqs"),
    "batching": ("batching", "policy"),
    "gpu_memory_utilization": ("kv_cache", "gpu_memory_utilization"),
    "kv_allocation": ("kv_cache", "allocation"),
    "chunked_prefill": ("prefill", "chunked"),
    "max_num_batched_tokens": ("prefill", "max_tokens_per_pass"),
    "prefix_caching": ("prefix", "prefix_caching"),
    "cuda_graphs": ("kernels", "cuda_graphs"),
}
_BLOCKS = ("batching", "prefix", "host", "kernels", "kv_cache", "prefill")


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(x) for x in err["loc"]) or "engine"
    got = err.get("input")
    tail = f" (got {got!r})" if isinstance(got, (bool, int, float, str)) else ""
    return f"{loc}: {err['msg']}{tail}"


def _profile_dir() -> Path:
    return Path(str(resources.files("ttcsim.engines.profiles")))


@functools.cache
def _builtin_files() -> dict[str, Path]:
    return {p.stem: p for p in sorted(_profile_dir().glob("*.yaml"))}


@functools.cache
def _builtin_aliases() -> dict[str, str]:
    out: dict[str, str] = {}
    for name, path in _builtin_files().items():
        for alias in load_engine_file(path).aliases:
            out[alias] = name
    return out


def list_engines() -> list[str]:
    """Names of the shipped engine profiles."""
    return list(_builtin_files())


def engine_aliases() -> dict[str, str]:
    """Shipped aliases -> profile names (``vllm`` -> ``vllm-0.5``)."""
    return dict(_builtin_aliases())


def load_engine_file(path: str | Path) -> EngineProfile:
    """Load and validate one engine YAML; errors name the file and the field."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TtcsimError(f"cannot read engine profile: {exc}", str(path)) from None
    data = parse_yaml(text, str(path))
    if not isinstance(data, dict):
        raise TtcsimError("an engine profile must be a YAML mapping", str(path))
    try:
        engine = EngineProfile.model_validate(data)
    except ValidationError as exc:
        raise TtcsimError(_first_error(exc), str(path)) from None
    if path.parent == _profile_dir() and engine.name != path.stem:
        raise TtcsimError(f"name {engine.name!r} differs from the file name", str(path))
    return engine


@functools.lru_cache(maxsize=32)
def _load_builtin(name: str) -> EngineProfile:
    return load_engine_file(_builtin_files()[name])


def get_engine(
    name_or_path: str | Path | EngineProfile | None = None, where: str = "--engine"
) -> EngineProfile:
    """Resolve an engine by name, alias or YAML path (None: :data:`DEFAULT_ENGINE`).

    Raises :class:`~ttcsim.errors.UnknownNameError` listing the known names.
    """
    if isinstance(name_or_path, EngineProfile):
        return name_or_path
    if name_or_path is None:
        name_or_path = DEFAULT_ENGINE
    key = str(name_or_path)
    if key.endswith((".yaml", ".yml")) or "/" in key:
        return load_engine_file(key)
    low = key.lower()
    low = _builtin_aliases().get(low, low)
    if low not in _builtin_files():
        valid = list(_builtin_files()) + sorted(_builtin_aliases())
        raise UnknownNameError("engine", key, valid, where)
    return _load_builtin(low)


def engine_from_record(value, where: str = "engine") -> EngineProfile:
    """The engine a run record names: None (reference), a name, or an object with settings.

    An object ``{"name": "vllm", "version": "0.5.4", "max_num_seqs": 256,
    "gpu_memory_utilization": 0.95, "host": {...}}`` takes the named profile and
    overrides the given settings (flat keys: :data:`RECORD_SHORTCUTS`; whole
    blocks by their names).  ``version`` is recorded, not used to pick a file.
    """
    if value is None or isinstance(value, (str, EngineProfile)):
        return get_engine(value, where)
    if not isinstance(value, dict):
        raise TtcsimError("must be an engine name or an object with a name", where)
    if "name" not in value:
        raise TtcsimError("an engine object needs a name", where)
    base = get_engine(value["name"], where)
    settings: dict = {}
    for key, v in value.items():
        if key in ("name", "version"):
            continue
        if key in RECORD_SHORTCUTS:
            block, field = RECORD_SHORTCUTS[key]
            settings.setdefault(block, {})[field] = v
        elif key in _BLOCKS and isinstance(v, dict):
            settings.setdefault(key, {}).update(v)
        else:
            valid = sorted(set(RECORD_SHORTCUTS) | set(_BLOCKS) | {"name", "version"})
            raise TtcsimError(f"unknown engine setting {key!r}; valid: {', '.join(valid)}", where)
    if "max_num_seqs" in settings.get("batching", {}) and "policy" not in settings["batching"]:
        if base.batching.policy != "continuous":
            settings["batching"]["policy"] = "continuous"
    try:
        engine = base.with_settings(settings)
    except ValidationError as exc:
        raise TtcsimError(_first_error(exc), where) from None
    if value.get("version"):
        engine = engine.model_copy(update={"version": str(value["version"])})
    return engine


def engine_to_yaml(engine: EngineProfile) -> str:
    """Serialise an engine profile; it is re-validated first, so what is written loads."""
    try:
        data = EngineProfile.model_validate(engine.model_dump()).model_dump(mode="json")
    except ValidationError as exc:
        raise TtcsimError(f"invalid engine profile: {_first_error(exc)}", engine.name) from None
    return yaml.safe_dump(data, sort_keys=False, width=100)
