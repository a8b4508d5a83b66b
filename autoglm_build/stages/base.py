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
from autoglm_build.workdir import Build


@dataclass
class StageContext:
    """What a stage run may read: the config, the workdir and its manifest, a status callback."""

    cfg: BuildConfig
    workdir: Path
    manifest: Manifest
    status: Callable[[str], None] = lambda message: None

    @property
    def build(self) -> Build:
        """The opened build: a stage reads its inputs through it (checked against their records)."""
        return Build(self.workdir, self.manifest, self.cfg)


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
    #: runs once per part of a staged module (``decoder.stage0``, ...; each part its own graph), or
    #: once per module (False: the stage takes a staged module as one)
    per_part: bool = True

    def fingerprint_data(self, ctx: StageContext, module: str) -> Dict[str, Any]:
        """Everything that determines this stage's output for ``module``, as JSON-able data."""
        raise NotImplementedError

    def reads_prompts(self, cfg: BuildConfig) -> bool:
        """Whether the stage tokenizes the calibration prompts (for embed and the decoder): the pipeline then
        checks the tokenizer and the prompts before any stage starts."""
        return False

    def check_inputs(self, cfg: BuildConfig, modules: List[str]) -> None:
        """Inputs from outside the workdir (calibration data, ...), checked before any stage of a run
        starts, so a missing one stops the run before anything is written. Raises UserError."""

    def fingerprint(self, ctx: StageContext, module: str) -> str:
        data = {
            "stage": self.name,
            "stage_version": self.version,
            "code": code_hash(type(self), module),
            "autoglm_build": __version__,
            "tools": {name: dist_version(name) for name in self.tools},
            "data": self.fingerprint_data(ctx, module),
        }
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    def __call__(self, ctx: StageContext, module: str) -> StageResult:
        raise NotImplementedError


def code_hash(stage_cls: type, module: str) -> str:
    """sha256 over every package file ``stage_cls`` runs for ``module``: the stage's file and every
    ``autoglm_build`` module it imports, transitively (imports inside functions included), with the
    modality files (``modules/<name>.py``) replaced by ``module``'s own. Editing ``precision.py``
    then invalidates the calibrate records, editing ``modules/vision.py`` only the vision ones."""
    from autoglm_build.parts import split_name

    names = import_closure(stage_cls.__module__, exclude=modality_modules())
    own = f"{PACKAGE}.modules.{split_name(module)[0]}"  # a stage of a staged module: the module's file
    if module_file(own) is not None:
        names |= import_closure(own, exclude=modality_modules() - {own})
    digest = hashlib.sha256()
    for name in sorted(names):
        path = module_file(name)
        if path is not None:
            digest.update(f"{name}\0".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


PACKAGE = "autoglm_build"
#: where the package's sources are read from (a test points it at a copy)
PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def module_file(name: str) -> Optional[Path]:
    """The source file of package module ``name`` (``autoglm_build.x.y``), or None if it has none."""
    parts = name.split(".")[1:]
    base = PACKAGE_ROOT.joinpath(*parts)
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def modality_modules() -> frozenset:
    """Package modules that register a modality (``@register(...)`` in ``modules/``)."""
    import re

    folder = PACKAGE_ROOT / "modules"
    return frozenset(f"{PACKAGE}.modules.{p.stem}" for p in sorted(folder.glob("*.py"))
                     if re.search(r"^@register\(", p.read_text(encoding="utf-8"), re.M))


def import_closure(name: str, exclude: frozenset = frozenset()) -> set:
    """``name`` and every package module it imports, transitively, minus ``exclude`` (not followed)."""
    seen, todo = set(), [name]
    while todo:
        current = todo.pop()
        if current in seen or current in exclude or module_file(current) is None:
            continue
        seen.add(current)
        todo += [n for n in _imports(module_file(current), current) if n not in seen]
    return seen


def _imports(path: Path, name: str) -> List[str]:
    """Package modules named by the import statements of ``path`` (anywhere in it), with the packages
    on the way (their ``__init__`` runs too)."""
    import ast

    tree = ast.parse(path.read_bytes(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: List[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            parts = target.split(".")
            if parts[0] == PACKAGE:
                found += [".".join(parts[:i]) for i in range(2, len(parts) + 1)]
    return found


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
