"""Server-side batching of concurrent ``:predict`` requests, as TF Serving's batching does.

One model call on a batch of 8 images costs far less than 8 calls on one image each (one graph
dispatch, one set of large matrix products), so concurrent requests are queued and run together:
one model call per batch, a bounded wait for a batch to fill, a bounded batch size, and a bounded
queue that fails fast when the server is overloaded. The parameter names and meanings are TF
Serving's (``BatchingParameters``: ``max_batch_size``, ``batch_timeout_micros``,
``max_enqueued_batches``, ``num_batch_threads``), so its tuning advice applies unchanged.

A batch is formed from whole requests (a request is never split across batches), so a request's
instances are answered by one model call. When a batch that merges several requests fails, each
request is re-run alone, so an error (e.g. "instances[2] cannot be decoded") reaches only the
request it belongs to, with that request's own instance index.
"""

from __future__ import annotations

import collections
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Generic, Sequence, TypeVar

import numpy as np

T = TypeVar("T")


@dataclass(frozen=True)
class BatchingParameters:
    """TF Serving's batching parameters, with defaults for a CPU server of a few cores."""

    #: Most instances in one model call (TF Serving: ``max_batch_size``). 32 is the explainer's
    #: chunk size too: large enough to fill the cores, small enough to bound activation memory.
    max_batch_size: int = 32
    #: How long the first request of a batch waits for others (``batch_timeout_micros``). 0 (TF
    #: Serving's advice for CPU serving to start from): while the model runs a batch, the next one
    #: fills anyway, so an idle server adds no latency. Measured on MobileNetV2 @ 192, 2 cores,
    #: concurrency 8: 0 gave higher throughput than 1000.
    batch_timeout_micros: int = 0
    #: Queued batches beyond which requests are refused at once (``max_enqueued_batches``), so
    #: an overloaded server answers "busy" instead of letting latency grow without bound.
    max_enqueued_batches: int = 64
    #: Threads running batches (``num_batch_threads``); TensorFlow parallelises within a call.
    num_batch_threads: int = 1

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_enqueued_batches", "num_batch_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"batching {name} must be >= 1, got {getattr(self, name)}")
        if self.batch_timeout_micros < 0:
            raise ValueError(f"batching batch_timeout_micros must be >= 0, got {self.batch_timeout_micros}")


class QueueFullError(RuntimeError):
    """The batching queue holds ``max_enqueued_batches`` batches: the server is overloaded."""


@dataclass
class _Task(Generic[T]):
    items: Sequence[T]
    future: Future


class Batcher(Generic[T]):
    """Runs ``fn(items) -> np.ndarray`` (one row per item) on batches of concurrent submissions.

    ``submit(items)`` blocks until this request's rows are ready and returns them; it may be
    called from any number of threads. Requests larger than ``max_batch_size`` run as a batch of
    their own (a request is the unit of work, as Vertex's ``max_instances`` already bounds it).
    """

    def __init__(self, fn: Callable[[list[T]], np.ndarray], parameters: BatchingParameters | None = None,
                 name: str = "batcher") -> None:
        self._fn = fn
        self.parameters = parameters or BatchingParameters()
        self._queue: collections.deque[_Task[T]] = collections.deque()
        self._queued_items = 0
        self._condition = threading.Condition()
        self._closed = False
        #: Sizes of the batches run so far (instances per model call), for tests and monitoring.
        self.batch_sizes: list[int] = []
        self._threads = [threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True)
                         for i in range(self.parameters.num_batch_threads)]
        for thread in self._threads:
            thread.start()

    def submit(self, items: Sequence[T], timeout_s: float | None = None) -> np.ndarray:
        """This request's rows of ``fn`` over a batch that may hold other requests too.

        Raises what ``fn`` raised for this request, :class:`QueueFullError` when overloaded, or
        ``TimeoutError`` after ``timeout_s``.
        """
        if not items:
            raise ValueError("submit needs at least one item")
        future: Future = Future()
        p = self.parameters
        with self._condition:
            if self._closed:
                raise QueueFullError("the server is shutting down")
            if self._queued_items >= p.max_enqueued_batches * p.max_batch_size:
                raise QueueFullError(f"the batching queue is full ({p.max_enqueued_batches} batches of "
                                     f"{p.max_batch_size} instances); retry later")
            self._queue.append(_Task(list(items), future))
            self._queued_items += len(items)
            self._condition.notify()
        try:
            return future.result(timeout=timeout_s)
        except TimeoutError:
            future.cancel()  # still queued: the batch thread skips it
            raise

    def close(self) -> None:
        """Stop the batch threads once the queue is empty; later submissions are refused."""
        with self._condition:
            self._closed = True
            self._condition.notify_all()

    def _next_batch(self) -> list[_Task[T]] | None:
        """Wait for a first request, then up to ``batch_timeout_micros`` for more to fill the batch."""
        p = self.parameters
        with self._condition:
            while not self._queue:
                if self._closed:
                    return None
                self._condition.wait()
            deadline = time.monotonic() + p.batch_timeout_micros / 1e6
            while self._queued_items < p.max_batch_size and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._condition.wait(remaining)
            batch = [self._queue.popleft()]
            size = len(batch[0].items)
            while self._queue and size + len(self._queue[0].items) <= p.max_batch_size:
                task = self._queue.popleft()
                batch.append(task)
                size += len(task.items)
            self._queued_items -= size
            return batch

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            live = [task for task in batch if task.future.set_running_or_notify_cancel()]
            if live:
                self._run_batch(live)

    def _run_batch(self, batch: list[_Task[T]]) -> None:
        items = [item for task in batch for item in task.items]
        self.batch_sizes.append(len(items))
        try:
            rows = self._fn(items)
        except BaseException as error:  # noqa: BLE001  (delivered to the waiting requests)
            if len(batch) == 1:
                batch[0].future.set_exception(error)
                return
            for task in batch:  # whose error is it? each request alone decides
                self._run_batch([task])
            return
        start = 0
        for task in batch:
            task.future.set_result(rows[start:start + len(task.items)])
            start += len(task.items)
