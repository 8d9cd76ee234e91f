"""Progress on stderr: rich progress bars on a terminal, one plain line per step otherwise (logs, CI)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO


class Progress:
    def __init__(self, stream: TextIO | None = None, *, enabled: bool = True) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = enabled and self.stream.isatty()
        self._rich: Any = None
        self._started = time.monotonic()

    def __enter__(self) -> Progress:
        if self.tty:
            from rich.console import Console
            from rich.progress import BarColumn, DownloadColumn, TextColumn
            from rich.progress import Progress as RichProgress

            self._rich = RichProgress(
                TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                console=Console(file=self.stream), transient=False,
            )
            self._rich.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._rich is not None:
            self._rich.__exit__(None, None, None)
            self._rich = None

    def note(self, message: str) -> None:
        if not self.enabled:
            return
        if self._rich is not None:
            self._rich.console.print(message)
        else:
            elapsed = time.monotonic() - self._started
            self.stream.write(f"salmiac [{elapsed:6.1f}s] {message}\n")
            self.stream.flush()

    @contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Any]:
        """Yields an ``advance(n)`` callable."""
        if self._rich is not None:
            task_id = self._rich.add_task(description, total=total)
            yield lambda n: self._rich.advance(task_id, n)
            self._rich.update(task_id, completed=total if total is not None else None)
        else:
            self.note(description + (f" ({total / (1 << 20):.1f} MiB)" if total else ""))
            yield lambda n: None
