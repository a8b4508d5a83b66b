"""Finding TensorRT and the GPU, and telling versions apart.

TensorRT >= 10.12 builds strongly typed networks from the precision-carrying ONNX; 8.5-10.11 build
the same ONNX in flag mode (FP16/INT8 builder flags, explicit Q/DQ): NVIDIA calls strong typing
complete from 10.12 (10.1's parser still called a setter that strongly typed networks reject on
LayerNormalization). Code branches on the version, never on what happens to import.

:func:`load` also refuses TensorRT/Polygraphy pairs known not to work together (one line, exit 4),
so that a mismatch is not discovered as a TypeError inside a build child.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Dict, Tuple

from autoglm_build.errors import EnvironmentMissing, UserError

STRONGLY_TYPED_FROM = (10, 12)
SUPPORTED_TENSORRT = ">=8.5,<12"  # the [trt] extra in pyproject.toml says the same
SUPPORTED_POLYGRAPHY = ">=0.50.3"
# (lowest TensorRT, lowest Polygraphy that works with it, what breaks below it)
POLYGRAPHY_FLOORS = (
    ((11, 0), (0, 50, 3), "its CreateConfig reads ILayer.precision_is_set and its inspector "
                          "ICudaEngine.device_memory_size, which TensorRT 11 removed: every build fails"),
    ((10, 0), (0, 49, 1), "it has no progress_monitor for TensorRT 10's IProgressMonitor"),
)


def load() -> Any:
    """The ``tensorrt`` module, after checking that the Polygraphy beside it can drive it.

    Raises:
        EnvironmentMissing: TensorRT or Polygraphy is not installed here, or the installed pair is
            known not to work (exit code 4).
    """
    try:
        import tensorrt
    except ImportError:
        raise EnvironmentMissing(
            "TensorRT is not installed here: engines are built and run on a machine with TensorRT and a GPU",
            hint="scripts/device_engines.sh runs them on the GPU harness; `verify` still checks the ONNX graphs",
        ) from None
    try:
        import polygraphy
    except ImportError:
        raise EnvironmentMissing(f"TensorRT {tensorrt.__version__} is installed but Polygraphy is not",
                                 hint=f"pip install 'polygraphy{SUPPORTED_POLYGRAPHY}' (autoglm-build's trt extra)"
                                 ) from None
    check_pair(tensorrt.__version__, polygraphy.__version__)
    return tensorrt


def check_pair(trt_version: str, polygraphy_version: str) -> None:
    """Refuse a TensorRT/Polygraphy pair known not to work together.

    Raises:
        EnvironmentMissing: one line naming both versions and what breaks (exit code 4).
    """
    trt_v, poly_v = version_tuple(trt_version), version_tuple(polygraphy_version)
    for trt_floor, poly_floor, why in POLYGRAPHY_FLOORS:
        if trt_v >= trt_floor and poly_v < poly_floor:
            need = ".".join(map(str, poly_floor))
            raise EnvironmentMissing(
                f"Polygraphy {polygraphy_version} does not work with TensorRT {trt_version}: {why}",
                hint=f"pip install 'polygraphy>={need}' (autoglm-build's trt extra pins "
                     f"polygraphy{SUPPORTED_POLYGRAPHY})")


def available() -> bool:
    """Whether TensorRT imports here (the Polygraphy pair is checked by :func:`load`)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


def version_tuple(version: str) -> Tuple[int, ...]:
    return tuple(int(p) for p in version.split(".")[:3] if p.isdigit())


def major(trt: Any) -> int:
    return version_tuple(trt.__version__)[0]


def strongly_typed(trt: Any) -> bool:
    """Whether builds use strongly typed networks: TensorRT >= 10.12 (11 knows nothing else)."""
    return version_tuple(trt.__version__)[:2] >= STRONGLY_TYPED_FROM


def numpy_dtype(trt: Any, dtype: Any, tensor: str = "") -> Any:
    """numpy type of a TensorRT DataType (TensorRT 8.5's ``trt.nptype`` uses ``np.bool``, gone in numpy 1.24).

    Raises:
        UserError: a type with no numpy equivalent (BF16, FP8, INT4, FP4): our engines keep FP32 I/O,
            so such an engine was not built by this tool, and reading its bytes as float32 would be wrong.
    """
    import numpy as np

    names = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32, "BOOL": np.bool_,
             "UINT8": np.uint8, "INT64": np.int64}
    name = getattr(dtype, "name", str(dtype)).rpartition(".")[2].upper()
    if name not in names:
        where = f"tensor '{tensor}' is" if tensor else "a tensor is"
        raise UserError(f"{where} of TensorRT type {name}, which has no numpy type here "
                        f"(known: {', '.join(sorted(names))})",
                        hint="autoglm-build engines keep FP32 I/O; rebuild the engine with `autoglm-build engine`")
    return names[name]


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
