"""On a machine with TensorRT and a GPU (the device harness): bad engines are refused with one line.

Needs a workdir whose engines were built by scripts/device_engines.sh: ``AUTOGLM_BUILD_TRT_WORKDIR``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from autoglm_build.cli import app
from autoglm_build.engine import tensorrt as trt_env
from tests.conftest import TINY

pytestmark = [
    pytest.mark.trt,
    pytest.mark.skipif(not trt_env.available(), reason="needs TensorRT and a GPU (run scripts/device_engines.sh)"),
    pytest.mark.skipif(not os.environ.get("AUTOGLM_BUILD_TRT_WORKDIR"), reason="AUTOGLM_BUILD_TRT_WORKDIR not set"),
]


@pytest.fixture
def workdir(tmp_path) -> Path:
    dest = tmp_path / "w"
    shutil.copytree(os.environ["AUTOGLM_BUILD_TRT_WORKDIR"], dest)
    return dest


def _runner() -> CliRunner:
    try:  # click < 8.2 mixes stderr into stdout unless told not to
        return CliRunner(mix_stderr=False)
    except TypeError:
        return CliRunner()


def _verify(workdir):
    return _runner().invoke(app, ["verify", "-c", str(TINY), "-w", str(workdir), "-m", "vision",
                                    "--precision", "fp16"])


def _error_line(result):
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def test_truncated_engine_is_refused(workdir):
    engine = workdir / "engines" / "vision.fp16.engine"
    engine.write_bytes(engine.read_bytes()[:1000])
    result = _verify(workdir)
    assert result.exit_code == 2 and "bytes differ from its manifest record" in _error_line(result)


def test_corrupt_engine_with_matching_hashes_fails_to_deserialize_cleanly(workdir):
    from autoglm_build.manifest import sha256_file

    engine = workdir / "engines" / "vision.fp16.engine"
    engine.write_bytes(b"\x00" * 4096)
    digest = sha256_file(engine)
    side = json.loads(engine.with_suffix(".json").read_text())
    side["engine_sha256"] = digest
    engine.with_suffix(".json").write_text(json.dumps(side))
    manifest = json.loads((workdir / "manifest.json").read_text())
    manifest["artifacts"]["engines/vision.fp16.engine"].update(sha256=digest, bytes=4096)
    (workdir / "manifest.json").write_text(json.dumps(manifest))
    result = _verify(workdir)
    assert result.exit_code == 2 and "could not deserialize" in _error_line(result)


def test_engine_from_another_tensorrt_version_is_refused(workdir):
    sidecar = workdir / "engines" / "vision.fp16.json"
    data = json.loads(sidecar.read_text())
    data["tensorrt_version"] = "10.0.1"
    sidecar.write_text(json.dumps(data))
    result = _verify(workdir)
    assert result.exit_code == 2 and "built by TensorRT 10.0.1" in _error_line(result)


def test_polygraphy_inspects_our_engine(workdir):
    cli = "import sys; from polygraphy.tools._main import main; sys.argv = ['polygraphy'] + sys.argv[1:]; main()"
    out = subprocess.run([sys.executable, "-c", cli, "inspect", "model",
                          str(workdir / "engines" / "vision.fp16.engine")], capture_output=True, text=True)
    assert out.returncode == 0 and "pixel_values" in out.stdout, out.stdout + out.stderr
