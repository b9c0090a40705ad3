"""Convert an image folder (one sub-folder per class, the layout of the public flower_photos
archive) to sharded TFRecords in the lab's schema, with a reproducible train/validation split.

Unreadable or corrupt images are reported by path and counted, in the returned summary, on the
console and in ``conversion_report.json``; they never crash the run or vanish silently.
"""

from __future__ import annotations

import io
import json
import os
from typing import Sequence

import trainer  # noqa: F401  (legacy Keras before TensorFlow)

import fire
import numpy as np
from PIL import Image
from tqdm import tqdm

from trainer.schema import FEATURE_CLASS, FEATURE_IMAGE, FEATURE_ONE_HOT, IMAGE_SIZE

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp")


def _class_folders(input_dir: str, classes: Sequence[str] | None) -> list[str]:
    if not os.path.isdir(input_dir):
        raise FileNotFoundError(f"{input_dir}: no such directory")
    found = sorted(d for d in os.listdir(input_dir) if os.path.isdir(os.path.join(input_dir, d)))
    if classes is None:
        if not found:
            raise ValueError(f"{input_dir}: no class sub-folders (expected one folder per class)")
        return found
    missing = [c for c in classes if c not in found]
    if missing:
        raise ValueError(f"{input_dir}: class folder(s) {missing} not found (has {found})")
    return list(classes)


def load_and_resize(path: str, image_size: tuple[int, int] = IMAGE_SIZE) -> bytes:
    """Any PIL-readable image (grayscale, RGBA, palette, GIF, BMP) to 192x192 RGB JPEG bytes."""
    with Image.open(path) as img:
        img.load()  # forces a full decode: truncated files fail here, not later in training
        rgb = img.convert("RGB")
    if rgb.size != (image_size[1], image_size[0]):
        rgb = rgb.resize((image_size[1], image_size[0]), Image.BILINEAR)
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def _split(files_by_class: dict[int, list[str]], validation_split: float, seed: int):
    """Stratified, seeded split: the same input and seed always give the same files in each split."""
    rng = np.random.default_rng(seed)
    train, validation = [], []
    for label, files in sorted(files_by_class.items()):
        order = list(files)
        rng.shuffle(order)
        n_val = int(round(len(order) * validation_split))
        validation += [(f, label) for f in order[:n_val]]
        train += [(f, label) for f in order[n_val:]]
    rng.shuffle(train)
    rng.shuffle(validation)
    return train, validation


def _write(items, directory: str, num_shards: int, num_classes: int, image_size, failures: list, desc: str) -> int:
    import tensorflow as tf

    os.makedirs(directory, exist_ok=True)
    shards = max(1, min(num_shards, len(items)))
    writers = [tf.io.TFRecordWriter(os.path.join(directory, f"flowers-{s:05d}-of-{shards:05d}.tfrec"))
               for s in range(shards)]
    written = 0
    try:
        for path, label in tqdm(items, desc=desc, unit="img"):
            try:
                data = load_and_resize(path, image_size)
            except Exception as exc:  # PIL raises many exception types for bad files
                failures.append({"path": path, "error": f"{type(exc).__name__}: {exc}"})
                continue
            one_hot = [0.0] * num_classes
            one_hot[label] = 1.0
            example = tf.train.Example(features=tf.train.Features(feature={
                FEATURE_IMAGE: tf.train.Feature(bytes_list=tf.train.BytesList(value=[data])),
                FEATURE_CLASS: tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
                FEATURE_ONE_HOT: tf.train.Feature(float_list=tf.train.FloatList(value=one_hot)),
            }))
            writers[written % shards].write(example.SerializeToString())
            written += 1
    finally:
        for writer in writers:
            writer.close()
    return written


def convert_image_folder(input_dir: str, output_dir: str, validation_split: float = 0.2, seed: int = 42,
                         num_shards: int = 8, classes: Sequence[str] | str | None = None,
                         image_size: tuple[int, int] = IMAGE_SIZE) -> dict:
    """Write ``output_dir/train/*.tfrec`` and ``output_dir/validation/*.tfrec``; returns a summary."""
    if not 0.0 <= validation_split < 1.0:
        raise ValueError(f"validation_split must be in [0, 1), got {validation_split}")
    if isinstance(classes, str):
        classes = [c.strip() for c in classes.split(",") if c.strip()]
    class_names = _class_folders(input_dir, classes)
    files_by_class: dict[int, list[str]] = {}
    skipped = []
    for label, name in enumerate(class_names):
        folder = os.path.join(input_dir, name)
        for entry in sorted(os.listdir(folder)):
            path = os.path.join(folder, entry)
            if entry.lower().endswith(IMAGE_EXTENSIONS):
                files_by_class.setdefault(label, []).append(path)
            elif os.path.isfile(path):
                skipped.append(path)
    train, validation = _split(files_by_class, validation_split, seed)
    failures: list[dict] = []
    n_train = _write(train, os.path.join(output_dir, "train"), num_shards, len(class_names), image_size, failures,
                     "train")
    n_val = _write(validation, os.path.join(output_dir, "validation"), max(1, num_shards // 4), len(class_names),
                   image_size, failures, "validation")
    summary = {"classes": class_names, "num_train": n_train, "num_validation": n_val,
               "num_failed": len(failures), "failed": failures, "skipped_non_images": skipped,
               "train_pattern": os.path.join(output_dir, "train", "*.tfrec"),
               "eval_pattern": os.path.join(output_dir, "validation", "*.tfrec")}
    with open(os.path.join(output_dir, "conversion_report.json"), "w") as f:
        json.dump(summary, f, indent=2)
    for failure in failures:
        print(f"UNREADABLE {failure['path']}: {failure['error']}")
    print(f"Converted {n_train} train and {n_val} validation images of {len(class_names)} classes; "
          f"{len(failures)} unreadable (see {output_dir}/conversion_report.json)")
    return summary


if __name__ == "__main__":
    fire.Fire(convert_image_folder, serialize=lambda s: json.dumps({k: v for k, v in s.items() if k != "failed"}))
