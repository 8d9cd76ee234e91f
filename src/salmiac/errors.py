"""Errors raised across salmiac.

Only ``salmiac.cli.main`` turns them into an exit: one clear line on stderr, then the exit code.
``RequestError`` (exit 2) is for bad usage, requests and inputs the user can fix; ``RuntimeFailure``
(exit 1) is for failures of our own or of the environment while doing valid work.
"""

from __future__ import annotations


class SalmiacError(Exception):
    """Base class. ``str(err)`` is the one line shown to the user."""

    exit_code: int = 1

    def diagnostics(self) -> str:
        """Advice on how to fix it, if any (shown with -v)."""
        return ""


class RequestError(SalmiacError):
    """Bad usage, bad conversion request, bad or malicious input image. Exit 2."""

    exit_code = 2


class ImageError(RequestError):
    """The input image cannot be read or is unsafe (digest mismatch, traversal, bomb...)."""


class RegistryError(SalmiacError):
    """A registry refused or failed a request (auth, not found, network). Exit 1 unless user error."""


class RuntimeFailure(SalmiacError):
    """A failure of salmiac itself or its environment (QEMU missing, enclave crashed...). Exit 1."""

    exit_code = 1
