"""Admission control without an engine: limits, shedding, deadlines, fairness, drain."""

from __future__ import annotations

import asyncio

import pytest

from loraplex.server.admission import AdmissionController, Draining, Overloaded


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def run(coro):
    return asyncio.run(coro)


def test_admits_up_to_the_limit_then_queues_then_sheds_with_retry_after():
    async def scenario():
        ctl = AdmissionController(max_concurrent=2, max_queued=1)
        a = await ctl.acquire("x", 10)
        b = await ctl.acquire("x", 10)
        queued = asyncio.ensure_future(ctl.acquire("x", 10))
        await asyncio.sleep(0)
        assert (ctl.running, ctl.stats().queued) == (2, 1) and not queued.done()
        with pytest.raises(Overloaded) as refused:
            await ctl.acquire("y", 10)
        assert refused.value.reason == "queue_full" and refused.value.retry_after_s >= 1
        ctl.release(a, 2.0)
        c = await queued
        assert c.adapter == "x" and ctl.running == 2 and ctl.stats().queued == 0
        ctl.release(b, 2.0)
        ctl.release(c, 2.0)
        ctl.release(c, 2.0)  # a second release is a no-op
        assert ctl.running == 0

    run(scenario())


def test_deadline_that_cannot_be_met_is_refused_at_once():
    async def scenario():
        clock = Clock()
        ctl = AdmissionController(max_concurrent=1, max_queued=10, clock=clock)
        first = await ctl.acquire("x", 1)
        ctl.release(first, 3.0)  # the server has now seen a 3 s request
        busy = await ctl.acquire("x", 1)
        # a 3 s request queued behind a running one needs about 6 s
        with pytest.raises(Overloaded) as refused:
            await ctl.acquire("x", 1, deadline=clock.now + 4.0)
        assert refused.value.reason == "deadline" and refused.value.retry_after_s == pytest.approx(3.0)
        waiting = asyncio.ensure_future(ctl.acquire("x", 1, deadline=clock.now + 10.0))
        await asyncio.sleep(0)
        assert ctl.stats().queued == 1
        ctl.release(busy, 3.0)
        assert (await waiting).adapter == "x"

    run(scenario())


def test_server_queue_wait_limit_sheds_and_times_out_waiters():
    async def scenario():
        ctl = AdmissionController(max_concurrent=1, max_queued=10, max_queue_wait_s=0.05)
        first = await ctl.acquire("x", 1)
        # nothing observed yet: queue, but give up after the limit
        with pytest.raises(Overloaded, match="passed while it was queued"):
            await ctl.acquire("x", 1)
        assert ctl.stats().queued == 0
        ctl.release(first, 1.0)  # now a request is known to take ~1 s
        ctl.release(await ctl.acquire("x", 1), 1.0)
        busy = await ctl.acquire("x", 1)
        with pytest.raises(Overloaded) as refused:
            await ctl.acquire("x", 1)
        assert refused.value.reason == "queue_wait"
        ctl.release(busy, 1.0)

    run(scenario())


def test_cancelled_waiter_leaves_the_queue_and_its_slot_goes_to_the_next():
    async def scenario():
        ctl = AdmissionController(max_concurrent=1, max_queued=10)
        held = await ctl.acquire("x", 1)
        gone = asyncio.ensure_future(ctl.acquire("x", 1))
        stays = asyncio.ensure_future(ctl.acquire("y", 1))
        await asyncio.sleep(0)
        gone.cancel()
        await asyncio.sleep(0)
        assert ctl.stats().queued == 1
        ctl.release(held, 1.0)
        assert (await stays).adapter == "y" and ctl.running == 1

    run(scenario())


def grant_order(weights=None, arrivals=()):
    """Queue ``arrivals`` (adapter names, in order) behind one running request and return the
    order in which they are admitted."""

    async def scenario():
        ctl = AdmissionController(max_concurrent=1, max_queued=1000, adapter_weights=weights)
        held = await ctl.acquire("warmup", 1)
        order: list[str] = []

        async def one(name):
            ticket = await ctl.acquire(name, 100)
            order.append(name)
            await asyncio.sleep(0)
            ctl.release(ticket, 0.1)

        tasks = [asyncio.ensure_future(one(name)) for name in arrivals]
        await asyncio.sleep(0)
        ctl.release(held, 0.1)
        await asyncio.gather(*tasks)
        return order

    return run(scenario())


def test_a_hot_adapter_does_not_starve_the_others():
    # the hot adapter's 30 requests all arrive before the others' 3 each
    arrivals = ["hot"] * 30 + [f"cold{i}" for i in range(3) for _ in range(3)]
    order = grant_order(arrivals=arrivals)
    positions = {name: [i for i, n in enumerate(order) if n == name] for name in set(arrivals)}
    # every cold adapter is fully served within the first ~4 rounds of the four-way share
    for i in range(3):
        assert max(positions[f"cold{i}"]) < 13, order
    assert len(order) == len(arrivals)


def test_weights_skew_the_share():
    order = grant_order(weights={"gold": 3.0}, arrivals=["gold"] * 40 + ["plain"] * 40)
    first = order[:40]
    assert 27 <= first.count("gold") <= 33, first


def test_drain_refuses_new_requests_and_waits_for_admitted_ones():
    async def scenario():
        ctl = AdmissionController(max_concurrent=1, max_queued=10)
        running = await ctl.acquire("x", 1)
        queued = asyncio.ensure_future(ctl.acquire("x", 1))
        await asyncio.sleep(0)
        ctl.start_draining()
        with pytest.raises(Draining):
            await ctl.acquire("x", 1)
        assert not await ctl.wait_idle(0.01)
        ctl.release(running, 0.5)
        ctl.release(await queued, 0.5)  # the queued one was accepted before the drain: it still runs
        assert await ctl.wait_idle(0.01)

    run(scenario())


def test_full_queue_sheds_the_adapter_holding_more_than_its_share():
    async def scenario():
        ctl = AdmissionController(max_concurrent=1, max_queued=4)
        held = await ctl.acquire("hot", 1)
        hot = [asyncio.ensure_future(ctl.acquire("hot", 1)) for _ in range(4)]
        await asyncio.sleep(0)
        cold = asyncio.ensure_future(ctl.acquire("cold", 1))  # queue full, but hot holds all of it
        await asyncio.sleep(0)
        assert ctl.stats().queued_per_adapter == {"hot": 3, "cold": 1}
        with pytest.raises(Overloaded, match="more than its share"):
            await hot[-1]
        with pytest.raises(Overloaded, match="overloaded"):  # hot itself cannot push anyone out
            await ctl.acquire("hot", 1)
        ctl.release(held, 1.0)
        assert (await cold).adapter == "cold"  # and it is granted first
        for task in hot[:-1]:
            task.cancel()

    run(scenario())


def test_wait_estimate_counts_only_what_fair_share_puts_ahead():
    async def scenario():
        ctl = AdmissionController(max_concurrent=2, max_queued=100)
        first = await ctl.acquire("hot", 1)
        ctl.release(first, 4.0)  # service time 4 s: with 2 slots busy one frees every 2 s
        held = [await ctl.acquire("hot", 1) for _ in range(2)]
        waiting = [asyncio.ensure_future(ctl.acquire("hot", 1)) for _ in range(6)]
        await asyncio.sleep(0)
        assert ctl.queued_ahead("hot") == 6 and ctl.estimated_wait_s("hot") == pytest.approx(14.0)
        assert ctl.queued_ahead("cold") == 0 and ctl.estimated_wait_s("cold") == pytest.approx(2.0)
        for task in waiting:
            task.cancel()
        for ticket in held:
            ctl.release(ticket, 4.0)

    run(scenario())
