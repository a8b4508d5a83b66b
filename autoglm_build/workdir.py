"""One opened build: which file, is it intact, is it ours.

A workdir travels through the tool as a :class:`Build`: the directory, its manifest and (when
known) the config. The manifest records the config of the last build; :func:`resolve_target` makes
it the config of every command on the workdir that names none, and refuses a ``-c`` from another
file that differs from it. Every lookup of "module X's graph at precision P" or "stage S's output for
module X" goes through it, and every file it hands out has been checked first:

- the path resolves inside the workdir (no absolute path, no ``..``, no symlink leaving it);
- the bytes are the ones the manifest recorded (size and mtime, else sha256: DVC's model);
- for an ONNX graph, every external-data ``location`` resolves inside the workdir and names a
  recorded artifact, itself checked.

A file that fails is refused with one line naming it, its record and "rebuild with --force" (exit
2). Deleting goes through the same resolution, so nothing outside the workdir is ever removed.

:meth:`Build.session` is what a run that writes holds: a shared ``flock`` on the workdir directory
(concurrent builds into one workdir keep running side by side); the first run that finds no other
holder removes the temp files and directories killed runs left behind.

Imports on the GPU harness's Python 3.9 without torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Tuple

from autoglm_build.errors import ConfigError, UserError
from autoglm_build.manifest import MANIFEST_NAME, Artifact, Manifest, artifact_state
from autoglm_build.paths import IntegrityError, inside

if TYPE_CHECKING:
    from autoglm_build.config import BuildConfig

#: names of the temp files and directories runs create in a workdir (and its artifact directories)
TEMP_PREFIXES = (".export-", ".optimize-", ".calibrate-", ".samples-", ".trt-parse-", ".engine-build-",
                 ".write-probe-", ".manifest.json.")
#: directories whose hidden entries are temp files of a run (engine files and sidecars written in place)
ARTIFACT_DIRS = ("onnx", "optimized", "int8", "fp16", "samples", "engines")
#: the command that rebuilds each stage's outputs
REBUILD = {
    "export": "export", "optimize": "optimize", "samples": "run", "calibrate-int8": "calibrate --int8",
    "calibrate-fp16": "calibrate --fp16", "engine-fp16": "engine --precision fp16",
    "engine-int8": "engine --precision int8", "engine-fp32": "engine --precision fp32",
}


def check_workdir(workdir: Path, option: str = "-w/--workdir") -> Path:
    """A workdir that exists must be a directory."""
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise UserError(f"{option}: {workdir} is not a directory", hint="pass a directory (it is created if missing)")
    return workdir


# ---- the workdir's config ------------------------------------------------------------------------


def config_record(cfg: BuildConfig) -> Tuple[Dict[str, Any], str]:
    """``cfg`` as the manifest stores it (JSON data, paths already absolute) and its sha256."""
    data = json.loads(cfg.model_dump_json())
    return data, hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def stored_config(manifest: Manifest, workdir: Path) -> Optional[BuildConfig]:
    """The config the workdir's last build recorded, validated; None for a manifest without one."""
    if manifest.config is None:
        return None
    from pydantic import ValidationError

    from autoglm_build.config import BuildConfig, format_validation_error

    try:
        return BuildConfig.model_validate(manifest.config)
    except ValidationError as exc:
        raise ConfigError(f"{Path(workdir) / MANIFEST_NAME}: config.{format_validation_error(exc)}",
                          hint="rebuild it: autoglm-build run -c <config> --force") from None


def with_overrides(cfg: BuildConfig, overrides: Optional[Dict[str, Any]]) -> BuildConfig:
    """``cfg`` with command-line settings merged in (``{"calibrate": {"method": ...}}``), validated.

    Raises:
        ConfigError: naming the option's config field.
    """
    if not overrides:
        return cfg
    from pydantic import ValidationError

    from autoglm_build.config import BuildConfig, format_validation_error

    data = json.loads(cfg.model_dump_json())
    for section, value in overrides.items():
        data[section] = {**data[section], **value} if isinstance(value, dict) else value
    try:
        return BuildConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"command line: {format_validation_error(exc)}") from None


#: config fields that say where a file is, not what the build is: a workdir carried to another
#: machine (the GPU harness) is used with the same config file at another path. What those files
#: hold is in the fingerprints (checkpoint header, tokenizer and calibration data hashes).
LOCATION_FIELDS = frozenset({"tokenizer", "checkpoint", "calibrate.data", "engine.timing_cache"})
#: the server's settings (``serve.*``): no artifact depends on them, so a config that differs only there (a new
#: serving option's default, a port) takes the workdir as built
SERVING_PREFIX = "serve."


def config_diff(old: Dict[str, Any], new: Dict[str, Any], prefix: str = "") -> List[str]:
    """Dotted fields whose values differ between two config records."""
    fields = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            fields += config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            fields.append(f"{prefix}{key}")
    return fields


@dataclass
class Target:
    """What a command works on: the config, the workdir, the config's file, and the fields that
    changed since the workdir's last build (``-c`` naming the file the workdir was built from)."""

    cfg: BuildConfig
    workdir: Path
    config_path: str
    changed: List[str]


def resolve_target(config: Optional[Path], workdir: Optional[Path], default: Path,
                   overrides: Optional[Dict[str, Any]] = None, force: bool = False,
                   rebuild_hint: str = "pass --force to rebuild it with {config}") -> Target:
    """The config and workdir of a command.

    Without ``config``, a workdir whose manifest records a config uses it (``default`` only names
    the default workdir, ``build/<its name>``, and serves a workdir with no build yet). With
    ``config``, a workdir built from another file whose config differs (beyond
    :data:`LOCATION_FIELDS` and the ``serve`` section) is refused unless ``force``;
    the file it was built from, edited, is taken (stages rerun by their fingerprints). ``overrides``
    (command-line settings) apply on top of either.

    Raises:
        ConfigError: a conflicting ``-c`` (naming both files), or a bad config or override.
    """
    from autoglm_build.config import load_config

    if config is None:
        if workdir is None:
            workdir = Path("build") / load_config(default).name
        workdir = check_workdir(workdir)
        manifest = Manifest.load(workdir)
        stored = stored_config(manifest, workdir)
        if stored is not None:
            return Target(with_overrides(stored, overrides), workdir, manifest.config_path, [])
        return Target(with_overrides(load_config(default), overrides), workdir, str(Path(default).resolve()), [])
    cfg = with_overrides(load_config(config), overrides)
    workdir = check_workdir(workdir if workdir is not None else Path("build") / cfg.name)
    manifest = Manifest.load(workdir)
    stored = stored_config(manifest, workdir)
    path = str(Path(config).resolve())
    if stored is None:
        return Target(cfg, workdir, path, [])
    changed = config_diff(config_record(with_overrides(stored, overrides))[0], config_record(cfg)[0])
    conflicting = [f for f in changed if f not in LOCATION_FIELDS and not f.startswith(SERVING_PREFIX)]
    same_file = bool(manifest.config_path) and Path(manifest.config_path).resolve() == Path(path)
    if conflicting and not same_file and not force:
        shown = ", ".join(conflicting[:3]) + (f" (+{len(conflicting) - 3} more)" if len(conflicting) > 3 else "")
        raise ConfigError(
            f"-c {config}: differs from {manifest.config_path or 'the config'}, which {workdir / MANIFEST_NAME} "
            f"was built with ({shown})",
            hint="drop -c to use the workdir's config, or " + rebuild_hint.format(config=config, workdir=workdir))
    return Target(cfg, workdir, path, changed)


class Build:
    """A workdir opened once: its manifest, its config, and checked files.

    Args:
        workdir: The build directory.
        manifest: Its manifest (read from the workdir when not given).
        cfg: The build config, where the caller has one.
    """

    def __init__(self, workdir: Path, manifest: Optional[Manifest] = None,
                 cfg: Optional[BuildConfig] = None) -> None:
        self.workdir = check_workdir(Path(workdir))
        self.manifest = manifest if manifest is not None else Manifest.load(self.workdir)
        self.cfg = cfg

    # ---- lookups --------------------------------------------------------------------------------

    def artifact(self, stage: str, module: str, kind: Optional[str] = None) -> Optional[Artifact]:
        """The first artifact of ``stage``/``module`` (of ``kind``), unchecked; None if there is none."""
        arts = self.manifest.artifacts_of(stage, module, kind)
        return arts[0] if arts else None

    def fp32_artifact(self, module: str) -> Optional[Artifact]:
        """The module's FP32 graph record: the optimized graph's, else the exported one's."""
        return self.artifact("optimize", module, "onnx") or self.artifact("export", module, "onnx")

    def graph_artifact(self, module: str, precision: str) -> Optional[Artifact]:
        """The module's ONNX record for a precision: the calibrated graph, or for fp32 the FP32 graph."""
        if precision == "fp32":
            return self.fp32_artifact(module)
        return self.artifact(f"calibrate-{precision}", module, f"onnx-{precision}")

    def fp32_graph(self, module: str) -> Path:
        """The module's FP32 graph, checked.

        Raises:
            UserError: no exported graph; IntegrityError: the file is not the recorded one.
        """
        art = self.fp32_artifact(module)
        if art is None:
            raise UserError(f"{module}: no exported ONNX in {self.workdir}", hint="run `autoglm-build export` first")
        return self.check(art)

    def graph(self, module: str, precision: str) -> Optional[Path]:
        """The module's graph at ``precision``, checked; None when the build has none."""
        art = self.graph_artifact(module, precision)
        return self.check(art) if art is not None else None

    def output(self, stage: str, module: str, kind: Optional[str], hint: str) -> Path:
        """Stage ``stage``'s output of ``kind`` for ``module``, checked.

        Raises:
            UserError: the stage has not produced it (``hint`` says what to run).
        """
        art = self.artifact(stage, module, kind)
        if art is None:
            raise UserError(f"{module}: no {stage} output{f' ({kind})' if kind else ''} in {self.workdir}", hint=hint)
        return self.check(art)

    def samples(self, module: str) -> Path:
        """The module's verification samples (``samples/<module>.npz``), checked."""
        return self.output("samples", module, None, "run `autoglm-build run` first")

    # ---- checks ---------------------------------------------------------------------------------

    def path(self, art: Artifact) -> Path:
        """Where ``art`` lives, checked to resolve inside the workdir (its content is not read)."""
        return inside(self.workdir, art.path, self.label(art))

    def check(self, art: Artifact) -> Path:
        """``art``'s path after checking it is inside the workdir and holds the recorded bytes; for a
        graph, its external data too.

        Raises:
            IntegrityError: one line naming the file, its record and "rebuild with --force".
        """
        path = self.path(art)
        state = artifact_state(self.workdir, art)
        if state != "ok":
            what = {"missing": "missing", "outside": "resolves outside the workdir"}.get(
                state, f"bytes differ from its manifest record (sha256 {art.sha256[:12]}…)")
            raise IntegrityError(f"{path}: {what}, record {art.stage}/{art.module}; rebuild with --force",
                                 hint=f"autoglm-build {REBUILD.get(art.stage, art.stage)} -m {art.module} --force")
        if path.suffix == ".onnx":
            self._check_external_data(path, art)
        return path

    def _check_external_data(self, path: Path, art: Artifact) -> None:
        """Each external-data file of a graph lies in the graph's directory, inside the workdir, and
        is a recorded artifact holding its recorded bytes."""
        from autoglm_build.onnx_io import external_data_locations

        for location in external_data_locations(path):
            what = f"{path}: external data"
            target = inside(path.parent, location, what)
            rel = inside(self.workdir, target.relative_to(self.workdir).as_posix(), what)
            data = self.manifest.artifacts.get(rel.relative_to(self.workdir).as_posix())
            if data is None:
                raise IntegrityError(f"{what} '{location}' is not an artifact in the manifest "
                                     f"(the graph is {self.label(art)})",
                                     hint=f"autoglm-build {REBUILD.get(art.stage, art.stage)} -m {art.module} --force")
            self.check(data)

    @staticmethod
    def label(art: Artifact) -> str:
        return f"manifest record {art.stage}/{art.module} ('{art.path}')"

    def check_paths(self, stage: str, module: str) -> None:
        """Every path recorded for ``stage``/``module`` resolves inside the workdir (before a rerun
        overwrites or removes them)."""
        rec = self.manifest.record(stage, module)
        for rel in rec.artifacts if rec else []:
            inside(self.workdir, rel, f"manifest record {stage}/{module} ('{rel}')")

    # ---- writes ---------------------------------------------------------------------------------

    def remove_outputs(self, stage: str, module: str) -> None:
        """Delete the files ``stage``/``module`` recorded; only ever inside the workdir."""
        for art in self.manifest.artifacts_of(stage, module):
            self.path(art).unlink(missing_ok=True)

    @contextlib.contextmanager
    def session(self) -> Iterator[BuildSession]:
        """What a run that writes holds (see :class:`BuildSession`); released on exit."""
        session = BuildSession(self.workdir)
        try:
            if self.workdir.is_dir():
                session.ensure()
            yield session
        finally:
            session.close()


class BuildSession:
    """A run's hold on a workdir: the workdir exists and is writable, a shared ``flock`` on the
    directory is held, and stale temps were removed if no other run held it. A workdir the run
    created and left without a manifest (refused before recording anything) is removed on close."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.fd: Optional[int] = None
        self.cleaned: List[str] = []
        self.created: Optional[Path] = None  # the topmost directory this run made for the workdir

    def ensure(self) -> None:
        """Create the workdir if needed, check it is writable, take the lock (once)."""
        if self.fd is not None:
            return
        missing = [p for p in (self.workdir, *self.workdir.parents) if not p.exists()]
        self.created = missing[-1] if missing else None
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=self.workdir, prefix=".write-probe-")
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise UserError(f"{self.workdir}: workdir is not writable ({exc.strerror or exc})",
                            hint="pass a writable directory with -w") from None
        self.fd = os.open(self.workdir, os.O_RDONLY)
        try:
            import fcntl
        except ImportError:  # Windows: single-process use only, no cleanup
            return
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # another run is building here: its temps are live
            fcntl.flock(self.fd, fcntl.LOCK_SH)
            return
        self.cleaned = remove_stale_temps(self.workdir)
        fcntl.flock(self.fd, fcntl.LOCK_SH)

    def close(self) -> None:
        if self.fd is None:
            return
        try:
            if self.created is not None and self._alone():
                self._remove_if_empty()
        finally:
            os.close(self.fd)  # releases the lock
            self.fd = None

    def _alone(self) -> bool:
        """No other run holds the workdir (the shared lock upgrades to an exclusive one)."""
        try:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except (ImportError, OSError):
            return False

    def _remove_if_empty(self) -> None:
        """The workdir this run created, if it holds nothing but the manifest lock, and the
        directories made for it: a command refused before recording anything leaves nothing."""
        from autoglm_build.manifest import LOCK_NAME

        if any(p.name != LOCK_NAME for p in self.workdir.iterdir()):
            return
        (self.workdir / LOCK_NAME).unlink(missing_ok=True)
        path = self.workdir
        while True:
            try:
                path.rmdir()
            except OSError:
                return
            if path == self.created:
                return
            path = path.parent


def remove_stale_temps(workdir: Path) -> List[str]:
    """Remove the temp files and directories of runs that no longer hold the workdir.

    Only entries directly in the workdir named with :data:`TEMP_PREFIXES`, and hidden files directly
    in its artifact directories; a symlink is unlinked, never followed. Returns what was removed.
    """
    from autoglm_build.manifest import LOCK_NAME, _locked

    removed = []
    with _locked(workdir / LOCK_NAME):  # a manifest save in flight keeps its temp file
        candidates = [p for p in workdir.iterdir() if p.name.startswith(TEMP_PREFIXES)]
        for name in ARTIFACT_DIRS:
            folder = workdir / name
            if folder.is_dir() and not folder.is_symlink():
                candidates += [p for p in folder.iterdir() if p.name.startswith(".")]
        for path in candidates:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path.relative_to(workdir).as_posix())
    return removed
