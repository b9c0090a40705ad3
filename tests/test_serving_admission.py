"""Explanations run a few at a time and the rest wait their turn (:mod:`serving.admission`)."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from serving.admission import ExplanationSlots, ServerBusyError
from serving.cancellation import CancellationToken, ClientGone


def _start(slots: ExplanationSlots, token: CancellationToken, order: list, name: str, hold: threading.Event):
    """A thread that takes a slot, notes ``name`` in ``order``, and keeps it until ``hold`` is set."""
    errors: list[BaseException] = []

    def work():
        try:
            with slots.slot(token):
                order.append(name)
                hold.wait(10)
        except BaseException as e:  # noqa: BLE001  (the test reads it)
            errors.append(e)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread, errors


def _until(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_explanations_wait_their_turn_in_arrival_order():
    slots, order, release = ExplanationSlots(1, 3), [], threading.Event()
    threads = []
    for name in "abcd":  # each starts waiting before the next arrives
        threads.append(_start(slots, CancellationToken(), order, name, release))
        _until(lambda: slots.running + slots.waiting == len(threads))
    assert order == ["a"] and slots.waiting == 3
    release.set()
    for thread, errors in threads:
        thread.join(10)
        assert not errors
    assert order == ["a", "b", "c", "d"] and slots.running == slots.waiting == 0


def test_a_full_queue_and_a_deadline_reached_while_waiting_are_busy_answers():
    slots, order, release = ExplanationSlots(1, 1), [], threading.Event()
    first = _start(slots, CancellationToken(), order, "first", release)
    _until(lambda: slots.running == 1)
    waiting = _start(slots, CancellationToken(deadline_s=2.0), order, "late", release)
    _until(lambda: slots.waiting == 1)
    with pytest.raises(ServerBusyError, match="1 explanation running and 1 waiting"):
        with slots.slot(CancellationToken()):
            pass
    waiting[0].join(10)
    (error,) = waiting[1]
    assert isinstance(error, ServerBusyError) and "reached its deadline of 2 s" in str(error)
    assert slots.waiting == 0  # it left the queue
    release.set()
    first[0].join(10)
    assert order == ["first"]


class _ClockToken(CancellationToken):
    """A token whose time left the test sets: what a turn finds, without racing a real clock."""

    def __init__(self, left: float) -> None:
        super().__init__(deadline_s=10.0)
        self.left = left

    def remaining_s(self) -> float:
        return self.left

    def check(self) -> None:
        if self.cancelled:
            super().check()


def test_a_turn_that_comes_too_late_to_start_is_a_busy_answer():
    """A request whose turn comes with under a quarter of its deadline left is not started (it
    would run into a 504, as each of a queue with one deadline's length did in turn); one with
    more is."""
    slots, order, release = ExplanationSlots(1, 2), [], threading.Event()
    first = _start(slots, CancellationToken(), order, "first", release)
    _until(lambda: slots.running == 1)
    late, in_time = _ClockToken(10.0), _ClockToken(10.0)
    waiting = [_start(slots, late, order, "late", release), _start(slots, in_time, order, "in time", release)]
    _until(lambda: slots.waiting == 2)
    late.left, in_time.left = 2.0, 3.0  # 2.5 s is a quarter of 10 s
    release.set()
    for thread, _ in [first, *waiting]:
        thread.join(10)
    (error,) = waiting[0][1]
    assert isinstance(error, ServerBusyError) and "had 2.0 s of its 10 s deadline left, too little to start" in str(error)
    assert not waiting[1][1] and order == ["first", "in time"]


def test_a_closing_server_answers_the_waiting_at_once_and_lets_the_running_finish():
    slots, order, release = ExplanationSlots(1, 2), [], threading.Event()
    first = _start(slots, CancellationToken(), order, "first", release)
    _until(lambda: slots.running == 1)
    waiting = _start(slots, CancellationToken(), order, "waiting", release)
    _until(lambda: slots.waiting == 1)
    slots.close("the server is shutting down")
    waiting[0].join(10)
    (error,) = waiting[1]
    assert isinstance(error, ServerBusyError) and "shutting down: this explanation was waiting" in str(error)
    with pytest.raises(ServerBusyError, match="was not started"):
        with slots.slot(CancellationToken()):
            pass
    release.set()
    first[0].join(10)
    assert not first[1] and order == ["first"]


def test_a_client_that_leaves_while_waiting_leaves_the_queue():
    slots, order, release = ExplanationSlots(1, 2), [], threading.Event()
    first = _start(slots, CancellationToken(), order, "first", release)
    _until(lambda: slots.running == 1)
    token = CancellationToken()
    gone = _start(slots, token, order, "gone", release)
    after = _start(slots, CancellationToken(), order, "after", release)
    _until(lambda: slots.waiting == 2)
    token.cancel(ClientGone("the client closed the connection"))
    gone[0].join(10)
    assert isinstance(gone[1][0], ClientGone) and slots.waiting == 1
    release.set()
    for thread, errors in (first, after):
        thread.join(10)
        assert not errors
    assert order == ["first", "after"]


def test_the_server_answers_503_when_no_explanation_slot_comes_free(exported_model_dir, tmp_path):
    """Over HTTP against the real model: with the one slot taken, a request that cannot queue is
    answered 503 at once, and one whose deadline passes in the queue 503 at its deadline; once
    the slot is free, the same request is explained."""
    from serving.app import ServerConfig, create_app
    from serving.backends import ModelDirBackend
    from serving.instances import Limits
    from serving.testing import serving_app, wait_until_up
    from tests.test_serving_server import GOOD

    def config(queue: int, deadline_s: float) -> ServerConfig:
        return ServerConfig(backend=ModelDirBackend(exported_model_dir, None), cache_dir=str(tmp_path / "cache"),
                            limits=Limits(request_deadline_s=deadline_s), explain_concurrency=1, explain_queue=queue)

    body = {"instances": [GOOD], "parameters": {}}
    for queue, deadline_s, message in ((0, 60.0, "waiting, the most it queues"),
                                       (1, 1.0, "reached its deadline of 1 s")):
        app = create_app(config(queue, deadline_s))
        with serving_app(app) as url:
            wait_until_up(url)
            explain_url = f"{url}/v1/projects/p/locations/l/endpoints/e:explain"
            release = threading.Event()
            holder = _start(app.state.slots, CancellationToken(), [], "holder", release)
            _until(lambda: app.state.slots.running == 1)
            response = httpx.post(explain_url, json=body, timeout=60)
            assert response.status_code == 503 and message in response.json()["error"]["message"], response.text
            assert response.json()["error"]["status"] == "UNAVAILABLE"
            release.set()
            holder[0].join(10)
            response = httpx.post(explain_url, json=body, timeout=60)
            assert response.status_code == 200, response.text
            assert response.json()["explanations"][0]["attributions"]
