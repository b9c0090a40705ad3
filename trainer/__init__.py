"""Flowers image classifier: data, preprocessing, model, training and export.

This package is what Vertex AI custom training runs (``python -m trainer.train``), so it must
stay importable without anything from ``components/`` or ``pipeline/``.

TensorFlow 2.16+ ships Keras 3, which ``tensorflow_hub.KerasLayer`` does not support. Setting
``TF_USE_LEGACY_KERAS`` here, before anything imports TensorFlow, makes ``tf.keras`` the legacy
``tf_keras`` everywhere this package is used, so no user has to remember an environment variable.
TensorFlow's C++ start-up noise is kept off the console too (:mod:`trainer.tf_logging`).

oneDNN keeps the convolution primitives it compiled per shape in a cache of 1024 by default, and
one batch size of MobileNetV2's forward and backward pass holds about a hundred: a process that
runs more than about ten batch sizes (the explanation kernel's chunks of 1 to 16 path points,
predictions, another graph) evicts and recompiles them. On MobileNetV2 1.0 @ 192 (2 cores) one
path point cost 40 ms instead of 18 once 32 sizes were in turn, 22 ms with room for 8192 (the
peak memory did not move). The default here is 8192, unless the environment already says.

Each TensorFlow device gets an intra-op thread pool of its own (``TF_OVERRIDE_GLOBAL_THREADPOOL``)
instead of one for the whole process, so that the explanation kernels can run their passes in
sessions with a share of the cores each (:mod:`explain.sessions`) while eager work (training,
predictions) keeps all of them. Read when TensorFlow makes its first device.
"""

import os

from trainer.tf_logging import quiet_tensorflow

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
# read when oneDNN builds its first primitive, so after importing TensorFlow is still in time
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "8192")
os.environ.setdefault("TF_OVERRIDE_GLOBAL_THREADPOOL", "1")
quiet_tensorflow()
