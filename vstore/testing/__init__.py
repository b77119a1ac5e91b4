"""Tools to test storage for consistency: a crash-simulating device and consistency checks.

- ``vstore.testing.crash``: ``CrashRecorder`` records every write and flush across the
  members of a pool (``crashsim://GROUP/NAME`` URIs) and materializes what they hold
  after a power cut at any point, with unflushed writes dropped, reordered or torn;
  ``reopen_after_crash`` opens the pool again as a new process would.
- ``vstore.testing.checks``: ``verify_parity`` (a scrub of raid5/raid6 parity) and
  ``degraded_views`` (the same layout with every survivable set of failed members).
- ``vstore.testing.faults``: fault wrappers (``FaultDevice``: failing member, corrupt
  read; ``SlowDevice``; ``DropFlushes``, a deliberately broken layer; ``fail_path``)
  and ``Rig``, which stacks them over crash-recorded members reachable as URIs.
- ``vstore.testing.strategies``: hypothesis strategies for workloads (writes, reads,
  flushes, discards of any size and alignment), failures and crashes.
- ``vstore.testing.machine``: ``device_state_machine(factory, size=..., ...)`` checks
  any ``BlockDevice`` factory against a byte-array model (a hypothesis
  ``RuleBasedStateMachine``); ``pool_state_machine(level, ...)`` does it for a pool.
- ``vstore.testing.iscsi_target`` (``TgtServer``) and ``vstore.testing.nfs_server``
  (``Ganesha``, ``RpcRelay``): real tgtd and NFS-Ganesha servers on loopback, started and
  always stopped, for tests and benchmarks alike.
- ``vstore.testing.torture``: the engine under both and under ``vstore torture``: schedules,
  ``Runner`` and its checks (a)-(d), ``Campaign``, ``shrink``.

The hypothesis-based names (``device_state_machine``, ``pool_state_machine``,
``strategies``) load on first use, so the rest works without hypothesis installed.
"""

from vstore.testing.checks import degraded_views, failure_sets, verify_parity
from vstore.testing.crash import (
    CrashDevice,
    CrashRecorder,
    abandon,
    dead_owner,
    reopen_after_crash,
)
from vstore.testing.faults import (
    DropFlushes,
    FaultDevice,
    Rig,
    SlowDevice,
    fail_path,
    reinstate_path,
)

_LAZY = {
    "device_state_machine": "vstore.testing.machine",
    "pool_state_machine": "vstore.testing.machine",
    "strategies": "vstore.testing.strategies",
    "Backing": "vstore.testing.torture",
    "CheckFailed": "vstore.testing.torture",
    "Op": "vstore.testing.torture",
    "run_schedule": "vstore.testing.torture",
    "parse_schedule": "vstore.testing.torture",
}


def __getattr__(name: str) -> object:
    """Load the hypothesis-based helpers (and the torture engine) on first use."""
    import importlib

    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'vstore.testing' has no attribute {name!r}")
    module = importlib.import_module(mod)
    return module if name == "strategies" else getattr(module, name)


__all__ = [
    "Backing",
    "CheckFailed",
    "CrashDevice",
    "CrashRecorder",
    "DropFlushes",
    "FaultDevice",
    "Op",
    "Rig",
    "SlowDevice",
    "abandon",
    "dead_owner",
    "degraded_views",
    "device_state_machine",
    "fail_path",
    "failure_sets",
    "parse_schedule",
    "pool_state_machine",
    "reinstate_path",
    "reopen_after_crash",
    "run_schedule",
    "strategies",
    "verify_parity",
]
