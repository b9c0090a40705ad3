"""Flowers image classifier: data, preprocessing, model, training and export.

This package is what Vertex AI custom training runs (``python -m trainer.train``), so it must
stay importable without anything from ``components/`` or ``pipeline/``.

TensorFlow 2.16+ ships Keras 3, which ``tensorflow_hub.KerasLayer`` does not support. Setting
``TF_USE_LEGACY_KERAS`` here, before anything imports TensorFlow, makes ``tf.keras`` the legacy
``tf_keras`` everywhere this package is used, so no user has to remember an environment variable.
TensorFlow's C++ start-up noise is kept off the console too (:mod:`trainer.tf_logging`).
"""

import os

from trainer.tf_logging import quiet_tensorflow

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
quiet_tensorflow()
