"""Convert an image folder (one sub-folder per class, the layout of the public flower_photos
archive: ``root/daisy/*.jpg``, ...) to sharded TFRecords in the lab's schema, with a reproducible,
stratified train/validation split.

Unreadable or corrupt images are reported by path and counted, in the returned summary, on the
console and in ``output_dir/conversion_report.json``; they never crash the run or vanish silently.
The split is decided on file paths before any image is decoded, so it depends only on the folder
listing and the seed: a corrupt file costs its own record, never reshuffles the others.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import trainer  # noqa: F401  (legacy Keras before TensorFlow)

import fire
import numpy as np
import tensorflow as tf
from PIL import Image, ImageOps
from tqdm import tqdm

from trainer.data import make_example, shard_paths
from trainer.pixels import eight_bit
from trainer.schema import IMAGE_SIZE

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp")
REPORT_FILE = "conversion_report.json"
JPEG_QUALITY = 92


def _class_folders(input_dir: str, classes: Sequence[str] | None) -> list[str]:
    if not os.path.isdir(input_dir):
        raise FileNotFoundError(f"{input_dir}: no such directory")
    found = sorted(d for d in os.listdir(input_dir) if os.path.isdir(os.path.join(input_dir, d)))
    if classes is None:
        if not found:
            raise ValueError(f"{input_dir}: no class sub-folders (expected one folder per class, "
                             f"e.g. {input_dir}/daisy)")
        return found
    missing = [c for c in classes if c not in found]
    if missing:
        raise ValueError(f"{input_dir}: class folder(s) {missing} not found (has {found})")
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes {list(classes)} name a class twice")
    return list(classes)


def load_and_resize(path: str, image_size: tuple[int, int] = IMAGE_SIZE, crop: bool = True) -> np.ndarray:
    """Any PIL-readable image (grayscale, RGB, RGBA, palette; JPEG, PNG, GIF, BMP) as ``uint8 [H, W, 3]``.

    ``crop=True`` scales to fill ``image_size`` and cuts the centre (aspect ratio kept, as the lab's
    192x192 flowers were made); ``crop=False`` stretches. Alpha is dropped, not composited, and a
    GIF gives its first frame: what ``preprocess_image`` does with the same file at serving time.
    """
    h, w = image_size
    with Image.open(path) as img:
        img.draft("RGB", (w, h))  # JPEG: decode at the smallest scale >= the target (much faster)
        img.load()  # a full decode: truncated files fail here, not later in training
        rgb = eight_bit(img).convert("RGB")
    if rgb.size != (w, h):
        rgb = ImageOps.fit(rgb, (w, h), Image.BILINEAR) if crop else rgb.resize((w, h), Image.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


def _split(files_by_class: dict[int, list[str]], validation_split: float,
           seed: int) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Stratified, seeded split: the same listing and seed always give the same files in each split,
    and every class keeps its share in both."""
    rng = np.random.default_rng(seed)
    train: list[tuple[str, int]] = []
    validation: list[tuple[str, int]] = []
    for label, files in sorted(files_by_class.items()):
        order = sorted(files)
        rng.shuffle(order)
        n_val = int(round(len(order) * validation_split))
        validation += [(f, label) for f in order[:n_val]]
        train += [(f, label) for f in order[n_val:]]
    rng.shuffle(train)  # classes interleaved in the shards, not one block per class
    rng.shuffle(validation)
    return train, validation


def _write(items: list[tuple[str, int]], directory: str, num_shards: int, num_classes: int,
           image_size: tuple[int, int], crop: bool, failures: list[dict], desc: str) -> list[int]:
    """Write ``items`` round-robin into shards; returns the labels written (failures are appended)."""
    os.makedirs(directory, exist_ok=True)
    written: list[int] = []
    if not items:
        return written
    writers = [tf.io.TFRecordWriter(p) for p in shard_paths(directory, max(1, min(num_shards, len(items))))]
    try:
        for path, label in tqdm(items, desc=desc, unit="img"):
            try:
                pixels = load_and_resize(path, image_size, crop)
            except Exception as exc:  # PIL raises many exception types for bad files
                failures.append({"path": path, "split": desc, "error": f"{type(exc).__name__}: {exc}"})
                continue
            example = make_example(pixels, label, num_classes, jpeg_quality=JPEG_QUALITY)
            writers[len(written) % len(writers)].write(example.SerializeToString())
            written.append(label)
    finally:
        for writer in writers:
            writer.close()
    return written


def convert_image_folder(input_dir: str, output_dir: str, validation_split: float = 0.2, seed: int = 42,
                         num_shards: int = 8, classes: Sequence[str] | str | None = None,
                         image_size: tuple[int, int] = IMAGE_SIZE, crop: bool = True) -> dict:
    """Write ``output_dir/train/flowers-*.tfrec`` and ``output_dir/validation/flowers-*.tfrec``.

    Class order (the label index) is the sorted folder names unless ``classes`` (a list or a
    comma-separated string) gives it; a given class without a folder is an error. Validation gets
    ``num_shards // 4`` shards (at least one). Returns (and writes to ``conversion_report.json``)
    a summary with the classes, per-class counts, the unreadable files and the output globs.
    """
    if not 0.0 <= validation_split < 1.0:
        raise ValueError(f"validation_split must be in [0, 1), got {validation_split}")
    if isinstance(classes, str):
        classes = [c.strip() for c in classes.split(",") if c.strip()]
    class_names = _class_folders(input_dir, classes)
    files_by_class: dict[int, list[str]] = {}
    skipped: list[str] = []
    for label, name in enumerate(class_names):
        folder = os.path.join(input_dir, name)
        for entry in sorted(os.listdir(folder)):
            path = os.path.join(folder, entry)
            if entry.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(path):
                files_by_class.setdefault(label, []).append(path)
            elif os.path.isfile(path):
                skipped.append(path)
    empty = [name for label, name in enumerate(class_names) if label not in files_by_class]
    if empty:
        raise ValueError(f"{input_dir}: class folder(s) {empty} hold no {'/'.join(IMAGE_EXTENSIONS)} files")

    train, validation = _split(files_by_class, validation_split, seed)
    failures: list[dict] = []
    train_labels = _write(train, os.path.join(output_dir, "train"), num_shards, len(class_names), image_size, crop,
                          failures, "train")
    val_labels = _write(validation, os.path.join(output_dir, "validation"), max(1, num_shards // 4),
                        len(class_names), image_size, crop, failures, "validation")
    summary = {
        "classes": class_names,
        "num_train": len(train_labels),
        "num_validation": len(val_labels),
        "per_class": {name: {"train": train_labels.count(i), "validation": val_labels.count(i)}
                      for i, name in enumerate(class_names)},
        "num_failed": len(failures),
        "failed": failures,
        "skipped_non_images": skipped,
        "train_pattern": os.path.join(output_dir, "train", "*.tfrec"),
        "eval_pattern": os.path.join(output_dir, "validation", "*.tfrec") if val_labels else None,
        "validation_split": validation_split,
        "seed": seed,
    }
    with open(os.path.join(output_dir, REPORT_FILE), "w") as f:
        json.dump(summary, f, indent=2)
    for failure in failures:
        print(f"UNREADABLE {failure['path']}: {failure['error']}")
    print(f"Converted {len(train_labels)} train and {len(val_labels)} validation images of {len(class_names)} "
          f"classes; {len(failures)} unreadable, {len(skipped)} non-image files skipped "
          f"(see {os.path.join(output_dir, REPORT_FILE)})")
    return summary


if __name__ == "__main__":
    fire.Fire(convert_image_folder,
              serialize=lambda s: json.dumps({k: v for k, v in s.items() if k != "failed"}, indent=2))
