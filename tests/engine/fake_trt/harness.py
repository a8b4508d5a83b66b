"""Running autoglm-build against a fake ``tensorrt`` (``pkg/tensorrt``) and a real Polygraphy wheel.

Each run is a fresh process (the CLI, through ``python -m autoglm_build``) whose ``sys.path`` starts
with the fake package and one Polygraphy version unpacked from PyPI's wheel (cached in
``$AUTOGLM_BUILD_TEST_CACHE``, default ``~/.cache/autoglm-build-tests``), and whose PATH has a fake
``nvidia-smi``. The fake records TensorRT calls as JSON lines in a log the tests read.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Dict, List

import pytest

ROOT = Path(__file__).resolve().parents[3]
PKG = Path(__file__).resolve().parent / "pkg"
SURFACES = Path(__file__).resolve().parent / "surfaces"
TRT_VERSIONS = ("8.5.3", "10.13.0", "11.1.0")  # one per surface
POLYGRAPHY_VERSIONS = ("0.49.26", "0.53.6")  # the GPU harness's, and the newest


def cache_dir() -> Path:
    return Path(os.environ.get("AUTOGLM_BUILD_TEST_CACHE", Path.home() / ".cache" / "autoglm-build-tests"))


def polygraphy(version: str) -> Path:
    """A directory holding Polygraphy ``version``'s package, unpacked from its wheel (pure Python)."""
    target = cache_dir() / f"polygraphy-{version}"
    if (target / "polygraphy" / "__init__.py").is_file():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp,
                              f"polygraphy=={version}"], capture_output=True, text=True)
        wheels = list(Path(tmp).glob("polygraphy-*.whl"))
        if out.returncode != 0 or not wheels:
            message = f"cannot download polygraphy=={version}: {out.stderr.strip()[-300:]}"
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
        cache_dir().mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=cache_dir(), prefix=".unpack-"))
        with zipfile.ZipFile(wheels[0]) as wheel:
            wheel.extractall(staging)
        if not target.exists():  # another test process may have unpacked it meanwhile
            os.replace(staging, target)
        else:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def environment(trt_version: str, polygraphy_version: str, log: Path) -> Dict[str, str]:
    env = dict(os.environ)
    paths = [str(PKG), str(polygraphy(polygraphy_version)), str(ROOT)]
    env.update(PYTHONPATH=os.pathsep.join(paths), FAKE_TRT_VERSION=trt_version, FAKE_TRT_LOG=str(log),
               FAKE_TRT_CUDA="1", PATH=os.pathsep.join([str(PKG / "bin"), env.get("PATH", "")]),
               AUTOGLM_BUILD_CACHE_DIR=str(log.parent / "trt-cache"), NO_COLOR="1",
               POLYGRAPHY_AUTOINSTALL_DEPS="0")
    return env


def run(args: List[str], env: Dict[str, str], cwd: Path = ROOT, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def calls(log: Path) -> List[Dict]:
    if not log.is_file():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
