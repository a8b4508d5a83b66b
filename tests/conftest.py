"""Shared fixtures: the tiny config, configs with overrides, and one tiny build shared by many tests."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Dict

import pytest
import yaml

from autoglm_build.config import BuildConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "autoglm-phone-tiny.yaml"
FULL = ROOT / "configs" / "autoglm-phone-9b.yaml"


def deep_update(base: Dict[str, Any], changes: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_update(out[key], value)
        else:
            out[key] = value
    return out


def write_config(path: Path, changes: Dict[str, Any], base: Path = TINY) -> Path:
    """A copy of ``base`` with ``changes`` merged in, written to ``path``."""
    data = deep_update(yaml.safe_load(base.read_text()), changes)
    if data.get("tokenizer") and not Path(data["tokenizer"]).is_absolute():
        data["tokenizer"] = str(base.parent / data["tokenizer"])  # relative to the config it came from
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def tiny_cfg() -> BuildConfig:
    return load_config(TINY)


@pytest.fixture(scope="session")
def tiny_build(tmp_path_factory) -> Path:
    """A workdir holding the tiny config's full export (built once per test session)."""
    from autoglm_build.console import Reporter
    from autoglm_build.pipeline import Pipeline
    from autoglm_build.stages.export import ExportStage

    workdir = tmp_path_factory.mktemp("tiny-build")
    cfg = load_config(TINY)
    Pipeline(cfg, workdir, [ExportStage()], cfg.modules, reporter=Reporter(-1), config_path=str(TINY)).run()
    return workdir


@pytest.fixture
def tiny_build_copy(tiny_build: Path, tmp_path: Path) -> Path:
    """A private copy of the shared tiny build (mtimes kept, so the manifest still matches)."""
    dest = tmp_path / "build"
    shutil.copytree(tiny_build, dest)
    return dest
