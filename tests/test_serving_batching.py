"""serving.batching: concurrent submissions share model calls, within TF Serving's bounds (batch
size, wait, queue), and each request gets its own rows or its own error."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from serving.batching import Batcher, BatchingParameters, QueueFullError


class SlowDouble:
    """A model stand-in: ``[2 * x for x in items]`` after a pause (so requests pile up), refusing
    the item ``-1`` the way the real model refuses an undecodable image."""

    def __init__(self, hold: threading.Event | None = None) -> None:
        self.calls: list[list[int]] = []
        self.hold = hold

    def __call__(self, items: list[int]) -> np.ndarray:
        self.calls.append(list(items))
        if self.hold is not None:
            self.hold.wait(30)  # until the test releases it
        else:
            threading.Event().wait(0.05)
        if -1 in items:
            raise ValueError(f"instances[{items.index(-1)}]: cannot decode")
        return np.array(items) * 2


def test_concurrent_requests_share_model_calls_and_get_their_own_rows():
    model = SlowDouble()
    batcher = Batcher(model, BatchingParameters(max_batch_size=8, batch_timeout_micros=20_000))
    requests = [[10 * i + j for j in range(1 + i % 3)] for i in range(24)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda items: batcher.submit(items, timeout_s=60), requests))
    for items, rows in zip(requests, answers):
        np.testing.assert_array_equal(rows, np.array(items) * 2)
    assert len(model.calls) < len(requests)  # batched: fewer model calls than requests
    assert sum(map(len, model.calls)) == sum(map(len, requests))  # every instance run exactly once
    assert max(batcher.batch_sizes) <= 8 and max(batcher.batch_sizes) > 1


def test_a_lone_request_waits_at_most_the_batch_timeout():
    batcher = Batcher(lambda items: np.array(items), BatchingParameters(batch_timeout_micros=10_000))
    # Alone, it never fills a batch: it must still run (timeout_s is a generous bound for a hang).
    np.testing.assert_array_equal(batcher.submit([7], timeout_s=30), [7])
    assert batcher.batch_sizes == [1]


def test_a_request_larger_than_the_batch_runs_alone_and_whole():
    model = SlowDouble()
    batcher = Batcher(model, BatchingParameters(max_batch_size=2, batch_timeout_micros=0))
    np.testing.assert_array_equal(batcher.submit([1, 2, 3, 4, 5], timeout_s=30), [2, 4, 6, 8, 10])
    assert model.calls == [[1, 2, 3, 4, 5]]


def test_an_error_reaches_only_its_own_request():
    model = SlowDouble()
    batcher = Batcher(model, BatchingParameters(max_batch_size=16, batch_timeout_micros=50_000))
    requests = [[1, 2], [3, -1], [5], [6, 7]]

    def submit(items):
        try:
            return batcher.submit(items, timeout_s=60)
        except ValueError as e:
            return str(e)

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(submit, requests))
    assert answers[1] == "instances[1]: cannot decode"  # the index within its own request
    for i in (0, 2, 3):
        np.testing.assert_array_equal(answers[i], np.array(requests[i]) * 2)


def test_a_full_queue_fails_fast():
    release = threading.Event()
    model = SlowDouble(hold=release)
    batcher = Batcher(model, BatchingParameters(max_batch_size=1, batch_timeout_micros=0, max_enqueued_batches=1))
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(batcher.submit, [1], 60)
        while not model.calls:  # the first request is in the model
            threading.Event().wait(0.01)
        queued = pool.submit(batcher.submit, [2], 60)
        while batcher._queued_items < 1:
            threading.Event().wait(0.01)
        with pytest.raises(QueueFullError, match="queue is full"):
            batcher.submit([3])
        release.set()
        assert running.result(60).tolist() == [2] and queued.result(60).tolist() == [4]
    batcher.close()
    with pytest.raises(QueueFullError, match="shutting down"):
        batcher.submit([4])


@pytest.mark.parametrize("field, value", [("max_batch_size", 0), ("batch_timeout_micros", -1),
                                          ("max_enqueued_batches", 0), ("num_batch_threads", 0)])
def test_parameters_are_checked(field, value):
    with pytest.raises(ValueError, match=field):
        BatchingParameters(**{field: value})
