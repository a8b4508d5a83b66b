"""Modality modules, registered by name. The registry is the only list of modules."""

from __future__ import annotations

from autoglm_build.modules import registry
from autoglm_build.modules.base import Case, ModuleSpec

# Importing the modules registers them.
from autoglm_build.modules import audio, decoder, embed, vision  # noqa: E402,F401

__all__ = ["Case", "ModuleSpec", "registry"]
