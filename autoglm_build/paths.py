"""Paths taken from a manifest, a config or a graph stay inside their root.

A manifest records artifact paths relative to the workdir; an ONNX graph names its external data
relative to its own directory. Either may have been written by someone else: before anything reads,
writes or deletes such a path it must be relative, free of ``..``, and resolve (symlinks followed)
inside its root. Otherwise the command stops with one line naming where the path came from (exit 2).

Imports on the GPU harness's Python 3.9 without torch.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import List

from autoglm_build.errors import UserError

_FOREIGN = "this was not written by autoglm-build: delete it and rebuild with --force"


class IntegrityError(UserError):
    """A file named by a manifest, config or graph leaves its root, or differs from its record."""


def relative_parts(rel: str, what: str) -> List[str]:
    """The components of a '/'-separated relative path, refusing absolute paths and ``..``.

    Args:
        rel: The path as recorded.
        what: Where it came from (file and record or field), for the message.

    Raises:
        IntegrityError: naming ``what``.
    """
    first = rel.replace("\\", "/").split("/")[0]
    if not rel or rel.startswith(("/", "\\")) or PurePosixPath(rel).is_absolute() or ":" in first:
        raise IntegrityError(f"{what}: path '{rel}' is absolute; only paths inside the workdir are allowed",
                             hint=_FOREIGN)
    parts = rel.replace("\\", "/").split("/")
    if ".." in parts:
        raise IntegrityError(f"{what}: path '{rel}' leaves its directory ('..')", hint=_FOREIGN)
    return [p for p in parts if p not in ("", ".")]


def inside(root: Path, rel: str, what: str) -> Path:
    """``root / rel`` after checking that it stays inside ``root`` with symlinks resolved.

    Raises:
        IntegrityError: an absolute path, ``..``, or a symlink on the way that leaves ``root``.
    """
    path = Path(root).joinpath(*relative_parts(rel, what))
    if not is_inside(Path(root), path):
        raise IntegrityError(f"{what}: {path} resolves to {path.resolve()}, outside {root} (a symlink leaves it)",
                             hint="replace the symlink by the file, or rebuild with --force")
    return path


def is_inside(root: Path, path: Path) -> bool:
    """Whether ``path`` resolves (symlinks followed) to ``root`` or below it."""
    real_root, real = Path(root).resolve(), Path(path).resolve()
    return real == real_root or real_root in real.parents
