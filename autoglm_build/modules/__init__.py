"""Modality modules, registered by name. The registry is the only list of modules."""

from __future__ import annotations

# Importing the modules registers them.
from autoglm_build.modules import audio, decoder, embed, registry, vision  # noqa: E402,F401
from autoglm_build.modules.base import Case, ModuleSpec

__all__ = ["Case", "ModuleSpec", "registry"]
