"""The one preprocessing function. Training, evaluation, ``serving_default`` and ``xai_preprocess``
all call :func:`preprocess_image`, so a model can never see differently prepared pixels at
serving time than it saw in training (the drift the lab notebook invites by writing it twice)."""

from __future__ import annotations

import tensorflow as tf

from trainer.schema import CHANNELS, IMAGE_SIZE


def preprocess_image(image_bytes: tf.Tensor, image_size: tuple[int, int] = IMAGE_SIZE) -> tf.Tensor:
    """Encoded image bytes (JPEG, PNG, GIF or BMP; grayscale, RGB or RGBA; any size) to a
    ``float32 [H, W, 3]`` tensor in ``[0, 1]``.

    ``decode_image`` rather than the lab's ``decode_jpeg`` so that every format a user may send is
    accepted; ``channels=3`` turns grayscale into RGB and drops alpha; the first frame of an
    animated GIF is used. Resizing is bilinear, which is the identity when the size already fits.
    """
    image = tf.io.decode_image(image_bytes, channels=CHANNELS, expand_animations=False)
    image = tf.image.convert_image_dtype(image, tf.float32)  # uint8 -> [0, 1]
    image = tf.image.resize(image, image_size, method="bilinear")
    image = tf.clip_by_value(image, 0.0, 1.0)
    image.set_shape([image_size[0], image_size[1], CHANNELS])
    return image


def preprocess_batch(bytes_batch: tf.Tensor, image_size: tuple[int, int] = IMAGE_SIZE) -> tf.Tensor:
    """A ``[N]`` string tensor of encoded images to ``float32 [N, H, W, 3]``."""
    return tf.map_fn(
        lambda b: preprocess_image(b, image_size),
        bytes_batch,
        fn_output_signature=tf.TensorSpec([image_size[0], image_size[1], CHANNELS], tf.float32),
    )
