"""Batching a token stream for a slow reader.

The engine produces one delta per token; sending each as its own gRPC message caps a
Python process at some tens of thousands of messages a second. `batches` reads the
source in a task of its own and hands the consumer everything produced since it last
looked: one item at a time while the consumer keeps up (no added latency), several when
it falls behind. Order is kept and nothing is dropped; the buffer is bounded, so a
stalled consumer stalls the source rather than growing memory.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TypeVar

T = TypeVar("T")

_END = object()


async def batches(source: AsyncIterator[T], limit: int = 256) -> AsyncGenerator[list[T], None]:
    queue: asyncio.Queue[object] = asyncio.Queue(limit)

    async def pump() -> None:
        try:
            async for item in source:
                await queue.put(item)
        except Exception as e:  # handed to the consumer, after what came before it
            await queue.put(e)
        else:
            await queue.put(_END)

    task = asyncio.create_task(pump())
    try:
        while True:
            items = [await queue.get()]
            while not queue.empty():
                items.append(queue.get_nowait())
            out: list[T] = []
            for item in items:
                if item is _END:
                    if out:
                        yield out
                    return
                if isinstance(item, Exception):
                    if out:
                        yield out
                    raise item
                out.append(item)  # type: ignore[arg-type]
            yield out
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        aclose = getattr(source, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()
