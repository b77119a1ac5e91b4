"""Mounting at boot: the ``mount.vstore`` helper of mount(8) and ``vstore install-helpers``.

``mount -t vstore POOL DIR -o OPTIONS`` (and so an ``/etc/fstab`` line) runs
``/sbin/mount.vstore POOL DIR [-sfnv] [-o OPTIONS]``, which runs ``vstore mount``:

- ``ro`` → ``--read-only``; ``allow_other`` → ``--allow-other``; ``home=DIR`` → ``--home DIR``
  (else ``$VSTORE_HOME``, else the invoking user's default, root's ``~/.local/share/vstore``);
- the generic options mount(8) and systemd use (``defaults``, ``rw``, ``auto``/``noauto``,
  ``nofail``, ``_netdev``, ``user``, ``exec``..., ``x-*``, ``comment=*``) are accepted and ignored;
  any other option is an error unless ``-s`` (sloppy) is given;
- ``-f`` (fake) checks the options and mounts nothing; ``-v`` prints the command; ``-n`` is ignored;
- POOL already mounted on DIR is success (mount(8) cannot tell, from ``vstore:POOL`` of type
  ``fuse.vstore``, that an fstab line ``POOL DIR vstore`` is mounted, so ``mount -a`` asks again).

Exit codes follow mount(8): 0 mounted, 1 bad invocation, 32 the mount failed.
``vstore install-helpers`` links ``/sbin/mount.vstore`` to this helper's console script and
writes the systemd unit template ``vstore-mount@.service`` with the path of this ``vstore``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import click

from vstore.errors import ConfigError, ExistsError

# Options mount(8), fstab and systemd pass along that mean nothing to a FUSE pool mount.
IGNORED = {
    "defaults", "rw", "auto", "noauto", "nofail", "_netdev", "user", "nouser", "users", "owner",
    "group", "exec", "noexec", "suid", "nosuid", "dev", "nodev", "async", "sync", "atime", "noatime",
    "relatime", "norelatime", "strictatime", "nostrictatime", "diratime", "nodiratime", "lazytime",
    "nolazytime", "loud", "silent", "iversion", "noiversion", "mand", "nomand",
}
IGNORED_PREFIXES = ("x-", "comment=")
UNIT_NAME = "vstore-mount@.service"
UNIT_VSTORE = "/usr/local/bin/vstore"  # the template's vstore; install-helpers writes the real one
HELPER_NAME = "mount.vstore"


def vstore_args(options: str, *, sloppy: bool = False) -> tuple[list[str], list[str]]:
    """The ``vstore`` arguments before and after ``mount`` for a mount(8) option string."""
    before: list[str] = []
    after: list[str] = []
    for opt in filter(None, (o.strip() for o in options.split(","))):
        name, _, value = opt.partition("=")
        if opt == "ro":
            after.append("--read-only")
        elif opt == "allow_other":
            after.append("--allow-other")
        elif name == "home":
            if not value:
                raise ConfigError("option home= needs a directory (home=/etc/vstore)")
            before = ["--home", value]
        elif opt in IGNORED or opt.startswith(IGNORED_PREFIXES):
            continue
        elif not sloppy:
            raise ConfigError(f"unknown option {opt!r} (known: ro, allow_other, home=DIR; -s ignores others)")
    return before, sorted(set(after))


def _parse_argv(argv: list[str]) -> tuple[list[str], str, set[str]]:
    """mount(8)'s helper arguments: SPEC DIR [-sfnv] [-o OPTS] [-t TYPE] [-N NS], in any order."""
    positional: list[str] = []
    options: list[str] = []
    flags: set[str] = set()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-o", "-t", "-N"):
            if i + 1 >= len(argv):
                raise ConfigError(f"{arg} needs a value")
            if arg == "-o":
                options.append(argv[i + 1])
            i += 2
            continue
        if arg.startswith("-o") and len(arg) > 2:
            options.append(arg[2:])
        elif arg.startswith("-") and len(arg) > 1:
            unknown = set(arg[1:]) - set("sfnvwr")
            if unknown:
                raise ConfigError(f"unknown flag {arg!r}")
            flags |= set(arg[1:])
        else:
            positional.append(arg)
        i += 1
    if len(positional) != 2:
        raise ConfigError("usage: mount.vstore POOL MOUNTPOINT [-sfnv] [-o OPTIONS]")
    if "r" in flags:
        options.append("ro")
    return positional, ",".join(options), flags


def mount_helper(argv: list[str]) -> int:
    """Run ``vstore mount`` for mount(8)'s arguments; mount(8)'s exit codes."""
    try:
        (pool, mountpoint), options, flags = _parse_argv(argv)
        before, after = vstore_args(options, sloppy="s" in flags)
    except ConfigError as e:
        print(f"mount.vstore: {e}", file=sys.stderr)
        return 1
    cmd = [sys.executable, "-m", "vstore.cli.main", *before, "mount", *after, "--", pool, mountpoint]
    if "v" in flags:
        print("mount.vstore: " + " ".join(["vstore", *cmd[3:]]), file=sys.stderr)
    if "f" in flags:
        return 0
    from fuse_mount.daemon import mount_entry

    entry = mount_entry(mountpoint)
    if entry is not None and (entry["fstype"], entry["source"]) == ("fuse.vstore", f"vstore:{pool}"):
        print(f"mount.vstore: {pool} is already mounted on {entry['mountpoint']}", file=sys.stderr)
        return 0  # `mount -a` again
    return 0 if subprocess.run(cmd).returncode == 0 else 32


def main() -> None:
    """Entry point of the ``mount.vstore`` console script."""
    sys.exit(mount_helper(sys.argv[1:]))


def unit_text(vstore: str) -> str:
    """The systemd unit template, running the given ``vstore`` executable."""
    text = resources.files("vstore.cli").joinpath(UNIT_NAME).read_text()
    return text.replace(UNIT_VSTORE, vstore)


def _script(name: str) -> Path:
    """A console script of this installation (beside this Python), or a clear error."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise ConfigError(f"no {name} beside {sys.executable}: install vstore (pip install .) first")
    return path


@click.command("install-helpers")
@click.option("--sbin", type=click.Path(file_okay=False), default="/sbin", show_default=True,
              help="Where mount(8) looks for mount.TYPE helpers.")
@click.option("--systemd-dir", type=click.Path(file_okay=False), default="/etc/systemd/system",
              show_default=True, help="Where to write the unit template vstore-mount@.service.")
@click.option("--uninstall", is_flag=True, help="Remove what install-helpers installed.")
@click.option("--force", is_flag=True, help="Replace an existing mount.vstore that is not vstore's.")
def install_helpers(sbin: str, systemd_dir: str, uninstall: bool, force: bool) -> None:
    """Link SBIN/mount.vstore (for mount -t vstore and /etc/fstab) and write the systemd unit template."""
    link, unit = Path(sbin) / HELPER_NAME, Path(systemd_dir) / UNIT_NAME
    if uninstall:
        for path in (link, unit):
            if path.is_symlink() or path.exists():
                path.unlink()
                click.echo(f"removed {path}")
        return
    helper, vstore = _script(HELPER_NAME), _script("vstore")
    if (link.is_symlink() or link.exists()) and not force:
        current = os.path.realpath(link)
        if Path(current).name != HELPER_NAME:
            raise ExistsError(f"{link} exists and is not vstore's ({current}); use --force to replace it")
    if link.is_symlink() or link.exists():
        link.unlink()
    try:
        link.symlink_to(helper)
        unit.parent.mkdir(parents=True, exist_ok=True)
        unit.write_text(unit_text(str(vstore)))
    except OSError as e:
        raise ConfigError(f"cannot install the helpers: {e} (run as root?)") from None
    click.echo(f"linked {link} -> {helper}")
    click.echo(f"wrote {unit} (systemctl daemon-reload; systemctl enable --now vstore-mount@POOL)")
