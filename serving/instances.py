"""Check a prediction request completely before any model runs.

Every instance is decoded and checked here (base64, a real image in a format the model's
``tf.io.decode_image`` reads, within the pixel budget, not truncated), so one bad instance is
answered with a 400 that names it and costs no model time, and a decompression bomb is refused
from its header before a single pixel is decoded. Large images are decoded here at a reduced
scale (JPEG) or reduced right after decoding, so memory per request stays bounded; JSON bodies
are parsed with a nesting limit and finite numbers only.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import re
import sys
import threading
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from trainer.pixels import eight_bit

#: What ``tf.io.decode_image`` (trainer.preprocess) decodes; anything else would fail in the graph.
SUPPORTED_FORMATS = frozenset({"JPEG", "PNG", "GIF", "BMP"})


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server. Defaults follow Vertex online prediction
    (1.5 MB request body) with a pixel budget far above any photo but far below a bomb."""

    max_body_bytes: int = 1_572_864
    max_instances: int = 64
    #: Most pixels one image may decode to (JPEG: after decoding at a reduced scale). A 40 MP
    #: image held by PIL is 160 MB, and at most :data:`LARGE_DECODES` are decoded at once.
    max_image_pixels: int = 40_000_000
    #: Images above this many pixels are decoded here, downscaled to at most ``reduced_pixels``
    #: and handed to the model re-encoded (lossless PNG), so the model's decoder never holds a
    #: huge float copy of them (a 40 MP image as float32 is 480 MB, plus the resize's copies).
    max_direct_pixels: int = 4_000_000
    reduced_pixels: int = 1_000_000
    #: Most pixels all images of one request may decode to: bounds a request's decoding time
    #: (a 40 MP PNG takes about 0.5 s) whatever the number of instances.
    max_request_pixels: int = 100_000_000
    #: Each request's deadline: work still running then stops and is answered 504.
    request_deadline_s: float = 60.0
    #: Time a client has to send its body; a stalled upload is answered 408 and closed.
    body_timeout_s: float = 30.0
    #: Time a connection has to send a request head (line and headers); 408 and closed after
    #: (:mod:`serving.connections`: a silent or byte-a-second client must not hold a socket).
    head_timeout_s: float = 10.0


#: Google's canonical status for each HTTP code this server answers with.
HTTP_STATUS = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED", 408: "DEADLINE_EXCEEDED",
               413: "INVALID_ARGUMENT", 415: "INVALID_ARGUMENT", 499: "CANCELLED", 500: "INTERNAL",
               503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}


class RequestError(ValueError):
    """A request the server refuses; rendered as Vertex's ``{"error": {code, message, status}}``
    (``status`` defaults to the canonical one of ``code``)."""

    def __init__(self, message: str, code: int = 400, status: str | None = None) -> None:
        super().__init__(message)
        self.message, self.code, self.status = message, code, status or HTTP_STATUS.get(code, "UNKNOWN")

    def to_json(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "status": self.status}}


#: Deepest JSON nesting accepted. The deepest legitimate value is a full-shape input baseline
#: in an explanation override (about 10 levels); CPython's parser recurses per level.
MAX_JSON_DEPTH = 64
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


def json_depth(raw: bytes) -> int:
    """How deeply ``raw`` nests arrays and objects, counted outside strings, without parsing it
    (so a 100,000-deep body is refused in milliseconds instead of overflowing the parser)."""
    skeleton = np.frombuffer(_JSON_STRING.sub(b"", raw), np.uint8)
    steps = np.zeros(len(skeleton), np.int32)
    steps[(skeleton == ord("[")) | (skeleton == ord("{"))] = 1
    steps[(skeleton == ord("]")) | (skeleton == ord("}"))] = -1
    return int(np.cumsum(steps).max(initial=0))


#: What a base64 string may hold between its characters: dropped before decoding.
_BASE64_SPACE = str.maketrans("", "", " \t\r\n")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _bounded_int(text: str) -> int:
    """A JSON integer, within Python's own limit on digits (``sys.get_int_max_str_digits()``),
    refused in words a client can act on rather than Python's advice to call
    ``sys.set_int_max_str_digits()``."""
    digits = len(text.lstrip("-"))
    if digits > sys.get_int_max_str_digits() > 0:
        raise ValueError(f"a number of {digits} digits ({text[:20]}...) is too long for any field")
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} is out of the range of a double")
    return value


def parse_json_body(raw: bytes, max_depth: int = MAX_JSON_DEPTH) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 saying where it stopped being JSON. Numbers
    must be finite (no ``NaN``, ``Infinity`` or ``1e400``) and nesting at most ``max_depth``."""
    depth = json_depth(raw)
    if depth > max_depth:
        raise RequestError(f"request body nests {depth} levels deep, over the limit of {max_depth}")
    try:
        body = json.loads(raw, parse_constant=_no_constant, parse_float=_finite_float, parse_int=_bounded_int)
    except UnicodeDecodeError as e:
        raise RequestError(f"request body is not UTF-8 JSON: {e}") from e
    except json.JSONDecodeError as e:
        raise RequestError(f"request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from e
    except (ValueError, RecursionError) as e:  # a non-finite or oversized number
        raise RequestError(f"request body is not valid JSON: {e}") from e
    if not isinstance(body, dict):
        raise RequestError(f"request body must be a JSON object with 'instances', got {type(body).__name__}")
    return body


def decode_instances(body: dict[str, Any], input_name: str, limits: Limits) -> list[bytes]:
    """The encoded image of every instance in ``body["instances"]``, each checked.

    An instance is ``{"<input_name>": {"b64": "..."}}`` (the serving signature's input, as Vertex
    sends it) or a bare ``{"b64": "..."}``.
    """
    if "instances" not in body:
        raise RequestError(f"request has no 'instances' (keys: {sorted(body)}); expected "
                           f'{{"instances": [{{"{input_name}": {{"b64": "..."}}}}]}}')
    instances = body["instances"]
    if not isinstance(instances, list) or not instances:
        raise RequestError("'instances' must be a non-empty list")
    if len(instances) > limits.max_instances:
        raise RequestError(f"too many instances: {len(instances)} > the limit of {limits.max_instances} per request")
    parameters = body.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise RequestError(f"'parameters' must be a JSON object, got {type(parameters).__name__}")
    images, pixels = [], 0
    for i, instance in enumerate(instances):
        data, decoded = _decode_instance(i, instance, input_name, limits)
        pixels += decoded
        if pixels > limits.max_request_pixels:
            raise RequestError(f"instances[0..{i}] hold {pixels} pixels, over the server's budget of "
                               f"{limits.max_request_pixels} pixels per request; send fewer or smaller images")
        images.append(data)
    return images


def _decode_instance(index: int, instance: Any, input_name: str, limits: Limits) -> tuple[bytes, int]:
    where = f"instances[{index}]"
    if isinstance(instance, dict) and input_name in instance:
        if len(instance) != 1:
            raise RequestError(f"{where}: unexpected keys {sorted(set(instance) - {input_name})} beside '{input_name}'")
        value, where = instance[input_name], f"{where}.{input_name}"
    else:
        value = instance
    if not isinstance(value, dict) or set(value) != {"b64"}:
        got = sorted(value) if isinstance(value, dict) else type(value).__name__
        raise RequestError(f"{where}: expected {{\"{input_name}\": {{\"b64\": <base64 image>}}}} or "
                           f"{{\"b64\": <base64 image>}}, got {got}")
    encoded = value["b64"]
    if isinstance(encoded, str):  # line breaks carry nothing: MIME base64 (the base64 command's output) has them
        encoded = encoded.translate(_BASE64_SPACE)
    if not isinstance(encoded, str) or not encoded:
        raise RequestError(f"{where}.b64: must be a non-empty base64 string")
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(f"{where}.b64: invalid base64 ({e})") from e
    return prepare_image(data, where, limits)


#: At most this many large images are decoded at once, server-wide: bounds peak memory under load.
LARGE_DECODES = 2
_large_decodes = threading.BoundedSemaphore(LARGE_DECODES)
#: BMP depths ``tf.io.decode_bmp`` reads; PIL reads more, so they are refused here with a reason.
_TF_BMP_BITS = (8, 24, 32)


def _bmp_bits(data: bytes) -> int | None:
    if len(data) < 30:
        return None
    header_size = int.from_bytes(data[14:18], "little")
    return int.from_bytes(data[24:26] if header_size == 12 else data[28:30], "little")


def prepare_image(data: bytes, where: str, limits: Limits) -> tuple[bytes, int]:
    """The bytes the model should decode for one instance: ``data`` itself when it is small, or
    (over ``max_direct_pixels``, or an animated GIF) the image decoded here, at a reduced scale
    where the format allows it (JPEG), downscaled and re-encoded as PNG; and the number of pixels
    decoded here.

    Refuses bytes that are no image, an unsupported format or depth, an image over the pixel
    budget (read from the header, before decoding) or one that does not decode to the end.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own budget decides
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError:
            raise RequestError(f"{where}: image is over the server's budget of {limits.max_image_pixels} "
                               "pixels") from None
        except Exception as e:  # noqa: BLE001  (PIL raises many types for garbage)
            raise RequestError(f"{where}: not an image ({len(data)} bytes that no image format recognises)") from e
        with image:
            if image.format not in SUPPORTED_FORMATS:
                raise RequestError(f"{where}: unsupported image format {image.format}; "
                                   f"send one of {sorted(SUPPORTED_FORMATS)}")
            if image.format == "BMP" and _bmp_bits(data) not in _TF_BMP_BITS:
                raise RequestError(f"{where}: BMP with {_bmp_bits(data)} bits per pixel; the model's decoder "
                                   f"reads {', '.join(map(str, _TF_BMP_BITS))}-bit BMP only: send it as PNG or JPEG")
            width, height = image.size
            target = (width, height)
            if width * height > limits.max_direct_pixels and image.format == "JPEG":
                factor = math.sqrt(width * height / limits.reduced_pixels)
                image.draft("RGB", (max(1, int(width / factor)), max(1, int(height / factor))))
            decoded = image.size[0] * image.size[1]
            if decoded > limits.max_image_pixels:
                raise RequestError(f"{where}: image is {width}x{height} = {width * height} pixels, over the "
                                   f"server's budget of {limits.max_image_pixels} pixels")
            reencode = decoded > limits.max_direct_pixels or getattr(image, "is_animated", False)
            if not reencode:
                try:
                    image.load()
                except Exception as e:  # noqa: BLE001
                    raise RequestError(f"{where}: {image.format} image cannot be decoded ({e}); "
                                       "is it truncated or corrupt?") from e
                return data, decoded
            with _large_decodes:
                try:
                    image.load()
                    reduced = _downscale(image, limits.reduced_pixels)
                except RequestError:
                    raise
                except Exception as e:  # noqa: BLE001
                    raise RequestError(f"{where}: {image.format} image {target[0]}x{target[1]} cannot be decoded "
                                       f"({e}); is it truncated or corrupt?") from e
                buffer = io.BytesIO()
                reduced.save(buffer, "PNG", compress_level=1)
                return buffer.getvalue(), decoded


def _downscale(image: Image.Image, max_pixels: int) -> Image.Image:
    """``image`` as 8-bit RGB, reduced by an integer factor (box filter) to at most ``max_pixels``."""
    pixels = image.size[0] * image.size[1]
    factor = math.ceil(math.sqrt(pixels / max_pixels)) if pixels > max_pixels else 1
    image = eight_bit(image)  # 16-bit grey: the high byte, as TensorFlow decodes the file
    if image.mode not in ("RGB", "RGBA", "L", "LA"):  # palette and 1-bit images cannot be reduced
        image = image.convert("RGB")
    if factor > 1:  # before converting, so no second full-size copy is made
        image = image.reduce(factor)
    return image if image.mode == "RGB" else image.convert("RGB")
