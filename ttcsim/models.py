"""Model architectures: the catalog and Hugging Face ``config.json`` files.

A :class:`ModelSpec` holds what the cost model needs of a decoder-only
transformer: layer count and widths, attention heads (GQA), FFN width, vocab,
tied embeddings, and for mixture-of-experts models the expert counts.  Values
in the catalog (``ttcsim/data/models.yaml``) are transcribed from each
model's published ``config.json``; the entry's ``source`` names it.
"""

from __future__ import annotations

import difflib
import functools
import json
import re
from importlib import resources
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ttcsim.errors import TtcsimError, UnknownNameError


class ModelSpec(BaseModel):
    """Architecture of a decoder-only transformer (dense or MoE)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    aliases: list[str] = Field(default_factory=list)
    family: str = "llama"
    n_layers: int = Field(ge=1, le=1000)
    hidden_size: int = Field(ge=16, le=131072)
    n_heads: int = Field(ge=1, le=1024)
    n_kv_heads: int = Field(ge=1, le=1024)
    head_dim: int = Field(ge=8, le=1024)
    intermediate_size: int = Field(ge=16, le=1048576, description="dense FFN width")
    vocab_size: int = Field(ge=2, le=10_000_000)
    tie_word_embeddings: bool = False
    attention_bias: bool = Field(default=False, description="bias on q/k/v projections (Qwen2)")
    n_experts: int = Field(default=0, ge=0, le=4096, description="routed experts; 0 = dense")
    n_active_experts: int = Field(default=0, ge=0, le=4096, description="experts per token")
    moe_intermediate_size: int | None = Field(default=None, ge=16, le=1048576)
    n_shared_experts: int = Field(default=0, ge=0, le=64)
    n_dense_layers: int = Field(
        default=0, ge=0, le=1000, description="leading dense-FFN layers of an MoE model"
    )
    max_context_tokens: int = Field(default=131072, ge=128, le=10_000_000)
    ffn_gated: bool = Field(default=True, description="gated FFN (SwiGLU/GeGLU: 3 matrices)")
    linear_bias: bool = Field(
        default=False, description="biases on every linear layer and LayerNorm (StarCoder2)"
    )
    norms_per_layer: int = Field(default=2, ge=0, le=8, description="norm weight vectors")
    sliding_window_tokens: int | None = Field(default=None, ge=1, le=10_000_000)
    n_sliding_layers: int = Field(
        default=0, ge=0, le=1000, description="layers attending only the last window"
    )
    kv_lora_rank: int | None = Field(default=None, ge=1, le=65536, description="MLA latent")
    q_lora_rank: int | None = Field(default=None, ge=1, le=65536)
    qk_rope_head_dim: int = Field(default=0, ge=0, le=1024)
    v_head_dim: int | None = Field(default=None, ge=1, le=1024)
    source: str = "user config"

    @model_validator(mode="after")
    def _checks(self) -> ModelSpec:
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads {self.n_heads} not a multiple of n_kv_heads {self.n_kv_heads}"
            )
        if self.n_experts:
            if not 1 <= self.n_active_experts <= self.n_experts:
                raise ValueError("need 1 <= n_active_experts <= n_experts for an MoE model")
        elif self.n_active_experts:
            raise ValueError("n_active_experts set on a dense model (n_experts = 0)")
        if self.n_dense_layers > (self.n_layers if self.n_experts else 0):
            raise ValueError("n_dense_layers must be <= n_layers, and only on an MoE model")
        if self.n_sliding_layers > self.n_layers:
            raise ValueError("n_sliding_layers must be <= n_layers")
        if self.n_sliding_layers and self.sliding_window_tokens is None:
            raise ValueError("n_sliding_layers set without sliding_window_tokens")
        if self.kv_lora_rank is not None and self.head_dim <= self.qk_rope_head_dim:
            raise ValueError("MLA head_dim (qk_nope + qk_rope) must exceed qk_rope_head_dim")
        return self

    @property
    def is_mla(self) -> bool:
        """Whether attention is DeepSeek multi-head latent attention (a latent KV cache)."""
        return self.kv_lora_rank is not None

    @property
    def n_moe_layers(self) -> int:
        """Layers whose FFN is a mixture of experts (all but the leading dense ones)."""
        return self.n_layers - self.n_dense_layers if self.is_moe else 0

    @property
    def value_head_dim(self) -> int:
        """Width of one head's value (MLA ``v_head_dim``; else ``head_dim``)."""
        return self.v_head_dim or self.head_dim

    @property
    def is_moe(self) -> bool:
        """Whether the FFN is a mixture of experts."""
        return self.n_experts > 0

    @property
    def expert_intermediate_size(self) -> int:
        """FFN width of one routed expert."""
        return self.moe_intermediate_size or self.intermediate_size


@functools.lru_cache(maxsize=1)
def _catalog() -> dict[str, ModelSpec]:
    text = resources.files("ttcsim").joinpath("data/models.yaml").read_text(encoding="utf-8")
    entries = yaml.safe_load(text)["models"]
    return {e["name"]: ModelSpec.model_validate(e) for e in entries}


@functools.lru_cache(maxsize=1)
def _aliases() -> dict[str, str]:
    return {a.lower(): m.name for m in _catalog().values() for a in m.aliases}


#: Name parts that mark a fine-tuned or re-packaged variant of the same architecture.
_VARIANT = re.compile(r"-(?:instruct|chat|it|hf|base)(?=-|$)")


def _hub_repo(source: str) -> str | None:
    """The ``org/repo`` a catalog ``source`` starts with (``None`` if it names none)."""
    head = source.split()[0] if source.split() else ""
    return head.lower() if re.fullmatch(r"[\w.-]+/[\w.-]+", head) else None


@functools.lru_cache(maxsize=1)
def _name_index() -> dict[str, str]:
    """Every spelling that resolves to a catalog name: names, aliases, hub ids, base forms."""
    index: dict[str, str] = {}
    for m in _catalog().values():
        repo = _hub_repo(m.source)
        for key in (m.name, *m.aliases, *((repo, repo.split("/")[1]) if repo else ())):
            for form in _name_forms(key.lower()):
                index.setdefault(form, m.name)
    return index


def _name_forms(key: str) -> list[str]:
    """``key`` and its base forms: organisation dropped, ``meta-``/variant parts removed.

    ``meta-llama/Meta-Llama-3.1-8B-Instruct`` -> ``meta-llama/meta-llama-3.1-8b-instruct``,
    ``meta-llama-3.1-8b-instruct``, ``llama-3.1-8b-instruct``, ``llama-3.1-8b``.
    """
    forms = [key]
    repo = key.rsplit("/", 1)[-1]
    for form in (repo, repo.removeprefix("meta-")):
        forms += [form, _VARIANT.sub("", form)]
    return list(dict.fromkeys(forms))


def resolve_model_name(name: str) -> str | None:
    """The catalog name ``name`` refers to, case-insensitively, or ``None``.

    Accepts catalog names, aliases, Hugging Face hub ids of the catalog's
    sources (``Qwen/Qwen2.5-7B-Instruct``) and their variants: another
    organisation prefix, ``Meta-`` in front, ``-Instruct``/``-Chat``/``-it``/
    ``-hf``/``-Base`` parts (same architecture, other weights).
    """
    index = _name_index()
    for form in _name_forms(name.strip().lower()):
        if form in index:
            return index[form]
    return None


def list_models() -> list[ModelSpec]:
    """All catalog models, in catalog order."""
    return list(_catalog().values())


def _int(cfg: dict, *keys: str, default: int | None = None) -> int:
    """The first of ``keys`` present, as a whole number (``4096.0`` passes, ``4096.7`` not)."""
    for k in keys:
        v = cfg.get(k)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (
            isinstance(v, float) and not v.is_integer()
        ):
            raise ValueError(f"{k} must be a whole number, got {v!r}")
        return int(v)
    if default is None:
        raise KeyError(keys[0])
    return default


def _bool(cfg: dict, key: str, default: bool) -> bool:
    """A JSON boolean (the string ``"false"`` is not silently true)."""
    v = cfg.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ValueError(f"{key} must be true or false, got {v!r}")
    return v


#: ``model_type`` values whose config class defaults ``tie_word_embeddings`` to true
#: (transformers' Gemma/Gemma2/Gemma3/Starcoder2/GPT-2 configs; Phi-3-small's own).
_TIED_BY_DEFAULT = frozenset(
    {"gemma", "gemma2", "gemma3", "gemma3_text", "starcoder2", "gpt2", "phi3small"}
)
#: ``model_type`` values with pre- and post-norms around attention and FFN (4 per layer).
_FOUR_NORMS = frozenset({"gemma2", "gemma3", "gemma3_text"})
#: Families whose ``sliding_window`` is only used with ``use_sliding_window: true``.
_QWEN_WINDOW = frozenset({"qwen2", "qwen2_moe", "qwen3", "qwen3_moe"})


def _sliding_layers(cfg: dict, n_layers: int) -> tuple[int | None, int]:
    """``(window, sliding layer count)`` from a config's attention-pattern keys.

    In order: ``layer_types`` (count of ``"sliding_attention"``); Qwen2/3's
    ``use_sliding_window`` with layers ``i >= max_window_layers`` sliding;
    Gemma-2's even layers; Gemma-3's ``sliding_window_pattern`` (every
    ``pattern``-th layer global, default 6); else every layer when
    ``sliding_window`` is set (Mistral-7B-v0.1, StarCoder2, Phi-3).
    ``(None, 0)`` when the model has no window.
    """
    window = cfg.get("sliding_window")
    if window is None or cfg.get("use_sliding_window") is False:
        return None, 0
    window = _int(cfg, "sliding_window")
    kind = cfg.get("model_type")
    types = cfg.get("layer_types")
    if isinstance(types, list):
        if len(types) != n_layers:
            raise ValueError(f"layer_types has {len(types)} entries for {n_layers} layers")
        n = sum(t == "sliding_attention" for t in types)
    elif kind in _QWEN_WINDOW:
        if not _bool(cfg, "use_sliding_window", False):
            return None, 0
        n = max(n_layers - _int(cfg, "max_window_layers", default=28), 0)
    elif kind == "gemma2":
        n = (n_layers + 1) // 2  # layer i slides when i is even
    elif kind in ("gemma3", "gemma3_text"):
        n = n_layers - n_layers // _int(cfg, "sliding_window_pattern", default=6)
    else:
        n = n_layers
    return (window, n) if n else (None, 0)


def _moe_fields(cfg: dict) -> dict:
    """Expert counts and layout: Mixtral, Qwen-MoE and DeepSeek key names."""
    n_experts = _int(cfg, "num_local_experts", "num_experts", "n_routed_experts", default=0)
    if not n_experts:
        return {}
    width = cfg.get("moe_intermediate_size")
    shared = _int(cfg, "n_shared_experts", default=0)
    shared_width = cfg.get("shared_expert_intermediate_size")  # Qwen-MoE: one wide shared FFN
    if shared_width and width and not shared:
        if shared_width % width:
            raise ValueError("shared_expert_intermediate_size not a multiple of the expert width")
        shared = shared_width // width
    return {
        "n_experts": n_experts,
        "n_active_experts": _int(cfg, "num_experts_per_tok", "num_experts_per_token"),
        "moe_intermediate_size": width,
        "n_shared_experts": shared,
        "n_dense_layers": _int(cfg, "first_k_dense_replace", default=0),
    }


def _mla_fields(cfg: dict) -> dict:
    """DeepSeek multi-head latent attention: latent ranks and head dims; ``{}`` without MLA."""
    if cfg.get("kv_lora_rank") is None:
        return {}
    rope = _int(cfg, "qk_rope_head_dim")
    return {
        "kv_lora_rank": _int(cfg, "kv_lora_rank"),
        "q_lora_rank": cfg.get("q_lora_rank"),
        "qk_rope_head_dim": rope,
        "v_head_dim": _int(cfg, "v_head_dim"),
        "head_dim": _int(cfg, "qk_nope_head_dim") + rope,
    }


_SHA = re.compile(r"[0-9a-f]{40}")


def _name_from_path(folder: Path) -> str | None:
    """``org/name`` of an HF cache folder (``models--org--name``), else a non-SHA folder name."""
    for part in reversed(folder.parts):
        if part.startswith("models--"):
            return part.removeprefix("models--").replace("--", "/")
    if folder.name and not _SHA.fullmatch(folder.name) and folder.name != "snapshots":
        return folder.name
    return None


def name_from_hf_config(cfg: dict, path: Path | None = None) -> str:
    """A model name for ``cfg``: its ``_name_or_path``, else the file's location, else its type.

    ``_name_or_path`` (its hub id, or a path's last two parts); an HF cache
    location ``models--org--name/snapshots/<sha>/`` gives ``org/name``; a folder
    named otherwise than a commit SHA gives its name; else ``architectures[0]``
    or ``model_type``.
    """
    given = cfg.get("_name_or_path")
    if isinstance(given, str) and given.strip():
        if not given.startswith(("/", ".", "~")) and given.count("/") <= 1:
            return given  # a hub id or a bare name
        name = _name_from_path(Path(given))  # a local path when the config was saved
        if name:
            return name
    if path is not None:
        name = _name_from_path(path.resolve().parent)
        if name:
            return name
    arch = cfg.get("architectures")
    if isinstance(arch, list) and arch and isinstance(arch[0], str):
        return arch[0]
    return str(cfg.get("model_type", "custom"))


def spec_from_hf_config(cfg: dict, name: str | None = None) -> ModelSpec:
    """Build a :class:`ModelSpec` from a Hugging Face ``config.json`` mapping.

    Reads the Llama/Qwen/Mistral/Mixtral key names (``num_hidden_layers``,
    ``num_key_value_heads``, ``num_local_experts`` / ``num_experts``,
    ``num_experts_per_tok``, ``moe_intermediate_size``, ...), Gemma-2/3, Phi-3,
    StarCoder2 (``use_bias``, plain MLP) and DeepSeek-V2/V3 (MLA, shared
    experts, ``first_k_dense_replace``).  Defaults follow each model type's
    transformers config class (``tie_word_embeddings`` is true for Gemma and
    StarCoder2).  Sliding windows: :func:`_sliding_layers`.  ``name``
    defaults to :func:`name_from_hf_config`.
    """
    if "text_config" in cfg and isinstance(cfg["text_config"], dict):
        cfg = {**cfg, **cfg["text_config"]}
    name = name or name_from_hf_config(cfg)
    kind = str(cfg.get("model_type", "llama"))
    hidden = _int(cfg, "hidden_size", "n_embd", "d_model")
    n_heads = _int(cfg, "num_attention_heads", "n_head")
    if n_heads < 1:
        raise ValueError(f"num_attention_heads must be >= 1, got {n_heads}")
    n_layers = _int(cfg, "num_hidden_layers", "n_layer")
    window, n_sliding = _sliding_layers(cfg, n_layers)
    fields = {
        "head_dim": _int(cfg, "head_dim", default=hidden // n_heads),
        "attention_bias": _bool(cfg, "attention_bias", kind == "qwen2"),
        **_moe_fields(cfg),
        **_mla_fields(cfg),
    }
    return ModelSpec(
        name=name,
        family=kind,
        n_layers=n_layers,
        hidden_size=hidden,
        n_heads=n_heads,
        n_kv_heads=_int(cfg, "num_key_value_heads", default=n_heads),
        intermediate_size=_int(
            cfg, "intermediate_size", "ff_intermediate_size", "ffn_dim", default=4 * hidden
        ),
        vocab_size=_int(cfg, "vocab_size"),
        tie_word_embeddings=_bool(cfg, "tie_word_embeddings", kind in _TIED_BY_DEFAULT),
        max_context_tokens=_int(cfg, "max_position_embeddings", default=131072),
        ffn_gated=kind != "starcoder2",
        linear_bias=_bool(cfg, "use_bias", True) if kind == "starcoder2" else kind == "phi3small",
        norms_per_layer=4 if kind in _FOUR_NORMS else 2,
        sliding_window_tokens=window,
        n_sliding_layers=n_sliding,
        source=f"config.json ({name})",
        **fields,
    )


def load_hf_config(path: str | Path) -> ModelSpec:
    """Read a Hugging Face ``config.json``; errors name the file."""
    path = Path(path)
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise TtcsimError(f"cannot read config: {exc}", str(path)) from None
    except json.JSONDecodeError as exc:
        raise TtcsimError(f"invalid JSON ({exc.msg})", f"{path}:{exc.lineno}") from None
    except (ValueError, RecursionError) as exc:  # 5000-digit numbers, 100000-deep nesting
        raise TtcsimError(f"invalid JSON ({exc})", str(path)) from None
    if not isinstance(cfg, dict):
        raise TtcsimError("config.json must hold a JSON object", str(path))
    try:
        return spec_from_hf_config(cfg, name=name_from_hf_config(cfg, path))
    except KeyError as exc:
        raise TtcsimError(f"missing key {exc.args[0]!r}", str(path)) from None
    except (ValidationError, TypeError, ValueError) as exc:
        if isinstance(exc, ValidationError):
            err = exc.errors()[0]
            msg = f"{'.'.join(str(x) for x in err['loc']) or 'config'}: {err['msg']}"
        else:
            msg = str(exc)
        raise TtcsimError(f"unusable config: {msg}", str(path)) from None


def get_model(name_or_path: str | Path | ModelSpec) -> ModelSpec:
    """Resolve a catalog name, alias, hub id (:func:`resolve_model_name`) or ``config.json`` path.

    An existing path wins over a hub id of the same spelling.  An unknown name
    raises :class:`~ttcsim.errors.UnknownNameError` listing the closest names first.
    """
    if isinstance(name_or_path, ModelSpec):
        return name_or_path
    key = str(name_or_path)
    p = Path(key)
    if key.endswith(".json") or p.exists() and "/" in key:
        return load_hf_config(p / "config.json" if p.is_dir() else p)
    resolved = resolve_model_name(key)
    if resolved is not None:
        return _catalog()[resolved]
    if "/" in key and (key.startswith((".", "/", "~")) or key.count("/") > 1):
        return load_hf_config(p / "config.json")  # a path that does not exist: say so
    valid = list(_catalog()) + sorted(_aliases())
    close = difflib.get_close_matches(key.lower().rsplit("/", 1)[-1], list(_name_index()), n=3)
    suggestions = list(dict.fromkeys(_name_index()[c] for c in close))
    raise UnknownNameError("model", key, valid, "--model", suggestions)
