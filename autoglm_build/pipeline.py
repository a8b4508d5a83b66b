"""Orders stages over modules, skips what is cached, and records everything in the manifest.

A stage is skipped for a module when its record says ``done``, its fingerprint equals the one
computed now, and every artifact it listed is on disk with its recorded content (DVC's lockfile
model). ``force`` reruns regardless. The manifest is saved after each stage/module, so an
interrupted build keeps what finished.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from autoglm_build.config import BuildConfig
from autoglm_build.console import Reporter
from autoglm_build.errors import EXIT_USAGE, UserError
from autoglm_build.manifest import Manifest, StageRecord, make_artifact
from autoglm_build.stages.base import Stage, StageContext
from autoglm_build.workdir import Build, BuildSession


@dataclass
class Outcome:
    """What happened to one stage/module in this invocation: ``ran``, ``cached`` or ``failed``."""

    stage: str
    module: str
    status: str
    seconds: float
    record: Optional[StageRecord]

    def as_dict(self) -> Dict[str, Any]:
        return {
            "stage": self.stage,
            "module": self.module,
            "status": self.status,
            "seconds": round(self.seconds, 3),
            "record": self.record.model_dump() if self.record else None,
        }


class Pipeline:
    """Run ``stages`` over ``modules`` in a workdir.

    Args:
        cfg: The validated build config.
        workdir: Where artifacts and ``manifest.json`` live.
        stages: Configured stage callables, in order.
        modules: Module names, in order.
        force: Rerun even cached stages.
        reporter: Progress and logs (stderr).
        config_path: Recorded in the manifest.
    """

    def __init__(
        self,
        cfg: BuildConfig,
        workdir: Path,
        stages: Sequence[Stage],
        modules: Sequence[str],
        force: bool = False,
        reporter: Optional[Reporter] = None,
        config_path: str = "",
    ) -> None:
        self.cfg = cfg
        self.workdir = Path(workdir)
        self.stages = list(stages)
        self.modules = list(modules)
        self.force = force
        self.reporter = reporter or Reporter()
        self.config_path = config_path

    def run(self) -> List[Outcome]:
        """Run every stage for every module; raises the first stage's :class:`UserError`."""
        build = Build(self.workdir, cfg=self.cfg)
        manifest = build.manifest
        manifest.config_name, manifest.config_path = self.cfg.name, self.config_path
        outcomes = []
        with build.session() as session:
            for stage in self.stages:
                for module in self.modules:
                    outcomes.append(self._run_one(manifest, stage, module, session))
            session.ensure()
            manifest.commit(self.workdir)
        return outcomes

    def plan(self) -> List[Dict[str, Any]]:
        """Per stage/module: the fingerprint now and whether it would be skipped (no work done)."""
        manifest = Manifest.load(self.workdir)
        rows = []
        for stage in self.stages:
            for module in self.modules:
                ctx = StageContext(self.cfg, self.workdir, manifest)
                fingerprint = stage.fingerprint(ctx, module)
                rows.append({"stage": stage.name, "module": module, "fingerprint": fingerprint,
                             "cached": self._cached(manifest, stage.name, module, fingerprint)})
        return rows

    def _cached(self, manifest: Manifest, stage: str, module: str, fingerprint: str) -> bool:
        rec = manifest.record(stage, module)
        return (
            not self.force and rec is not None and rec.status == "done"
            and rec.fingerprint == fingerprint and manifest.intact(self.workdir, rec)
        )

    def _run_one(self, manifest: Manifest, stage: Stage, module: str, session: BuildSession) -> Outcome:
        label = f"{stage.name} {module}"
        with self.reporter.task(label) as status:
            ctx = StageContext(self.cfg, self.workdir, manifest, status=status)
            fingerprint = stage.fingerprint(ctx, module)
            if self._cached(manifest, stage.name, module, fingerprint):
                self.reporter.info(f"{label}: cached (fingerprint {fingerprint[:12]} and outputs unchanged)")
                return Outcome(stage.name, module, "cached", 0.0, manifest.record(stage.name, module))
            ctx.build.check_paths(stage.name, module)  # what a rerun replaces or removes stays inside
            started = time.time()
            session.ensure()
            try:
                result = stage(ctx, module)
            except UserError as exc:
                if exc.exit_code == EXIT_USAGE:  # bad input, refused before anything was made: nothing written
                    raise
                record = StageRecord(
                    stage=stage.name, module=module, status="failed", fingerprint=fingerprint,
                    started=started, duration_s=round(time.time() - started, 3),
                    metrics=getattr(exc, "metrics", {}), warnings=[exc.message],
                )
                ctx.build.remove_outputs(stage.name, module)  # no stale output of an earlier config
                manifest.commit(self.workdir, [(record, [])])
                raise
        artifacts = [make_artifact(self.workdir, path, kind, module, stage.name) for path, kind in result.outputs]
        record = StageRecord(
            stage=stage.name, module=module, status="done", fingerprint=fingerprint, params=result.params,
            started=started, duration_s=round(time.time() - started, 3), metrics=result.metrics,
            warnings=result.warnings,
        )
        manifest.commit(self.workdir, [(record, artifacts)])
        for warning in result.warnings:
            self.reporter.warn(f"{label}: {warning}")
        self.reporter.info(f"{label}: done in {record.duration_s:.1f}s")
        return Outcome(stage.name, module, "ran", record.duration_s, record)
