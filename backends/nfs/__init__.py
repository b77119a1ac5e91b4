"""nfs:// members: a file on an NFSv3 export, reached by vstore's own trio RPC client.

URI: ``nfs://HOST[:PORT]/EXPORT/PATH/FILE[?nfsport=2049&mountport=20048&uid=0&gid=0]``
(libnfs style; an explicit port skips the rpcbind GETPORT). Further query
parameters: ``depth`` (RPCs in flight, 32), ``timeout`` (seconds per try, 10),
``retrans`` (retransmissions before failing, 2), ``cache_bytes`` (bound on
uncommitted data remembered for resending, 64 MiB), ``rsize``/``wsize`` (override
FSINFO's transfer sizes; at most 1 MiB).

Modules: ``xdr``, ``rpc`` and ``nfs3`` are sans-IO codecs over bytes; ``client``
is the trio transport; ``device`` is the BlockDevice and the opening sequence.
"""

from vstore.errors import ConfigError
from vstore.uri import Backend, MemberURI

from .device import NfsDevice, open_uri
from .nfs3 import NfsError, NfsNotFoundError
from .rpc import RpcError

__all__ = ["BACKEND", "NfsDevice", "NfsError", "NfsNotFoundError", "RpcError", "open_uri"]


def _check_uri(uri: MemberURI) -> None:
    if not uri.host or len(uri.path.strip("/").split("/")) < 2:
        raise ConfigError(f"NFS URI needs host, export and file: {uri.redacted()!r}")


BACKEND = Backend(
    "nfs", open_uri,
    frozenset({"nfsport", "mountport", "uid", "gid", "depth", "retrans", "timeout", "cache_bytes",
               "rsize", "wsize"}),
    _check_uri,
)
