"""`vstore discover`: the iSCSI targets and LUNs behind a portal, or the images of a Ceph RBD pool."""

from __future__ import annotations

import json
import sys

import click

from vstore.cli.common import run
from vstore.errors import ConfigError
from vstore.sizes import format_size
from vstore.uri import redact_text


@click.command()
@click.argument("portal", metavar="iscsi://[USER%SECRET@]HOST[:PORT] | rbd://[ID@]POOL[?conf=..]")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def discover(portal: str, as_json: bool) -> None:
    """List the iSCSI targets behind a portal (their LUNs and sizes), or a Ceph pool's RBD images."""
    from backends.iscsi import discover as iscsi_discover

    if portal.lower().startswith("rbd://"):
        _discover_rbd(portal, as_json)
        return
    if not portal.lower().startswith("iscsi://"):
        raise ConfigError(f"discover takes an iscsi:// portal or rbd:// pool URI, not {redact_text(portal)!r}")
    targets = run(iscsi_discover, portal)
    failed = [t for t in targets if t.get("error")]
    if as_json:
        click.echo(json.dumps(targets, indent=2))
    else:
        if not targets:
            click.echo("no targets")
        for t in targets:
            click.echo(f"{t['target']}  ({t['portal']})" + (f"  error: {t['error']}" if t.get("error") else ""))
            for lun in t.get("luns", []):
                size = f"{format_size(lun['size'])} ({lun['size']} bytes, {lun.get('block_size')}-byte blocks)" if "size" in lun else lun.get("type", "")
                click.echo(f"  {lun['uri']}  {size}")
    if failed:  # a target we could not log in to (CHAP, ACL): say so in the exit code too
        click.echo(redact_text(f"vstore: error: could not log in to {len(failed)} of {len(targets)} target(s): "
                               f"{failed[0]['target']}: {failed[0]['error']}"), err=True)
        sys.exit(1)


def _discover_rbd(pool_uri: str, as_json: bool) -> None:
    """Print the images of an RBD pool, each with its member URI and size."""
    from backends.rbd import discover as rbd_discover

    images = run(rbd_discover, pool_uri)
    if as_json:
        click.echo(json.dumps(images, indent=2))
        return
    if not images:
        click.echo("no images")
    for im in images:
        size = f"{format_size(im['size'])} ({im['size']} bytes)" if "size" in im else f"error: {im.get('error')}"
        click.echo(f"{im['uri']}  {size}")
