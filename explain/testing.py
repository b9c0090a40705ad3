"""Synthetic inputs for tests and benchmarks of the explanation engine: a small nonlinear
classifier exported like the real one, and smooth test images.

The session's ``exported_model_dir`` CNN is untrained and almost linear along IG paths, so every
quadrature rule integrates it exactly; this one saturates (tanh, sharp softmax), so its path
integrand curves and quadrature rules and adaptive steps can be told apart.
"""

from __future__ import annotations

import trainer  # noqa: F401  (legacy Keras before TensorFlow)

import numpy as np
import tf_keras as keras

from trainer.export import export_model
from trainer.schema import CLASSES, IMAGE_SIZE


def saturating_classifier(seed: int = 1) -> keras.Model:
    keras.utils.set_random_seed(seed)
    init = keras.initializers.RandomNormal(stddev=1.5)
    return keras.Sequential([
        keras.layers.InputLayer(input_shape=[*IMAGE_SIZE, 3]),
        keras.layers.AveragePooling2D(24),
        keras.layers.Conv2D(8, 3, padding="same", activation="tanh", kernel_initializer=init),
        keras.layers.Flatten(),
        keras.layers.Dense(16, activation="tanh", kernel_initializer=keras.initializers.RandomNormal(stddev=0.6)),
        keras.layers.Dense(len(CLASSES), kernel_initializer=keras.initializers.RandomNormal(stddev=2.0)),
        keras.layers.Softmax(),
    ])


def export_saturating_classifier(export_dir: str) -> str:
    export_model(saturating_classifier(), export_dir, CLASSES, verbose=False)
    return export_dir


def smooth_images(n: int, seed: int = 0) -> np.ndarray:
    """Images with shapes and gradients (not noise), float32 [n, H, W, 3] in [0, 1]."""
    rng = np.random.default_rng(seed)
    h, w = IMAGE_SIZE
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    images = []
    for _ in range(n):
        cy, cx, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.12, 0.25)
        disk = ((yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2)[..., None]
        background = rng.uniform(0, 0.5, 3) * (0.5 + 0.5 * yy[..., None])
        images.append(np.where(disk, rng.uniform(0.5, 1, 3), background))
    return np.clip(np.stack(images), 0, 1).astype(np.float32)
