"""8-bit pixels from any image PIL opens, the way TensorFlow decodes the same file.

``tf.io.decode_image`` (what :func:`trainer.preprocess.preprocess_image` runs in training and in the
exported model) keeps the high byte of a 16-bit PNG. PIL's own ``convert("RGB")`` clips 16-bit values
at 255 instead, so a 16-bit grayscale photo became solid white wherever PIL decoded it first (the
folder converter, the server's reduced decode of large images, the figures). One function for it,
PIL and NumPy only, so the server imports it without TensorFlow.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def eight_bit(image: Image.Image) -> Image.Image:
    """``image`` with 16- or 32-bit integer samples (modes ``I``, ``I;16``, ``I;16B``...) reduced to
    their high byte (mode ``L``), as TensorFlow decodes a 16-bit PNG; float images (``F``, never
    from an accepted file type) clipped to 0..255; any other image unchanged."""
    if image.mode.startswith("I"):
        return Image.fromarray((np.asarray(image).astype(np.uint32) >> 8).clip(0, 255).astype(np.uint8), "L")
    if image.mode == "F":
        return Image.fromarray(np.nan_to_num(np.asarray(image)).clip(0, 255).astype(np.uint8), "L")
    return image
