"""Errors of the iSCSI backend, all within the vstore hierarchy."""

from __future__ import annotations

from vstore.errors import MemberIOError


class ScsiError(MemberIOError):
    """A SCSI command ended with a status other than GOOD (CHECK CONDITION with its sense, ...)."""

    def __init__(self, message: str, *, status: int, sense_key: int | None = None,
                 asc: int | None = None, ascq: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.sense_key = sense_key
        self.asc = asc
        self.ascq = ascq


class ConnectionLostError(MemberIOError):
    """The connection to the target dropped while a command was in flight (it may be reissued)."""


class DigestError(MemberIOError):
    """A CRC32C data digest did not match: the data of that command was not used."""
