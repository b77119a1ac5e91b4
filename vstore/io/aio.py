"""Structured concurrency over trio: the one helper that runs jobs at once and collects their errors."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

from vstore.errors import VstoreError


def unwrap(exc: BaseException) -> BaseException:
    """The most telling leaf of an exception group (a VstoreError if there is one)."""
    while isinstance(exc, BaseExceptionGroup):
        leaves = list(exc.exceptions)
        exc = next((e for e in leaves if _has_vstore(e)), leaves[0])
    return exc


def _has_vstore(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return any(_has_vstore(e) for e in exc.exceptions)
    return isinstance(exc, VstoreError)


async def run_all(jobs: Sequence[Callable[[], Awaitable[Any]]], *,
                  catch: type[BaseException] | tuple[type[BaseException], ...] = Exception,
                  prefer: type[BaseException] | tuple[type[BaseException], ...] = (),
                  on_error: Callable[[int, BaseException], Any] | None = None) -> list[Any]:
    """Run the jobs concurrently, each to its end; return their results in order or raise one plain error.

    An error of a ``catch`` type does not stop the other jobs (a member write must
    not be cancelled half way because a sibling failed): with ``on_error`` it is
    handed to ``on_error(i, error)`` (awaited if that returns an awaitable) and the
    job's result is None; without, the first one (of a ``prefer`` type if any) is
    raised once all jobs have ended. Anything else (a cancellation, a bug) cancels
    the rest and comes out unwrapped from the exception group.
    """
    results: list[Any] = [None] * len(jobs)
    errors: list[BaseException] = []

    async def one(i: int) -> None:
        try:
            results[i] = await jobs[i]()
        except catch as e:
            if on_error is None:
                errors.append(e)
                return
            res = on_error(i, e)
            if isinstance(res, Awaitable):
                await res

    if len(jobs) == 1:
        await one(0)  # no nursery (and no task) for a single job
    elif jobs:
        try:
            async with trio.open_nursery() as nursery:
                for i in range(len(jobs)):
                    nursery.start_soon(one, i)
        except BaseExceptionGroup as eg:
            leaf = unwrap(eg)
            if isinstance(leaf, trio.Cancelled):
                raise
            raise leaf from None
    if errors:
        raise next((e for e in errors if isinstance(e, prefer)), errors[0]) if prefer else errors[0]
    return results
