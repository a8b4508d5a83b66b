"""What a workdir holds: the manifest's artifacts, each checked on disk, and its stage records."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

from autoglm_build.errors import UserError
from autoglm_build.manifest import MANIFEST_NAME, Manifest, artifact_state


def inspect_workdir(workdir: Path) -> Dict[str, Any]:
    """The manifest as data, with each artifact's ``state`` (ok | missing | modified).

    Raises:
        UserError: the workdir has no manifest.
    """
    workdir = Path(workdir)
    if not (workdir / MANIFEST_NAME).is_file():
        raise UserError(f"{workdir}: no {MANIFEST_NAME} here", hint="run `autoglm-build run` first, or pass -w")
    manifest = Manifest.load(workdir)
    data = manifest.model_dump()
    for path, art in manifest.artifacts.items():
        data["artifacts"][path]["state"] = artifact_state(workdir, art)
    data["workdir"] = str(workdir)
    return data
