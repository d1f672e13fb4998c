"""File output helpers: atomic writes so no file is ever left half-written."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ttcsim.errors import TtcsimError


def atomic_write_text(path: str | Path, text: str, overwrite: bool = True) -> Path:
    """Write ``text`` to ``path`` via a temp file in the same folder and ``os.replace``.

    With ``overwrite=False`` an existing file is an error (use ``--force``).
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise TtcsimError("exists; pass --force to overwrite", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
