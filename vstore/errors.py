"""The one exception hierarchy of vstore: every error a user can cause is a VstoreError."""

from __future__ import annotations


class VstoreError(Exception):
    """Root of every error vstore raises on purpose; the CLI prints it as one line."""

    exit_code = 1


class ConfigError(VstoreError):
    """Bad configuration or command-line input (unknown level, bad size, bad URI)."""

    exit_code = 2


class NotFoundError(VstoreError):
    """A pool, volume, member or file that does not exist."""

    exit_code = 2


class ExistsError(VstoreError):
    """A pool, volume or member that already exists."""

    exit_code = 2


class NoSpaceError(VstoreError):
    """Not enough free space in the pool for the request."""

    exit_code = 2


class OutOfRangeError(VstoreError):
    """An I/O request outside the device, or not aligned as required."""

    exit_code = 2


class MetadataError(VstoreError):
    """A superblock or pool metadata record that is missing, corrupt or inconsistent."""


class PoolBusyError(VstoreError):
    """The pool is owned by another live process."""


class MemberIOError(VstoreError):
    """An I/O error on one member (or one path of a member)."""


class DeviceTimeoutError(MemberIOError):
    """A member or path did not answer within its timeout."""


class ProtocolError(MemberIOError):
    """A peer (iSCSI target, NFS server) sent bytes that do not parse."""


class AuthError(MemberIOError):
    """Authentication to a member failed (CHAP, AUTH_SYS denial)."""


class NoPathError(MemberIOError):
    """Every path to a member has failed."""


class DegradedError(VstoreError):
    """More members failed than the RAID level can survive: data cannot be returned."""


class ReadOnlyError(VstoreError):
    """A write to something opened read-only."""


class CorruptError(VstoreError):
    """Data that fails its checksum and cannot be rebuilt from redundancy: never returned."""
