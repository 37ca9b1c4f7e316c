"""Small asyncio helpers.

On Python 3.11, `asyncio.wait_for` can swallow a cancellation when the awaited thing
finishes in the same loop turn (fixed in 3.12): a long-running loop built on it may then
ignore `task.cancel()` and never stop. These use `asyncio.timeout`, which does not.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait for `event` at most `timeout` seconds; whether it is set."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await event.wait()
    return event.is_set()


async def within(aw: Awaitable[T], timeout: float) -> T:
    """Await `aw` with a time limit (TimeoutError past it)."""
    async with asyncio.timeout(timeout):
        return await aw


async def stop_task(task: asyncio.Task[object] | None, *, nag: float = 1.0) -> None:
    """Cancel `task` and wait for it to end, cancelling again if a cancellation was lost."""
    if task is None:
        return
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=nag)
    if not task.cancelled():
        with contextlib.suppress(BaseException):
            task.result()
