"""A slow reader gets the tokens produced meanwhile together, in order, none dropped."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from maas.services.worker.coalesce import batches


async def numbers(n: int, fail_at: int = -1) -> AsyncIterator[int]:
    for i in range(n):
        if i == fail_at:
            raise ValueError("engine failed")
        await asyncio.sleep(0)
        yield i


async def test_a_reader_that_keeps_up_gets_one_item_at_a_time():
    got = [b async for b in batches(numbers(20))]
    assert [i for b in got for i in b] == list(range(20))


async def test_a_slow_reader_gets_what_piled_up_in_order():
    got = []
    async for batch in batches(numbers(200), limit=64):
        got.append(batch)
        await asyncio.sleep(0.005)  # falls behind: the source keeps producing meanwhile
    assert [i for b in got for i in b] == list(range(200))
    assert len(got) < 100 and max(len(b) for b in got) <= 64


async def test_an_error_comes_after_the_items_before_it():
    seen: list[int] = []
    with pytest.raises(ValueError, match="engine failed"):
        async for batch in batches(numbers(10, fail_at=7)):
            seen += batch
    assert seen == list(range(7))


async def test_stopping_early_closes_the_source():
    closed = asyncio.Event()

    async def source() -> AsyncIterator[int]:
        try:
            for i in range(10_000):
                await asyncio.sleep(0)
                yield i
        finally:
            closed.set()

    async with contextlib.aclosing(batches(source())) as stream:
        async for _ in stream:
            break
    assert closed.is_set()
