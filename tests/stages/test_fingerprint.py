"""A stage's fingerprint covers every package module it imports (issue 16, item 8).

The package is copied and ``PACKAGE_ROOT`` pointed at the copy, so files can be edited without
touching the checkout; the fingerprints are the stages' own (``Stage.fingerprint``).
"""

from __future__ import annotations

import shutil

import pytest

from autoglm_build.manifest import Manifest
from autoglm_build.stages import base
from autoglm_build.stages.base import StageContext
from autoglm_build.stages.calibrate import CalibrateStage
from autoglm_build.stages.export import ExportStage
from autoglm_build.stages.optimize import OptimizeStage
from autoglm_build.stages.samples import SamplesStage
from tests.conftest import ROOT


@pytest.fixture
def package_copy(tmp_path, monkeypatch):
    copy = tmp_path / "autoglm_build"
    shutil.copytree(ROOT / "autoglm_build", copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(base, "PACKAGE_ROOT", copy, raising=False)
    return copy


def _fingerprints(cfg, workdir):
    ctx = StageContext(cfg, workdir, Manifest())
    stages = [ExportStage(), OptimizeStage(), SamplesStage(), CalibrateStage("int8"), CalibrateStage("fp16")]
    return {(s.name, m): s.fingerprint(ctx, m) for s in stages for m in ("vision", "audio")}


def _edit(path):
    path.write_text(path.read_text(encoding="utf-8") + "\n# edited\n", encoding="utf-8")


@pytest.mark.parametrize("edited, stages", [
    ("precision.py", {"calibrate-int8", "calibrate-fp16"}),
    ("rewrites/qdq.py", {"calibrate-int8", "calibrate-fp16"}),
    ("calibration.py", {"export", "samples", "calibrate-int8", "calibrate-fp16"}),
    ("validate.py", {"export", "optimize"}),
])
def test_editing_an_imported_module_invalidates_the_stages_that_import_it(package_copy, tiny_cfg, tmp_path,
                                                                         edited, stages):
    before = _fingerprints(tiny_cfg, tmp_path)
    _edit(package_copy / edited)
    after = _fingerprints(tiny_cfg, tmp_path)
    changed = {stage for (stage, _), fp in after.items() if fp != before[(stage, _)]}
    assert stages <= changed, f"editing {edited} left {sorted(stages - changed)} cached"


def test_a_modality_file_invalidates_only_its_own_module(package_copy, tiny_cfg, tmp_path):
    before = _fingerprints(tiny_cfg, tmp_path)
    _edit(package_copy / "modules" / "vision.py")
    after = _fingerprints(tiny_cfg, tmp_path)
    changed = {key for key, fp in after.items() if fp != before[key]}
    assert {m for _, m in changed} == {"vision"}
    assert {s for s, _ in changed} == {"export", "optimize", "samples", "calibrate-int8", "calibrate-fp16"}


def test_an_unrelated_module_invalidates_nothing(package_copy, tiny_cfg, tmp_path):
    before = _fingerprints(tiny_cfg, tmp_path)
    _edit(package_copy / "serve" / "app.py")
    _edit(package_copy / "bench.py")
    assert _fingerprints(tiny_cfg, tmp_path) == before
