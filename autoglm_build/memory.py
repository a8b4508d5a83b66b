"""This process's peak resident memory, per phase.

``getrusage(RUSAGE_SELF).ru_maxrss`` is the high-water mark since the process started. Writing ``5``
to ``/proc/self/clear_refs`` (Linux >= 4.0) resets it to the current RSS, so a stage that resets it
first reads its own peak even after an earlier, bigger module in the same process. Where the reset
is refused (another kernel, a locked-down /proc) the peak is the process's so far: an upper bound.
"""

from __future__ import annotations

import resource
import sys


def reset_peak() -> bool:
    """Reset the high-water mark to the current RSS; False where the system does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    """The peak RSS in MiB since the process started or since the last :func:`reset_peak`."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)  # bytes on macOS, KiB on Linux
