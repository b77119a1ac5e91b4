"""`vstore torture`: a consistency campaign against a throwaway pool on real members, or a scratch volume."""

from __future__ import annotations

import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import click
import trio

from vstore.cli.common import LEVELS, echo_json, home_of, refuse_if_mounted, run
from vstore.errors import ConfigError
from vstore.sizes import format_size

SCRATCH = "torture-scratch"
STAT_KEYS = ("rounds", "ops", "bytes_written", "crashes", "failures", "rebuilds", "moves", "switches",
             "paths", "corruptions", "corrupt_reads", "checksum_mismatches", "checksum_repairs", "checks")


def new_summary(seed: int, *, level: str | None, pool: str | None, replay: bool) -> dict[str, Any]:
    """The --json summary before the run: every key present, counts null until a campaign ran."""
    return {"ok": False, "mode": "replay" if replay else "campaign", "seed": seed, "level": level,
            "pool": pool, **dict.fromkeys(STAT_KEYS), "notes": [], "failure": None}


def _fill_stats(summary: dict[str, Any], stats: Any) -> None:
    """Copy a campaign's counts into the summary."""
    for key in STAT_KEYS:
        summary[key] = getattr(stats, key)
    summary["notes"] = sorted(stats.notes)


def _size(text: str) -> int:
    from vstore.sizes import parse_size

    return parse_size(text)


def _load_wrap(spec: str | None) -> tuple[Any, str]:
    """MODULE:CALLABLE[@members|@journal|@all] -> (callable, where)."""
    if not spec:
        return None, "all"
    import importlib

    target, _, where = spec.partition("@")
    where = where or "all"
    mod, _, attr = target.partition(":")
    if where not in ("all", "members", "journal") or not mod or not attr:
        raise click.BadParameter(f"{spec!r}: use MODULE:CALLABLE[@members|@journal|@all]",
                                 param_hint="--wrap")
    try:
        fn = getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as e:
        raise click.BadParameter(f"{spec!r}: {e}", param_hint="--wrap") from None
    return fn, where


class Reporter:
    """The live summary: a rich table on a terminal, a plain line a second otherwise (to stderr with err)."""

    def __init__(self, title: str, *, err: bool = False) -> None:
        self.title = title
        self.err = err
        self.tty = (sys.stderr if err else sys.stdout).isatty()
        self.live: Any = None
        self.last = 0.0

    def __enter__(self) -> Reporter:
        if self.tty:
            from rich.console import Console
            from rich.live import Live

            self.live = Live(refresh_per_second=4, transient=False, console=Console(stderr=self.err))
            self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)

    def line(self, c: Any) -> str:
        s = c.stats
        return (f"[{time.monotonic() - c.started:5.1f}s] rounds {s.rounds}  ops {s.ops}  "
                f"written {format_size(s.bytes_written)}  crashes {s.crashes}  "
                f"failures {s.failures}  rebuilds {s.rebuilds}  moves {s.moves}  "
                f"journal-switches {s.switches}  path-failures {s.paths}  "
                f"corruptions {s.corruptions}  corrupt-reads {s.corrupt_reads}  "
                f"checksum-errors {s.checksum_mismatches}  checksum-repairs {s.checksum_repairs}  "
                f"checks {s.checks}  {c.phase}")

    def update(self, c: Any, force: bool = False) -> None:
        now = time.monotonic()
        if self.live is not None:
            from rich.table import Table

            s = c.stats
            # Two columns, one stat a row: fits any terminal width.
            t = Table(title=self.title, show_header=False)
            t.add_column(style="bold")
            t.add_column(justify="right")
            for key, value in (("time", f"{now - c.started:.1f}s"), ("rounds", s.rounds),
                               ("operations", s.ops), ("written", format_size(s.bytes_written)),
                               ("crashes", s.crashes), ("member failures", s.failures),
                               ("rebuilds", s.rebuilds), ("moves", s.moves),
                               ("journal switches", s.switches), ("path failures", s.paths),
                               ("silent corruptions", s.corruptions), ("corrupted reads", s.corrupt_reads),
                               ("checksum errors", s.checksum_mismatches),
                               ("checksum repairs", s.checksum_repairs),
                               ("checks", s.checks), ("state", c.phase)):
                t.add_row(key, str(value))
            self.live.update(t)
        elif force or now - self.last >= 1.0:
            click.echo(self.line(c), err=self.err)
            self.last = now


@click.command("torture")
@click.argument("spec", nargs=-1, required=True, metavar="POOL | URI...")
@click.option("--level", type=click.Choice(LEVELS), default=None,
              help="Build a throwaway pool of this level on the member URIs given.")
@click.option("--seed", type=int, default=None, help="Campaign seed (default: random, printed).")
@click.option("--time", "duration", default="60s", show_default=True, help="How long to run (10s, 2m).")
@click.option("--crashes", is_flag=True,
              help="Cut the power at random points (also during recovery, member moves and journal "
                   "attach/detach, onto memory devices s0 and j), reopen, check.")
@click.option("--failures", is_flag=True,
              help="Fail members (and paths of multipath members) within the level's redundancy; heal and "
                   "rebuild; silent corruption (reads of a member return flipped bits, no error).")
@click.option("--checksums", is_flag=True,
              help="Make the throwaway pool with block checksums (vstore create --checksums): "
                   "corrupted reads must be caught and repaired.")
@click.option("--no-corruption", is_flag=True,
              help="Leave silent corruption out of --failures (a pool without checksums cannot catch it).")
@click.option("--journal", default="none", show_default=True, metavar="none|memory|URI",
              help="The throwaway pool's journal (none: write-intent bitmap).")
@click.option("--journal-size", default="4M", show_default=True, help="Journal size.")
@click.option("--chunk", default="4K", show_default=True, help="Chunk size of the throwaway pool.")
@click.option("--member-size", default="8M", show_default=True,
              help="Bytes of each member the throwaway pool uses (missing files are created).")
@click.option("--window", default="256K", show_default=True, help="Bytes of the device the workload touches.")
@click.option("--align", default="auto", show_default=True,
              help="Round offsets and lengths to this many bytes (auto: 512 when a member is an "
                   "iSCSI LUN, which takes whole sectors only; else 1, any alignment).")
@click.option("--ops", type=click.IntRange(1, 10000), default=24, show_default=True,
              help="Most operations per round.")
@click.option("--rounds", type=click.IntRange(1), default=None, help="Stop after this many rounds.")
@click.option("--no-rebuild", is_flag=True, help="A healed member the pool dropped stays out.")
@click.option("--wrap", default=None, metavar="MODULE:CALLABLE[@members|@journal]",
              help="Put your own layer over every member (or the journal): CALLABLE(device) -> device.")
@click.option("--replay", default=None, metavar="SCHEDULE",
              help="Run this one schedule (as printed after a failure) instead of a campaign.")
@click.option("--schedule", "schedule_file", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Run the schedule in this file instead of a campaign.")
@click.option("--shrink-time", default="30s", show_default=True, help="Time to spend shrinking a failure.")
@click.option("--force", is_flag=True, help="Overwrite members that belong to another vstore pool.")
@click.option("--json", "as_json", is_flag=True,
              help="The summary as one JSON document on stdout; progress goes to stderr (see README).")
@click.pass_context
def torture(ctx: click.Context, spec: tuple[str, ...], level: str | None, seed: int | None,
            duration: str, crashes: bool, failures: bool, checksums: bool, no_corruption: bool,
            journal: str, journal_size: str,
            chunk: str, member_size: str, window: str, align: str, ops: int, rounds: int | None,
            no_rebuild: bool, wrap: str | None, replay: str | None, schedule_file: str | None,
            shrink_time: str, force: bool, as_json: bool) -> None:
    """Torture a pool: random I/O, crashes and failures, checked against a model.

    \b
    Throwaway pool:  vstore torture --level raid5 [--crashes] [--failures] [--checksums] URI...
      builds a fresh pool on the members each round (they are overwritten; comma-joined
      paths make a multipath member); crashes are simulated on the real members by
      recording their writes and flushes and writing back the bytes a power cut leaves.
    Existing pool:   vstore torture POOL
      runs the workload on a scratch volume 'torture-scratch' (created, then removed);
      crashes and failures need a throwaway pool.

    Checks: (a) acknowledged data intact, (b) no torn write units, (c) parity
    consistent (scrub), (d) degraded reads identical; a wrong read after silent
    corruption is named as such (caught with --checksums). A failure prints the seed and
    the shrunk schedule as a command line that reproduces it. Exit 0: all checks
    passed; 1: a check failed; 2: bad usage.

    
    Schedules (--replay, --schedule) are comma-separated steps:
      w:OFF:LEN:SEED  write        c:OFF:LEN:SEED+...  concurrent writes
      r:OFF:LEN       read, check  f                   flush
      d:OFF:LEN       discard      x:M / h:M           member M fails / is healed
      x:M:short:F     member M's reads come back short; x:M:shrink:F: it ends at F of its size
      p:M:P / q:M:P   path P of member M fails / returns
      s:M:MS          member M answers MS ms late
      z:M:N           member M's next N reads return flipped bits (silent corruption)
      m:M             member M moves to a spare     j:1 / j:0  journal attached / detached
      crash@FRAC:MODE:SEED   power cut after FRAC of the previous step's member I/O;
                             MODE random|drop|keep decides the unflushed writes
    """
    from vstore.testing import torture as T

    try:
        seconds = T.parse_time(duration)
        shrink_budget = T.parse_time(shrink_time)
        sizes = {k: _size(v) for k, v in (("chunk", chunk), ("member-size", member_size),
                                          ("window", window), ("journal-size", journal_size))}
    except ConfigError as e:
        raise click.UsageError(str(e)) from None
    wrap_fn, wrap_where = _load_wrap(wrap)
    if align == "auto":
        iscsi = any(p.strip().lower().startswith("iscsi://") for m in spec for p in m.split(","))
        align_bytes = 512 if iscsi else 1
    else:
        try:
            align_bytes = _size(align)
        except ConfigError as e:
            raise click.UsageError(str(e)) from None
    if replay and schedule_file:
        raise click.UsageError("give --replay or --schedule, not both")
    schedule = None
    if schedule_file:
        replay = Path(schedule_file).read_text()
    if replay is not None:
        try:
            schedule = T.parse_schedule(replay)
        except ConfigError as e:
            raise click.UsageError(str(e)) from None
    if seed is None:
        import random

        seed = random.SystemRandom().randrange(1 << 31)
    if not (logging.getLogger().level <= logging.INFO):
        # Member failures and crash recoveries are the point here, not news.
        logging.getLogger("vstore").setLevel(logging.CRITICAL)

    if level is None:
        if len(spec) != 1 or "://" in spec[0]:
            raise click.UsageError("member URIs need --level (a throwaway pool); an existing pool "
                                   "is given by its name alone")
        if checksums:
            raise click.UsageError("--checksums makes a throwaway pool with checksums (--level and "
                                   "member URIs); an existing pool keeps them or not as created")
        if crashes or failures or schedule is not None and any(
                o.kind in "xhpqsmjz" or o.kind == "crash" for o in schedule):
            raise click.UsageError("crashes and failures need a throwaway pool (--level and member "
                                   "URIs): they would harm an existing pool")
        summary = new_summary(seed, level=None, pool=spec[0], replay=schedule is not None)
        ok = _existing_pool(ctx, spec[0], seed=seed, seconds=seconds, ops=ops, rounds=rounds,
                            window=sizes["window"], schedule=schedule, shrink_budget=shrink_budget,
                            summary=summary, err=as_json)
        _finish(summary, ok, as_json)

    jr = None if journal.lower() == "none" else journal
    opts = dict(level=level, members=list(spec), journal=jr, sizes=sizes, seed=seed,
                seconds=seconds, crashes=crashes, failures=failures, ops=ops, rounds=rounds,
                checksums=checksums, corruption=failures and not no_corruption,
                rebuild=not no_rebuild, wrap=(wrap_fn, wrap_where), schedule=schedule, align=align_bytes,
                shrink_budget=shrink_budget, force=force)
    rerun = ["vstore", "torture", "--level", level, "--chunk", chunk, "--member-size", member_size,
             "--window", window, "--align", str(align_bytes)]
    if jr:
        rerun += ["--journal", journal, "--journal-size", journal_size]
    if checksums:
        rerun.append("--checksums")
    if no_corruption:
        rerun.append("--no-corruption")
    if no_rebuild:
        rerun.append("--no-rebuild")
    if wrap:
        rerun += ["--wrap", wrap]
    if force:
        rerun.append("--force")
    rerun += ["--seed", str(seed), *spec]
    summary = new_summary(seed, level=level, pool=None, replay=schedule is not None)
    ok = _throwaway(rerun, **opts, summary=summary, err=as_json)
    _finish(summary, ok, as_json)


def _finish(summary: dict[str, Any], ok: bool, as_json: bool) -> None:
    """Print the JSON summary (with --json) and exit 0 on PASS, 1 on FAIL."""
    summary["ok"] = ok
    if as_json:
        echo_json(summary)
    sys.exit(0 if ok else 1)


def _report_failure(rerun: list[str], seed: int, failure: Any, *, round_info: str = "",
                    err: bool = False) -> dict[str, Any]:
    """Print FAIL, the schedules and the rerun command line; the same as the summary's "failure"."""
    from vstore.testing.torture import format_schedule

    first = failure.first or failure.outcome
    click.echo(f"FAIL{round_info}: {first.message}", err=err)
    if failure.schedule != failure.minimal:
        click.echo(f"  schedule ({len(failure.schedule)} steps): {format_schedule(failure.schedule)}",
                   err=err)
    minimal = format_schedule(failure.minimal)
    click.echo(f"  minimal schedule ({len(failure.minimal)} steps, seed {seed}): {minimal}", err=err)
    if failure.schedule != failure.minimal:
        click.echo(f"  minimal failure: {failure.outcome.message}", err=err)
    command = shlex.join([*rerun, "--replay", minimal])
    click.echo("rerun: " + command, err=err)
    return {"message": first.message, "step": first.step, "schedule": format_schedule(failure.schedule),
            "minimal": minimal, "minimal_steps": len(failure.minimal),
            "minimal_message": failure.outcome.message, "rerun": command}


def _throwaway(rerun: list[str], *, level: str, members: list[str], journal: str | None,
               sizes: dict[str, int], seed: int, seconds: float, crashes: bool, failures: bool,
               checksums: bool, corruption: bool, ops: int, rounds: int | None, rebuild: bool, wrap: tuple[Any, str],
               schedule: list[Any] | None, shrink_budget: float, force: bool, align: int,
               summary: dict[str, Any], err: bool) -> bool:
    """A campaign (or one schedule) on throwaway pools built on the members; True when it passed."""
    from vstore.testing import torture as T

    def say(text: str) -> None:
        click.echo(text, err=err)

    async def main() -> bool:
        rig = await T.build_rig(members, member_size=sizes["member-size"], journal=journal,
                                journal_size=sizes["journal-size"], wrap=wrap[0],
                                wrap_where=wrap[1], force=force, spare=crashes)
        try:
            shape = await T.pool_shape(rig, level, chunk=sizes["chunk"], journal=journal is not None,
                                       window=sizes["window"], checksums=checksums)

            made: list[T.Runner] = []

            async def make() -> T.Runner:
                made.append(T.Runner(T.PoolTarget(rig, level, chunk=sizes["chunk"],
                                                  journal=journal is not None, rebuild=rebuild,
                                                  checksums=checksums),
                                     window=shape.window, align=align))
                return made[-1]

            desc = (f"{level} pool of {shape.members} members ({', '.join(m.split('://')[0] for m in members)}), "
                    f"chunk {format_size(shape.chunk)}, window {format_size(shape.window)}, align {align}, "
                    f"{'journal ' + journal if journal else 'bitmap'}"
                    f"{', checksums' if checksums else ''}; seed {seed}")
            if schedule is not None:
                say(f"replaying {len(schedule)} steps on a {desc}")
                outcome = await T.run_schedule(make, schedule)
                if outcome.ok:
                    s = made[-1].stats
                    extra = (f" ({s.corrupt_reads} reads flipped by silent corruption, "
                             f"{s.checksum_mismatches} checksum errors, {s.checksum_repairs} "
                             "blocks rewritten)") if s.corruptions else ""
                    say(f"PASS: the schedule ran and every check passed{extra}")
                    return True
                failure = T.Failure(seed, list(schedule), list(schedule), outcome)
                summary["failure"] = _report_failure(rerun, seed, failure,
                                                     round_info=f" at step {outcome.step}", err=err)
                return False
            say(f"torture: {desc}; {'crashes ' if crashes else ''}"
                f"{'failures ' if failures else ''}{'corruption ' if corruption else ''}for {seconds:g}s")
            with Reporter(f"vstore torture {level}", err=err) as rep:
                camp = T.Campaign(make, shape, seed=seed, seconds=seconds, crashes=crashes,
                                  failures=failures, corruption=corruption, ops=ops, max_rounds=rounds,
                                  shrink_budget=shrink_budget, on_round=rep.update)
                failure = await camp.run()
                camp.phase = "failed" if failure else "passed"
                rep.update(camp, force=True)
            s = camp.stats
            _fill_stats(summary, s)
            for note in sorted(s.notes):
                say(f"note: {note}")
            if failure is None:
                say(f"PASS: {s.rounds} rounds, {s.ops} operations, {s.crashes} crashes, "
                    f"{s.failures} member failures, {s.rebuilds} rebuilds, {s.moves} moves, "
                    f"{s.switches} journal switches, {s.paths} path failures, "
                    f"{s.corruptions} silent corruptions ({s.corrupt_reads} reads flipped, "
                    f"{s.checksum_mismatches} checksum errors, {s.checksum_repairs} blocks rewritten), "
                    f"{s.checks} checks; seed {seed}")
                return True
            summary["failure"] = _report_failure(rerun, seed, failure, round_info=f" in round {s.rounds}",
                                                 err=err)
            return False
        finally:
            with trio.CancelScope(shield=True):
                await rig.aclose()

    return run(main)


def _existing_pool(ctx: click.Context, name: str, *, seed: int, seconds: float, ops: int,
                   rounds: int | None, window: int, schedule: list[Any] | None,
                   shrink_budget: float, summary: dict[str, Any], err: bool) -> bool:
    """A campaign (or one schedule) on a scratch volume of pool name; True when it passed."""
    from vstore.pool.pool import Pool
    from vstore.testing import torture as T
    from vstore.testing.faults import Rig

    home = home_of(ctx)
    refuse_if_mounted(home, name)

    async def main() -> bool:
        pool = await Pool.open(home, name)
        rig = Rig()  # no members: nothing is recorded or crashed
        await rig.start()
        try:
            if SCRATCH in pool.volumes:
                await pool.remove_volume(SCRATCH)  # left by an interrupted run
            vol = await pool.create_volume(SCRATCH, window)
            shape = T.Shape(window=vol.size, level=pool.level, chunk=pool.meta["chunk"],
                            row=(pool.layout.row_bytes if pool.layout is not None else None) or pool.meta["chunk"])

            async def make() -> T.Runner:
                return T.Runner(T.VolumeTarget(rig, pool, SCRATCH), window=vol.size)

            summary["level"] = pool.level
            rerun = ["vstore", "torture", "--window", str(window), "--seed", str(seed), name]
            if schedule is not None:
                outcome = await T.run_schedule(make, schedule)
                if outcome.ok:
                    click.echo("PASS: the schedule ran and every check passed", err=err)
                    return True
                summary["failure"] = _report_failure(rerun, seed, T.Failure(seed, schedule, schedule, outcome),
                                                     err=err)
                return False
            click.echo(f"torture: scratch volume {SCRATCH!r} ({format_size(vol.size)}) in {pool.level} "
                       f"pool {name!r}; seed {seed}; for {seconds:g}s", err=err)
            with Reporter(f"vstore torture {name}", err=err) as rep:
                camp = T.Campaign(make, shape, seed=seed, seconds=seconds, crashes=False,
                                  failures=False, ops=ops, max_rounds=rounds,
                                  shrink_budget=shrink_budget, on_round=rep.update)
                failure = await camp.run()
                camp.phase = "failed" if failure else "passed"
                rep.update(camp, force=True)
            _fill_stats(summary, camp.stats)
            if failure is None:
                click.echo(f"PASS: {camp.stats.rounds} rounds, {camp.stats.ops} operations, "
                           f"{camp.stats.checks} checks; seed {seed}", err=err)
                return True
            summary["failure"] = _report_failure(rerun, seed, failure, err=err)
            return False
        finally:
            with trio.CancelScope(shield=True):
                try:
                    if SCRATCH in pool.volumes:
                        await pool.remove_volume(SCRATCH)
                finally:
                    await rig.aclose()
                    await pool.aclose()

    return run(main)
