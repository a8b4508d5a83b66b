"""Pipeline stages, in order. Each is a configured callable (see :mod:`autoglm_build.stages.base`)."""

from autoglm_build.stages.base import Stage, StageContext, StageResult

__all__ = ["Stage", "StageContext", "StageResult"]
