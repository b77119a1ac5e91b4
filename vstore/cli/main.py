"""The `vstore` command line: the root group, assembled from the command groups, and its entry point.

Each command group is a module of this package (pools, volume, mount, transfer,
discover, lifecycle, journal, path, torture, bench, boot); what they share is in ``vstore.cli.common``;
commands on a pool are those of ``vstore.pool.commands``. Nothing imports this
module. Errors are one line on stderr and a non-zero exit code; a traceback is
shown only with VSTORE_DEBUG=1.
"""

from __future__ import annotations

import logging
import os
import sys

import click

from vstore.cli import (
    bench,
    boot,
    discover,
    grow,
    journal,
    lifecycle,
    mount,
    path,
    pools,
    torture,
    transfer,
    volume,
)
from vstore.errors import VstoreError
from vstore.io.aio import unwrap
from vstore.pool.home import Home
from vstore.uri import redact_text


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--home", type=click.Path(file_okay=False), envvar="VSTORE_HOME",
              help="Config directory (default: $VSTORE_HOME or ~/.local/share/vstore).")
@click.option("-v", "--verbose", is_flag=True, help="Log what happens to stderr.")
@click.option("--takeover", is_flag=True,
              help="A command that opens a pool owned through an etcd lease waits for another "
                   "host's lease to expire and takes the pool over (see README, across hosts).")
@click.version_option(package_name="vstore")
@click.pass_context
def cli(ctx: click.Context, home: str | None, verbose: bool, takeover: bool) -> None:
    """vstore: pool local files, NFS files and iSCSI LUNs into RAID-protected volumes."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="vstore: %(levelname)s: %(message)s")
    ctx.obj = {"home": Home(home), "takeover": takeover}


for _command in (*pools.COMMANDS, volume.volume, discover.discover, mount.mount, mount.umount,
                 transfer.import_cmd, transfer.export_cmd, path.path, *lifecycle.COMMANDS, grow.grow,
                 journal.journal, torture.torture, bench.bench, boot.install_helpers):
    cli.add_command(_command)


def main() -> None:
    """Entry point: run the CLI, turning every VstoreError into one line and an exit code."""
    try:
        cli.main(prog_name="vstore", complete_var="_VSTORE_COMPLETE", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("vstore: aborted", err=True)
        sys.exit(130)
    except click.UsageError as e:
        where = f"vstore {e.ctx.command_path.split(' ', 1)[1]}" if e.ctx and " " in e.ctx.command_path else "vstore"
        click.echo(redact_text(f"vstore: error: {e.format_message()} (see '{where} --help')"), err=True)
        sys.exit(e.exit_code)
    except click.ClickException as e:
        click.echo(redact_text(f"vstore: error: {e.format_message()}"), err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except BaseException as e:  # noqa: BLE001 - the one place errors become exit codes
        leaf = unwrap(e)
        if isinstance(leaf, SystemExit):
            raise
        if os.environ.get("VSTORE_DEBUG"):
            raise
        if isinstance(leaf, VstoreError):
            click.echo(redact_text(f"vstore: error: {leaf}"), err=True)
            sys.exit(leaf.exit_code)
        if isinstance(leaf, KeyboardInterrupt):
            click.echo("vstore: interrupted", err=True)
            sys.exit(130)
        if isinstance(leaf, OSError):
            click.echo(redact_text(f"vstore: error: {leaf}"), err=True)
            sys.exit(1)
        click.echo(redact_text(f"vstore: internal error: {type(leaf).__name__}: {leaf} ")
                   + "(set VSTORE_DEBUG=1 for a traceback)", err=True)
        sys.exit(70)


if __name__ == "__main__":
    main()
