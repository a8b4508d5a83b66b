"""Every Python file of the project compiles on Python 3.9, the GPU harness's (../shared/trt-harness: the engine
build, verify, the server and the GPU tests run there). A 3.10+ construct fails there at collection, on the device,
after a lease's engines are built: ``[[await q.get() ...] for q in queues]`` in tests/serve/test_app.py did, in the
tenth session (an ``await`` in a comprehension inside another comprehension, allowed only from 3.11).

Compiling, not importing: the syntax and the compiler's scoping rules (which ``ast.parse(feature_version=...)`` does
not apply), without the harness's packages."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

import pytest

from tests.conftest import ROOT

COMPILE = """import sys
bad = 0
for path in sys.argv[1:]:
    try:
        compile(open(path, encoding="utf-8").read(), path, "exec", dont_inherit=True)
    except SyntaxError as exc:
        bad += 1
        print(f"{path}:{exc.lineno}: {exc.msg}")
sys.exit(1 if bad else 0)
"""


def is_python39(exe: str) -> bool:
    try:
        out = subprocess.run([exe, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and out.stdout.strip() == "(3, 9)"


def python39() -> Optional[str]:
    """A Python 3.9 interpreter: ``$AUTOGLM_BUILD_PYTHON39`` (which must be one), this one, ``python3.9`` on PATH, or
    pyenv's 3.9 (whose shim does not run unless 3.9 is selected); None if there is none."""
    chosen = os.environ.get("AUTOGLM_BUILD_PYTHON39")
    if chosen:
        assert is_python39(chosen), f"$AUTOGLM_BUILD_PYTHON39={chosen}: not a Python 3.9 that runs"
        return chosen
    candidates = [sys.executable, shutil.which("python3.9")]
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    candidates += sorted(str(p) for p in pyenv.glob("3.9*/bin/python3.9"))
    return next((exe for exe in filter(None, candidates) if is_python39(exe)), None)


def project_files() -> List[Path]:
    """The project's Python files: in a checkout git's tracked and untracked ones but the ignored (a device call
    carries those too), else those under its source folders."""
    try:
        out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "--", "*.py"], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
        if out.returncode == 0 and out.stdout.strip():
            return [ROOT / line for line in out.stdout.splitlines() if (ROOT / line).is_file()]
    except (OSError, subprocess.SubprocessError):
        pass
    return [p for top in ("autoglm_build", "tests", "benchmarks", "scripts") for p in (ROOT / top).rglob("*.py")]


def test_every_python_file_compiles_on_the_harness_python_3_9():
    exe = python39()
    if exe is None:
        pytest.skip("no Python 3.9 interpreter here (the GPU harness's version): set $AUTOGLM_BUILD_PYTHON39, put "
                    "python3.9 on PATH or `pyenv install 3.9`")
    files = project_files()
    assert len(files) > 100  # the whole tree, not a folder of it
    out = subprocess.run([exe, "-c", COMPILE, *map(str, files)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"not Python 3.9 (the GPU harness's):\n{out.stdout}{out.stderr}"


def test_the_check_fails_on_what_python_3_9_refuses(tmp_path):
    """The check itself: the construct that failed on the device is refused, a plain comprehension is not."""
    exe = python39()
    if exe is None:
        pytest.skip("no Python 3.9 interpreter here")
    bad, good = tmp_path / "bad.py", tmp_path / "good.py"
    bad.write_text("async def f(qs):\n    return [[await q.get() for _ in range(2)] for q in qs]\n")
    good.write_text("async def f(qs):\n    return [await q.get() for q in qs]\n")
    refused = subprocess.run([exe, "-c", COMPILE, str(bad), str(good)], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "bad.py" in refused.stdout and "good.py" not in refused.stdout
