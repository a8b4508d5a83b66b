"""The build manifest: the one object that flows between stages (``<workdir>/manifest.json``).

It lists every artifact (path relative to the workdir, kind, module, sha256, bytes) and, per stage
and module, a record (status, fingerprint, params, duration, metrics, warnings). It is written
atomically (temp file + ``os.replace``) after each stage, so an interrupted build leaves the last
complete state behind, never a truncated file. Records are committed under a lock on
``<workdir>/.manifest.lock`` onto the file as it is then, so processes building different modules
into one workdir at once (``engine -m decoder`` beside ``engine -m vision``) keep each other's records.

Artifact checks follow DVC's cache model: a file whose size and mtime still match the recorded
ones is taken as unchanged; otherwise its sha256 is recomputed and compared.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from autoglm_build import __version__
from autoglm_build.errors import UserError
from autoglm_build.paths import IntegrityError, is_inside, relative_parts

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
LOCK_NAME = ".manifest.lock"
_CHUNK = 1 << 22


class Artifact(BaseModel):
    """One file a stage produced."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="relative to the workdir, '/'-separated")
    kind: str = Field(description="onnx | onnx-data | ...")
    module: str
    stage: str
    sha256: str
    bytes: int
    mtime_ns: int = 0


class StageRecord(BaseModel):
    """What one stage did for one module."""

    model_config = ConfigDict(extra="forbid")

    stage: str
    module: str
    status: str = Field(description="done | failed")
    fingerprint: str
    params: Dict[str, Any] = Field(default_factory=dict)
    started: float = 0.0
    duration_s: float = 0.0
    metrics: Dict[str, Any] = Field(default_factory=dict)
    warnings: List[str] = Field(default_factory=list)
    artifacts: List[str] = Field(default_factory=list, description="paths of this record's artifacts")


class Manifest(BaseModel):
    """Everything a workdir holds and how it was made."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    tool_version: str = __version__
    config_name: str = ""
    config_path: str = Field("", description="the config file of the last build (absolute)")
    config: Optional[Dict[str, Any]] = Field(
        None, description="the validated config of the last build, paths resolved: commands without -c use it")
    config_sha256: str = Field("", description="sha256 of `config` as canonical JSON")
    updated: float = 0.0
    artifacts: Dict[str, Artifact] = Field(default_factory=dict)
    records: Dict[str, StageRecord] = Field(default_factory=dict)

    # ---- persistence ------------------------------------------------------------------------

    @classmethod
    def load(cls, workdir: Path) -> Manifest:
        """The workdir's manifest, or an empty one if there is none yet.

        Raises:
            UserError: the file exists but is not a manifest this version can read.
        """
        path = Path(workdir) / MANIFEST_NAME
        if not path.is_file():
            return cls()
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except (OSError, ValueError) as exc:  # ValueError: invalid UTF-8 or JSON
            reason = str(exc).splitlines()[0][:120]
            raise UserError(f"{path}: unreadable manifest ({reason})", hint="delete it or pass --force") from None
        if not isinstance(data, dict):
            raise UserError(f"{path}: not a manifest (a JSON {_json_type(data)}, expected an object)",
                            hint="delete it and rebuild into this workdir")
        if data.get("schema_version") != SCHEMA_VERSION:
            raise UserError(
                f"{path}: schema_version: {data.get('schema_version')!r}, this tool reads {SCHEMA_VERSION}",
                hint="rebuild into a fresh workdir",
            )
        try:
            manifest = cls.model_validate(data)
        except ValidationError as exc:
            from autoglm_build.config import format_validation_error

            raise UserError(f"{path}: {format_validation_error(exc)}") from None
        manifest.check_paths(path)
        return manifest

    def check_paths(self, source: Path) -> None:
        """Every recorded path is relative and free of ``..`` (checked at load, before any use).

        Raises:
            IntegrityError: naming the manifest and the record.
        """
        for key, art in self.artifacts.items():
            what = f"{source}: artifact record {art.stage}/{art.module}"
            relative_parts(key, what)
            if art.path != key:
                raise IntegrityError(f"{what}: path '{art.path}' differs from its key '{key}'",
                                     hint="delete the manifest and rebuild with --force")
        for key, rec in self.records.items():
            for rel in rec.artifacts:
                relative_parts(rel, f"{source}: record {key}")

    def save(self, workdir: Path) -> None:
        """Write atomically: a temp file in the same directory, then ``os.replace``."""
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self.updated = time.time()
        atomic_write_text(workdir / MANIFEST_NAME, self.model_dump_json(indent=2) + "\n")

    def commit(self, workdir: Path, updates: Sequence[Tuple[StageRecord, List[Artifact]]] = ()) -> None:
        """Apply ``updates`` (:meth:`put` arguments) to the manifest on disk, under the workdir's lock,
        and save it; this object then holds what was written (other processes' records included)."""
        def put_all(fresh: Manifest) -> None:
            for record, artifacts in updates:
                fresh.put(record, artifacts)

        self.update(workdir, put_all)

    def update(self, workdir: Path, change: Callable[[Manifest], Any]) -> None:
        """Reread the manifest on disk under the workdir's lock, ``change`` it, save it; this object
        then holds what was written. A change that merges with what is stored (bench rows) sees
        what another process stored up to the moment of writing."""
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        with _locked(workdir / LOCK_NAME):
            fresh = Manifest.load(workdir)
            fresh.config_name = self.config_name or fresh.config_name
            fresh.config_path = self.config_path or fresh.config_path
            if self.config is not None:
                fresh.config, fresh.config_sha256 = self.config, self.config_sha256
            change(fresh)
            fresh.save(workdir)
        for name in type(self).model_fields:
            setattr(self, name, getattr(fresh, name))

    # ---- records ----------------------------------------------------------------------------

    @staticmethod
    def key(stage: str, module: str) -> str:
        return f"{stage}/{module}"

    def record(self, stage: str, module: str) -> Optional[StageRecord]:
        return self.records.get(self.key(stage, module))

    def put(self, record: StageRecord, artifacts: List[Artifact]) -> None:
        """Store a record and its artifacts, dropping the artifacts its previous run listed."""
        old = self.records.get(self.key(record.stage, record.module))
        for path in old.artifacts if old else []:
            self.artifacts.pop(path, None)
        for art in artifacts:
            self.artifacts[art.path] = art
        record.artifacts = [a.path for a in artifacts]
        self.records[self.key(record.stage, record.module)] = record

    def artifacts_of(self, stage: str, module: str, kind: Optional[str] = None) -> List[Artifact]:
        rec = self.record(stage, module)
        arts = [self.artifacts[p] for p in rec.artifacts if p in self.artifacts] if rec else []
        return [a for a in arts if kind is None or a.kind == kind]

    def intact(self, workdir: Path, record: StageRecord) -> bool:
        """Whether every artifact of ``record`` is on disk with its recorded content."""
        return all(
            path in self.artifacts and artifact_state(workdir, self.artifacts[path]) == "ok"
            for path in record.artifacts
        )


# --------------------------------------------------------------------------------------------
# Files


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def make_artifact(workdir: Path, path: Path, kind: str, module: str, stage: str) -> Artifact:
    """Hash a file already in its final place under ``workdir``."""
    st = path.stat()
    return Artifact(
        path=path.relative_to(workdir).as_posix(),
        kind=kind,
        module=module,
        stage=stage,
        sha256=sha256_file(path),
        bytes=st.st_size,
        mtime_ns=st.st_mtime_ns,
    )


def artifact_state(workdir: Path, art: Artifact) -> str:
    """``ok``, ``missing``, ``modified`` (size/mtime changed and the sha256 no longer matches) or
    ``outside`` (the path leaves the workdir: absolute, ``..``, or through a symlink; never read)."""
    try:
        path = Path(workdir).joinpath(*relative_parts(art.path, art.path))
    except IntegrityError:
        return "outside"
    if not is_inside(Path(workdir), path):
        return "outside"
    try:
        st = path.stat()
    except FileNotFoundError:
        return "missing"
    if st.st_size != art.bytes:
        return "modified"
    if st.st_mtime_ns == art.mtime_ns:
        return "ok"
    if sha256_file(path) != art.sha256:
        return "modified"
    art.mtime_ns = st.st_mtime_ns  # same content, touched: remember the new mtime
    return "ok"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (``flock``) held for the block; no lock where fcntl is missing."""
    try:
        import fcntl
    except ImportError:  # Windows: single-process use only
        yield
        return
    with open(path, "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old or the new file, never a partial one."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never a partial one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would outlive the rename; other files get 0666 - umask
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process umask (read from /proc where it can be, so no thread sees it changed)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _json_type(data: Any) -> str:
    return {list: "list", type(None): "null", str: "string", bool: "boolean"}.get(type(data), "number")
