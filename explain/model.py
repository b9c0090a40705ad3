"""An exported SavedModel as explanations need it, and the TensorFlow backend of IG.

The model is reached only through its ``xai_preprocess`` and ``xai_model`` signatures, exactly
what Vertex's explanation service uses, so a local explanation explains the artefact that is
deployed. Path gradients are computed in one traced ``tf.function`` per path kind: the path
points are built, the model is run forward and backward on them, and the weighted gradient
sums are reduced per group, all in the graph, over near-equal chunks of at most a batch of nodes
(bounded memory, no retracing: every shape in the input signature is dynamic), run a few at once
on their own threads (one chunk of a few nodes leaves a core idle), each in a TensorFlow session
with its share of the cores (:mod:`explain.sessions`: 8-21% less time per request than sharing the
process's threads). The model run there is
the ``xai_model`` with its batch normalizations folded into its convolutions (:mod:`explain.folding`:
the same function, a third cheaper to differentiate), checked against the signature when the model
is loaded. Traced functions are cached on
the model object, and calling a traced concrete function is thread-safe, so one
:class:`ExplainableModel` serves concurrent requests.

A linear path's ends are evaluated once, not once per path: XRAI's black and white paths share
their input, and a baseline that recurs (black, white, the metadata's) is the same image for
every request, so its gradient per class is a constant of the model, kept in a small
byte-bounded cache. Baselines that never recur (random, blurred) are not kept.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import posixpath
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import trainer  # noqa: F401  (legacy Keras before TensorFlow)

import numpy as np
import tensorflow as tf
import threadpoolctl

from explain.folding import FoldedFunction, fold_batch_norms
from explain.integrated_gradients import GroupSums, PathBatch, PathResult
from explain.lanes import run_in_lanes
from explain.paths import LINEAR, SCALE_SPACE, frequency_squared
from explain.sessions import SessionFunction
from explain.sessions import cores as _cores
from trainer.data import tf_error_reason
from trainer.export import output_count, read_explanation_metadata, read_labels
from trainer.schema import (CONCRETE_INPUT, EXPLANATION_METADATA_FILE, LABELS_FILE, SERVING_INPUT,
                            XAI_MODEL_SIGNATURE, XAI_PREPROCESS_SIGNATURE)

log = logging.getLogger(__name__)

#: Path nodes in flight per call (shared by its :data:`STREAM_CANDIDATES` streams), tried when a
#: model is loaded (:func:`calibrate_batch_size`): the fastest per node is kept when it clearly
#: beats :data:`DEFAULT_BATCH_SIZE`, because the best size is the machine's. Measured in one stream:
#: MobileNetV2 1.0 @ 192, ms per node, 2 cores: on one host 57 alone, 43 in 4s, 41 in 8s, 48 in 16s,
#: 58 in 32s (past 8 the activations no longer fit its caches); on another 32 alone, 20 in 4s, 17.6
#: in 8s, 15.4 in 16s, 14.6 in 32s, and through the folded graph (:mod:`explain.folding`) 19 alone,
#: 10.7 in 4s, 8.8 in 8s, 9.0 in 16s. Not past 16: a call holds about 40 MB of activations per node
#: (770 MB at 16, 1.4 GB at 32), per concurrent request. ``make bench`` prints the whole curve for
#: its machine.
BATCH_SIZE_CANDIDATES = (4, 8, 16)
#: Chunks of one call run at once, tried when a model is loaded (:func:`calibrate_streams`), up to
#: the cores the process may use: the adaptive mode's rounds are small, and on 2 cores one chunk
#: of a few nodes leaves a core idle (:meth:`ExplainableModel._run_chunks`).
STREAM_CANDIDATES = (1, 2)
#: Nodes of the round the streams are timed on (a typical round of the default request).
STREAM_ROUND = 4
#: Chunk size when calibration is skipped (``load_explainable_model(batch_size=...)`` given), and
#: the one calibration keeps unless another candidate is faster by more than :data:`CALIBRATION_MARGIN`.
DEFAULT_BATCH_SIZE = 8
#: How much faster per node (a fraction) another chunk size must measure at load to replace
#: :data:`DEFAULT_BATCH_SIZE`: on a shared 2-core VM a calibration's readings move by a few percent.
CALIBRATION_MARGIN = 0.05
#: Images per forward-only call (no gradients: activations are freed layer by layer).
PREDICT_BATCH_SIZE = 64
#: Bytes of baseline gradients kept across calls (least recently used first out): MobileNetV2 @ 192
#: needs 442 KB per (baseline, class), so this holds black and white for 70 classes.
END_CACHE_BYTES = 64 * 2 ** 20
#: What names a BLAS thread count in the environment; one set there is left alone (:func:`quiet_blas`).
BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS")
#: Digests of non-constant baselines seen once (a baseline is kept from its second use on).
SEEN_BASELINES = 1024


#: A chunk of a path-gradients call: its nodes (indices into the call's), the call's group ids its
#: renumbered groups stand for, and the kernel's arguments for it.
_Chunk = tuple[np.ndarray, np.ndarray, tuple[np.ndarray, ...]]


class ModelLoadError(ValueError):
    """The model directory lacks what explanations need."""


@dataclass
class ExplainableModel:
    """The loaded SavedModel plus what explanations need (labels and explanation metadata)."""

    model_dir: str
    labels: list[str]
    metadata: dict[str, Any]
    batch_size: int = DEFAULT_BATCH_SIZE
    #: seconds per node at each chunk size tried, when :func:`calibrate_batch_size` chose ``batch_size``
    batch_seconds: dict[int, float] = field(default_factory=dict)
    #: chunks of one call run at once, each in its own thread (:meth:`_run_chunks`); the
    #: ``batch_size`` nodes in flight are shared among them
    streams: int = 1
    #: seconds per node of a round of :data:`STREAM_ROUND` nodes in each number of streams tried,
    #: when :func:`calibrate_streams` chose ``streams``
    stream_seconds: dict[int, float] = field(default_factory=dict)
    _loaded: Any = field(default=None, repr=False)
    #: the ``xai_model`` with its batch normalizations folded (:mod:`explain.folding`), which the
    #: gradient kernels run; None: they run the signature as exported
    folded: FoldedFunction | None = field(default=None, repr=False)
    #: evaluate a linear path's ends once per distinct point and class, and cache baselines' gradients
    share_ends: bool = True
    end_cache_bytes: int = END_CACHE_BYTES
    #: gradient evaluations the model actually ran (path nodes minus shared and cached ends)
    evaluations: int = field(default=0, init=False)
    _kernels: dict[str, SessionFunction] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    #: the threads of every stream but the caller's, shared by concurrent requests
    _helpers: ThreadPoolExecutor | None = field(default=None, init=False, repr=False)
    #: (point digest, class) -> (gradient of F_class at the baseline [H, W, C], F_class there)
    _end_cache: OrderedDict = field(default_factory=OrderedDict, init=False, repr=False)
    _end_cache_size: int = field(default=0, init=False, repr=False)
    _seen_baselines: OrderedDict = field(default_factory=OrderedDict, init=False, repr=False)
    _end_cache_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    #: path -> the lock held while its kernel is traced and frozen (outside :attr:`_lock`)
    _building: dict[str, threading.Lock] = field(default_factory=dict, init=False, repr=False)

    @property
    def _xai_model(self):
        return self._loaded.signatures[XAI_MODEL_SIGNATURE]

    @property
    def output_key(self) -> str:
        """The ``xai_model`` output (the probabilities)."""
        return next(iter(self._xai_model.structured_outputs))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)`` the ``xai_model`` signature takes."""
        spec = self._xai_model.structured_input_signature[1][CONCRETE_INPUT]
        return tuple(int(d) for d in spec.shape[1:])

    def preprocess(self, image_bytes: list[bytes]) -> np.ndarray:
        """Encoded images to float32 ``[N, H, W, 3]`` in [0, 1] via ``xai_preprocess``."""
        fn = self._loaded.signatures[XAI_PREPROCESS_SIGNATURE]
        try:
            out = fn(**{SERVING_INPUT: tf.constant(list(image_bytes), tf.string)})
        except tf.errors.InvalidArgumentError:
            for i, one in enumerate(image_bytes):  # name the bad instance
                try:
                    fn(**{SERVING_INPUT: tf.constant([one], tf.string)})
                except tf.errors.InvalidArgumentError as error:
                    raise ValueError(f"instance {i}: not a decodable image ({len(one)} bytes): "
                                     f"{tf_error_reason(error)}") from None
            raise
        return next(iter(out.values())).numpy()

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Probabilities ``[N, C]`` via ``xai_model``, in chunks of :data:`PREDICT_BATCH_SIZE`."""
        images = np.asarray(images, np.float32)
        if images.ndim != 4 or images.shape[1:] != self.image_shape:
            raise ValueError(f"images must be [N, {', '.join(map(str, self.image_shape))}], got {images.shape}")
        step = PREDICT_BATCH_SIZE
        chunks = [self._xai_model(**{CONCRETE_INPUT: tf.constant(images[i:i + step])})[self.output_key].numpy()
                  for i in range(0, len(images), step)]
        return np.concatenate(chunks) if chunks else np.zeros((0, len(self.labels)), np.float32)

    def path_gradients(self, batch: PathBatch) -> PathResult:
        """The :class:`explain.integrated_gradients.PathModel` callback: chunked in-graph IG.

        On a linear path, the nodes at alpha 0 (the baseline) and 1 (the input) are evaluated once
        per distinct point and class, and a baseline's gradient is kept for later calls
        (:meth:`_shared_ends`); their contributions are added here from the gradient itself."""
        kernel = self._kernel(batch.path)
        n = len(batch.alphas)
        groups = GroupSums(batch.num_groups, batch.inputs.shape[1:])
        derivatives = np.zeros(n, np.float32)
        outputs = np.zeros(n, np.float32)
        ends, sharing, missing = self._shared_ends(batch) if batch.path == LINEAR and self.share_ends else ({}, {}, [])
        # what runs: one node per missing end (weight 0, its raw gradient returned), then the rest
        raw_nodes = np.array([node for _, node in missing], np.int64)
        special = set(ends) | set(sharing) | set(raw_nodes.tolist())
        regular = np.array([k for k in range(n) if k not in special], np.int64)
        order = np.concatenate([raw_nodes, regular])
        weights = batch.weights.copy()
        weights[raw_nodes] = 0.0
        # every chunk's kernel arguments, made here before any chunk runs, with the paths' inputs,
        # baselines and classes gathered once per call, not once per chunk: made in the lanes, one
        # chunk's arguments were made while the other lane's chunk already had both cores, 1.2 ms
        # per round before the first pass started where alone they take 0.15 (MobileNetV2 1.0 @
        # 192, 2 cores)
        path_arrays: dict[bytes, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

        def arguments(part: np.ndarray) -> _Chunk:
            raw_count = int(np.count_nonzero(np.isin(part, raw_nodes)))  # they lead the order
            rows, node_rows = np.unique(batch.node_rows[part], return_inverse=True)
            group_ids, node_groups = np.unique(batch.node_groups[part], return_inverse=True)
            key = rows.tobytes()
            if key not in path_arrays:
                path_arrays[key] = (np.asarray(batch.inputs[rows], np.float32),
                                    np.asarray(batch.baselines[rows], np.float32),
                                    np.asarray(batch.classes[rows], np.int32))
            return part, group_ids, (*path_arrays[key], node_rows.astype(np.int32), node_groups.astype(np.int32),
                                     batch.alphas[part].astype(np.float32), weights[part].astype(np.float32),
                                     np.int32(len(group_ids)), np.float32(batch.max_blur_sigma), np.int32(raw_count))

        parts = [arguments(part) for part in self._chunks(order)]
        threads = self._threads()

        def run(chunk: _Chunk) -> tuple[np.ndarray, ...]:
            return kernel(*chunk[2], threads=threads)

        raw_grads, raw_outputs = [], []

        def fold(chunk: _Chunk, result: tuple[np.ndarray, ...]) -> None:
            part, group_ids = chunk[:2]
            sums, d, f, raw = result
            derivatives[part], outputs[part] = d, f
            groups.add_each(group_ids, sums)
            raw_grads.extend(raw)
            raw_outputs.extend(f[:len(raw)])

        self._run_chunks(run, parts, fold)
        with self._end_cache_lock:
            self.evaluations += len(order)
        for (key, node), grad, value in zip(missing, raw_grads, raw_outputs):
            ends[node] = (grad, float(value))
            if batch.alphas[node] == 0.0:
                self._cache_end(key, batch.baselines[batch.node_rows[node]], grad, float(value))
        ends.update({node: ends[source] for node, source in sharing.items()})
        for node, (grad, value) in ends.items():
            row = batch.node_rows[node]
            contribution = grad * (batch.inputs[row] - batch.baselines[row])
            derivatives[node] = contribution.sum(dtype=np.float64)
            outputs[node] = value
            groups.add(int(batch.node_groups[node]), batch.weights[node] * contribution)
        return PathResult(groups.arrays(), derivatives, outputs)

    def _chunks(self, order: np.ndarray) -> list[np.ndarray]:
        """``order`` in near-equal chunks (their sizes differ by at most one) of at most
        ``batch_size // streams`` nodes, and at least one per stream while nodes last, so at most
        ``batch_size`` nodes are in flight at once."""
        if not len(order):
            return []
        streams = self._lanes()
        largest = max(1, self.batch_size // streams)
        return np.array_split(order, max(min(len(order), streams), math.ceil(len(order) / largest)))

    def _lanes(self) -> int:
        """Chunks run at once: ``streams``, but never more than ``batch_size`` nodes in flight."""
        return max(1, min(self.streams, self.batch_size))

    def _threads(self) -> int:
        """Intra-op threads of each chunk's pass: the cores shared among the lanes
        (:mod:`explain.sessions`)."""
        return max(1, _cores() // self._lanes())

    def _run_chunks(self, run: Callable[[np.ndarray], Any], parts: list[np.ndarray],
                    fold: Callable[[np.ndarray, Any], None]) -> None:
        """``fold(part, run(part))`` for every part, in order, with the runs up to ``streams`` at
        once (:func:`explain.lanes.run_in_lanes`: the caller's thread and helpers from the model's
        pool, so the sums are the same on every call and a request never waits on the pool alone).

        A pass over one path point keeps about one core busy on MobileNetV2 1.0 @ 192 (oneDNN
        splits little of its work at batch 1: 17.3 ms alone on 1 thread or 2), so the small
        rounds of the adaptive mode left the second core idle. Measured on 2 cores, ms per
        round: 1+1 nodes at once 22-23 against 27.5-29 for 2 in one call, 2+2 36.5-38 against
        43-44, 3+3 53-56 against 58-61, 8+8 134-146 against 145-149."""
        run_in_lanes(run, parts, fold, self._lanes(), self._helper_pool)

    def _helper_pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._helpers is None:
                self._helpers = ThreadPoolExecutor(max_workers=max(self.streams, *STREAM_CANDIDATES) - 1 or 1,
                                                   thread_name_prefix="path-gradients")
            return self._helpers

    def _shared_ends(self, batch: PathBatch) -> tuple[dict[int, tuple[np.ndarray, float]], dict[int, int],
                                                      list[tuple[bytes, int]]]:
        """The nodes at a linear path's ends, by distinct (point, class): ``ends`` maps a node to
        its cached ``(gradient, F)``, ``sharing`` a node to the earlier node with the same point
        and class, and ``missing`` lists ``(key, node)`` for each distinct end to evaluate now."""
        at_end = np.flatnonzero((batch.alphas == 0.0) | (batch.alphas == 1.0))
        ends: dict[int, tuple[np.ndarray, float]] = {}
        sharing: dict[int, int] = {}
        missing: list[tuple[bytes, int]] = []
        first: dict[bytes, int] = {}
        digests: dict[tuple[int, bool], bytes] = {}
        for node in at_end:
            row, is_input = int(batch.node_rows[node]), bool(batch.alphas[node] == 1.0)
            if (row, is_input) not in digests:
                point = (batch.inputs if is_input else batch.baselines)[row]
                digests[row, is_input] = hashlib.blake2b(np.ascontiguousarray(point).tobytes(),
                                                         digest_size=16).digest()
            key = digests[row, is_input] + int(batch.classes[row]).to_bytes(4, "little")
            if key in first:
                sharing[int(node)] = first[key]
                continue
            cached = self._cached_end(key)  # a gradient is the point's, whichever end it is
            if cached is not None:
                ends[int(node)] = cached
            else:
                missing.append((key, int(node)))
            first[key] = int(node)
        return ends, sharing, missing

    def _cached_end(self, key: bytes) -> tuple[np.ndarray, float] | None:
        with self._end_cache_lock:
            if key in self._end_cache:
                self._end_cache.move_to_end(key)
                return self._end_cache[key]
        return None

    def _cache_end(self, key: bytes, baseline: np.ndarray, grad: np.ndarray, value: float) -> None:
        """Keep a baseline's gradient if the baseline recurs: a constant image (black, white) at
        once, any other from its second use on (random and blurred baselines never recur, and
        must not push out the ones that do); the least recently used go past ``end_cache_bytes``."""
        constant = float(baseline.min()) == float(baseline.max())
        with self._end_cache_lock:
            if not constant and key not in self._seen_baselines:
                self._seen_baselines[key] = None
                while len(self._seen_baselines) > SEEN_BASELINES:
                    self._seen_baselines.popitem(last=False)
                return
            if key in self._end_cache:
                self._end_cache.move_to_end(key)
                return
            grad = grad.copy()  # not a view: it would keep its whole chunk's gradients alive
            grad.flags.writeable = False
            self._end_cache[key] = (grad, value)
            self._end_cache_size += grad.nbytes
            while self._end_cache and self._end_cache_size > self.end_cache_bytes:
                old, _ = self._end_cache.popitem(last=False)[1]
                self._end_cache_size -= old.nbytes

    def _probabilities_function(self) -> Callable[[tf.Tensor], tf.Tensor]:
        """images -> probabilities for the gradient kernels: the folded graph, else the signature."""
        if self.folded is not None:
            return self.folded.function
        return lambda points: self._xai_model(**{CONCRETE_INPUT: points})[self.output_key]

    def _kernel(self, path: str) -> SessionFunction:
        """The path-gradient function for ``path``, traced once per model and run in sessions of
        the lanes' share of the cores each (:mod:`explain.sessions`). Tracing and freezing one
        (2-4 s for the blurred path's, first used by a request) holds only that path's lock, so
        requests on the other path's kernel do not wait for it."""
        with self._lock:
            if path in self._kernels:
                return self._kernels[path]
            building = self._building.setdefault(path, threading.Lock())
        with building:
            with self._lock:
                if path in self._kernels:  # made while this call waited for it
                    return self._kernels[path]
            kernel = SessionFunction(_trace_path_kernel(self._probabilities_function(), self.image_shape, path))
            with self._lock:
                return self._kernels.setdefault(path, kernel)


def _trace_path_kernel(probabilities: Callable[[tf.Tensor], tf.Tensor], image_shape: tuple[int, int, int],
                       path: str):
    """A concrete function computing, for a chunk of path nodes, the per-group sums of
    ``weight * grad F(point) * dpoint/dalpha``, ``dF/dalpha`` and ``F`` at each node, and
    ``grad F(point)`` itself for the chunk's first ``raw_count`` nodes (ends to be shared)."""
    height, width, channels = image_shape
    image = tf.TensorSpec([None, height, width, channels], tf.float32)
    vector = lambda dtype: tf.TensorSpec([None], dtype)  # noqa: E731
    scalar = lambda dtype: tf.TensorSpec([], dtype)  # noqa: E731
    freq2 = tf.constant(frequency_squared(height, width))  # [2H, W+1]

    def linear_points(inputs, baselines, node_rows, alphas, max_sigma):
        x, b = tf.gather(inputs, node_rows), tf.gather(baselines, node_rows)
        alpha = alphas[:, None, None, None]
        # the path's ends are exactly the baseline and the input (b + (x - b) may round off x; here
        # one term is exactly 0 at either end); a select on alpha == 1 to the same end cost 3 ms of
        # a 106 ms call of 8 nodes on MobileNetV2 1.0 @ 192, as much as the first convolution's pass
        return b * (1.0 - alpha) + x * alpha, x - b

    def scale_space_points(inputs, baselines, node_rows, alphas, max_sigma):
        x = tf.transpose(inputs, [0, 3, 1, 2])  # [R, C, H, W]
        x = tf.concat([x, tf.reverse(x, [2])], axis=2)
        x = tf.concat([x, tf.reverse(x, [3])], axis=3)
        spectrum = tf.gather(tf.signal.rfft2d(x), node_rows)  # [n, C, 2H, W+1]
        sigma = (max_sigma * (1.0 - alphas))[:, None, None, None]
        gauss = tf.exp(-2.0 * math.pi ** 2 * sigma ** 2 * freq2)
        # d/dalpha blur(x, max_sigma (1 - alpha)) = max_sigma * 4 pi^2 sigma |f|^2 * blurred spectrum
        speed = 4.0 * math.pi ** 2 * max_sigma * sigma * freq2 * gauss

        def spatial(multiplier):
            out = tf.signal.irfft2d(spectrum * tf.cast(multiplier, tf.complex64), fft_length=[2 * height, 2 * width])
            return tf.transpose(out[:, :, :height, :width], [0, 2, 3, 1])

        return spatial(gauss), spatial(speed)

    make_points = {LINEAR: linear_points, SCALE_SPACE: scale_space_points}[path]

    @tf.function(input_signature=[image, image, vector(tf.int32), vector(tf.int32), vector(tf.int32),
                                  vector(tf.float32), vector(tf.float32), scalar(tf.int32), scalar(tf.float32),
                                  scalar(tf.int32)])
    def kernel(inputs, baselines, classes, node_rows, node_groups, alphas, weights, num_groups, max_sigma,
               raw_count):
        points, velocity = make_points(inputs, baselines, node_rows, alphas, max_sigma)
        with tf.GradientTape() as tape:
            tape.watch(points)
            probs = probabilities(points)
            # Rows are independent, so the gradient of the sum is each row's own gradient.
            target = tf.gather(probs, tf.gather(classes, node_rows), batch_dims=1)
        raw = tape.gradient(target, points)
        grads = raw * velocity
        derivatives = tf.reduce_sum(grads, axis=[1, 2, 3])
        sums = tf.math.unsorted_segment_sum(weights[:, None, None, None] * grads, node_groups, num_groups)
        return sums, derivatives, target, raw[:raw_count]

    return kernel.get_concrete_function()


def _interior_nodes(image: np.ndarray, n: int) -> tuple:
    """The linear path kernel's arguments for ``n`` evenly spaced interior nodes of the path from
    black to ``image`` ``[1, H, W, C]``, class 0, each node its own group."""
    image = np.asarray(image, np.float32)
    return (image, np.zeros_like(image), np.zeros(1, np.int32), np.zeros(n, np.int32), np.arange(n, dtype=np.int32),
            np.linspace(0.0, 1.0, n + 2)[1:-1].astype(np.float32), np.ones(n, np.float32), np.int32(n),
            np.float32(0.0), np.int32(0))


def _round_seconds(model: ExplainableModel, image: np.ndarray, settings: dict[Any, dict[str, int]],
                   repeats: int) -> dict[Any, float]:
    """Per key of ``settings``, the best of ``repeats`` timed rounds of the linear path kernel,
    with the model's attributes set as the key's value says (``nodes`` interior nodes of the
    path, chunked and run as ``batch_size`` and ``streams`` say): one untimed round of each
    first, then the keys in turn, repeat by repeat, so a disturbance of the host while one is
    timed (a few ms, on a shared 2-core VM) hits every key's repeats alike. Timing each key's
    repeats together once chose 4 nodes in flight over 8 at a load in ``make bench`` (MobileNetV2
    1.0 @ 192): the default request's passes then cost 1.10 of the folded floor, against
    1.01-1.06 at 8 over three runs, and the bench's 12 default requests take 12% longer at 4 than at 8."""
    kernel = model._kernel(LINEAR)
    kept = model.batch_size, model.streams

    def timed(setting: dict[str, int]) -> float:
        model.batch_size, model.streams = setting["batch_size"], setting["streams"]
        parts = model._chunks(np.arange(setting["nodes"]))
        arguments = {len(part): _interior_nodes(image, len(part)) for part in parts}
        start = time.perf_counter()
        threads = model._threads()
        model._run_chunks(lambda part: kernel(*arguments[len(part)], threads=threads), parts,
                          lambda part, result: None)
        return time.perf_counter() - start

    try:
        for setting in settings.values():
            timed(setting)
        best = dict.fromkeys(settings, math.inf)
        for _ in range(repeats):
            for key, setting in settings.items():
                best[key] = min(best[key], timed(setting))
        return best
    finally:
        model.batch_size, model.streams = kept


def calibrate_streams(model: ExplainableModel, candidates: tuple[int, ...] = STREAM_CANDIDATES,
                      repeats: int = 3) -> dict[int, float]:
    """Seconds per node of a round of :data:`STREAM_ROUND` nodes in each candidate number of
    streams up to the cores this process may use (on a mid-grey image), and set the model's
    ``streams`` to the fastest. About 0.3-0.5 s for MobileNetV2 1.0 @ 192 on 2 cores."""
    image = np.full((1, *model.image_shape), 0.5, np.float32)
    settings = {streams: dict(nodes=STREAM_ROUND, batch_size=model.batch_size, streams=streams)
                for streams in [c for c in candidates if c <= _cores()] or [1]}
    per_node = {streams: seconds / STREAM_ROUND
                for streams, seconds in _round_seconds(model, image, settings, repeats).items()}
    model.streams = min(per_node, key=per_node.get)
    model.stream_seconds = per_node
    return per_node


def calibrate_batch_size(model: ExplainableModel, candidates: tuple[int, ...] = BATCH_SIZE_CANDIDATES,
                         repeats: int = 3) -> dict[int, float]:
    """Seconds per node of the linear path kernel at each candidate number of nodes in flight, on
    the same round of ``max(candidates)`` nodes (the best of ``repeats`` timed rounds, the
    candidates in turn: :func:`_round_seconds`; on a mid-grey image, in the model's ``streams``),
    and set the model's ``batch_size``: :data:`DEFAULT_BATCH_SIZE` unless another candidate is
    faster per node by more than :data:`CALIBRATION_MARGIN`. Once per load: about 1.7 s for
    MobileNetV2 1.0 @ 192 on this project's current 2-core host. The chunking changes results
    only in float32 rounding (as the make-up of a request's rounds already does).

    Why one round for all: the candidates differ only on rounds larger than the smallest of them
    (smaller rounds are cut alike), and a large round is where a small chunk size loses. Timing
    each candidate on a round of its own size (4 nodes at 4, 8 at 8 ...) rated them within a few
    percent, and a server loaded that way chose 4 (9.5 against 10.4 ms per node at 8): its default
    ``:explain`` then took 431 ms against 409 for a server at 8, and the bench's 12 default requests take 12% longer
    at 4 than at 8 (MobileNetV2 1.0 @ 192). On one round of 16, 4 reads 5-14% slower than 8 in
    six calibrations of one process; 8 and 16 stay within 1-3%, inside the margin."""
    image = np.full((1, *model.image_shape), 0.5, np.float32)
    nodes = max(candidates)
    settings = {n: dict(nodes=nodes, batch_size=n, streams=model.streams) for n in candidates}
    per_node = {n: seconds / nodes for n, seconds in _round_seconds(model, image, settings, repeats).items()}
    fastest = min(per_node, key=per_node.get)
    default = per_node.get(DEFAULT_BATCH_SIZE)
    model.batch_size = fastest if default is None or per_node[fastest] < default / (1 + CALIBRATION_MARGIN) \
        else DEFAULT_BATCH_SIZE
    model.batch_seconds = per_node
    return per_node


def quiet_blas() -> None:
    """Run numpy's BLAS (and any other loaded) on the calling thread alone, unless the
    environment names a thread count (:data:`BLAS_THREAD_VARIABLES`).

    OpenBLAS's worker threads keep spinning for a while after each call, and on a 2-core host they
    took a core from the TensorFlow passes that came next: after one request's final weighted sum
    (a ``np.tensordot``), the next request's first path passes ran 20-50 ms slow (4 nodes: 47-94
    ms against 40; MobileNetV2 1.0 @ 192). With one BLAS thread, completeness alone to 5% on the
    bench's 12 images went from 17.5 to 14.8 ms per evaluation, the default request from 12.3 to
    11.7. The arrays numpy multiplies here are one map at a time; TensorFlow's threads do the
    heavy work. Called when a model is loaded, so the libraries loaded by then are limited."""
    if any(name in os.environ for name in BLAS_THREAD_VARIABLES):
        return
    threadpoolctl.threadpool_limits(limits=1, user_api="blas")


def load_explainable_model(model_dir: str, batch_size: int | None = None,
                           loaded: Any = None, fold_norms: bool = True, streams: int | None = None) -> ExplainableModel:
    """Load an exported model with its ``labels.txt`` and ``explanation_metadata.json``.

    ``batch_size``: path nodes per forward+backward call; None measures the fastest of
    :data:`BATCH_SIZE_CANDIDATES` on this machine (:func:`calibrate_batch_size`).
    ``loaded``: the SavedModel already loaded from ``model_dir`` (a server that also runs its
    ``serving_default``), so its variables are held once and not loaded again.
    ``streams``: chunks of a call run at once (:meth:`ExplainableModel._run_chunks`); None
    measures the fastest of :data:`STREAM_CANDIDATES` on this machine (:func:`calibrate_streams`).
    ``fold_norms``: run gradients through the ``xai_model`` with its inference batch normalizations
    folded into their convolutions (:func:`explain.folding.fold_batch_norms`: the same function to
    float32 rounding, checked at load, and a third cheaper to differentiate on MobileNetV2);
    False runs the signature as exported.
    """
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 path nodes per call (or None: measured), got {batch_size}")
    if streams is not None and streams < 1:
        raise ValueError(f"streams must be >= 1 chunks at once (or None: measured), got {streams}")
    for name in (LABELS_FILE, EXPLANATION_METADATA_FILE, "saved_model.pb"):
        if not tf.io.gfile.exists(posixpath.join(model_dir, name)):
            raise ModelLoadError(f"{model_dir}: no {name} (export the model with trainer.export first)")
    quiet_blas()
    if loaded is None:
        loaded = tf.saved_model.load(model_dir)
    missing = {XAI_PREPROCESS_SIGNATURE, XAI_MODEL_SIGNATURE} - set(loaded.signatures)
    if missing:
        raise ModelLoadError(f"{model_dir}: SavedModel lacks signature(s) {sorted(missing)}")
    labels = read_labels(model_dir, output_count(loaded.signatures[XAI_MODEL_SIGNATURE]))
    model = ExplainableModel(model_dir=model_dir, labels=labels,
                             metadata=read_explanation_metadata(model_dir),
                             batch_size=batch_size or DEFAULT_BATCH_SIZE, streams=streams or 1, _loaded=loaded)
    if fold_norms:
        height, width, channels = model.image_shape
        probes = np.stack([np.full((height, width, channels), v, np.float32) for v in (0.0, 0.5, 1.0)]
                          + [np.random.default_rng(0).uniform(0, 1, (height, width, channels)).astype(np.float32)])
        model.folded = fold_batch_norms(model._xai_model, model.output_key, probes)
        if model.folded is not None:
            try:  # the folded graph is differentiated here first: a failure falls back, not the model
                model._kernel(LINEAR)(*_interior_nodes(probes[1:2], 1), threads=_cores())
            except Exception as error:  # noqa: BLE001 - folding is an optimization
                log.warning("the folded graph cannot be differentiated (%s: %s); gradients use the graph as exported",
                            type(error).__name__, error)
                model.folded = None
                model._kernels.clear()
    model._kernel(LINEAR)  # trace the common kernel now, not inside the first request
    if streams is None:
        calibrate_streams(model)
    if batch_size is None:
        calibrate_batch_size(model)
    # every session the requests' chunks will run in, made and run once (calibrated or not)
    kernel = model._kernel(LINEAR)
    kernel.prepare(*_interior_nodes(np.full((1, *model.image_shape), 0.5, np.float32), 1), threads=model._threads())
    kernel.close_other_sizes(model._threads())  # the calibration's others

    def measured(seconds: dict[int, float]) -> str:
        return ", ".join(f"{k}: {v * 1000:.1f}" for k, v in seconds.items()) or "given"

    # what the load chose and from what, in the server's log: a request's speed depends on it
    log.info("%s: path gradients %s, %d path points in flight in %d stream(s) (ms per point by points in "
             "flight: %s; by streams: %s)", model_dir, "with batch norms folded" if model.folded else "as exported",
             model.batch_size, model.streams, measured(model.batch_seconds), measured(model.stream_seconds))
    return model
