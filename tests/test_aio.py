"""A cancellation that lands in the same instant as a queue item is never lost (Python 3.10/3.11's
`asyncio.wait_for` loses it; a disconnected stream then generated to its last token)."""

import asyncio

import pytest

from engine.serving.aio import get_within


def test_a_cancellation_racing_an_item_still_cancels():
    async def main():
        for _ in range(200):
            q: asyncio.Queue = asyncio.Queue()

            async def consumer():
                while True:
                    await get_within(q, 5.0)

            task = asyncio.ensure_future(consumer())
            await asyncio.sleep(0)
            q.put_nowait(1)
            task.cancel()  # the item and the cancellation in the same instant
            done, _ = await asyncio.wait({task}, timeout=1.0)
            assert done and task.cancelled()

    asyncio.run(main())


def test_items_come_in_order_and_an_empty_queue_times_out():
    async def main():
        q: asyncio.Queue = asyncio.Queue()
        for i in range(3):
            q.put_nowait(i)
        assert [await get_within(q, 1.0) for _ in range(3)] == [0, 1, 2]
        with pytest.raises(asyncio.TimeoutError):
            await get_within(q, 0.05)
        assert q.empty()
        q.put_nowait(7)  # the timed-out getter takes no later item
        assert await get_within(q, 1.0) == 7

    asyncio.run(main())
