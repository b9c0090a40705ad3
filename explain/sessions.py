"""A traced function run in TensorFlow sessions that each have their own few intra-op threads.

The adaptive IG mode runs a round's chunks of path points a few at once, one per core
(:meth:`explain.model.ExplainableModel._run_chunks`). Called eagerly, every chunk's ops share the
process's one intra-op pool: each op of either pass was cut into shards for all its threads, and
each pass waited on shards queued behind the other pass's. A TensorFlow session of its own, with an
intra-op pool of ``cores // streams`` threads, runs its pass on its own share of the cores instead.
Measured on MobileNetV2 1.0 @ 192 (folded graph, 2 cores, two streams, ms per path point): rounds of
2 points 9.3-9.8 against 13.3-14.5 called eagerly, 4 points 8.2-8.3 against 10.3-10.6, 8 points
8.3-8.5 against 9.4, with bitwise the same gradients.

A session's pool is its own only when ``TF_OVERRIDE_GLOBAL_THREADPOOL`` was set before TensorFlow
made its first device (:mod:`trainer` sets it, so importing this project first is enough);
otherwise every session and the eager context share one pool, and a session runs as an eager call
does. The eager context keeps its pool of all the cores either way: predictions, training and any
single pass of the process are not cut down to a share.

A function is frozen (its variables made constants) into one graph, and the graph is run by up to
``cores // threads`` sessions per thread count, made when first needed: a call takes a free one or
waits for one, so one function's passes of one size never ask for more threads than the process has
cores. Several functions at once (two model versions, a blurred path's kernel beside the linear
one's) each have their own, as eager calls from as many threads shared one pool before.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from typing import Any, Callable

import trainer  # noqa: F401  (legacy Keras before TensorFlow)

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import graph_pb2
from tensorflow.python.framework import convert_to_constants

from trainer.tf_logging import native_noise_filtered

log = logging.getLogger(__name__)

#: What names the intra-op pools as each device's own rather than one for the process.
OWN_POOLS_VARIABLE = "TF_OVERRIDE_GLOBAL_THREADPOOL"


def frozen_graph_def(function: Any) -> graph_pb2.GraphDef:
    """``function``'s graph with its variables as constants and its calls inlined, its inputs and
    outputs under the names they have in ``function``. The public ``convert_variables_to_constants_v2``
    also builds a concrete function of the result, which takes 2.5 of its 2.8 s on MobileNetV2's
    signature (and 0.4-0.9 of 0.6-1.2 s on an IG kernel) and is not used here: the GraphDef is taken
    before that step (the same two calls it makes), or from the public function if a TensorFlow
    lacks them. Grappler's start-up lines are kept off the console."""
    with native_noise_filtered():
        try:
            data = convert_to_constants._FunctionConverterDataInEager(func=function, lower_control_flow=True,
                                                                      aggressive_inlining=False)
            return convert_to_constants._replace_variables_by_constants(converter_data=data)[0]
        except AttributeError:  # pragma: no cover - another TensorFlow's internals
            return convert_to_constants.convert_variables_to_constants_v2(function).graph.as_graph_def()


def cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class SessionFunction:
    """``function(*arguments)`` (a concrete function of tensors) run in sessions of ``threads``
    intra-op threads each, arguments and results as numpy arrays."""

    def __init__(self, function: Any):
        self._function = function
        self._lock = threading.Lock()
        #: threads -> sessions made, and the callables of those not in use
        self._sessions: dict[int, list[tf.compat.v1.Session]] = {}
        self._free: dict[int, queue.SimpleQueue] = {}
        #: why the function runs eagerly instead (its graph cannot be frozen and run in a session)
        self.eager_because: str | None = None
        try:
            graph_def = frozen_graph_def(function)
            self.graph = tf.Graph()
            with self.graph.as_default():
                tf.graph_util.import_graph_def(graph_def, name="")
            arguments = function.inputs[:len(tf.nest.flatten(function.structured_input_signature))]  # not captures
            self._feeds = [self.graph.get_tensor_by_name(t.name) for t in arguments]
            self._fetches = [self.graph.get_tensor_by_name(t.name) for t in function.outputs]
        except Exception as error:  # noqa: BLE001 - e.g. a while loop's gradient reading a variable
            self._run_eagerly(error)

    def _run_eagerly(self, error: BaseException) -> None:
        self.eager_because = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        log.warning("the explanation kernel runs eagerly, on the process's shared threads, because its graph "
                    "cannot run in a session of its own (%s)", self.eager_because)

    def _eager(self, arguments: tuple) -> list[np.ndarray]:
        return [t.numpy() for t in self._function(*map(tf.constant, arguments))]

    def __call__(self, *arguments: np.ndarray, threads: int) -> tuple[np.ndarray, ...]:
        """The function's outputs on ``arguments``, in a session of ``threads`` intra-op threads
        (waiting for one while ``cores() // threads`` of them are in a pass), read-only as an
        eager call's are (callers keep them uncopied, and never write into them)."""
        if self.eager_because is not None:
            outputs = self._eager(arguments)
        else:
            threads = max(1, threads)
            run, new = self._acquire(threads)
            try:
                outputs = self._first_run(run, arguments) if new else run(*arguments)
            finally:
                self._free[threads].put(run)
        outputs = [np.asarray(output) for output in outputs]  # a scalar output: a 0-d array
        for output in outputs:
            output.flags.writeable = False
        return tuple(outputs)

    def _first_run(self, run: Callable[..., list[np.ndarray]], arguments: tuple) -> list[np.ndarray]:
        """A new session's first run (it prints native start-up lines, kept off the console). If it
        fails where an eager call on the same arguments does not, the graph does not run in a
        session (it froze, but not into something a session runs): the function runs eagerly from
        then on. If the eager call fails too, the arguments are at fault, and its error is raised."""
        try:
            with native_noise_filtered():
                return run(*arguments)
        except Exception as error:  # noqa: BLE001 - told apart from the arguments' fault below
            outputs = self._eager(arguments)
            self._run_eagerly(error)
            return outputs

    def prepare(self, *arguments: np.ndarray, threads: int) -> None:
        """Make every session of ``threads`` threads and run each once on ``arguments``: a
        session's first pass builds its executor and oneDNN's primitives (about a second on
        MobileNetV2), which a request should not pay."""
        threads = max(1, threads)
        runs = []
        try:
            while self.eager_because is None and len(runs) < max(1, cores() // threads):
                runs.append(self._acquire(threads))
            for run, new in runs:
                if self.eager_because is None:
                    self._first_run(run, arguments) if new else run(*arguments)
        finally:
            for run, _ in runs:
                self._free[threads].put(run)

    def close_other_sizes(self, threads: int) -> None:
        """Close the sessions of every other size than ``threads`` (those a load's calibration
        made and did not choose: each holds its own copy of the graph's constants and threads).
        Only while no call is running, as when a model is loaded."""
        with self._lock:
            for size in [size for size in self._sessions if size != threads]:
                for session in self._sessions.pop(size):
                    if session is not None:  # (one being made has no place to be closed from)
                        session.close()
                self._free.pop(size, None)

    def _acquire(self, threads: int) -> tuple[Callable[..., list[np.ndarray]], bool]:
        """A free session's callable (made if fewer than ``cores() // threads`` exist, else waited
        for), and whether it was just made."""
        with self._lock:
            free = self._free.setdefault(threads, queue.SimpleQueue())
            made = self._sessions.setdefault(threads, [])
            try:
                return free.get_nowait(), False
            except queue.Empty:
                room = len(made) < max(1, cores() // threads)
                if room:
                    made.append(None)  # its place, held while it is made outside the lock
        if not room:
            return free.get(), False  # every session of this size is in a pass: the next one freed
        session = None
        try:
            # its own threads: one inter-op thread dispatches the ops, ``threads`` run them
            config = tf.compat.v1.ConfigProto(intra_op_parallelism_threads=threads, inter_op_parallelism_threads=1,
                                              use_per_session_threads=True)
            session = tf.compat.v1.Session(graph=self.graph, config=config)
            run = session.make_callable(self._fetches, feed_list=self._feeds)
        except BaseException:
            with self._lock:
                made.remove(None)  # its place, free again
            if session is not None:
                session.close()
            raise
        with self._lock:
            made[made.index(None)] = session
        return run, True
