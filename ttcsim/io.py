"""File input/output helpers.

* Atomic writes, so no file is ever left half-written: the text goes to a
  temporary file in the target's folder, is flushed to disk, and replaces the
  target with one ``os.replace`` (a reader sees the old file or the new one,
  never a mixture).  The new file gets the usual permissions (``0666`` less
  the umask, or the replaced file's mode), not ``mkstemp``'s ``0600``.
* :func:`load_yaml`: ``yaml.safe_load`` (with libyaml's C parser where
  PyYAML has it) that refuses a mapping with the same key twice (plain
  PyYAML silently keeps the last one, so a duplicated ``idle_power_w:``
  line would change a number without a word);
  :func:`parse_yaml` reports its errors as one line naming the file and line.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import yaml

from ttcsim.errors import TtcsimError


def _new_file_mode(path: Path) -> int:
    """Mode for ``path``: the replaced file's, else ``0666`` less the umask."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write_bytes(path: str | Path, data: bytes, overwrite: bool = True) -> Path:
    """Write ``data`` to ``path`` via a temp file in the same folder and ``os.replace``.

    With ``overwrite=False`` an existing file is an error (use ``--force``).  A
    folder that cannot be created or written is a :class:`TtcsimError` naming
    ``path``; on any failure the temp file is removed and ``path`` is untouched.
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise TtcsimError("exists; pass --force to overwrite", str(path))
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _new_file_mode(path))
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise TtcsimError(f"cannot write: {exc.strerror or exc}", str(path)) from None
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str, overwrite: bool = True) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; see :func:`atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode("utf-8"), overwrite)


#: libyaml's C parser when PyYAML was built with it (about 8x faster), else pure Python.
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _UniqueKeyLoader(_SAFE_LOADER):
    """The safe loader (C where available) that rejects duplicate keys in a mapping.

    Only the constructor is overridden; the C parser keeps node marks, so
    duplicate-key and syntax errors still carry their line numbers.
    """

    def construct_mapping(self, node, deep=False):  # noqa: D102
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # unhashable key: let PyYAML report it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {key!r}",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str):
    """``yaml.safe_load(text)``, but a mapping with a duplicate key is a ``yaml.YAMLError``."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def parse_yaml(text: str, where: str):
    """:func:`load_yaml`, its errors as one-line :class:`TtcsimError` at ``where:line``.

    Used for every user YAML file (profiles, sweep grids, accuracy tables).
    """
    try:
        return load_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"{where}:{mark.line + 1}" if mark else where
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise TtcsimError(f"invalid YAML ({problem})", at) from None
    except RecursionError:
        raise TtcsimError("invalid YAML (nested too deeply)", where) from None
