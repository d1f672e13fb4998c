"""ttcsim's own exceptions.

Every user-facing failure is a :class:`TtcsimError`; the CLI turns it into a
one-line message and exit code 2.  ``where`` names the place (an option, or
``file:line``) so the message can point at it.
"""

from __future__ import annotations


class TtcsimError(ValueError):
    """A problem with the user's input or environment, reported in one line."""

    def __init__(self, message: str, where: str | None = None) -> None:
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


class UnknownNameError(TtcsimError):
    """A hardware, model or strategy name that is not in its registry."""

    def __init__(
        self,
        kind: str,
        name: str,
        valid: list[str],
        where: str | None = None,
        suggestions: list[str] | None = None,
    ):
        shown = ", ".join(valid)
        hint = f"; did you mean {' or '.join(suggestions)}?" if suggestions else ""
        super().__init__(f"unknown {kind} {name!r}{hint}; valid: {shown}", where)
        self.valid = valid
        self.suggestions = suggestions or []


class DoesNotFitError(TtcsimError):
    """The model, its KV cache and workspace do not fit in GPU memory."""


class GpuUnavailableError(TtcsimError):
    """No NVIDIA GPU, no NVML or no torch: the GPU-only commands cannot run."""
