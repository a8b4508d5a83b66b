"""The JSON sidecar beside every ``.engine``, and the checks made before an engine is deserialized.

An engine is only valid for the TensorRT version and GPU architecture that built it, and only
meaningful for the ONNX it came from. Loading refuses (one line, exit 2) an engine whose sidecar
is missing or unreadable, whose TensorRT version or compute capability differs from the running
ones, or whose bytes do not hash to what the manifest recorded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

from pydantic import BaseModel, ConfigDict, ValidationError

from autoglm_build.errors import UserError
from autoglm_build.manifest import atomic_write_text, sha256_file


class EngineMismatch(UserError):
    """An engine cannot be used here or no longer matches what was built."""


class Sidecar(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: int = 1
    module: str
    precision: str
    tensorrt_version: str
    strongly_typed: bool
    gpu_name: str
    compute_capability: str
    profiles: List[Dict[str, List[List[int]]]]
    profile_names: List[str]
    source_onnx: str
    source_onnx_sha256: str
    build_seconds: float
    engine_bytes: int
    engine_sha256: str
    timing_cache: Optional[str] = None

    @staticmethod
    def path_for(engine: Path) -> Path:
        return engine.with_suffix(".json")

    def write(self, engine: Path) -> Path:
        path = self.path_for(engine)
        atomic_write_text(path, self.model_dump_json(indent=2) + "\n")
        return path

    @classmethod
    def read(cls, engine: Path) -> Sidecar:
        path = cls.path_for(engine)
        try:
            return cls.model_validate(json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise EngineMismatch(f"{path}: engine sidecar missing; cannot tell which TensorRT built {engine.name}",
                                 hint="rebuild with `autoglm-build engine --force`") from None
        except (json.JSONDecodeError, ValidationError) as exc:
            raise EngineMismatch(f"{path}: unreadable engine sidecar ({str(exc).splitlines()[0]})",
                                 hint="rebuild with `autoglm-build engine --force`") from None


def check_loadable(engine: Path, expected_sha256: Optional[str], trt_version: str, compute_capability: str) -> Sidecar:
    """Everything that can be checked before TensorRT sees the bytes.

    Args:
        engine: The ``.engine`` file.
        expected_sha256: What the manifest recorded for it (None: not in a manifest).
        trt_version: The running TensorRT's version.
        compute_capability: The running GPU's, e.g. ``9.0``.

    Raises:
        EngineMismatch: with one line naming the engine and what differs.
    """
    if not engine.is_file():
        raise EngineMismatch(f"{engine}: engine file not found", hint="run `autoglm-build engine`")
    sidecar = Sidecar.read(engine)
    if sidecar.tensorrt_version != trt_version:
        raise EngineMismatch(
            f"{engine}: built by TensorRT {sidecar.tensorrt_version}, this is TensorRT {trt_version}; "
            "engines do not move between TensorRT versions",
            hint="rebuild with `autoglm-build engine --force`",
        )
    if sidecar.compute_capability != compute_capability:
        raise EngineMismatch(
            f"{engine}: built for compute capability {sidecar.compute_capability} ({sidecar.gpu_name}), this GPU is "
            f"{compute_capability}", hint="rebuild on this GPU with `autoglm-build engine --force`")
    actual = sha256_file(engine)
    if expected_sha256 is not None and actual != expected_sha256:
        raise EngineMismatch(f"{engine}: sha256 {actual[:12]}... does not match the manifest "
                             f"({expected_sha256[:12]}...)",
                             hint="the file changed after it was built; rebuild with `autoglm-build engine --force`")
    if actual != sidecar.engine_sha256:
        raise EngineMismatch(f"{engine}: sha256 does not match its sidecar; the engine file was modified or truncated",
                             hint="rebuild with `autoglm-build engine --force`")
    return sidecar


def deserialize(trt, engine: Path):
    """A TensorRT engine from a file already through :func:`check_loadable`; corrupt bytes are a UserError."""
    logger = trt.Logger(trt.Logger.ERROR)
    runtime = trt.Runtime(logger)
    result = runtime.deserialize_cuda_engine(engine.read_bytes())
    if result is None:
        raise EngineMismatch(f"{engine}: TensorRT could not deserialize the engine (corrupt or truncated)",
                             hint="rebuild with `autoglm-build engine --force`")
    return result
