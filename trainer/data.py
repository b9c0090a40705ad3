"""Reading the flowers TFRecords (the lab's schema), with errors that name the file.

Every image goes through :func:`trainer.preprocess.preprocess_image`, the one preprocessing
function that serving uses too.
"""

from __future__ import annotations

import io

import trainer  # noqa: F401  (legacy Keras before TensorFlow)

import numpy as np
import tensorflow as tf

from trainer.preprocess import preprocess_image
from trainer.schema import CLASSES, FEATURE_CLASS, FEATURE_IMAGE, FEATURE_MASK, FEATURE_ONE_HOT, IMAGE_SIZE


class DataError(ValueError):
    """Training data that cannot be used: the message names the file and the problem."""


def list_files(pattern: str) -> list[str]:
    """Files matching a glob (local or ``gs://``; several globs may be joined by commas)."""
    files: list[str] = []
    for part in [p.strip() for p in pattern.split(",") if p.strip()]:
        try:
            matched = tf.io.gfile.glob(part)
        except tf.errors.OpError as exc:
            raise DataError(f"{part}: cannot list files ({exc.message})") from exc
        if not matched:
            raise DataError(f"{part}: no files match this pattern (missing directory or empty glob)")
        files.extend(sorted(matched))
    if not files:
        raise DataError(f"{pattern!r}: no file pattern given")
    return files


def _feature_spec() -> dict[str, tf.io.FixedLenFeature | tf.io.VarLenFeature]:
    return {FEATURE_IMAGE: tf.io.FixedLenFeature([], tf.string),
            FEATURE_CLASS: tf.io.FixedLenFeature([], tf.int64),
            FEATURE_ONE_HOT: tf.io.VarLenFeature(tf.float32)}


def parse_example(serialized: tf.Tensor, num_classes: int = len(CLASSES),
                  image_size: tuple[int, int] = IMAGE_SIZE) -> tuple[tf.Tensor, tf.Tensor]:
    """One serialized ``tf.train.Example`` to ``(image float32 [H, W, 3], one_hot float32 [C])``."""
    example = tf.io.parse_single_example(serialized, _feature_spec())
    image = preprocess_image(example[FEATURE_IMAGE], image_size)
    one_hot = tf.reshape(tf.sparse.to_dense(example[FEATURE_ONE_HOT]), [num_classes])
    return image, one_hot


def validate_files(files: list[str], num_classes: int, records_per_file: int = 2) -> int:
    """Check the first records of every file eagerly, so bad data fails in seconds, not hours."""
    from PIL import Image

    for path in files:
        try:
            records = list(tf.data.TFRecordDataset(path).take(records_per_file))
        except tf.errors.OpError as exc:
            raise DataError(f"{path}: not a readable TFRecord file ({exc.message.splitlines()[0]})") from exc
        if not records:
            raise DataError(f"{path}: holds no records")
        for index, record in enumerate(records):
            example = tf.train.Example.FromString(record.numpy())
            feats = example.features.feature
            where = f"{path}, record {index}"
            for key in (FEATURE_IMAGE, FEATURE_CLASS, FEATURE_ONE_HOT):
                if key not in feats:
                    raise DataError(f"{where}: missing feature {key!r} (has {sorted(feats)})")
            (image_bytes,) = feats[FEATURE_IMAGE].bytes_list.value or [b""]
            try:
                with Image.open(io.BytesIO(image_bytes)) as img:
                    img.verify()
            except Exception as exc:  # PIL raises many types for non-images
                raise DataError(f"{where}: feature {FEATURE_IMAGE!r} is not an image ({exc})") from exc
            one_hot = list(feats[FEATURE_ONE_HOT].float_list.value)
            if len(one_hot) != num_classes:
                raise DataError(f"{where}: {FEATURE_ONE_HOT!r} has {len(one_hot)} entries but the model head has "
                                f"{num_classes} classes")
            (label,) = feats[FEATURE_CLASS].int64_list.value or [-1]
            if not 0 <= label < num_classes:
                raise DataError(f"{where}: {FEATURE_CLASS!r} = {label} is outside [0, {num_classes})")
    return len(files)


def load_dataset(pattern: str, batch_size: int = 32, training: bool = True, num_classes: int = len(CLASSES),
                 seed: int = 42, shuffle_buffer: int = 1024, image_size: tuple[int, int] = IMAGE_SIZE,
                 validate: bool = True) -> tf.data.Dataset:
    """Batches of ``(images, one_hot)``: parallel read and decode, seeded shuffle, prefetch.

    Deterministic for a seed (``deterministic=True`` keeps parallel map order). Finite: the
    trainer decides about repetition.
    """
    files = list_files(pattern)
    if validate:
        validate_files(files, num_classes)
    options = tf.data.Options()
    options.deterministic = True
    ds = tf.data.Dataset.from_tensor_slices(files)
    if training:
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    ds = ds.interleave(tf.data.TFRecordDataset, cycle_length=min(len(files), 8),
                       num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if training:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    ds = ds.map(lambda r: parse_example(r, num_classes, image_size), num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE).with_options(options)


def count_records(pattern: str) -> int:
    """Number of records in all files matching ``pattern``."""
    return int(sum(1 for _ in tf.data.TFRecordDataset(list_files(pattern))))


def take_numpy(pattern: str, n: int, image_size: tuple[int, int] = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` records as ``(images float32 [n, H, W, 3], class indices int [n])``."""
    ds = tf.data.TFRecordDataset(list_files(pattern)).take(n)
    images, labels = [], []
    for record in ds:
        example = tf.io.parse_single_example(record, {FEATURE_IMAGE: tf.io.FixedLenFeature([], tf.string),
                                                      FEATURE_CLASS: tf.io.FixedLenFeature([], tf.int64)})
        images.append(preprocess_image(example[FEATURE_IMAGE], image_size).numpy())
        labels.append(int(example[FEATURE_CLASS]))
    return np.stack(images), np.array(labels)


def load_masks(pattern: str, n: int | None = None) -> np.ndarray:
    """The synthetic data's ground-truth object masks, ``bool [n, H, W]``, in record order."""
    ds = tf.data.TFRecordDataset(list_files(pattern))
    if n is not None:
        ds = ds.take(n)
    masks = []
    for index, record in enumerate(ds):
        example = tf.io.parse_single_example(record, {FEATURE_MASK: tf.io.FixedLenFeature([], tf.string, b"")})
        if not example[FEATURE_MASK].numpy():
            raise DataError(f"{pattern}, record {index}: has no {FEATURE_MASK!r} feature (not synthetic data)")
        masks.append(tf.io.decode_png(example[FEATURE_MASK], channels=1).numpy()[..., 0] > 127)
    return np.stack(masks)
