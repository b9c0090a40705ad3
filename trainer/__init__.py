"""Flowers image classifier: data, preprocessing, model, training and export.

This package is what Vertex AI custom training runs (``python -m trainer.train``), so it must
stay importable without anything from ``components/`` or ``pipeline/``.

TensorFlow 2.16+ ships Keras 3, which ``tensorflow_hub.KerasLayer`` does not support. Setting
``TF_USE_LEGACY_KERAS`` here, before anything imports TensorFlow, makes ``tf.keras`` the legacy
``tf_keras`` everywhere this package is used, so no user has to remember an environment variable.
"""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
