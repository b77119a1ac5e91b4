"""Tools to test storage for consistency: a crash-simulating device and consistency checks.

- ``vstore.testing.crash``: ``CrashRecorder`` records every write and flush across the
  members of a pool (``crashsim://GROUP/NAME`` URIs) and materializes what they hold
  after a power cut at any point, with unflushed writes dropped, reordered or torn;
  ``reopen_after_crash`` opens the pool again as a new process would.
- ``vstore.testing.checks``: ``verify_parity`` (a scrub of raid5/raid6 parity) and
  ``degraded_views`` (the same layout with every survivable set of failed members).
"""

from vstore.testing.checks import degraded_views, failure_sets, verify_parity
from vstore.testing.crash import (
    CrashDevice,
    CrashRecorder,
    abandon,
    dead_owner,
    reopen_after_crash,
)

__all__ = [
    "CrashDevice",
    "CrashRecorder",
    "abandon",
    "dead_owner",
    "degraded_views",
    "failure_sets",
    "reopen_after_crash",
    "verify_parity",
]
