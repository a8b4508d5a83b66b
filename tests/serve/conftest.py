"""A real ``autoglm-build serve`` process on loopback over the tiny build."""

from __future__ import annotations

import contextlib
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from autoglm_build.serve.launch import serve_process
from tests.conftest import TINY


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"


@contextlib.contextmanager
def running_server(workdir: Path, log_dir: Path, *args: str, env: dict = None) -> Iterator[Server]:
    serve_args = ["-c", str(TINY), "-w", str(workdir), "--backend", BACKEND, *args]
    with serve_process(serve_args, log_dir, env) as (url, proc, log):
        yield Server(url, proc, log)


# On the GPU harness: AUTOGLM_BUILD_SERVE_BACKEND=tensorrt AUTOGLM_BUILD_SERVE_WORKDIR=<workdir with engines>
BACKEND = os.environ.get("AUTOGLM_BUILD_SERVE_BACKEND", "onnxruntime")


@pytest.fixture(scope="module")
def served_build(request) -> Path:
    """The workdir the server runs on: $AUTOGLM_BUILD_SERVE_WORKDIR, else the tiny config with random weights."""
    workdir = os.environ.get("AUTOGLM_BUILD_SERVE_WORKDIR")
    return Path(workdir) if workdir else request.getfixturevalue("random_tiny_build")


@pytest.fixture(scope="module")
def server(served_build: Path, tmp_path_factory) -> Iterator[Server]:
    with running_server(served_build, tmp_path_factory.mktemp("serve")) as srv:
        yield srv
