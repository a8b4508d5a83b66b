"""Error families and exit codes (Polygraphy's ``_main.py`` model).

A :class:`UserError` is something the user can fix: the CLI prints it as one red line with an
optional hint and exits with its code, no traceback. Anything else is a bug and keeps its
traceback.

Exit codes (documented in README.md):

====  ==========================================================================
0     success
1     internal error (a bug: the traceback is printed)
2     bad input: config file/field, CLI argument, checkpoint, calibration data
3     accuracy: a module's outputs are outside their tolerance
4     environment: a required runtime (e.g. TensorRT, a GPU) is missing
====  ==========================================================================
"""

from __future__ import annotations

from typing import Optional

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_ACCURACY = 3
EXIT_ENVIRONMENT = 4


class UserError(Exception):
    """A user-fixable problem, reported as one line.

    Args:
        message: What is wrong, naming the file and field where there is one.
        hint: What to do about it (optional, printed dim after the message).
    """

    exit_code = EXIT_USAGE

    def __init__(self, message: str, hint: Optional[str] = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class ConfigError(UserError):
    """A config file is missing, unparsable, or has an invalid/unknown field."""


class CheckpointError(UserError):
    """A checkpoint directory is missing, unsafe (pickle), or does not fit the config."""


class AccuracyError(UserError):
    """Outputs differ from the reference by more than the tolerance."""

    exit_code = EXIT_ACCURACY


class StructureError(UserError):
    """A wrong output shape or a missing output: fatal whatever the tolerance."""

    exit_code = EXIT_ACCURACY


class EnvironmentMissing(UserError):
    """A runtime the command needs is not installed here (TensorRT, a GPU)."""

    exit_code = EXIT_ENVIRONMENT
