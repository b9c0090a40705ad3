"""Bulk throughput of ``explain.batch`` against its floors, on the same images in the same run.

* Explanations: seconds per image of ``explain_batch`` (IG, ``step_count`` fixed steps, everything it
  does: read, check, decode, explain, draw, write JSON lines) against the floor of ``step_count``
  evaluations x one batched forward+backward pass per image (:func:`bench.common.forward_backward_curve`,
  the same floor the IG benchmark uses). Goal: floor / ours >= 0.9.
* Predictions: seconds per image of ``explain_batch(explain=False)`` against ``serving_default``
  called in process on batches of the same encoded images (no reading, no checks, no output).
  Goal: reference / ours >= 0.9.

The model is loaded once per mode before timing (an :class:`explain.batch.Engine`), so load time
is not counted against either side; each side is timed ``repeats`` times and the median is kept.
The explanation floor is measured between the bulk runs, so both see the same machine.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any, Sequence

import trainer  # noqa: F401  (legacy Keras before TensorFlow)

import numpy as np
import tensorflow as tf

#: serving_default's batch in the reference (the container's default request size is far smaller).
REFERENCE_BATCH = 64


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def run(model_dir: str, images: Sequence[bytes], step_count: int = 50, batch_size: int = 8,
        repeats: int = 3, predict_images: Sequence[bytes] | None = None,
        floor_batches: Sequence[int] | None = None) -> dict[str, Any]:
    """Per-image seconds and ratios for bulk IG explanations of ``images`` and bulk predictions of
    ``predict_images`` (default: the same; encoded JPEG/PNG bytes) with the exported model in
    ``model_dir``. ``batch_size``: images per explain call (predictions use ``explain.batch``'s
    default, as the CLI does). Predictions cost ~1/100 of an explanation, so they want far more
    images for a run's fixed costs (listing, shard manifest, threads) to weigh what they do in bulk."""
    from bench.common import SignatureModel, forward_backward_curve
    from bench.profiles import FLOOR_BATCH_SIZES
    from explain.batch import Engine, explain_batch
    from trainer.schema import SERVING_SIGNATURE

    images = list(images)
    predict_images = list(predict_images) if predict_images is not None else images
    if not images or not predict_images:
        raise ValueError("run() needs at least one image")
    # fixed steps, so the evaluations spent are exactly step_count per image and the floor is exact
    parameters = {"integrated_gradients_attribution": {"step_count": step_count, "target_error": None}}
    with tempfile.TemporaryDirectory() as tmp:
        folders = {}
        for explain, batch in ((True, images), (False, predict_images)):
            folders[explain] = os.path.join(tmp, "explain" if explain else "predict")
            os.makedirs(folders[explain])
            for i, data in enumerate(batch):
                name = f"{i:06d}.png" if data[:4] == b"\x89PNG" else f"{i:06d}.jpg"
                with open(os.path.join(folders[explain], name), "wb") as f:
                    f.write(data)
        outputs = iter(range(10 ** 6))

        def bulk(engine: Engine, explain: bool) -> dict:
            return explain_batch(folders[explain], os.path.join(tmp, f"out{next(outputs)}"), model_dir,
                                 parameters if explain else None, explain=explain, shard_size=64,
                                 batch_size=batch_size if explain else None, key_only=True, progress=False,
                                 engine=engine)

        explain_engine = Engine(model_dir, True, parameters)
        bulk(explain_engine, True)  # warm-up: traces the kernels
        # The floor, same images, same process, measured between the bulk runs so that both see the
        # same machine: the best batch size once, then its cost once per repeat.
        floor_model = SignatureModel(model_dir)
        pixels = explain_engine.model.preprocess(images[:1])[0]
        curve = forward_backward_curve(floor_model, pixels, tuple(floor_batches or FLOOR_BATCH_SIZES))
        best = min(curve, key=curve.get)
        explain_times, floor_times = [], []
        for _ in range(repeats):
            explain_times.append(_median_seconds(lambda: bulk(explain_engine, True), 1) / len(images))
            floor_times.append(forward_backward_curve(floor_model, pixels, (best,))[best])
        explain_seconds, floor_step = float(np.median(explain_times)), float(np.median(floor_times))
        predict_engine = Engine(model_dir, False, None)
        bulk(predict_engine, False)
        predict_seconds = _median_seconds(lambda: bulk(predict_engine, False), repeats) / len(predict_images)

    floor = step_count * floor_step
    signature = tf.saved_model.load(model_dir).signatures[SERVING_SIGNATURE]
    input_name = next(iter(signature.structured_input_signature[1]))

    def reference() -> None:
        for lo in range(0, len(predict_images), REFERENCE_BATCH):
            signature(**{input_name: tf.constant(predict_images[lo:lo + REFERENCE_BATCH])})

    reference()
    reference_seconds = _median_seconds(reference, repeats) / len(predict_images)
    return {
        "images": len(images), "predict_images": len(predict_images), "step_count": step_count, "batch_size": batch_size,
        "explain_seconds_per_image": explain_seconds,
        "explain_floor_seconds_per_image": floor,
        "forward_backward_seconds_per_image": floor_step, "floor_batch_size": best,
        "explain_seconds_per_image_runs": explain_times, "forward_backward_seconds_runs": floor_times,
        "explain_vs_floor": floor / explain_seconds,
        "predict_seconds_per_image": predict_seconds,
        "serving_default_seconds_per_image": reference_seconds,
        "predict_vs_serving_default": reference_seconds / predict_seconds,
    }
