"""Small structured-concurrency helpers over trio."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

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


async def gather(*thunks: Callable[[], Awaitable[object]]) -> list[object]:
    """Run the thunks concurrently; return their results in order or raise one plain error."""
    results: list[object] = [None] * len(thunks)

    async def run(i: int, fn: Callable[[], Awaitable[object]]) -> None:
        results[i] = await fn()

    if len(thunks) == 1:
        results[0] = await thunks[0]()
        return results
    try:
        async with trio.open_nursery() as nursery:
            for i, fn in enumerate(thunks):
                nursery.start_soon(run, i, fn)
    except BaseExceptionGroup as eg:
        leaf = unwrap(eg)
        if isinstance(leaf, trio.Cancelled):
            raise
        raise leaf from None
    return results
