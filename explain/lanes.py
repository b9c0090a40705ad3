"""Parts of one piece of work run a few at once, in lanes: the calling thread and helpers from a
pool each take the next part until none is left. The path gradients' chunks run this way
(:meth:`explain.model.ExplainableModel._run_chunks`), and so do the halves of the adaptive
refinement's map bookkeeping (:func:`explain.integrated_gradients._in_halves`)."""

from __future__ import annotations

import threading
from concurrent.futures import Executor, wait
from typing import Any, Callable, Sequence, TypeVar

P = TypeVar("P")


def run_in_lanes(run: Callable[[P], Any], parts: Sequence[P], fold: Callable[[P, Any], None], lanes: int,
                 pool: Callable[[], Executor]) -> None:
    """``fold(part, run(part))`` for every part, in order, with the runs up to ``lanes`` at once:
    the caller's thread and ``lanes - 1`` helpers submitted to ``pool()`` each take the next part
    until none is left, and each result is folded (under a lock, in the parts' order, so sums are
    the same on every call) as soon as those before it are. A lane does not start a part more than
    two rounds of lanes ahead of the fold, so the results waiting in memory stay bounded however
    many parts there are.

    The caller's thread is one of the lanes, so a call never waits on the pool alone: when another
    call holds the pool's threads, it runs its parts itself, and a helper it submitted that has
    not started is cancelled and not waited for (``wait()`` would block until the pool is done
    with the other call's lane). The first error of any lane is raised once every lane that
    started has stopped (they may write into the caller's arrays); no part starts after it."""
    lanes = max(1, min(lanes, len(parts)))
    upcoming = iter(range(len(parts)))  # next() on a range iterator is atomic under the GIL
    state = threading.Condition()
    waiting: dict[int, Any] = {}  # results run, not yet folded
    folded = 0
    failures: list[BaseException] = []

    def lane() -> None:
        nonlocal folded
        for i in upcoming:
            with state:
                state.wait_for(lambda: failures or i < folded + 2 * lanes)
                if failures:
                    return
            try:
                result = run(parts[i])
                with state:
                    waiting[i] = result
                    while folded in waiting and not failures:
                        fold(parts[folded], waiting.pop(folded))
                        folded += 1
                    state.notify_all()
            except BaseException as error:  # noqa: BLE001 - raised in the caller below
                with state:
                    failures.append(error)
                    state.notify_all()
                return

    helpers = []
    for _ in range(lanes - 1):
        try:
            helpers.append(pool().submit(lane))
        except RuntimeError:  # the interpreter is shutting down: the caller runs them all
            break
    lane()
    wait([future for future in helpers if not future.cancel()])
    if failures:
        raise failures[0]
    assert folded == len(parts), (folded, len(parts))
