"""Async-iterator plumbing for streamed responses: merging the n samples, batching SSE text, SSE framing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any, AsyncIterator, Sequence, TypeVar

T = TypeVar("T")

_DONE = object()


async def merge(iterators: Sequence[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Items of several iterators as they come, tagged with the iterator's index.

    Closing the merged iterator (or an error in one source) cancels and closes every source, so their
    engine requests are aborted.
    """
    if len(iterators) == 1:
        async with contextlib.aclosing(iterators[0]) as only:
            async for item in only:
                yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, iterator: AsyncIterator[T]) -> None:
        try:
            async with contextlib.aclosing(iterator):
                async for item in iterator:
                    await queue.put((index, item))
        except BaseException as error:  # handed to the consumer, which re-raises it
            await queue.put((index, error))
            return
        await queue.put((index, _DONE))

    tasks = [asyncio.create_task(pump(i, it)) for i, it in enumerate(iterators)]
    try:
        num_running = len(tasks)
        while num_running:
            index, item = await queue.get()
            if item is _DONE:
                num_running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def batched(source: AsyncIterator[str], interval_s: float) -> AsyncIterator[str]:
    """Joins strings that arrive within `interval_s` of the last yield; the first one goes out at once.

    Each yield crosses from the model replica to the ingress as one Ray object, so batching caps that
    traffic per stream without delaying a token by more than the interval.
    """
    if interval_s <= 0:
        async with contextlib.aclosing(source):
            async for item in source:
                yield item
        return
    iterator = source.__aiter__()
    pending: asyncio.Future | None = None
    buffer: list[str] = []
    last_yield = float("-inf")
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(iterator.__anext__())
            timeout = max(0.0, last_yield + interval_s - time.monotonic()) if buffer else None
            done, _ = await asyncio.wait({pending}, timeout=timeout)
            if done:
                future, pending = pending, None
                try:
                    buffer.append(future.result())
                except StopAsyncIteration:
                    break
                if time.monotonic() - last_yield < interval_s:
                    continue
            if buffer:
                chunk, buffer = "".join(buffer), []
                last_yield = time.monotonic()
                yield chunk
        if buffer:
            yield "".join(buffer)
    finally:
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
        await iterator.aclose()


def sse(data: dict[str, Any] | str, event: str | None = None) -> str:
    """One server-sent event: an optional `event:` line, then `data: <json>` and a blank line."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    prefix = f"event: {event}\n" if event else ""
    return f"{prefix}data: {payload}\n\n"


SSE_DONE = "data: [DONE]\n\n"
