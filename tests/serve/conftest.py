"""A real ``autoglm-build serve`` process on loopback over the tiny build."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from tests.conftest import TINY


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(workdir: Path, log_dir: Path, *args: str, env: dict = None) -> Iterator[Server]:
    port = free_port()
    log = log_dir / f"serve-{port}.log"
    cmd = [sys.executable, "-m", "autoglm_build", "serve", "-c", str(TINY), "-w", str(workdir), "--port", str(port),
           "--backend", BACKEND, *args]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    server = Server(f"http://127.0.0.1:{port}", proc, log)
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}: {log.read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{server.url}/ready", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready in 90 s: {log.read_text()[-2000:]}")
            time.sleep(0.3)
        yield server
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


# On the GPU harness: AUTOGLM_BUILD_SERVE_BACKEND=tensorrt AUTOGLM_BUILD_SERVE_WORKDIR=<workdir with engines>
BACKEND = os.environ.get("AUTOGLM_BUILD_SERVE_BACKEND", "onnxruntime")


@pytest.fixture(scope="module")
def served_build(request) -> Path:
    """The workdir the server runs on: $AUTOGLM_BUILD_SERVE_WORKDIR, else the session's tiny build."""
    workdir = os.environ.get("AUTOGLM_BUILD_SERVE_WORKDIR")
    return Path(workdir) if workdir else request.getfixturevalue("tiny_build")


@pytest.fixture(scope="module")
def server(served_build: Path, tmp_path_factory) -> Iterator[Server]:
    with running_server(served_build, tmp_path_factory.mktemp("serve")) as srv:
        yield srv
