"""Output sinks (the ``hf`` CLI's model): results on stdout, logs and progress on stderr.

stdout carries only the result: a rich table, or one JSON document with ``--json``. Everything
else (progress, info, warnings) goes to stderr. Rich honours ``NO_COLOR``; when stderr is not a
terminal, progress is plain lines instead of an animation.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any, Callable, Iterator

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn


def _console(to_stderr: bool) -> Console:
    console = Console(stderr=to_stderr)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(stderr=to_stderr, width=160)  # piped or captured: don't squeeze tables to 80
    return console


stdout = _console(False)
stderr = _console(True)


class Reporter:
    """Logs and progress on stderr, at a verbosity.

    Args:
        verbosity: -1 quiet (errors only), 0 normal, 1 verbose.
        console: Where to write (stderr by default).
    """

    def __init__(self, verbosity: int = 0, console: Console = stderr) -> None:
        self.verbosity = verbosity
        self.console = console

    def info(self, message: str) -> None:
        if self.verbosity >= 0:
            self.console.print(message, highlight=False)

    def debug(self, message: str) -> None:
        if self.verbosity >= 1:
            self.console.print(f"[dim]{message}[/dim]", highlight=False)

    def warn(self, message: str) -> None:
        if self.verbosity >= 0:
            self.console.print(f"[yellow]warning:[/yellow] {message}", highlight=False)

    @contextlib.contextmanager
    def task(self, label: str) -> Iterator[Callable[[str], None]]:
        """A unit of work: yields ``status(phase)``; a spinner with elapsed time on a terminal."""
        if self.verbosity < 0:
            yield lambda phase: None
            return
        if not self.console.is_terminal:
            start = time.perf_counter()

            def line(phase: str) -> None:
                self.console.print(f"{label}: {phase} ({time.perf_counter() - start:.1f}s)", highlight=False)

            yield line
            return
        columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
        with Progress(*columns, console=self.console, transient=True) as progress:
            task_id = progress.add_task(label)
            yield lambda phase: progress.update(task_id, description=f"{label}: {phase}")


def print_json(document: Any) -> None:
    """One JSON document on stdout (no rich markup, no wrapping)."""
    print(json.dumps(document, indent=2, default=str))


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def human_count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))
