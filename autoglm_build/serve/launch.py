"""``autoglm-build serve`` as a child process on a free loopback port, handed over once ``/ready``
answers 200, stopped (SIGTERM, then SIGKILL after 30 s) on exit. The load benchmark and the serving
tests start their servers with it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, Iterator, Optional, Sequence, Tuple


def free_port() -> int:
    """A loopback TCP port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/ready", timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):  # refused while starting, 503 while loading
        return False


@contextlib.contextmanager
def serve_process(serve_args: Sequence[str], log_dir: Path, env: Optional[Dict[str, str]] = None,
                  ready_timeout: float = 90.0, program: Sequence[str] = ("-m", "autoglm_build", "serve"),
                  ) -> Iterator[Tuple[str, subprocess.Popen, Path]]:
    """``(url, process, log)`` of ``autoglm-build serve <serve_args> --host 127.0.0.1 --port <free>``,
    its stdout and stderr in ``<log_dir>/serve-<port>.log``. ``program``: what this Python runs instead of
    ``-m autoglm_build serve`` (a benchmark's own server, which takes ``--host`` and ``--port`` as ``serve`` does).

    Raises:
        RuntimeError: the server exited, or was not ready in ``ready_timeout`` seconds (the log's tail
            is in the message).
    """
    port = free_port()
    log = Path(log_dir) / f"serve-{port}.log"
    cmd = [sys.executable, *program, *serve_args, "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout
        while not _ready(url):
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}: {log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready in {ready_timeout:g} s: {log.read_text()[-2000:]}")
            time.sleep(0.3)
        yield url, proc, log
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
