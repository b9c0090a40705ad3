"""What every benchmark shares: alternating timers, the completeness error, the evaluation
images with their masks, and the model as the ``saliency`` library and the tutorial call it.

Contenders are timed in alternation (A B C, B C A, C A B, ...) so that a slow spell of a shared
machine falls on all of them alike rather than on whichever ran last.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import trainer  # noqa: F401  (legacy Keras before TensorFlow)

import numpy as np
import tensorflow as tf

from bench.profiles import FLOOR_BATCH_SIZES  # on a CPU the cost per image is not monotone in the batch
from trainer.schema import CONCRETE_INPUT


@dataclass
class Timing:
    """Seconds of repeated runs of one contender."""

    seconds: list[float]

    @property
    def median(self) -> float:
        return float(np.median(self.seconds))

    @property
    def p95(self) -> float:
        return float(np.percentile(self.seconds, 95))


def alternate(contenders: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, Timing]:
    """Time each contender ``repeats`` times, rotating their order every round, after
    ``warmup`` untimed calls each (tracing, caches)."""
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    out = {name: Timing([]) for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            contenders[name]()
            out[name].seconds.append(time.perf_counter() - t0)
    return out


def completeness_error(attributions: np.ndarray, f_input: np.ndarray, f_baseline: np.ndarray) -> np.ndarray:
    """Vertex's approximation error, |sum(attr) - (F(x) - F(b))| / |F(x) - F(b)|, per row.

    Measured from the attributions alone, so every implementation is scored the same way.
    """
    attributions = np.asarray(attributions, np.float64)
    total = attributions.reshape(len(attributions), -1).sum(axis=1)
    delta = np.asarray(f_input, np.float64) - np.asarray(f_baseline, np.float64)
    return np.abs(total - delta) / np.maximum(np.abs(delta), 1e-12)


@dataclass
class EvalSet:
    """Validation images (float32 [n, H, W, 3] in [0, 1]), true classes and ground-truth masks."""

    images: np.ndarray
    labels: np.ndarray
    masks: np.ndarray


def load_eval_set(pattern: str, n: int) -> EvalSet:
    from trainer.data import load_masks, take_numpy

    images, labels = take_numpy(pattern, n)
    masks = load_masks(pattern, n)
    if len(images) < n:
        raise ValueError(f"{pattern}: holds {len(images)} records, the benchmark needs {n}")
    return EvalSet(images, labels, masks)


class SignatureModel:
    """The exported ``xai_model`` signature as the reference implementations need it: batched
    probabilities, and batched gradients of one class's probability with respect to the pixels.
    ``fold_norms``: the same graph with its batch normalizations folded as ours folds them
    (:mod:`explain.folding`), for the floor of the graph ours runs."""

    def __init__(self, model_dir: str, fold_norms: bool = False):
        from trainer.schema import XAI_MODEL_SIGNATURE

        self._loaded = tf.saved_model.load(model_dir)  # keeps the variables alive
        self._fn = self._loaded.signatures[XAI_MODEL_SIGNATURE]
        self.output_key = next(iter(self._fn.structured_outputs))
        self._folded = None
        if fold_norms:
            from explain.folding import fold_batch_norms

            shape = self._fn.structured_input_signature[1][CONCRETE_INPUT].shape[1:]
            folded = fold_batch_norms(self._fn, self.output_key, np.full((1, *shape), 0.5, np.float32))
            if folded is None:
                raise ValueError(f"{model_dir}: no batch normalization of its xai_model folds")
            self._folded = folded.function
        spec = tf.TensorSpec([None, *self._fn.structured_input_signature[1][CONCRETE_INPUT].shape[1:]], tf.float32)

        @tf.function(input_signature=[spec, tf.TensorSpec([], tf.int32)], autograph=False)
        def gradients(images, class_index):
            with tf.GradientTape() as tape:
                tape.watch(images)
                target = self(images)[:, class_index]
            return tape.gradient(target, images)

        self._gradients = gradients
        self._in_sessions = None

    # not converted when a ``tf.function`` calls it (the tutorial's): in one pytest process autograph
    # once took this method for ``gradients`` above, and passed the object itself as the images
    @tf.autograph.experimental.do_not_convert
    def __call__(self, images: tf.Tensor) -> tf.Tensor:
        """Probabilities ``[N, C]`` (the graph function, usable inside ``tf.function``)."""
        if self._folded is not None:
            return self._folded(images)
        return self._fn(**{CONCRETE_INPUT: images})[self.output_key]

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self(tf.constant(np.asarray(images, np.float32))).numpy()

    def gradients(self, images: np.ndarray, class_index: int, threads: int | None = None) -> np.ndarray:
        """Gradients of class ``class_index``'s probability at ``images``: called eagerly, or with
        ``threads`` in a session of that many threads (:mod:`explain.sessions`), as ours' lanes run."""
        if threads is None:
            return self._gradients(tf.constant(np.asarray(images, np.float32)),
                                   tf.constant(class_index, tf.int32)).numpy()
        if self._in_sessions is None:
            from explain.sessions import SessionFunction

            self._in_sessions = SessionFunction(self._gradients.get_concrete_function())
        return self._in_sessions(np.asarray(images, np.float32), np.int32(class_index), threads=threads)[0]

    def saliency_call(self) -> Callable:
        """A ``saliency.core`` ``call_model_function`` giving input gradients of one class."""
        import saliency.core as saliency

        def call(x_value_batch, call_model_args=None, expected_keys=None):
            class_index = int(call_model_args["class_index"])
            return {saliency.base.INPUT_OUTPUT_GRADIENTS: self.gradients(x_value_batch, class_index)}

        return call


def forward_backward_curve(model: SignatureModel, image: np.ndarray, batch_sizes=FLOOR_BATCH_SIZES,
                           repeats: int = 3) -> dict[int, float]:
    """Seconds of one forward+backward pass per image at each batch size (median of ``repeats``)."""
    curve = {}
    for batch_size in batch_sizes:
        batch = np.repeat(np.asarray(image, np.float32)[None], batch_size, axis=0)
        model.gradients(batch, 0)  # trace
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model.gradients(batch, 0)
            times.append(time.perf_counter() - t0)
        curve[batch_size] = float(np.median(times)) / batch_size
    return curve


def table(caption: str, columns: list[str], rows: list[list[Any]]) -> dict:
    """A table for the report: rows of values, formatted there."""
    return {"caption": caption, "columns": columns, "rows": rows}
