"""The micro-batcher: concurrent requests share passes, results go back to their callers, errors stay in their pass."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np

from service.batcher import MicroBatcher


def _forward(calls: list[list[str]], fail_on: str | None = None, delay: float = 0.02):
    def forward(texts, pairs):
        calls.append(list(texts))
        time.sleep(delay)  # a forward pass takes time, so that requests queue behind it
        if fail_on in texts:
            raise RuntimeError("model failed")
        return np.array([[float(len(t)), float(i)] for i, t in enumerate(texts)], dtype=np.float32)

    return forward


def test_requests_that_arrive_together_share_passes_and_get_their_own_rows():
    calls: list[list[str]] = []
    batcher = MicroBatcher(_forward(calls), max_batch_size=8)

    async def main():
        texts = [["x" * (i + 1)] * (1 + i % 3) for i in range(20)]
        return texts, await asyncio.gather(*(batcher(t) for t in texts))

    texts, outputs = asyncio.run(main())
    for sent, got in zip(texts, outputs):
        assert got.shape == (len(sent), 2) and list(got[:, 0]) == [len(t) for t in sent]
    assert sum(len(c) for c in calls) == sum(len(t) for t in texts)  # every text ran exactly once
    assert len(calls) < 20 and max(len(c) for c in calls) <= 8  # shared passes, never over the limit
    assert list(batcher.batch_sizes) == [len(c) for c in calls]


def test_a_request_larger_than_a_turn_takes_turns_with_the_others():
    calls: list[list[str]] = []
    batcher = MicroBatcher(_forward(calls), max_batch_size=4)

    async def main():
        big = asyncio.ensure_future(batcher([f"a{i}" for i in range(10)]))
        other = asyncio.ensure_future(batcher([f"c{i}" for i in range(5)]))
        return await big, await other

    big, other = asyncio.run(main())
    assert big.shape == (10, 2) and other.shape == (5, 2)
    assert list(big[:, 0]) == [len(f"a{i}") for i in range(10)]  # its rows back in order
    # two large requests alternate, a turn each; their last turns share a pass
    assert calls == [["a0", "a1", "a2", "a3"], ["c0", "c1", "c2", "c3"], ["a4", "a5", "a6", "a7"],
                     ["c4", "a8", "a9"]]


def test_a_one_turn_request_does_not_wait_for_a_large_requests_turn():
    # the large request's turn holds the model until the small request has its answer: the small one runs beside
    # it, in the second lane (were it queued behind the turn, this would never finish)
    turn_running, small_answered = threading.Event(), threading.Event()
    calls: list[list[str]] = []

    def forward(texts, pairs):
        calls.append(list(texts))
        if texts[0].startswith("a"):
            turn_running.set()
            assert small_answered.wait(10), "the one-text request waited for the large request's turn"
        return np.array([[float(len(t)), 0.0] for t in texts], dtype=np.float32)

    batcher = MicroBatcher(forward, max_batch_size=4)

    async def main():
        big = asyncio.ensure_future(batcher([f"a{i}" for i in range(6)]))
        await asyncio.to_thread(turn_running.wait, 10)
        small = await asyncio.wait_for(batcher(["b"]), 10)
        small_answered.set()
        return await big, small

    big, small = asyncio.run(main())
    assert list(big[:, 0]) == [2.0] * 6 and list(small[:, 0]) == [1.0]
    assert calls == [["a0", "a1", "a2", "a3"], ["b"], ["a4", "a5"]]


def test_one_turn_requests_pool_in_the_second_lane_and_never_join_a_large_turn():
    calls: list[list[str]] = []
    lock = threading.Lock()

    def forward(texts, pairs):
        with lock:
            calls.append(list(texts))
        time.sleep(0.05 if texts[0].startswith("a") else 0.001)
        return np.array([[float(len(t)), 0.0] for t in texts], dtype=np.float32)

    batcher = MicroBatcher(forward, max_batch_size=4)

    async def main():
        big = asyncio.ensure_future(batcher([f"a{i}" for i in range(8)]))
        await asyncio.sleep(0.01)  # the first turn is running
        smalls = await asyncio.gather(*(batcher([f"s{i}"]) for i in range(3)))
        return await big, smalls

    big, smalls = asyncio.run(main())
    assert big.shape == (8, 2) and [s.shape for s in smalls] == [(1, 2)] * 3
    assert ["s0", "s1", "s2"] in calls  # pooled into one pass of their own
    assert all(len({t[0] for t in call}) == 1 for call in calls)  # no pass mixes the two kinds


def test_a_turn_is_bounded_by_tokens_too():
    calls: list[list[str]] = []
    # each text costs its length: turns of at most 10 "tokens"
    batcher = MicroBatcher(_forward(calls), max_batch_size=32, turn_tokens=10, cost=lambda text, pair: len(text))

    async def main():
        return await asyncio.gather(batcher(["x" * 6, "y" * 6, "z" * 3]), batcher(["w" * 20]), batcher(["v" * 20]))

    asyncio.run(main())
    # the large request's turns: 6 + 6 > 10, then 6 + 3; a one-turn request over the budget runs alone
    assert sorted(calls) == sorted([["x" * 6], ["y" * 6, "z" * 3], ["w" * 20], ["v" * 20]])


def test_a_failing_pass_fails_only_its_requests():
    calls: list[list[str]] = []
    batcher = MicroBatcher(_forward(calls, fail_on="bad"), max_batch_size=2)

    async def main():
        first = asyncio.ensure_future(batcher(["slow"]))  # occupies the model while the rest queue
        await asyncio.sleep(0.005)
        bad = asyncio.ensure_future(batcher(["bad", "x"]))
        good = asyncio.ensure_future(batcher(["fine", "y"]))
        return await asyncio.gather(first, bad, good, return_exceptions=True)

    first, bad, good = asyncio.run(main())
    assert isinstance(bad, RuntimeError)
    assert first.shape == (1, 2) and good.shape == (2, 2)


def test_a_cancelled_request_does_not_stop_the_others():
    calls: list[list[str]] = []
    batcher = MicroBatcher(_forward(calls, delay=0.05), max_batch_size=1)

    async def main():
        first = asyncio.ensure_future(batcher(["one"]))
        await asyncio.sleep(0.01)
        gone = asyncio.ensure_future(batcher(["gone"]))
        last = asyncio.ensure_future(batcher(["last"]))
        await asyncio.sleep(0.01)
        gone.cancel()
        return await first, await last, gone.cancelled()

    first, last, cancelled = asyncio.run(main())
    assert first.shape == (1, 2) and last.shape == (1, 2) and cancelled
    assert ["gone"] not in calls  # a request whose caller left is not computed
