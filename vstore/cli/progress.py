"""Progress reporting for long operations: a rich bar on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from vstore.sizes import format_size


@contextmanager
def progress_bar(label: str, *, stream=None) -> Iterator[Callable[[int, int], None]]:
    """Yield a callback(done, total) that shows progress with rate and ETA."""
    stream = stream or sys.stderr
    if stream.isatty():
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        with Progress("[progress.description]{task.description}", BarColumn(),
                      DownloadColumn(binary_units=True), TransferSpeedColumn(),
                      TimeRemainingColumn(), transient=True) as prog:
            task = prog.add_task(label, total=None)

            def update(done: int, total: int) -> None:
                prog.update(task, completed=done, total=total)

            yield update
        return
    state = {"last": 0.0, "start": time.monotonic()}

    def plain(done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - state["last"] < 2.0:
            return
        state["last"] = now
        rate = done / max(now - state["start"], 1e-6)
        pct = 100.0 * done / total if total else 100.0
        print(f"{label}: {pct:5.1f}% {format_size(done)}/{format_size(total)} "
              f"{format_size(int(rate))}/s", file=stream, flush=True)

    yield plain
