"""How many explanations run at once, and who waits.

An explanation is CPU-bound work of seconds: every gradient pass runs on all the cores
(:mod:`explain.sessions`), so explanations running at once share the cores and each takes as
much longer. Without a limit, a burst of them all slow down together until every one runs past
the request deadline, and none is answered: 16 requests of about 15 s each (each within the
cost budget) on 2 cores all came back 504 after 60 s, having spent the whole minute of both
cores on work nobody received. Here at most ``slots`` run; the rest wait in arrival order (a
waiting request costs a thread, not the cores), at most ``max_waiting`` of them, so the first
ones finish in their own time. A request that finds the queue full, or whose deadline passes
while it waits or leaves too little to start in (:data:`START_SHARE`), is answered 503 at once
with what it waited for: the client can retry, and the
work already admitted is not slowed by it. A client that goes away while waiting leaves the queue.

A waiting request holds a worker thread: the server sizes its thread pool to hold every running
and waiting one with room to spare (:func:`serving.app.create_app`), so waiting explanations never
keep ``:predict`` out of the pool. A request's own cost in time is not known before it runs
(refinement usually stops far below the cap the budget counts), so one started with more than
the floor left may still run past its deadline (504).
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from typing import Iterator

from serving.cancellation import CancellationToken, DeadlineExceeded

#: How often a waiting request looks at its token (a disconnect or the server's shutdown).
_POLL_S = 0.05
#: A request whose turn comes with less than this share of its deadline left (and under
#: :data:`START_FLOOR_S`) is answered 503 instead of started. Requests queued together share a
#: deadline's length, so the one ahead often frees its slot by running past its own deadline,
#: just before the next one's: started with a few hundred ms left, each ran into a 504 in turn
#: (a 5 s deadline, one slot, three waiters: three 504s, no 503).
START_SHARE = 0.25
START_FLOOR_S = 5.0


def _explanations(n: int) -> str:
    return f"{n} explanation{'' if n == 1 else 's'}"


class ServerBusyError(RuntimeError):
    """No explanation slot came free in time, or too many requests wait for one: answered 503."""


class ExplanationSlots:
    """At most ``slots`` explanations at once; up to ``max_waiting`` more wait, first come first served."""

    def __init__(self, slots: int, max_waiting: int) -> None:
        if slots < 1 or max_waiting < 0:
            raise ValueError(f"slots must be >= 1 and max_waiting >= 0, got {slots} and {max_waiting}")
        self.slots, self.max_waiting = slots, max_waiting
        self._running = 0
        self._queue: collections.deque[object] = collections.deque()
        self._changed = threading.Condition()
        self._closed: str | None = None

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def close(self, reason: str) -> None:
        """Start nothing more: every waiting request, and every one that comes, is answered 503
        with ``reason`` (a server going away); those running finish."""
        with self._changed:
            self._closed = reason
            self._changed.notify_all()

    @contextlib.contextmanager
    def slot(self, token: CancellationToken) -> Iterator[None]:
        """Hold one slot for the block, after waiting for it in turn (until the token's deadline)."""
        start = time.monotonic()
        ticket = object()
        with self._changed:
            if self._closed:
                raise ServerBusyError(f"{self._closed}: this explanation was not started; retry")
            if len(self._queue) >= self.max_waiting and (self._running >= self.slots or self._queue):
                raise ServerBusyError(
                    f"the server is busy: {_explanations(self._running)} running and {len(self._queue)} "
                    f"waiting, the most it queues; retry later (--explain_concurrency and "
                    f"--explain_queue set these)")
            self._queue.append(ticket)
            try:
                while self._running >= self.slots or self._queue[0] is not ticket:
                    if self._closed:
                        raise ServerBusyError(f"{self._closed}: this explanation was waiting for a slot and was "
                                              f"not started; retry")
                    remaining = token.remaining_s()
                    try:
                        token.check()  # a disconnect or shutdown leaves the queue now
                    except DeadlineExceeded:
                        raise ServerBusyError(
                            f"the server is busy: this explanation waited {time.monotonic() - start:.1f} s for "
                            f"one of {self.slots} explanation slots and reached its deadline of "
                            f"{token.deadline_s:g} s before one came free; retry later") from None
                    self._changed.wait(_POLL_S if remaining is None else max(0.0, min(_POLL_S, remaining)))
                remaining = token.remaining_s()
                if remaining is not None and token.deadline_s and \
                        remaining < min(START_SHARE * token.deadline_s, START_FLOOR_S):
                    waited = time.monotonic() - start
                    raise ServerBusyError(  # "busy" only if it was: the time may have gone before the queue
                        f"{'the server is busy: ' if waited >= 0.05 else ''}this explanation waited {waited:.1f} s "
                        f"for one of {self.slots} explanation slots and had {max(remaining, 0.0):.1f} s of its "
                        f"{token.deadline_s:g} s deadline left, too little to start; retry later")
            except BaseException:
                self._queue.remove(ticket)
                self._changed.notify_all()
                raise
            self._queue.popleft()
            self._running += 1
            if self._queue and self._running < self.slots:  # the next in line need not wait out a poll
                self._changed.notify_all()
        try:
            yield
        finally:
            with self._changed:
                self._running -= 1
                self._changed.notify_all()
