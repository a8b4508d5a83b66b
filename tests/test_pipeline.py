"""Skipping by fingerprint and outputs (DVC's lockfile model), reruns, and what forces them."""

from __future__ import annotations

from pathlib import Path

from autoglm_build.config import load_config
from autoglm_build.console import Reporter
from autoglm_build.pipeline import Pipeline
from autoglm_build.stages.export import ExportStage
from tests.conftest import TINY, write_config


def _export(cfg):
    """The export stage as the CLI configures it: from the config's checkpoint (the shared build's too)."""
    return ExportStage(Path(cfg.checkpoint) if cfg.checkpoint else None)


def _run(cfg, workdir, force=False, modules=None):
    outcomes = Pipeline(cfg, workdir, [_export(cfg)], modules or cfg.modules, force=force,
                        reporter=Reporter(-1)).run()
    return {o.module: o.status for o in outcomes}


def test_unchanged_build_skips_every_stage(tiny_build_copy, tiny_cfg):
    assert _run(tiny_cfg, tiny_build_copy) == dict.fromkeys(tiny_cfg.modules, "cached")


def test_changing_one_modules_config_reruns_only_that_module(tiny_build_copy, tmp_path):
    cfg = load_config(write_config(tmp_path / "c.yaml", {"vision": {"max_pixels": 300000}}))
    assert _run(cfg, tiny_build_copy) == {"vision": "ran", "audio": "cached", "embed": "cached",
                                          "decoder": "cached"}
    cfg = load_config(write_config(tmp_path / "c.yaml", {"text": {"rope_theta": 20000.0}}))
    assert _run(cfg, tiny_build_copy, modules=["audio", "embed", "decoder"]) == {
        "audio": "cached", "embed": "cached", "decoder": "ran"}


def test_deleted_or_edited_artifact_reruns_its_module(tiny_build_copy, tiny_cfg):
    (tiny_build_copy / "onnx" / "embed.onnx").unlink()
    with open(tiny_build_copy / "onnx" / "audio.onnx", "r+b") as fh:
        fh.seek(100)
        fh.write(b"\x00\x01\x02")
    statuses = _run(tiny_cfg, tiny_build_copy)
    assert statuses == {"vision": "cached", "audio": "ran", "embed": "ran", "decoder": "cached"}


def test_force_reruns(tiny_build_copy, tiny_cfg):
    assert _run(tiny_cfg, tiny_build_copy, force=True, modules=["embed"]) == {"embed": "ran"}


def test_plan_reports_cache_without_running(tiny_build_copy, tiny_cfg):
    rows = Pipeline(load_config(TINY), tiny_build_copy, [_export(tiny_cfg)], tiny_cfg.modules).plan()
    assert all(r["cached"] for r in rows) and len(rows) == 4
