"""Inputs of bulk explanation: image folders, globs, TFRecords (the lab's schema) and Vertex's JSONL
instances, local or ``gs://``, read as one ordered stream of :class:`Record`.

Everything goes through ``tf.io.gfile``, so a bucket reads like a folder. The stream is ordered and
deterministic (files sorted, records in file order), because resumable output shards are defined
by record position: record ``i`` always lands in shard ``i // shard_size``. A record that cannot be
used (an unreadable file, a line that is not JSON, a TFRecord that is not an Example; bytes that
are not an image, found later by :func:`check_image`) carries its ``error`` rather than raising,
so one bad record is reported in the errors file and never stops a million-image run.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import posixpath
import warnings
from dataclasses import dataclass
from typing import Any, Iterator

import trainer  # noqa: F401  (legacy Keras before TensorFlow)

import tensorflow as tf
from PIL import Image

from trainer.data import DataError, list_files, tf_error_reason
from trainer.schema import FEATURE_IMAGE, SERVING_INPUT

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp")
TFRECORD_EXTENSIONS = (".tfrec", ".tfrecord", ".tfrecords")
JSONL_EXTENSIONS = (".jsonl", ".json")
#: What ``tf.io.decode_image`` (the exported ``xai_preprocess``) decodes.
SUPPORTED_FORMATS = frozenset({"JPEG", "PNG", "GIF", "BMP"})
#: Far above any photo, far below a decompression bomb.
MAX_IMAGE_PIXELS = 40_000_000

IMAGES, TFRECORD, JSONL = "images", "tfrecord", "jsonl"


class BatchInputError(ValueError):
    """The input as a whole cannot be read (no files, mixed kinds); single bad records never raise."""


@dataclass(frozen=True)
class Record:
    """One instance: ``key`` names where it came from (``path``, ``path#record``, ``path#line``);
    ``instance`` is the JSON instance as Vertex echoes it in its output (None: the image as
    ``{"bytes_inputs": {"b64": ...}}``, built only when written); ``image`` the encoded bytes, or
    None with ``error`` saying why the record is unusable. Images are not decoded while reading
    (records of finished shards are skipped cheaply); :func:`check_image` does that later."""

    key: str
    instance: Any
    image: bytes | None
    error: str | None = None


@dataclass(frozen=True)
class Source:
    """The resolved input: its kind and its files, in reading order."""

    kind: str
    files: tuple[str, ...]

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "files": list(self.files)}


def _kind_of(path: str) -> str | None:
    lower = path.lower()
    if lower.endswith(IMAGE_EXTENSIONS):
        return IMAGES
    if lower.endswith(TFRECORD_EXTENSIONS):
        return TFRECORD
    if lower.endswith(JSONL_EXTENSIONS):
        return JSONL
    return None


def _walk(directory: str, exclude: str | None = None) -> list[str]:
    """The input files under ``directory``; the others are named in a warning, not dropped silently
    (a folder of .webp or .tiff photos would otherwise explain nothing and say nothing)."""
    files, others = [], []
    for root, _, names in tf.io.gfile.walk(directory):
        for name in names:
            path = posixpath.join(root, name) if root.startswith("gs://") else f"{root.rstrip('/')}/{name}"
            if _kind_of(name) is not None:
                files.append(path)
            elif not (exclude and path.startswith(exclude.rstrip("/") + "/")):  # the run's own output
                others.append(path)
    if others:
        warnings.warn(f"{directory}: skipped {len(others)} file(s) of other types (e.g. {others[0]}); input is "
                      f"images {IMAGE_EXTENSIONS}, TFRecords {TFRECORD_EXTENSIONS} or JSONL {JSONL_EXTENSIONS}",
                      stacklevel=2)
    return files


def resolve_input(spec: str, exclude: str | None = None) -> Source:
    """Files of ``spec``: a folder (searched recursively), a glob or a file, local or ``gs://``;
    several joined by commas. All files must be of one kind (images, TFRecords or JSONL). Files
    under ``exclude`` (the run's own output directory, which may sit inside an input folder) are
    not input."""
    parts = [p.strip() for p in str(spec).split(",") if p.strip()]
    if not parts:
        raise BatchInputError("no input given (a folder, a glob, TFRecords or JSONL files)")
    files: list[str] = []
    for part in parts:
        if tf.io.gfile.isdir(part):
            matched = _walk(part, exclude)
            if not matched:
                raise BatchInputError(f"{part}: folder holds no images ({', '.join(IMAGE_EXTENSIONS)}), "
                                      f"TFRecords or JSONL files")
        else:
            try:
                matched = list_files(part)  # the trainer's glob handling: one place for it
            except DataError as e:
                raise BatchInputError(str(e)) from e
        files.extend(f for f in sorted(matched) if f not in files)
    if exclude:
        prefix = exclude.rstrip("/") + "/"
        files = [f for f in files if not f.startswith(prefix)]
        if not files:
            raise BatchInputError(f"{spec}: holds nothing but the output directory {exclude}")
    kinds = {f: _kind_of(f) for f in files}
    unknown = [f for f, k in kinds.items() if k is None]
    if unknown:
        raise BatchInputError(f"{unknown[0]}: unknown file type (expected images {IMAGE_EXTENSIONS}, TFRecords "
                              f"{TFRECORD_EXTENSIONS} or JSONL {JSONL_EXTENSIONS})")
    found = sorted(set(kinds.values()))
    if len(found) > 1:
        raise BatchInputError(f"input mixes {' and '.join(found)} files; give one kind per run")
    return Source(found[0], tuple(files))


def check_image(data: bytes) -> str | None:
    """Why ``data`` is not an image the model can decode (None if it is): format, pixel budget
    (read from the header, before decoding) and a full decode, so truncated files are caught."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            return f"image is over the pixel budget ({e})"
        except Exception:  # noqa: BLE001  (PIL raises many types for garbage)
            return f"not an image ({len(data)} bytes that no image format recognises)"
        with image:
            if image.format not in SUPPORTED_FORMATS:
                return f"unsupported image format {image.format}; expected one of {sorted(SUPPORTED_FORMATS)}"
            if image.size[0] * image.size[1] > MAX_IMAGE_PIXELS:
                return f"image is {image.size[0]}x{image.size[1]} pixels, over the budget of {MAX_IMAGE_PIXELS}"
            try:
                image.load()
            except Exception as e:  # noqa: BLE001
                return f"{image.format} image cannot be decoded ({e}); is it truncated or corrupt?"
    return None


def _b64_instance(data: bytes) -> dict[str, Any]:
    return {SERVING_INPUT: {"b64": base64.b64encode(data).decode("ascii")}}


def b64_instance(data: bytes) -> dict[str, Any]:
    """The JSONL instance Vertex sends our container for an image: ``{"bytes_inputs": {"b64": ...}}``."""
    return _b64_instance(data)


def _read_image_files(files: tuple[str, ...]) -> Iterator[Record]:
    for path in files:
        try:
            with tf.io.gfile.GFile(path, "rb") as f:
                data = f.read()
        except (tf.errors.OpError, OSError) as e:
            yield Record(path, {"uri": path}, None, f"cannot read file: {getattr(e, 'message', e)}")
            continue
        yield Record(path, None, data)


def _read_tfrecords(files: tuple[str, ...]) -> Iterator[Record]:
    for path in files:
        index = 0
        try:
            for raw in tf.data.TFRecordDataset(path).as_numpy_iterator():
                key = f"{path}#{index}"
                index += 1
                try:
                    example = tf.train.Example.FromString(raw)
                except Exception as e:  # noqa: BLE001  (protobuf's DecodeError)
                    yield Record(key, {"key": key}, None, f"not a tf.train.Example ({e})")
                    continue
                feature = example.features.feature.get(FEATURE_IMAGE)
                values = list(feature.bytes_list.value) if feature is not None else []
                if len(values) != 1:
                    yield Record(key, {"key": key}, None, f"no single {FEATURE_IMAGE!r} bytes feature "
                                                          f"(has {sorted(example.features.feature)})")
                    continue
                yield Record(key, None, values[0])
        except tf.errors.OpError as e:  # truncated or corrupt file: report it, go on with the next file
            key = f"{path}#{index}"
            yield Record(key, {"key": key}, None, f"TFRecord file unreadable from record {index} on: "
                                                  f"{tf_error_reason(e)}")


def instance_image(instance: Any) -> bytes:
    """The encoded image of a Vertex JSONL instance: ``{"<input>": {"b64": ...}}`` or ``{"b64": ...}``."""
    value = instance
    if isinstance(instance, dict) and set(instance) != {"b64"} and len(instance) == 1:
        value = next(iter(instance.values()))
    if not isinstance(value, dict) or set(value) != {"b64"} or not isinstance(value["b64"], str):
        got = sorted(instance) if isinstance(instance, dict) else type(instance).__name__
        raise ValueError(f'expected {{"{SERVING_INPUT}": {{"b64": <base64 image>}}}} or {{"b64": ...}}, got {got}')
    try:
        return base64.b64decode(value["b64"], validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"invalid base64 ({e})") from None


def _read_jsonl(files: tuple[str, ...]) -> Iterator[Record]:
    for path in files:
        try:
            with tf.io.gfile.GFile(path, "r") as f:
                for number, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    key = f"{path}#{number}"
                    try:
                        instance = json.loads(line)
                    except json.JSONDecodeError as e:
                        yield Record(key, {"line": line.strip()[:200]}, None, f"not valid JSON: {e.msg} at column "
                                                                            f"{e.colno}")
                        continue
                    try:
                        data = instance_image(instance)
                    except ValueError as e:
                        yield Record(key, instance, None, str(e))
                        continue
                    yield Record(key, instance, data)
        except (tf.errors.OpError, OSError, UnicodeDecodeError) as e:
            yield Record(path, {"uri": path}, None, f"cannot read JSONL file: {getattr(e, 'message', e)}")


def read_records(source: Source) -> Iterator[Record]:
    """Every record of ``source`` in order; unusable ones carry their ``error``."""
    reader = {IMAGES: _read_image_files, TFRECORD: _read_tfrecords, JSONL: _read_jsonl}[source.kind]
    return reader(source.files)


def count_records(source: Source) -> int:
    """How many records :func:`read_records` yields, without decoding images (fixes the shard count)."""
    if source.kind == IMAGES:
        return len(source.files)
    if source.kind == TFRECORD:
        total = 0
        for path in source.files:
            try:
                for _ in tf.data.TFRecordDataset(path).as_numpy_iterator():
                    total += 1
            except tf.errors.OpError:
                total += 1  # the error record read_records yields for the unreadable rest
        return total
    total = 0
    for path in source.files:
        try:
            with tf.io.gfile.GFile(path, "r") as f:
                total += sum(1 for line in f if line.strip())
        except (tf.errors.OpError, OSError, UnicodeDecodeError):
            total += 1
    return total
