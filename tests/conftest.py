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
    for field in ("tokenizer", "checkpoint"):
        if data.get(field) and not Path(data[field]).is_absolute():
            data[field] = str(base.parent / data[field])  # relative to the config it came from
    calibrate = data.get("calibrate")
    if isinstance(calibrate, dict) and isinstance(calibrate.get("data"), str):
        calibrate["data"] = str((base.parent / calibrate["data"]).resolve())  # likewise (absolute stays)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def tiny_cfg() -> BuildConfig:
    return load_config(TINY)


@pytest.fixture(scope="session")
def tiny_build(tmp_path_factory) -> Path:
    """A workdir holding the tiny config's full export from its checkpoint, as `autoglm-build export`
    makes it (built once per test session)."""
    from autoglm_build.console import Reporter
    from autoglm_build.pipeline import Pipeline
    from autoglm_build.stages.export import ExportStage

    workdir = tmp_path_factory.mktemp("tiny-build")
    cfg = load_config(TINY)
    checkpoint = Path(cfg.checkpoint) if cfg.checkpoint else None  # as the CLI exports it: the trained weights
    Pipeline(cfg, workdir, [ExportStage(checkpoint)], cfg.modules, reporter=Reporter(-1), config_path=str(TINY)).run()
    return workdir


@pytest.fixture(scope="session")
def random_tiny_build(tmp_path_factory) -> Path:
    """The tiny config exported with seeded random weights instead of its checkpoint: what the
    protocol tests serve (the trained checkpoint echoes its prompts and never closes a `<think>`
    span, so reasoning separation and stop sequences need the random model's varied tokens)."""
    from autoglm_build.console import Reporter
    from autoglm_build.pipeline import Pipeline
    from autoglm_build.stages.export import ExportStage

    workdir = tmp_path_factory.mktemp("tiny-random-build")
    cfg = load_config(TINY)
    Pipeline(cfg, workdir, [ExportStage()], cfg.modules, reporter=Reporter(-1), config_path=str(TINY)).run()
    return workdir


@pytest.fixture
def tiny_build_copy(tiny_build: Path, tmp_path: Path) -> Path:
    """A private copy of the shared tiny build (mtimes kept, so the manifest still matches)."""
    dest = tmp_path / "build"
    shutil.copytree(tiny_build, dest)
    return dest


#: modules of :func:`trust_build` (no vision: its export is the most expensive and others cover it)
TRUST_MODULES = ["audio", "embed", "decoder"]


@pytest.fixture(scope="session")
def trust_config(tmp_path_factory) -> Path:
    """The tiny config without the vision tower (``modules: [audio, embed, decoder]``)."""
    return write_config(tmp_path_factory.mktemp("trust-config") / "tiny-trust.yaml", {"modules": TRUST_MODULES})


@pytest.fixture(scope="session")
def trust_build(tmp_path_factory, trust_config: Path) -> Path:
    """A workdir with every CPU stage's outputs for audio and embed (export, optimize, samples,
    calibrate int8 and fp16) and the decoder's export: the artifacts the trust tests tamper with."""
    from autoglm_build.console import Reporter
    from autoglm_build.pipeline import Pipeline
    from autoglm_build.stages.calibrate import CalibrateStage
    from autoglm_build.stages.export import ExportStage
    from autoglm_build.stages.optimize import OptimizeStage
    from autoglm_build.stages.samples import SamplesStage

    workdir = tmp_path_factory.mktemp("trust-build")
    cfg = load_config(trust_config)
    quiet = Reporter(-1)
    checkpoint = Path(cfg.checkpoint) if cfg.checkpoint else None  # as the CLI exports it
    Pipeline(cfg, workdir, [ExportStage(checkpoint)], TRUST_MODULES, reporter=quiet,
             config_path=str(trust_config)).run()
    stages = [OptimizeStage(), SamplesStage(), CalibrateStage("int8"), CalibrateStage("fp16")]
    Pipeline(cfg, workdir, stages, ["audio", "embed"], reporter=quiet, config_path=str(trust_config)).run()
    return workdir


@pytest.fixture
def trust_copy(trust_build: Path, tmp_path: Path) -> Path:
    """A private copy of :func:`trust_build` (mtimes kept, so the manifest still matches)."""
    dest = tmp_path / "w"
    shutil.copytree(trust_build, dest, symlinks=True)
    return dest
