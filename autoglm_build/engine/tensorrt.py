"""Finding TensorRT and the GPU, and telling versions apart.

TensorRT >= 10 builds strongly typed networks from the precision-carrying ONNX; 8.5-9 build the
same ONNX in flag mode (FP16/INT8 builder flags, explicit Q/DQ). Code branches on
:func:`major`, never on what happens to import.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Dict, Tuple

from autoglm_build.errors import EnvironmentMissing

STRONGLY_TYPED_FROM = 10


def load() -> Any:
    """The ``tensorrt`` module.

    Raises:
        EnvironmentMissing: TensorRT is not installed here (exit code 4).
    """
    try:
        import tensorrt
    except ImportError:
        raise EnvironmentMissing(
            "TensorRT is not installed here: engines are built and run on a machine with TensorRT and a GPU",
            hint="scripts/device_engines.sh runs them on the GPU harness; `verify` still checks the ONNX graphs",
        ) from None
    return tensorrt


def available() -> bool:
    try:
        load()
        return True
    except EnvironmentMissing:
        return False


def version_tuple(version: str) -> Tuple[int, ...]:
    return tuple(int(p) for p in version.split(".")[:3] if p.isdigit())


def major(trt: Any) -> int:
    return version_tuple(trt.__version__)[0]


def strongly_typed(trt: Any) -> bool:
    return major(trt) >= STRONGLY_TYPED_FROM


def numpy_dtype(trt: Any, dtype: Any) -> Any:
    """numpy type of a TensorRT DataType (TensorRT 8.5's ``trt.nptype`` uses ``np.bool``, gone in numpy 1.24)."""
    import numpy as np

    names = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32, "BOOL": np.bool_,
             "UINT8": np.uint8, "INT64": np.int64}
    return names.get(getattr(dtype, "name", str(dtype)).upper(), np.float32)


def gpu() -> Dict[str, str]:
    """Name and compute capability of GPU 0 (``nvidia-smi``), as the sidecar records them."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        raise EnvironmentMissing("no GPU here (nvidia-smi not found)")
    out = subprocess.run([smi, "--query-gpu=name,compute_cap", "--format=csv,noheader"], capture_output=True,
                         text=True, check=False)
    if out.returncode != 0 or not out.stdout.strip():
        raise EnvironmentMissing(f"no GPU here (nvidia-smi: {out.stderr.strip() or 'no device'})")
    name, cc = [p.strip() for p in out.stdout.strip().splitlines()[0].split(",")]
    return {"name": name, "compute_capability": cc}


def cache_dir() -> Path:
    """Where timing caches live: ``$AUTOGLM_BUILD_CACHE_DIR``, else the platform's user cache dir."""
    env = os.environ.get("AUTOGLM_BUILD_CACHE_DIR")
    if env:
        return Path(env)
    try:
        from platformdirs import user_cache_dir

        return Path(user_cache_dir("autoglm-build"))
    except ImportError:  # the harness may lack platformdirs
        return Path.home() / ".cache" / "autoglm-build"
