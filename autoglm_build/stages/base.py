"""What a stage is: a configured callable from artifacts (and the config) to artifacts.

Stages never call each other; :mod:`autoglm_build.pipeline` orders them, skips those whose
fingerprint and outputs still match, and records what they did in the manifest.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from autoglm_build import __version__
from autoglm_build.config import BuildConfig
from autoglm_build.manifest import Manifest


@dataclass
class StageContext:
    """What a stage run may read: the config, the workdir and its manifest, a status callback."""

    cfg: BuildConfig
    workdir: Path
    manifest: Manifest
    status: Callable[[str], None] = lambda message: None


@dataclass
class StageResult:
    """What a stage run produced: files already in their final place, with their kinds."""

    outputs: List[Tuple[Path, str]]
    params: Dict[str, Any] = field(default_factory=dict)
    metrics: Dict[str, Any] = field(default_factory=dict)
    warnings: List[str] = field(default_factory=list)


class Stage:
    """Base class. ``version`` is bumped whenever a change to the stage's code changes its output."""

    name: str = ""
    version: int = 1
    #: distributions whose versions change this stage's output (hashed into the fingerprint)
    tools: Tuple[str, ...] = ()

    def fingerprint_data(self, ctx: StageContext, module: str) -> Dict[str, Any]:
        """Everything that determines this stage's output for ``module``, as JSON-able data."""
        raise NotImplementedError

    def fingerprint(self, ctx: StageContext, module: str) -> str:
        data = {
            "stage": self.name,
            "stage_version": self.version,
            "code": source_hash(type(self)),
            "autoglm_build": __version__,
            "tools": {name: dist_version(name) for name in self.tools},
            "data": self.fingerprint_data(ctx, module),
        }
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    def __call__(self, ctx: StageContext, module: str) -> StageResult:
        raise NotImplementedError


def source_hash(obj: Any) -> str:
    """sha256 of the file that defines ``obj``: editing a stage's or module's code invalidates its cache."""
    import inspect

    return hashlib.sha256(Path(inspect.getfile(obj)).read_bytes()).hexdigest()


def dist_version(name: str) -> Optional[str]:
    """An installed distribution's version without importing it (torch's import alone takes seconds)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
