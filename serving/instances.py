"""Check a prediction request completely before any model runs.

Every instance is decoded and checked here (base64, a real image in a format the model's
``tf.io.decode_image`` reads, within the pixel budget, not truncated), so one bad instance is
answered with a 400 that names it and costs no model time, and a decompression bomb is refused
from its header before a single pixel is decoded.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import warnings
from dataclasses import dataclass
from typing import Any

from PIL import Image

#: What ``tf.io.decode_image`` (trainer.preprocess) decodes; anything else would fail in the graph.
SUPPORTED_FORMATS = frozenset({"JPEG", "PNG", "GIF", "BMP"})


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server. Defaults follow Vertex online prediction
    (1.5 MB request body) with a pixel budget far above any photo but far below a bomb."""

    max_body_bytes: int = 1_572_864
    max_instances: int = 64
    max_image_pixels: int = 40_000_000


class RequestError(ValueError):
    """A request the server refuses; rendered as Vertex's ``{"error": {code, message, status}}``."""

    def __init__(self, message: str, code: int = 400, status: str = "INVALID_ARGUMENT") -> None:
        super().__init__(message)
        self.message, self.code, self.status = message, code, status

    def to_json(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "status": self.status}}


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 saying where it stopped being JSON."""
    try:
        body = json.loads(raw)
    except UnicodeDecodeError as e:
        raise RequestError(f"request body is not UTF-8 JSON: {e}") from e
    except json.JSONDecodeError as e:
        raise RequestError(f"request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from e
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
    return [_decode_instance(i, instance, input_name, limits) for i, instance in enumerate(instances)]


def _decode_instance(index: int, instance: Any, input_name: str, limits: Limits) -> bytes:
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
    if not isinstance(encoded, str) or not encoded:
        raise RequestError(f"{where}.b64: must be a non-empty base64 string")
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(f"{where}.b64: invalid base64 ({e})") from e
    check_image(data, where, limits)
    return data


def check_image(data: bytes, where: str, limits: Limits) -> None:
    """Refuse bytes that are no image, an unsupported format, an image over the pixel budget
    (read from the header, before decoding) or one that does not decode to the end."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own budget decides
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            raise RequestError(f"{where}: image is over the pixel budget ({e})") from e
        except Exception as e:  # noqa: BLE001  (PIL raises many types for garbage)
            raise RequestError(f"{where}: not an image ({len(data)} bytes that no image format recognises)") from e
        with image:
            if image.format not in SUPPORTED_FORMATS:
                raise RequestError(f"{where}: unsupported image format {image.format}; "
                                   f"send one of {sorted(SUPPORTED_FORMATS)}")
            width, height = image.size
            if width * height > limits.max_image_pixels:
                raise RequestError(f"{where}: image is {width}x{height} = {width * height} pixels, over the "
                                   f"budget of {limits.max_image_pixels} pixels")
            try:
                image.load()
            except Exception as e:  # noqa: BLE001
                raise RequestError(f"{where}: {image.format} image cannot be decoded ({e}); "
                                   "is it truncated or corrupt?") from e
