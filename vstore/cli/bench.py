"""`vstore bench`: the benchmarks of the ``bench`` package (the same program as ``python -m bench``)."""

from __future__ import annotations

import importlib
from collections.abc import Callable

import click

from vstore.errors import ConfigError


def _bench_main() -> Callable[..., int]:
    try:
        return importlib.import_module("bench.__main__").main
    except ImportError as e:
        raise ConfigError(f"the benchmarks cannot be loaded ({e}); reinstall vstore") from None


@click.command()
@click.option("--quick", is_flag=True, help="Small sizes and few workloads (under a minute).")
@click.option("--only", metavar="SECTIONS",
              help="Comma-separated subset of kernels,layouts,stack,iscsi,nfs,rbd,multipath,journal.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), metavar="FILE",
              help="Write the JSON report to FILE (default OUT/bench.json).")
@click.option("--out", type=click.Path(file_okay=False), metavar="DIR",
              help="Output directory for the chart and reports (default ./vstore-bench when installed, "
                   "bench/results in a checkout).")
@click.option("--kinds", default=None, help="Member kinds for the layouts section (default memory,file).")
@click.option("--profile", is_flag=True, help="stack: py-spy on the vstore mount during each job.")
@click.pass_context
def bench(ctx: click.Context, quick: bool, only: str | None, json_path: str | None, out: str | None,
          kinds: str | None, profile: bool) -> None:
    """Benchmark the RAID kernels, the layouts and the whole stack, each against a baseline of the same run.

    Prints tables, writes a JSON report and a PNG chart of the layouts. A missing
    baseline (fio, FUSE, qemu-storage-daemon, ISA-L, matplotlib for the chart) is
    reported as missing; the exit code is 1 only when a benchmark itself broke.
    """
    main = _bench_main()
    sections = importlib.import_module("bench.__main__")
    known = (*sections.CORE, *sections.PEERS)
    if only is not None:
        wanted = [s.strip() for s in only.split(",") if s.strip()]
        unknown = [s for s in wanted if s not in known]
        if unknown or not wanted:
            raise click.BadParameter(f"unknown section(s) {', '.join(unknown) or repr(only)}; "
                                     f"choose from {', '.join(known)}", param_hint="'--only'")
    argv: list[str] = []
    if kinds is not None:
        bad_kinds = [k for k in kinds.split(",") if k not in ("memory", "file")]
        if bad_kinds or not kinds:
            raise click.BadParameter(f"unknown member kind(s) {', '.join(bad_kinds) or repr(kinds)}; "
                                     "choose from memory,file", param_hint="'--kinds'")
        argv += ["--kinds", kinds]
    if quick:
        argv.append("--quick")
    if only is not None:
        argv += ["--only", only]
    if json_path is not None:
        argv += ["--json", json_path]
    if out is not None:
        argv += ["--out", out]
    if profile:
        argv.append("--profile")
    ctx.exit(main(argv, prog="vstore bench"))
