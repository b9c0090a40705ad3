"""Shared fixtures: tiny, real artefacts built once per test session.

``exported_model_dir`` is a real SavedModel with the three signatures and its
``explanation_metadata.json``, written by :func:`trainer.export.export_model`.
"""

from __future__ import annotations

import trainer  # noqa: F401  (legacy Keras before TensorFlow)

import pytest
import tensorflow as tf
import tf_keras as keras

from trainer.export import export_model
from trainer.schema import CLASSES, IMAGE_SIZE


def _tiny_cnn(seed: int = 0) -> keras.Model:
    """A small untrained CNN with the classifier's input and output shapes."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.layers.InputLayer(input_shape=[*IMAGE_SIZE, 3]),
        keras.layers.Conv2D(8, 5, strides=4, activation="relu"),
        keras.layers.Conv2D(16, 3, strides=2, activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(len(CLASSES), activation="softmax"),
    ])


@pytest.fixture(scope="session")
def exported_model_dir(tmp_path_factory) -> str:
    """A small classifier exported with all three signatures, labels and explanation metadata."""
    export_dir = str(tmp_path_factory.mktemp("export") / "model")
    export_model(_tiny_cnn(), export_dir, CLASSES, verbose=False)
    return export_dir
