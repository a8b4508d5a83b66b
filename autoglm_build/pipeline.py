"""Orders stages over modules, skips what is cached, and records everything in the manifest.

A stage is skipped for a module when its record says ``done``, its fingerprint equals the one
computed now, and every artifact it listed is on disk with its recorded content (DVC's lockfile
model). ``force`` reruns regardless. The manifest is saved after each stage/module, so an
interrupted build keeps what finished, and records the config the build used (commands on the
workdir without ``-c`` use it). Inputs from outside the workdir (calibration data, and the
tokenizer where a stage tokenizes the calibration prompts) are checked before the first stage starts.

:meth:`Pipeline.plan` (``--dry-run``) predicts the same decisions without running anything: a stage
predicted to run marks its outputs as about to change, so the stages reading them later in the same
command are predicted to run too, as they will once the new outputs' hashes enter their
fingerprints (only an output rebuilt byte-identical lets ``run`` skip them after all).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from autoglm_build.calibration import CalibrationDataError, check_prompts
from autoglm_build.config import BuildConfig
from autoglm_build.console import Reporter
from autoglm_build.errors import EXIT_USAGE, UserError
from autoglm_build.manifest import Artifact, Manifest, StageRecord, make_artifact
from autoglm_build.stages.base import Stage, StageContext
from autoglm_build.workdir import Build, BuildSession, config_record


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
        config_path: Recorded in the manifest (the config itself is recorded too).
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
        for stage in self.stages:
            stage.check_inputs(self.cfg, self.module_names())
        self.check_prompts()
        build = Build(self.workdir, cfg=self.cfg)
        manifest = build.manifest
        manifest.config_name, manifest.config_path = self.cfg.name, self.config_path
        manifest.config, manifest.config_sha256 = config_record(self.cfg)
        outcomes = []
        with build.session() as session:
            for stage in self.stages:
                for module in self.units(stage):
                    outcomes.append(self._run_one(manifest, stage, module, session))
            session.ensure()
            manifest.commit(self.workdir)
        return outcomes

    def units(self, stage: Stage) -> List[str]:
        """What ``stage`` runs over: the modules, with a staged module as its parts where the stage
        builds each part on its own (:attr:`Stage.per_part`)."""
        from autoglm_build.modules import registry

        return registry.expand(self.cfg, self.modules, parts=stage.per_part)

    def module_names(self) -> List[str]:
        """The modules (a part named on the command line stands for its module)."""
        from autoglm_build.modules import registry

        return registry.expand(self.cfg, self.modules, parts=False)

    def check_prompts(self) -> None:
        """The tokenizer and calibration prompts, where a stage of this pipeline tokenizes them."""
        if any(stage.reads_prompts(self.cfg) for stage in self.stages):
            check_prompts(self.cfg, self.module_names())

    def plan(self) -> List[Dict[str, Any]]:
        """Per stage/module: the fingerprint now, whether ``run`` would skip it, and why it would not
        (no work done, nothing written). Raises what :meth:`run` raises before its first stage, but for
        the tokenizer: that is a warning (a full-size config's plan is useful before its checkpoint is)."""
        for stage in self.stages:
            stage.check_inputs(self.cfg, self.module_names())
        try:
            self.check_prompts()
        except CalibrationDataError as exc:
            self.reporter.warn(f"run would stop before its first stage: {exc.message}")
        on_disk = Manifest.load(self.workdir)
        manifest = on_disk.model_copy(deep=True)  # gets the predicted runs' outputs marked as changing
        rows, changing = [], False
        for stage in self.stages:
            for module in self.units(stage):
                fingerprint = stage.fingerprint(StageContext(self.cfg, self.workdir, manifest), module)
                reason = self._rerun_reason(manifest, stage.name, module, fingerprint)
                if reason == "fingerprint changed" and changing:
                    now = stage.fingerprint(StageContext(self.cfg, self.workdir, on_disk), module)
                    if now == on_disk.records[Manifest.key(stage.name, module)].fingerprint:
                        reason = "an input is rebuilt first"
                if reason is not None:
                    _mark_changing(manifest, stage.name, module)
                    changing = True
                rows.append({"stage": stage.name, "module": module, "fingerprint": fingerprint,
                             "cached": reason is None, "reason": reason or "fingerprint and outputs unchanged"})
        return rows

    def _cached(self, manifest: Manifest, stage: str, module: str, fingerprint: str) -> bool:
        return self._rerun_reason(manifest, stage, module, fingerprint) is None

    def _rerun_reason(self, manifest: Manifest, stage: str, module: str, fingerprint: str) -> Optional[str]:
        """Why ``stage``/``module`` must run now; None when its record still holds."""
        rec = manifest.record(stage, module)
        if self.force:
            return "--force"
        if rec is None:
            return "no record"
        if rec.status != "done":
            return f"last run {rec.status}"
        if rec.fingerprint != fingerprint:
            return "fingerprint changed"
        if not manifest.intact(self.workdir, rec):
            return "outputs missing or modified"
        return None

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
        peak = record.metrics.get("peak_rss_mib")  # export records it
        memory = f", peak RSS {peak:,.0f} MiB" if peak else ""
        self.reporter.info(f"{label}: done in {record.duration_s:.1f}s{memory}")
        return Outcome(stage.name, module, "ran", record.duration_s, record)


def _mark_changing(manifest: Manifest, stage: str, module: str) -> None:
    """In a plan's copy of the manifest: ``stage``/``module`` is about to produce new outputs, so every
    fingerprint that hashes them differs from its record (one placeholder if it has none yet)."""
    arts = [a.model_copy(update={"sha256": "rebuilt"}) for a in manifest.artifacts_of(stage, module)]
    arts = arts or [Artifact(path=f".planned/{stage}/{module}", kind="planned", module=module, stage=stage,
                             sha256="rebuilt", bytes=0)]
    record = manifest.record(stage, module) or StageRecord(stage=stage, module=module, status="planned",
                                                           fingerprint="")
    manifest.put(record.model_copy(), arts)
