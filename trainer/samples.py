"""Write a few records of a TFRecord glob back out as the image files a user would send.

The demo and the tests explain *files*, the way a user calls the endpoint, so they need real
encoded images: these are the records' own JPEG bytes, not re-encoded pixels.
"""

from __future__ import annotations

import os

import trainer  # noqa: F401  (legacy Keras before TensorFlow)

import fire
import tensorflow as tf

from trainer.schema import CLASSES, FEATURE_CLASS, FEATURE_IMAGE


def write_sample_images(data_path: str, output_dir: str, n: int = 3, classes: tuple[str, ...] = CLASSES,
                        one_per_class: bool = True) -> list[str]:
    """Write up to ``n`` images (one per class first, when ``one_per_class``) as ``<i>_<class>.jpg``."""
    from trainer.data import list_files

    os.makedirs(output_dir, exist_ok=True)
    spec = {FEATURE_IMAGE: tf.io.FixedLenFeature([], tf.string), FEATURE_CLASS: tf.io.FixedLenFeature([], tf.int64)}
    seen: set[int] = set()
    paths: list[str] = []
    for record in tf.data.TFRecordDataset(list_files(data_path)):
        example = tf.io.parse_single_example(record, spec)
        label = int(example[FEATURE_CLASS])
        if one_per_class and label in seen:
            continue
        seen.add(label)
        path = os.path.join(output_dir, f"{len(paths):03d}_{classes[label]}.jpg")
        with open(path, "wb") as f:
            f.write(example[FEATURE_IMAGE].numpy())
        paths.append(path)
        if len(paths) >= n:
            break
    return paths


if __name__ == "__main__":
    fire.Fire(write_sample_images, serialize=lambda paths: "\n".join(paths))
