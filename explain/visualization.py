"""Attribution images as Vertex draws them, and the lab's three-panel figure.

Options are Vertex's ``ExplanationMetadata.InputMetadata.Visualization`` (read from the
explanation metadata's input ``visualization`` dict, snake_case or camelCase) with its defaults:
``type`` OUTLINES for IG (XRAI is always drawn as PIXELS: outlines apply to IG only),
``polarity`` POSITIVE, ``color_map`` PINK_GREEN for IG and VIRIDIS for XRAI,
``clip_percent_upperbound`` 99.9, ``clip_percent_lowerbound`` 62, ``overlay_type`` NONE.

Drawing follows the IG authors' visualisation (the one Vertex's images resemble): attributions
are summed over colour channels, split by polarity, and their magnitudes clipped at thresholds
that keep the stated share of the total attribution mass (so the lower bound 62 hides the
weakest pixels that together carry 62% of the attribution), then scaled linearly into
[``MIN_VISIBLE``, 1]. XRAI's region gains are piecewise constant, so for XRAI the clip bounds
are ordinary percentiles of the gains (otherwise one large region would take the whole mass).
"""

from __future__ import annotations

import base64
import io
import re
from dataclasses import dataclass
from typing import Any, Mapping

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from PIL import Image
from scipy import ndimage
from skimage import morphology, segmentation

from explain.parameters import IG_METHOD, XRAI_METHOD, ExplanationParametersError

TYPES = ("PIXELS", "OUTLINES")
POLARITIES = ("POSITIVE", "NEGATIVE", "BOTH")
COLOR_MAPS = ("PINK_GREEN", "VIRIDIS", "RED", "GREEN", "RED_GREEN", "PINK_WHITE_GREEN")
OVERLAY_TYPES = ("NONE", "ORIGINAL", "GRAYSCALE", "MASK_BLACK")
#: Kept pixels fade in from this intensity, so the weakest shown pixel is still visible.
MIN_VISIBLE = 0.2
JPEG_QUALITY = 90

_GREEN = np.array([0.0, 0.85, 0.25])
_PINK = np.array([1.0, 0.2, 0.6])
_RED = np.array([0.95, 0.1, 0.1])
#: Colour of (positive, negative) attributions for each two-sided map.
_TWO_SIDED = {"PINK_GREEN": (_GREEN, _PINK), "RED_GREEN": (_GREEN, _RED), "RED": (_RED, _RED),
              "GREEN": (_GREEN, _GREEN)}


@dataclass(frozen=True)
class VisualizationConfig:
    """Vertex's ``InputMetadata.Visualization``, resolved against the method's defaults."""

    type: str = "OUTLINES"
    polarity: str = "POSITIVE"
    color_map: str = "PINK_GREEN"
    clip_percent_upperbound: float = 99.9
    clip_percent_lowerbound: float = 62.0
    overlay_type: str = "NONE"


def _choice(raw: Mapping[str, Any], key: str, allowed: tuple[str, ...], default: str) -> str:
    value = raw.get(key)
    if value in (None, "", f"{key.upper()}_UNSPECIFIED", "TYPE_UNSPECIFIED", "POLARITY_UNSPECIFIED",
                 "COLOR_MAP_UNSPECIFIED", "OVERLAY_TYPE_UNSPECIFIED"):
        return default
    value = str(value).upper()
    if value not in allowed:
        raise ExplanationParametersError(f"visualization.{key} must be one of {allowed}, got {raw[key]!r}")
    return value


def _percent(raw: Mapping[str, Any], key: str, default: float) -> float:
    value = raw.get(key) or default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
        raise ExplanationParametersError(f"visualization.{key} must be a number in [0, 100], got {raw[key]!r:.80}")
    return float(value)


def parse_visualization(raw: Mapping[str, Any] | None, method: str = IG_METHOD) -> VisualizationConfig:
    """Resolve an ``InputMetadata.Visualization`` dict (or None) for ``method``'s defaults."""
    if raw is not None and not isinstance(raw, Mapping):
        raise ExplanationParametersError(f"visualization must be an object, got {raw!r:.80}")
    raw = {re.sub(r"(?<!^)(?=[A-Z])", "_", str(k)).lower(): v for k, v in (raw or {}).items()}
    allowed = {"type", "polarity", "color_map", "clip_percent_upperbound", "clip_percent_lowerbound", "overlay_type"}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ExplanationParametersError(f"visualization: unknown field(s) {unknown}; allowed: {sorted(allowed)}")
    xrai = method == XRAI_METHOD
    upper = _percent(raw, "clip_percent_upperbound", 99.9)  # proto3: 0 = unset
    lower = _percent(raw, "clip_percent_lowerbound", 62.0)
    if not 0 <= lower < upper <= 100:
        raise ExplanationParametersError(f"visualization clip bounds must satisfy 0 <= clip_percent_lowerbound "
                                         f"({lower}) < clip_percent_upperbound ({upper}) <= 100")
    kind = _choice(raw, "type", TYPES, "PIXELS" if xrai else "OUTLINES")
    return VisualizationConfig(
        type="PIXELS" if xrai else kind,
        polarity=_choice(raw, "polarity", POLARITIES, "POSITIVE"),
        color_map=_choice(raw, "color_map", COLOR_MAPS, "VIRIDIS" if xrai else "PINK_GREEN"),
        clip_percent_upperbound=upper, clip_percent_lowerbound=lower,
        overlay_type=_choice(raw, "overlay_type", OVERLAY_TYPES, "NONE"))


def _mass_threshold(values: np.ndarray, percent: float) -> float:
    """The magnitude below which lie the weakest pixels carrying ``percent``% of the total mass."""
    flat = np.sort(values.ravel())
    total = flat.sum()
    if total <= 0:
        return 0.0
    index = np.searchsorted(np.cumsum(flat), total * percent / 100.0)
    return float(flat[min(index, len(flat) - 1)])


def _scale(magnitude: np.ndarray, config: VisualizationConfig, by_mass: bool) -> np.ndarray:
    """Magnitudes to [0, 1]: 0 below the lower clip, MIN_VISIBLE..1 between, 1 above."""
    if by_mass:
        low = _mass_threshold(magnitude, config.clip_percent_lowerbound)
        high = _mass_threshold(magnitude, config.clip_percent_upperbound)
    else:
        low, high = np.percentile(magnitude, [config.clip_percent_lowerbound, config.clip_percent_upperbound])
    if high <= low:
        return (magnitude > low).astype(np.float32) if high > 0 else np.zeros_like(magnitude, np.float32)
    scaled = MIN_VISIBLE + (1 - MIN_VISIBLE) * (magnitude - low) / (high - low)
    return np.where(magnitude > low, np.clip(scaled, 0, 1), 0).astype(np.float32)


def _outline(mask: np.ndarray) -> np.ndarray:
    """Smooth a binary mask of strong pixels into blobs and return their thick boundaries."""
    if not mask.any():
        return mask
    size = max(1, min(mask.shape) // 64)
    blobs = ndimage.binary_closing(mask, morphology.disk(2 * size), border_value=0)
    blobs = ndimage.binary_fill_holes(ndimage.binary_opening(blobs, morphology.disk(size)))
    labels, count = ndimage.label(blobs)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    blobs = (sizes >= max(16, mask.size // 1000))[labels] & blobs  # drop specks
    return ndimage.binary_dilation(segmentation.find_boundaries(blobs, mode="inner"), morphology.disk(size))


def render_attribution(image: np.ndarray, attribution: np.ndarray, config: VisualizationConfig,
                       method: str = IG_METHOD) -> np.ndarray:
    """The attribution image, uint8 ``[H, W, 3]``, as Vertex draws it for ``config``.

    Args:
      image: the explained input, float ``[H, W, 3]`` in [0, 1] (for the overlays).
      attribution: IG ``[H, W, C]`` or ``[H, W]``; XRAI region gains ``[H, W]``.
    """
    values = np.asarray(attribution, np.float64)
    if values.ndim == 3:
        values = values.sum(axis=-1)
    xrai = method == XRAI_METHOD
    positive = _scale(np.maximum(values, 0) if not xrai else values - values.min(), config, not xrai)
    negative = _scale(np.maximum(-values, 0) if not xrai else values.max() - values, config, not xrai)
    if config.polarity == "POSITIVE":
        negative = np.zeros_like(negative)
    elif config.polarity == "NEGATIVE":
        positive = np.zeros_like(positive)
    elif xrai:  # BOTH for regions: strength regardless of sign
        positive, negative = _scale(np.abs(values), config, False), np.zeros_like(positive)
    if config.type == "OUTLINES" and not xrai:
        positive, negative = _outline(positive > 0).astype(np.float32), _outline(negative > 0).astype(np.float32)

    strength = np.maximum(positive, negative)
    if config.color_map == "VIRIDIS":
        rgb = matplotlib.colormaps["viridis"](np.maximum(positive, negative))[..., :3]
        alpha = np.full(values.shape, 0.6)
    elif config.color_map == "PINK_WHITE_GREEN":
        rgb = matplotlib.colormaps["PiYG"](0.5 + 0.5 * (positive - negative))[..., :3]
        alpha = np.full(values.shape, 0.6)
    else:
        pos_color, neg_color = _TWO_SIDED[config.color_map]
        rgb = np.clip(positive[..., None] * pos_color + negative[..., None] * neg_color, 0, 1)
        alpha = strength

    base = np.asarray(image, np.float64)[..., :3]
    if config.overlay_type == "ORIGINAL":
        rgb = (1 - alpha[..., None]) * base + alpha[..., None] * rgb
    elif config.overlay_type == "GRAYSCALE":
        gray = np.repeat(base @ np.array([0.299, 0.587, 0.114])[:, None], 3, axis=-1)
        rgb = (1 - alpha[..., None]) * gray + alpha[..., None] * rgb
    elif config.overlay_type == "MASK_BLACK":  # attributions reveal the predictive parts only
        reveal = strength if config.type == "PIXELS" or xrai else ndimage.binary_fill_holes(strength > 0)
        rgb = base * np.asarray(reveal, np.float64)[..., None]
    return (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)


def encode_jpeg_b64(rgb: np.ndarray) -> str:
    """uint8 ``[H, W, 3]`` to base64 JPEG text (the ``b64_jpeg`` of a Vertex attribution)."""
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_jpeg_b64(text: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))).convert("RGB"))


def save_explanation_figure(image: np.ndarray, attribution_rgb: np.ndarray, path: str, title: str = "") -> str:
    """The lab's figure: input, feature attribution mask, and the mask over the input; as PNG."""
    image = np.asarray(image)
    image = image if image.dtype == np.uint8 else (np.clip(image, 0, 1) * 255).astype(np.uint8)
    # A bare Figure (no pyplot): no global state, so figures can be drawn from several threads.
    fig = Figure(figsize=(12, 4.4))
    axes = fig.subplots(1, 3)
    panels = [("Input image", image, None), ("Feature attribution mask", attribution_rgb, None),
              ("Overlaid attribution mask", image, attribution_rgb)]
    for ax, (name, first, second) in zip(axes, panels):
        ax.imshow(first)
        if second is not None:
            ax.imshow(second, alpha=0.6)
        ax.set_title(name)
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 0.94) if title else None)
    fig.savefig(path, format="png", dpi=100)
    return path
