"""A traced function run in sessions of their own threads (explain.sessions)."""

import os
import threading

import trainer  # noqa: F401  (legacy Keras before TensorFlow)

import numpy as np
import pytest
import tensorflow as tf

from explain import sessions
from explain.sessions import SessionFunction


def _traced():
    """A concrete function with a variable (frozen into a constant) and two outputs."""
    weights = tf.Variable(np.arange(12, dtype=np.float32).reshape(3, 4))

    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32), tf.TensorSpec([], tf.float32)])
    def function(x, scale):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.reduce_sum(tf.tanh(x @ weights) * scale, axis=1)
        return y, tape.gradient(y, x)

    return function.get_concrete_function(), weights


def test_importing_the_project_asks_tensorflow_for_a_pool_per_device():
    """The sessions' pools are their own only if this was set before TensorFlow made a device
    (that they then run on their own threads is what the A/B in explain.sessions measured; no
    test can see threads without timing them)."""
    assert os.environ.get(sessions.OWN_POOLS_VARIABLE) == "1"


def test_a_session_function_gives_the_eager_results_read_only():
    """The same outputs as the eager call, bitwise, in sessions of 1 thread or all the cores; the
    arrays are read-only as an eager call's are (callers keep them uncopied)."""
    function, weights = _traced()
    x = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    eager = [t.numpy() for t in function(tf.constant(x), tf.constant(0.5))]
    in_sessions = SessionFunction(function)
    assert in_sessions.eager_because is None
    for threads in (1, sessions.cores()):
        outputs = in_sessions(x, np.float32(0.5), threads=threads)
        assert len(outputs) == 2 and all(not o.flags.writeable for o in outputs)
        for got, expected in zip(outputs, eager):
            np.testing.assert_array_equal(got, expected)
    weights.assign(weights * 0.0)  # frozen when made: a later change of the variable is not seen
    np.testing.assert_array_equal(in_sessions(x, np.float32(0.5), threads=1)[0], eager[0])


def test_passes_of_one_size_at_once_never_ask_for_more_threads_than_the_cores(monkeypatch):
    """However many callers at once, at most ``cores // threads`` sessions of a size are made, and
    a caller beyond them waits for one to be free; every caller gets its own input's result."""
    monkeypatch.setattr(sessions, "cores", lambda: 2)
    function, _ = _traced()
    in_sessions = SessionFunction(function)
    inputs = [np.full((2, 3), k / 10, np.float32) for k in range(12)]
    expected = [function(tf.constant(x), tf.constant(1.0))[0].numpy() for x in inputs]
    start, results, errors = threading.Barrier(12, timeout=30), [None] * 12, []

    def call(k: int, threads: int) -> None:
        try:
            start.wait()
            results[k] = in_sessions(inputs[k], np.float32(1.0), threads=threads)[0]
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    workers = [threading.Thread(target=call, args=(k, 1 if k < 8 else 2)) for k in range(12)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert not errors and not any(worker.is_alive() for worker in workers)
    assert len(in_sessions._sessions[1]) <= 2 and len(in_sessions._sessions[2]) == 1
    for got, want in zip(results, expected):
        np.testing.assert_array_equal(got, want)


def test_prepare_makes_and_runs_every_session_of_a_size(monkeypatch):
    """Loading a model runs each session its requests will use once, so no request builds one."""
    monkeypatch.setattr(sessions, "cores", lambda: 2)
    function, _ = _traced()
    in_sessions = SessionFunction(function)
    in_sessions.prepare(np.zeros((1, 3), np.float32), np.float32(1.0), threads=1)
    assert len(in_sessions._sessions[1]) == 2 and 2 not in in_sessions._sessions


def test_a_graph_that_cannot_be_frozen_runs_eagerly_and_says_why(monkeypatch, caplog):
    """A function whose graph cannot be frozen into a session's (a model's while loop whose
    gradient reads a variable: tests/test_explain_folding.py) is called eagerly instead, with a
    warning naming the cause, and gives the same results."""
    function, _ = _traced()

    def failing(_):
        raise ValueError("cannot freeze this graph")

    monkeypatch.setattr(sessions, "frozen_graph_def", failing)
    with caplog.at_level("WARNING", logger="explain.sessions"):
        in_sessions = SessionFunction(function)
    assert in_sessions.eager_because == "ValueError: cannot freeze this graph"
    assert "runs eagerly" in caplog.text and "cannot freeze this graph" in caplog.text
    x = np.ones((2, 3), np.float32)
    np.testing.assert_array_equal(in_sessions(x, np.float32(2.0), threads=1)[1],
                                  function(tf.constant(x), tf.constant(2.0))[1].numpy())
    in_sessions.prepare(x, np.float32(2.0), threads=1)  # nothing to make


def test_scalar_outputs_come_back_as_read_only_arrays():
    """A session returns a scalar output as a numpy scalar, whose flags cannot be set."""
    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32)])
    def total(x):
        return tf.reduce_sum(x), x * 2.0

    (value, doubled) = SessionFunction(total.get_concrete_function())(np.ones(3, np.float32), threads=1)
    assert value.shape == () and float(value) == 3.0 and not value.flags.writeable and not doubled.flags.writeable


def test_a_graph_that_freezes_but_fails_in_a_session_runs_eagerly_and_bad_arguments_still_fail(monkeypatch):
    """When a new session's first run fails but the eager call on the same arguments does not, the
    graph is at fault: the function runs eagerly from then on (and a load does not fail on it).
    When the eager call fails too, the arguments are at fault, and the error is the caller's."""
    function, _ = _traced()
    in_sessions = SessionFunction(function)
    with pytest.raises(Exception):
        in_sessions(np.ones((2, 5), np.float32), np.float32(1.0), threads=1)  # 5 columns, not 3
    assert in_sessions.eager_because is None

    monkeypatch.setattr(sessions, "cores", lambda: 4)  # room for a new session, whose first run fails
    monkeypatch.setattr(tf.compat.v1.Session, "make_callable",
                        lambda self, *a, **k: lambda *args: (_ for _ in ()).throw(RuntimeError("no kernel for it")))
    x = np.ones((2, 3), np.float32)
    in_sessions.prepare(x, np.float32(1.0), threads=2)
    assert in_sessions.eager_because == "RuntimeError: no kernel for it"
    np.testing.assert_array_equal(in_sessions(x, np.float32(1.0), threads=2)[0],
                                  function(tf.constant(x), tf.constant(1.0))[0].numpy())


def test_the_calibrations_other_sizes_are_closed(monkeypatch):
    monkeypatch.setattr(sessions, "cores", lambda: 2)
    function, _ = _traced()
    in_sessions = SessionFunction(function)
    x = np.ones((1, 3), np.float32)
    for threads in (1, 2):
        in_sessions.prepare(x, np.float32(1.0), threads=threads)
    in_sessions.close_other_sizes(1)
    assert set(in_sessions._sessions) == {1} and len(in_sessions._sessions[1]) == 2
    assert in_sessions(x, np.float32(1.0), threads=1)[0].shape == (1,)
